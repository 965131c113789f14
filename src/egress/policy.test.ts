import { describe, expect, it } from 'vitest';
import { isBerthError } from '../errors.js';
import { compilePolicy, type EgressCredential, isCredentialHeader, PACKAGE_MANAGER_HOSTS } from './policy.js';

const credential = (overrides: Partial<EgressCredential> = {}): EgressCredential => ({
  id: 'vcrd_1',
  name: 'token',
  placeholder: 'berth_placeholder_abc',
  secret: 'real-secret-value',
  allowedHosts: ['api.example.com'],
  injection: { header: true, body: false },
  ...overrides,
});

describe('egress policy', () => {
  it('lets a limited environment reach exactly its allowed hosts, case-insensitively', () => {
    const policy = compilePolicy({
      networking: {
        type: 'limited',
        allowedHosts: ['API.Example.com', 'bücher.example'],
        allowPackageManagers: false,
      },
      credentials: [],
    });
    expect(policy.reachable('api.example.com').ok).toBe(true);
    expect(policy.reachable('xn--bcher-kva.example').ok).toBe(true);
    for (const host of [
      'example.com',
      'x.api.example.com',
      'api.example.com.evil.test',
      'evilapi.example.com',
    ]) {
      const result = policy.reachable(host);
      expect(result.ok, host).toBe(false);
      if (!result.ok) expect(result.reason).toContain('allowed_hosts');
    }
  });

  it('matches a *. entry on subdomains only, never the apex or a look-alike', () => {
    const policy = compilePolicy({
      networking: { type: 'limited', allowedHosts: ['*.example.com'], allowPackageManagers: false },
      credentials: [],
    });
    expect(policy.reachable('a.example.com').ok).toBe(true);
    expect(policy.reachable('a.b.example.com').ok).toBe(true);
    expect(policy.reachable('example.com').ok).toBe(false);
    expect(policy.reachable('badexample.com').ok).toBe(false);
  });

  it('opens the package registries only with allow_package_managers', () => {
    const closed = compilePolicy({
      networking: { type: 'limited', allowedHosts: [], allowPackageManagers: false },
      credentials: [],
    });
    const open = compilePolicy({
      networking: { type: 'limited', allowedHosts: [], allowPackageManagers: true },
      credentials: [],
    });
    for (const host of [
      'registry.npmjs.org',
      'pypi.org',
      'files.pythonhosted.org',
      'static.crates.io',
      'proxy.golang.org',
      'rubygems.org',
      'deb.debian.org',
      'us.archive.ubuntu.com',
      'codeload.github.com',
    ]) {
      expect(closed.reachable(host).ok, host).toBe(false);
      expect(open.reachable(host).ok, host).toBe(true);
    }
    expect(open.reachable('evil.example').ok).toBe(false);
    expect(PACKAGE_MANAGER_HOSTS).toContain('registry.npmjs.org');
  });

  it('applies a credential only on its own hosts; unrestricted ones everywhere', () => {
    const limited = credential();
    const wildcard = credential({
      id: 'vcrd_2',
      name: 'wild',
      placeholder: 'p2',
      secret: 's2-secret',
      allowedHosts: ['*.svc.example'],
    });
    const anywhere = credential({
      id: 'vcrd_3',
      name: 'any',
      placeholder: 'p3',
      secret: 's3-secret',
      allowedHosts: 'unrestricted',
    });
    const policy = compilePolicy({
      networking: { type: 'unrestricted' },
      credentials: [limited, wildcard, anywhere],
    });
    expect(policy.credentialsFor('api.example.com').map((entry) => entry.name)).toEqual(['token', 'any']);
    expect(policy.credentialsFor('a.svc.example').map((entry) => entry.name)).toEqual(['wild', 'any']);
    expect(policy.credentialsFor('svc.example').map((entry) => entry.name)).toEqual(['any']);
    expect(policy.credentialsFor('other.example').map((entry) => entry.name)).toEqual(['any']);
  });

  it('refuses a credential whose placeholder would give its secret away', () => {
    for (const bad of [
      credential({ secret: '' }),
      credential({ placeholder: '' }),
      credential({ placeholder: 'x-real-secret-value-x' }),
      credential({ secret: 'abc-berth_placeholder_abc-def' }),
    ]) {
      let thrown: unknown;
      try {
        compilePolicy({ networking: { type: 'unrestricted' }, credentials: [bad] });
      } catch (error) {
        thrown = error;
      }
      expect(isBerthError(thrown, 'invalid_request')).toBe(true);
      expect(String((thrown as Error).message)).not.toContain(bad.secret || 'never');
    }
  });
  it('swaps placeholders only into headers that carry credentials', () => {
    for (const name of ['authorization', 'cookie', 'x-api-key', 'api-key', 'private-token', 'x-auth-token'])
      expect(isCredentialHeader(name), name).toBe(true);
    for (const name of ['x-note', 'user-agent', 'referer', 'x-comment', 'content-type'])
      expect(isCredentialHeader(name), name).toBe(false);
  });

  it('scans every host for secrets of 8 bytes or more, and shorter ones only on credential hosts', () => {
    const compiled = compilePolicy({
      networking: { type: 'unrestricted' },
      credentials: [
        credential(),
        credential({ id: 'vcrd_2', placeholder: 'berth_placeholder_short', secret: 'abc' }),
      ],
      withheld: [
        { id: 'vcrd_3', secret: 'mcp-token-value' },
        { id: 'vcrd_4', secret: 'pw' },
      ],
    });
    expect(compiled.responseSwaps.map((swap) => swap.to)).toEqual([
      'berth_placeholder_abc',
      'berth_placeholder_short',
      'berth_withheld_vcrd_3',
      'berth_withheld_vcrd_4',
    ]);
    expect(compiled.responseSwapsEverywhere.map((swap) => swap.to)).toEqual([
      'berth_placeholder_abc',
      'berth_withheld_vcrd_3',
    ]);
  });
});
