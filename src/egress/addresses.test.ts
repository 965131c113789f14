import { describe, expect, it } from 'vitest';
import { canonicalHost, destinationKey, isPublicAddress, parseAuthority } from './addresses.js';

describe('egress addresses', () => {
  it('reads odd spellings of an IPv4 address as the address they are', () => {
    for (const spelling of [
      '0x7f.1',
      '2130706433',
      '017700000001',
      '127.1',
      '0x7f000001',
      '127.0.0.1.',
      '%31%32%37.0.0.1',
    ]) {
      expect(canonicalHost(spelling), spelling).toBe('127.0.0.1');
    }
    expect(canonicalHost('[0:0:0:0:0:ffff:7f00:1]')).toBe('::ffff:7f00:1');
    expect(canonicalHost('[::ffff:127.0.0.1]')).toBe('::ffff:7f00:1');
    expect(canonicalHost('API.Example.COM.')).toBe('api.example.com');
    expect(canonicalHost('bücher.example')).toBe('xn--bcher-kva.example');
  });

  it('refuses hosts that smuggle user info, paths or spaces', () => {
    for (const bad of [
      'user@evil.example',
      'a b.example',
      'evil.example/path',
      'evil.example?x',
      'evil.example#x',
      '',
      'a\\b',
      '1.2.3.4.5',
    ]) {
      expect(canonicalHost(bad), bad).toBeUndefined();
    }
  });

  it('parses CONNECT targets into a canonical host and a port', () => {
    expect(parseAuthority('Example.com:443', 443)).toEqual({ host: 'example.com', port: 443 });
    expect(parseAuthority('example.com', 443)).toEqual({ host: 'example.com', port: 443 });
    expect(parseAuthority('[::1]:8443', 443)).toEqual({ host: '::1', port: 8443 });
    expect(parseAuthority('2130706433:22', 443)).toEqual({ host: '127.0.0.1', port: 22 });
    for (const bad of [
      'example.com:0',
      'example.com:65536',
      'example.com:+443',
      'a@example.com:443',
      '::1:443',
      '[::1',
      'example.com:443/x',
    ]) {
      expect(parseAuthority(bad, 443), bad).toBeUndefined();
    }
  });

  it('treats only public internet addresses as public', () => {
    const refused = [
      '127.0.0.1',
      '127.255.255.254',
      '0.0.0.0',
      '10.1.2.3',
      '172.16.0.1',
      '172.31.255.255',
      '192.168.1.1',
      '169.254.169.254', // cloud metadata
      '169.254.0.1',
      '100.64.0.1', // CGNAT
      '100.127.255.254',
      '224.0.0.1',
      '239.255.255.250',
      '255.255.255.255',
      '240.0.0.1',
      '192.0.2.1',
      '198.18.0.1',
      '::',
      '::1',
      '0:0:0:0:0:0:0:1',
      'fe80::1',
      'fe80::1%eth0',
      'fc00::1',
      'fd12:3456::1',
      'ff02::1',
      'fec0::1',
      '::ffff:127.0.0.1', // IPv4-mapped loopback
      '::ffff:7f00:1',
      '::ffff:169.254.169.254',
      '::ffff:10.0.0.1',
      '::127.0.0.1', // IPv4-compatible (deprecated)
      '::ffff:0:127.0.0.1', // SIIT
      '64:ff9b::127.0.0.1', // NAT64 of loopback
      '64:ff9b::a9fe:a9fe', // NAT64 of metadata
      '64:ff9b:1::8.8.8.8', // local-use NAT64
      '2002:7f00:1::1', // 6to4 of loopback
      '2002:a9fe:a9fe::1', // 6to4 of metadata
      '2001:0:4136:e378:8000:63bf:3fff:fdd2', // Teredo
      '2001:db8::1', // documentation
      'not-an-address',
      '',
    ];
    for (const address of refused) expect(isPublicAddress(address), address).toBe(false);
    const allowed = [
      '93.184.216.34',
      '8.8.8.8',
      '1.1.1.1',
      '2606:4700::1111',
      '2a00:1450:4001::200e',
      '::ffff:8.8.8.8',
      '64:ff9b::808:808',
      '2002:808:808::1',
    ];
    for (const address of allowed) expect(isPublicAddress(address), address).toBe(true);
  });

  it('reads operator allow-list entries as an exact address and port', () => {
    expect(destinationKey('127.0.0.1:8080')).toBe('127.0.0.1:8080');
    expect(destinationKey('[0:0::1]:8080')).toBe('[::1]:8080');
    expect(destinationKey(' 10.0.0.5:443 ')).toBe('10.0.0.5:443');
    for (const bad of ['127.0.0.1', 'localhost:80', '127.0.0.1:0', '::1:80', 'x']) {
      expect(destinationKey(bad), bad).toBeUndefined();
    }
  });
});
