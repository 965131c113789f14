import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createServer as createHttpServer } from 'node:http';
import { createServer as createHttpsServer } from 'node:https';
import { type AddressInfo, createServer as createNetServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { gunzipSync, gzipSync } from 'node:zlib';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  connectVia,
  curl,
  requestText,
  startBridge,
  startHttpUpstream,
  startUpstream,
  tlsVia,
  type Upstream,
  viaProxy,
} from '../../test/support/egress-harness.js';
import { createCertificateAuthority } from './certificates.js';
import type { EgressCredential, EgressPolicy } from './policy.js';
import { createEgressProxy, type EgressAuditRecord, type EgressProxy } from './proxy.js';

const SECRET = 'sk-live-canary-5f3a9c1e7d';
const PLACEHOLDER = 'berth_placeholder_0123456789abcdef';
const HEADER_ONLY_SECRET = 'ghp_headeronly_canary_91b2';
const HEADER_ONLY_PLACEHOLDER = 'berth_placeholder_headeronly_77';
const ELSEWHERE_SECRET = 'elsewhere-canary-secret-3c4d';
const ELSEWHERE_PLACEHOLDER = 'berth_placeholder_elsewhere_55';
const SECRETS = [SECRET, HEADER_ONLY_SECRET, ELSEWHERE_SECRET];

const hasCurl = await curl(['--version']).then((result) => result.code === 0);

describe('egress proxy: TLS interception and placeholders', () => {
  let directory: string;
  let upstreamCaPem: string;
  let api: Upstream;
  let shady: Upstream;
  let plain: Upstream;
  let proxy: EgressProxy;
  /** Everything a sandbox client saw in these tests: scanned for secrets at the end. */
  const sandboxSaw: string[] = [];
  const records: EgressAuditRecord[] = [];
  const token: EgressCredential = {
    id: 'vcrd_1',
    name: 'api-token',
    placeholder: PLACEHOLDER,
    secret: SECRET,
    allowedHosts: ['api.test', 'wrong-name.test', 'shady.test'],
    injection: { header: true, body: true },
  };
  const headerOnly: EgressCredential = {
    id: 'vcrd_2',
    name: 'header-only-token',
    placeholder: HEADER_ONLY_PLACEHOLDER,
    secret: HEADER_ONLY_SECRET,
    allowedHosts: ['api.test'],
    injection: { header: true, body: false },
  };
  const elsewhere: EgressCredential = {
    id: 'vcrd_3',
    name: 'elsewhere-token',
    placeholder: ELSEWHERE_PLACEHOLDER,
    secret: ELSEWHERE_SECRET,
    allowedHosts: ['other.test'],
    injection: { header: true, body: true },
  };
  const policy: EgressPolicy = {
    networking: {
      type: 'limited',
      allowedHosts: ['api.test', 'wrong-name.test', 'shady.test', 'plain.test', 'other.test'],
      allowPackageManagers: false,
    },
    credentials: [token, headerOnly, elsewhere],
  };

  const see = <T>(value: T): T => {
    sandboxSaw.push(JSON.stringify(value));
    return value;
  };

  beforeAll(async () => {
    directory = mkdtempSync(join(tmpdir(), 'berth-egress-tls-'));
    const upstreamCa = await createCertificateAuthority('upstream test CA');
    upstreamCaPem = upstreamCa.certificatePem;
    const stranger = await createCertificateAuthority('a CA nobody trusts');
    const apiCertificate = await upstreamCa.issue('api.test');
    const shadyCertificate = await stranger.issue('shady.test');
    api = await startUpstream(
      createHttpsServer({ cert: apiCertificate.certificatePem, key: apiCertificate.keyPem }),
      (request, response, seen) => {
        if (request.url === '/echo-everywhere') {
          // Echo the secret in headers (also repeated ones), in the status text and in a body
          // whose chunks split it, gzip-compressed although nobody asked for it.
          const echoed = String(request.headers.authorization ?? '');
          const body = gzipSync(`start ${echoed} middle ${seen.body} end`);
          response.writeHead(200, `OK ${echoed}`, {
            'content-type': 'text/plain',
            'content-encoding': 'gzip',
            'content-length': body.length,
            'x-echo': echoed,
            'set-cookie': [`a=${echoed}`, 'b=plain'],
          });
          const third = Math.floor(body.length / 3);
          response.write(body.subarray(0, third));
          setTimeout(() => {
            response.write(body.subarray(third, 2 * third));
            response.end(body.subarray(2 * third));
          }, 10);
          return;
        }
        if (request.url === '/redirect') {
          response.writeHead(302, { location: `http://plain.test:${plain.port}/stolen` });
          response.end();
          return;
        }
        response.writeHead(200, {
          'content-type': 'text/plain',
          'x-echo': String(request.headers.authorization ?? ''),
        });
        response.end(`you sent: ${request.headers.authorization ?? ''} / ${seen.body}`);
      },
    );
    shady = await startUpstream(
      createHttpsServer({ cert: shadyCertificate.certificatePem, key: shadyCertificate.keyPem }),
    );
    plain = await startHttpUpstream();
    proxy = await createEgressProxy({
      socketPath: join(directory, 'egress.sock'),
      label: 'sesn_test',
      policy,
      onRequest: (record) => records.push(record),
      allowPrivateDestinations: [api.port, shady.port, plain.port].map((port) => `127.0.0.1:${port}`),
      upstreamCaCertificates: [upstreamCaPem],
      resolve: async () => ['127.0.0.1'],
    });
  });

  afterAll(async () => {
    await proxy?.close();
    for (const upstream of [api, shady, plain]) await upstream?.close();
    rmSync(directory, { recursive: true, force: true });
  });

  it('a client trusting the session CA sends the placeholder and the upstream receives the secret', async () => {
    const result = see(
      await tlsVia(
        proxy.socketPath,
        'api.test',
        api.port,
        [proxy.caCertificatePem],
        requestText('api.test', {
          headers: {
            authorization: `Bearer ${PLACEHOLDER}`,
            'x-api-key': `token ${HEADER_ONLY_PLACEHOLDER}`,
            'x-note': `note ${PLACEHOLDER}`,
          },
        }),
      ),
    );
    if ('error' in result) throw new Error(result.error);
    expect(result.status).toBe(200);
    const seen = api.seen.at(-1)!;
    expect(seen.headers.authorization).toBe(`Bearer ${SECRET}`);
    expect(seen.headers['x-api-key']).toBe(`token ${HEADER_ONLY_SECRET}`);
    // Only headers that carry credentials get the secret; any other keeps the placeholder.
    expect(seen.headers['x-note']).toBe(`note ${PLACEHOLDER}`);
    expect(seen.headers.host).toBe(`api.test:${api.port}`);
    // The sandbox saw a certificate for api.test from the session's CA, not the upstream's.
    expect(result.certificate.subject.CN).toBe('api.test');
    expect(result.certificate.issuer.CN).toContain('Berth egress CA sesn_test');
    expect(records.at(-1)).toMatchObject({
      method: 'POST',
      host: 'api.test',
      port: api.port,
      path: '/',
      tls: 'intercepted',
      status: 200,
      decision: 'allowed',
    });
    expect(records.at(-1)!.credentials.sort()).toEqual(['api-token', 'header-only-token']);
  });

  it('shows the sandbox only the placeholder when the upstream echoes the secret in headers and body', async () => {
    const result = see(
      await tlsVia(
        proxy.socketPath,
        'api.test',
        api.port,
        [proxy.caCertificatePem],
        requestText('api.test', {
          path: '/echo-everywhere',
          headers: { authorization: `Bearer ${PLACEHOLDER}`, 'accept-encoding': 'gzip, br' },
          body: `{"token":"${PLACEHOLDER}"}`,
        }),
      ),
    );
    if ('error' in result) throw new Error(result.error);
    const seen = api.seen.at(-1)!;
    expect(seen.headers.authorization).toBe(`Bearer ${SECRET}`);
    // Asked upstream for an uncompressed body, so it can be checked.
    expect(seen.headers['accept-encoding']).toBeUndefined();
    expect(result.status).toBe(200);
    expect(result.headers).toContain(`x-echo: Bearer ${PLACEHOLDER}`);
    expect(result.headers).toContain(`set-cookie: a=Bearer ${PLACEHOLDER}`);
    expect(result.headers).toContain(`200 OK Bearer ${PLACEHOLDER}`);
    // The body arrives decoded (the upstream compressed it anyway), with the placeholder.
    expect(result.headers).not.toMatch(/content-encoding/i);
    expect(result.body).toContain(`start Bearer ${PLACEHOLDER} middle {"token":"${PLACEHOLDER}"} end`);
    expect(result.response).not.toContain(SECRET);
  });

  it('swaps a placeholder in a chunked request body wherever the chunks split it, and sends a content-length', async () => {
    const body = `grant_type=client_credentials&client_secret=${PLACEHOLDER}&again=${PLACEHOLDER}`;
    const at = body.indexOf(PLACEHOLDER) + 7;
    const answer = see(
      await viaProxy(proxy.socketPath, `http://api.test:${plain.port}/token`, {
        headers: { 'content-type': 'application/x-www-form-urlencoded' },
        body: [body.slice(0, at), body.slice(at, at + 5), body.slice(at + 5)],
      }),
    );
    expect(answer.status).toBe(200);
    const seen = plain.seen.at(-1)!;
    const expected = body.replaceAll(PLACEHOLDER, SECRET);
    expect(seen.body).toBe(expected);
    expect(seen.headers['content-length']).toBe(String(Buffer.byteLength(expected)));
    expect(seen.headers['transfer-encoding']).toBeUndefined();
    expect(answer.body).not.toContain(SECRET);
    expect(records.at(-1)).toMatchObject({ host: 'api.test', tls: 'none', credentials: ['api-token'] });
  });

  it('leaves a placeholder in the body when its credential injects into headers only', async () => {
    const answer = see(
      await viaProxy(proxy.socketPath, `http://api.test:${plain.port}/`, {
        body: `x=${HEADER_ONLY_PLACEHOLDER}`,
      }),
    );
    expect(answer.status).toBe(200);
    expect(plain.seen.at(-1)!.body).toBe(`x=${HEADER_ONLY_PLACEHOLDER}`);
    expect(records.at(-1)!.credentials).toEqual([]);
  });

  it('answers 413 when a body it must scan is over the cap, without reaching the upstream', async () => {
    const capped = await createEgressProxy({
      socketPath: join(directory, 'capped.sock'),
      policy,
      allowPrivateDestinations: [`127.0.0.1:${plain.port}`],
      resolve: async () => ['127.0.0.1'],
      limits: { maxInjectedBodyBytes: 1024 },
    });
    try {
      const before = plain.seen.length;
      const declared = see(
        await viaProxy(capped.socketPath, `http://api.test:${plain.port}/`, { body: 'x'.repeat(2000) }),
      );
      expect(declared.status).toBe(413);
      expect(declared.body).toContain('limited to 1024 bytes');
      const chunked = see(
        await viaProxy(capped.socketPath, `http://api.test:${plain.port}/`, {
          body: ['x'.repeat(800), 'y'.repeat(800)],
        }),
      );
      expect(chunked.status).toBe(413);
      expect(plain.seen.length).toBe(before);
      // Hosts without a body-injected credential stream any size.
      const other = await viaProxy(capped.socketPath, `http://plain.test:${plain.port}/`, {
        body: 'z'.repeat(5000),
      });
      expect(other.status).toBe(200);
    } finally {
      await capped.close();
    }
  });

  it('forwards a placeholder unchanged to a host where its credential does not apply', async () => {
    const plainHost = see(
      await viaProxy(proxy.socketPath, `http://plain.test:${plain.port}/`, {
        headers: { authorization: `Bearer ${PLACEHOLDER}` },
        body: `token=${PLACEHOLDER}`,
      }),
    );
    expect(plainHost.status).toBe(200);
    expect(plain.seen.at(-1)!.headers.authorization).toBe(`Bearer ${PLACEHOLDER}`);
    expect(plain.seen.at(-1)!.body).toBe(`token=${PLACEHOLDER}`);
    // On an intercepted host, another credential's placeholder stays what it is.
    const result = see(
      await tlsVia(
        proxy.socketPath,
        'api.test',
        api.port,
        [proxy.caCertificatePem],
        requestText('api.test', { headers: { authorization: `Bearer ${ELSEWHERE_PLACEHOLDER}` } }),
      ),
    );
    if ('error' in result) throw new Error(result.error);
    expect(api.seen.at(-1)!.headers.authorization).toBe(`Bearer ${ELSEWHERE_PLACEHOLDER}`);
    expect(records.at(-1)!.credentials).toEqual([]);
  });

  it('refuses an upstream whose certificate comes from an untrusted CA, and never falls back', async () => {
    const result = see(
      await tlsVia(
        proxy.socketPath,
        'shady.test',
        shady.port,
        [proxy.caCertificatePem],
        requestText('shady.test', { headers: { authorization: `Bearer ${PLACEHOLDER}` } }),
      ),
    );
    if ('error' in result) throw new Error(result.error);
    expect(result.status).toBe(502);
    expect(result.body).toContain('TLS certificate of shady.test did not verify');
    expect(shady.seen).toEqual([]);
    expect(records.at(-1)).toMatchObject({ host: 'shady.test', status: 502, tls: 'intercepted' });
  });

  it('refuses an upstream whose certificate names another host', async () => {
    // wrong-name.test resolves to the api.test server, whose certificate names only api.test.
    const before = api.seen.length;
    const result = see(
      await tlsVia(
        proxy.socketPath,
        'wrong-name.test',
        api.port,
        [proxy.caCertificatePem],
        requestText('wrong-name.test', { headers: { authorization: `Bearer ${PLACEHOLDER}` } }),
      ),
    );
    if ('error' in result) throw new Error(result.error);
    expect(result.status).toBe(502);
    expect(result.body).toContain('ERR_TLS_CERT_ALTNAME_INVALID');
    expect(api.seen.length).toBe(before);
  });

  it('refuses a request inside a tunnel that names another host than the tunnel', async () => {
    const before = api.seen.length;
    for (const text of [
      requestText('plain.test', { headers: { authorization: `Bearer ${PLACEHOLDER}` } }),
      requestText('api.test', {
        path: `http://plain.test:${plain.port}/`,
        headers: { authorization: `Bearer ${PLACEHOLDER}` },
      }),
    ]) {
      const result = see(
        await tlsVia(proxy.socketPath, 'api.test', api.port, [proxy.caCertificatePem], text),
      );
      if ('error' in result) throw new Error(result.error);
      expect(result.status).toBe(403);
      expect(result.body).toContain('names host plain.test but its tunnel goes to api.test');
    }
    expect(api.seen.length).toBe(before);
  });

  it('does not follow redirects: a redirect to another host carries only the placeholder', async () => {
    const before = plain.seen.length;
    const result = see(
      await tlsVia(
        proxy.socketPath,
        'api.test',
        api.port,
        [proxy.caCertificatePem],
        requestText('api.test', {
          method: 'GET',
          path: '/redirect',
          headers: { authorization: `Bearer ${PLACEHOLDER}` },
        }),
      ),
    );
    if ('error' in result) throw new Error(result.error);
    expect(result.status).toBe(302);
    expect(plain.seen.length).toBe(before);
    const location = /location: (\S+)/.exec(result.headers)![1]!;
    const followed = see(
      await viaProxy(proxy.socketPath, location, { headers: { authorization: `Bearer ${PLACEHOLDER}` } }),
    );
    expect(followed.status).toBe(200);
    expect(plain.seen.at(-1)!.headers.authorization).toBe(`Bearer ${PLACEHOLDER}`);
  });

  it('refuses to pass on a response whose encoding it cannot check for secrets', async () => {
    const odd = createHttpServer((_request, response) => {
      response.writeHead(200, { 'content-encoding': 'zstd' });
      response.end(`compressed? ${SECRET}`);
    });
    await new Promise<void>((resolve) => odd.listen(0, '127.0.0.1', resolve));
    const port = (odd.address() as AddressInfo).port;
    const checking = await createEgressProxy({
      socketPath: join(directory, 'odd.sock'),
      policy,
      allowPrivateDestinations: [`127.0.0.1:${port}`],
      resolve: async () => ['127.0.0.1'],
    });
    try {
      const answer = see(await viaProxy(checking.socketPath, `http://api.test:${port}/`));
      expect(answer.status).toBe(502);
      expect(answer.body).toContain('content-encoding the proxy cannot check for secrets');
      expect(answer.body).not.toContain(SECRET);
    } finally {
      await checking.close();
      odd.close();
    }
  });

  it('refuses a response in a transfer-coding other than chunked, so gzip bytes of a secret never pass', async () => {
    // An upstream that answers `Transfer-Encoding: gzip, chunked`: Node's parser undoes the
    // chunks only, so the body is gzip of the secret (what `gzip -dc` would reveal).
    const coded = createNetServer((socket) => {
      socket.on('error', () => undefined);
      socket.once('data', () => {
        const body = gzipSync(`the secret is ${SECRET}`);
        socket.end(
          Buffer.concat([
            Buffer.from(
              'HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: gzip, chunked\r\n' +
                `connection: close\r\n\r\n${body.length.toString(16)}\r\n`,
            ),
            body,
            Buffer.from('\r\n0\r\n\r\n'),
          ]),
        );
      });
    });
    await new Promise<void>((resolve) => coded.listen(0, '127.0.0.1', resolve));
    const port = (coded.address() as AddressInfo).port;
    const checking = await createEgressProxy({
      socketPath: join(directory, 'coded.sock'),
      policy,
      onRequest: (record) => records.push(record),
      allowPrivateDestinations: [`127.0.0.1:${port}`],
      resolve: async () => ['127.0.0.1'],
    });
    const unzipped = (bytes: Buffer) => {
      try {
        return gunzipSync(bytes).toString('latin1');
      } catch {
        return '';
      }
    };
    try {
      // The credential's host and a host with no credential alike.
      for (const host of ['api.test', 'plain.test']) {
        const answer = see(await viaProxy(checking.socketPath, `http://${host}:${port}/`));
        expect(unzipped(answer.bytes)).not.toContain(SECRET);
        expect(answer.status).toBe(502);
        expect(answer.body).toContain('transfer-encoding the proxy cannot check for secrets');
        expect(records.at(-1)).toMatchObject({ host, status: 502, decision: 'allowed', tls: 'none' });
        expect(records.at(-1)!.reason).toContain('transfer-encoding');
      }
    } finally {
      await checking.close();
      coded.close();
    }
  });

  it('never lets a secret stored by the credential host come back through another host', async () => {
    // A credential host that stores what it is sent (a header or the body) and a second host
    // that serves what was stored: the read-back trick.
    let stored = '';
    const notes = await startHttpUpstream((request, response, seen) => {
      if (request.url === '/store') {
        stored = `${request.headers['x-note'] ?? ''} | ${request.headers.authorization ?? ''} | ${seen.body}`;
        response.end('stored');
        return;
      }
      response.writeHead(200, { 'content-type': 'text/plain', 'x-stored': stored });
      response.end(`stored: ${stored}`);
    });
    const withheldToken = 'mcp-bearer-canary-secret-8d1f';
    const reading = await createEgressProxy({
      socketPath: join(directory, 'notes.sock'),
      policy: { ...policy, withheld: [{ id: 'vcrd_mcp', secret: withheldToken }] },
      allowPrivateDestinations: [`127.0.0.1:${notes.port}`],
      resolve: async () => ['127.0.0.1'],
    });
    try {
      const sent = see(
        await viaProxy(reading.socketPath, `http://api.test:${notes.port}/store`, {
          headers: { 'x-note': PLACEHOLDER, authorization: `Bearer ${PLACEHOLDER}` },
          body: `note=${PLACEHOLDER}`,
        }),
      );
      expect(sent.status).toBe(200);
      // X-Note is no credential header: the host stored the placeholder there. Authorization and
      // the body (this credential injects there too) carried the secret, as they should.
      expect(stored).toBe(`${PLACEHOLDER} | Bearer ${SECRET} | note=${SECRET}`);
      // Read back from a host with no credential (plain HTTP): scanned all the same.
      const readBack = see(await viaProxy(reading.socketPath, `http://plain.test:${notes.port}/read`));
      expect(readBack.status).toBe(200);
      expect(readBack.body).toBe(`stored: ${PLACEHOLDER} | Bearer ${PLACEHOLDER} | note=${PLACEHOLDER}`);
      expect(readBack.headers['x-stored']).toBe(
        `${PLACEHOLDER} | Bearer ${PLACEHOLDER} | note=${PLACEHOLDER}`,
      );
      // A secret the sandbox has no placeholder for (an MCP token Berth sends) is scanned for too.
      stored = `token ${withheldToken}`;
      const withheld = see(await viaProxy(reading.socketPath, `http://plain.test:${notes.port}/read`));
      expect(withheld.body).toBe('stored: token berth_withheld_vcrd_mcp');
      expect(withheld.body).not.toContain(withheldToken);
    } finally {
      await reading.close();
      await notes.close();
    }
  });

  it('reuses one upstream connection for consecutive intercepted requests', async () => {
    let connections = 0;
    const counting = () => {
      connections++;
    };
    api.server.on('secureConnection', counting);
    try {
      for (let index = 0; index < 3; index++) {
        const result = see(
          await tlsVia(
            proxy.socketPath,
            'api.test',
            api.port,
            [proxy.caCertificatePem],
            requestText('api.test'),
          ),
        );
        if ('error' in result) throw new Error(result.error);
        expect(result.status).toBe(200);
      }
      expect(connections).toBeLessThanOrEqual(1);
    } finally {
      api.server.off('secureConnection', counting);
    }
  });

  it.skipIf(!hasCurl)(
    'works for curl through a sandbox-like bridge (HTTPS intercepted, refused, plain HTTP)',
    async () => {
      const bridge = await startBridge(proxy.socketPath);
      const sessionCa = join(directory, 'session-ca.pem');
      writeFileSync(sessionCa, proxy.caCertificatePem);
      const proxyUrl = `http://127.0.0.1:${bridge.port}`;
      try {
        const intercepted = see(
          await curl([
            '-sS',
            '--proxy',
            proxyUrl,
            '--cacert',
            sessionCa,
            '-H',
            `Authorization: Bearer ${PLACEHOLDER}`,
            '--compressed',
            `https://api.test:${api.port}/from-curl`,
          ]),
        );
        expect(intercepted.stderr).toBe('');
        expect(intercepted.stdout).toBe(`you sent: Bearer ${PLACEHOLDER} / `);
        expect(api.seen.at(-1)).toMatchObject({ url: '/from-curl' });
        expect(api.seen.at(-1)!.headers.authorization).toBe(`Bearer ${SECRET}`);

        const refused = see(
          await curl([
            '-sS',
            '--proxy',
            proxyUrl,
            '--cacert',
            sessionCa,
            `https://denied.example:${api.port}/`,
          ]),
        );
        expect(refused.code).not.toBe(0);
        expect(refused.stderr).toMatch(/403/);

        // Plain HTTP through the same proxy variables.
        const viaHttp = see(
          await curl([
            '-sS',
            '--proxy',
            proxyUrl,
            '-H',
            `Authorization: Bearer ${PLACEHOLDER}`,
            `http://plain.test:${plain.port}/x`,
          ]),
        );
        expect(viaHttp.stdout).toBe(`you sent: Bearer ${PLACEHOLDER} / `);
        expect(plain.seen.at(-1)!.headers.authorization).toBe(`Bearer ${PLACEHOLDER}`);
      } finally {
        await bridge.close();
      }
    },
  );

  it('names credentials in audit records, never their values, and never shows a secret to the sandbox', () => {
    expect(records.length).toBeGreaterThan(10);
    const audit = JSON.stringify(records);
    const seenBySandbox = sandboxSaw.join('\n');
    for (const secret of SECRETS) {
      expect(audit).not.toContain(secret);
      expect(seenBySandbox).not.toContain(secret);
    }
    expect(records.some((record) => record.credentials.includes('api-token'))).toBe(true);
    // Completed handshakes are not reported as failed ones.
    expect(records.filter((record) => record.reason?.includes('did not complete'))).toEqual([]);
  });

  it('audits a client that does not trust the session CA (and sends it nothing)', async () => {
    const before = api.seen.length;
    const result = await tlsVia(
      proxy.socketPath,
      'api.test',
      api.port,
      [upstreamCaPem],
      requestText('api.test'),
    );
    expect('error' in result && result.error).toMatch(/self.signed|unable to|certificate/i);
    await expect
      .poll(() => records.at(-1))
      .toMatchObject({ method: 'CONNECT', host: 'api.test', tls: 'intercepted', status: 200 });
    expect(records.at(-1)!.reason).toContain('trust the session CA');
    expect(api.seen.length).toBe(before);
  });

  it('refuses CONNECT to a denied host before any TLS, and audits it', async () => {
    const tunnel = await connectVia(proxy.socketPath, `evil.example:${api.port}`);
    expect(tunnel.status).toBe(403);
    expect(records.at(-1)).toMatchObject({ method: 'CONNECT', host: 'evil.example', decision: 'denied' });
  });
});
