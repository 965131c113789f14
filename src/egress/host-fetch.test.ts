import { createServer, type IncomingHttpHeaders, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { gzipSync } from 'node:zlib';
import { afterEach, describe, expect, it } from 'vitest';
import { createDestinationRule } from './destinations.js';
import { createHostFetch, type HostFetch, Refusal } from './host-fetch.js';
import { compilePolicy, type EgressNetworking } from './policy.js';
import type { EgressAuditRecord } from './proxy.js';

interface Site {
  port: number;
  seen: { path: string; headers: IncomingHttpHeaders }[];
  close(): Promise<void>;
}

/** A loopback site that records requests; `redirect` answers every request with a 302 there. */
async function startSite(redirect?: () => string): Promise<Site> {
  const seen: Site['seen'] = [];
  const server: Server = createServer((request, response) => {
    seen.push({ path: request.url ?? '', headers: request.headers });
    if (redirect) {
      response.writeHead(302, { location: redirect() });
      response.end();
      return;
    }
    response.writeHead(200, { 'content-type': 'text/plain' });
    response.end(`page ${request.url}`);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    port: (server.address() as AddressInfo).port,
    seen,
    close: () => new Promise<void>((resolve) => server.close(() => resolve())),
  };
}

describe('host-side egress client', () => {
  const cleanups: (() => Promise<void>)[] = [];
  afterEach(async () => {
    for (const cleanup of cleanups.splice(0)) await cleanup();
  });

  /** A client where every `*.test` name resolves to 127.0.0.1 and only `allowedPorts` are excepted. */
  function client(options: { networking?: EgressNetworking; allowedPorts: number[] }) {
    const lookups: string[] = [];
    const audits: EgressAuditRecord[] = [];
    const hostFetch: HostFetch = createHostFetch({
      policy: compilePolicy({ networking: options.networking ?? { type: 'unrestricted' }, credentials: [] }),
      destinations: createDestinationRule({
        allowPrivateDestinations: options.allowedPorts.map((port) => `127.0.0.1:${port}`),
        resolve: async (host) => {
          lookups.push(host);
          return host.endsWith('.test') ? ['127.0.0.1'] : [];
        },
        resolveTimeoutMs: 1000,
      }),
      onRequest: (record) => audits.push(record),
    });
    cleanups.push(() => hostFetch.close());
    return { hostFetch, lookups, audits };
  }

  it('refuses a host outside a limited policy before looking the name up', async () => {
    const site = await startSite();
    cleanups.push(site.close);
    const { hostFetch, lookups, audits } = client({
      networking: { type: 'limited', allowedHosts: ['docs.test'], allowPackageManagers: false },
      allowedPorts: [site.port],
    });
    const refused = await hostFetch.fetch(`http://evil.test:${site.port}/x`).catch((error: unknown) => error);
    expect(refused).toBeInstanceOf(Refusal);
    expect((refused as Error).message).toMatch(/not in the environment's allowed_hosts/);
    expect(lookups).toEqual([]);
    expect(site.seen).toEqual([]);
    expect(audits).toMatchObject([{ host: 'evil.test', decision: 'denied', status: 403 }]);
    const allowed = await hostFetch.fetch(`http://docs.test:${site.port}/ok`);
    expect(await allowed.text()).toBe('page /ok');
  });

  it('refuses a name that resolves to a private address the operator did not allow', async () => {
    const site = await startSite();
    cleanups.push(site.close);
    const { hostFetch, audits } = client({ allowedPorts: [] });
    const refused = await hostFetch
      .fetch(`http://inside.test:${site.port}/`)
      .catch((error: unknown) => error);
    expect((refused as Error).message).toMatch(/resolves to 127\.0\.0\.1, which is on a private/);
    expect(site.seen).toEqual([]);
    expect(audits.at(-1)).toMatchObject({ decision: 'denied', status: 403 });
  });

  it('checks every redirect hop: a redirect to a private address is refused, the target never hit', async () => {
    const hidden = await startSite();
    const bouncer = await startSite(() => `http://127.0.0.1:${hidden.port}/admin`);
    cleanups.push(hidden.close, bouncer.close);
    const { hostFetch, audits } = client({ allowedPorts: [bouncer.port] });
    const refused = await hostFetch
      .fetch(`http://bouncer.test:${bouncer.port}/`)
      .catch((error: unknown) => error);
    expect(refused).toBeInstanceOf(Refusal);
    expect(bouncer.seen).toHaveLength(1);
    expect(hidden.seen).toEqual([]);
    expect(audits.map((record) => [record.status, record.decision])).toEqual([
      [302, 'allowed'],
      [403, 'denied'],
    ]);
  });

  it('sends a credential only to its host: never across a redirect, nor the caller\u2019s own header', async () => {
    const other = await startSite();
    const first = await startSite(() => `http://other.test:${other.port}/landing`);
    cleanups.push(other.close, first.close);
    const { hostFetch, audits } = client({ allowedPorts: [first.port, other.port] });
    const response = await hostFetch.fetch(`http://first.test:${first.port}/`, {
      headers: { authorization: 'Bearer callers-own', cookie: 'a=b' },
      credentialFor: (url) =>
        url.hostname === 'first.test' ? { authorization: 'Bearer vaulted', name: 'First' } : undefined,
    });
    expect(await response.text()).toBe('page /landing');
    expect(first.seen[0]!.headers.authorization).toBe('Bearer vaulted');
    expect(other.seen[0]!.headers.authorization).toBeUndefined();
    expect(other.seen[0]!.headers.cookie).toBeUndefined();
    expect(audits.map((record) => record.credentials)).toEqual([['First'], []]);
  });

  it('audits the body bytes that really came for chunked, streamed and compressed answers', async () => {
    const compressed = gzipSync('z'.repeat(50_000));
    const server = createServer((request, response) => {
      if (request.url === '/gzip') {
        response.writeHead(200, { 'content-type': 'text/plain', 'content-encoding': 'gzip' });
        response.end(compressed);
        return;
      }
      // Chunked, no content-length, written over time like a stream.
      response.writeHead(200, { 'content-type': 'text/plain' });
      let sent = 0;
      const next = () => {
        if (sent === 3) return void response.end();
        sent++;
        response.write('x'.repeat(1000), () => setTimeout(next, 5));
      };
      next();
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    const port = (server.address() as AddressInfo).port;
    cleanups.push(() => new Promise<void>((resolve) => server.close(() => resolve())));
    const { hostFetch, audits } = client({ allowedPorts: [port] });
    const streamed = await hostFetch.fetch(`http://stream.test:${port}/stream`);
    expect((await streamed.text()).length).toBe(3000);
    await expect.poll(() => audits.at(-1)?.bytesReceived).toBe(3000);
    // Bytes on the wire: the compressed body, not what it decodes to.
    const zipped = await hostFetch.fetch(`http://stream.test:${port}/gzip`);
    expect((await zipped.text()).length).toBe(50_000);
    await expect.poll(() => audits.at(-1)?.path).toBe('/gzip');
    expect(audits.at(-1)!.bytesReceived).toBe(compressed.length);
  });

  it('lets a caller abort a scanned answer mid-body without an uncaught error', async () => {
    // An MCP client closing its event stream aborts a fetch whose body is still coming.
    const server = createServer((_request, response) => {
      response.writeHead(200, { 'content-type': 'text/event-stream' });
      // Longer than the secret: the scan holds back only a secret's length of the tail.
      response.write(`data: first ${'x'.repeat(100)}\n\n`);
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    const port = (server.address() as AddressInfo).port;
    cleanups.push(
      () =>
        new Promise<void>((resolve) => {
          server.closeAllConnections();
          server.close(() => resolve());
        }),
    );
    const uncaught: unknown[] = [];
    const onUncaught = (error: unknown) => uncaught.push(error);
    process.on('uncaughtException', onUncaught);
    cleanups.push(async () => void process.off('uncaughtException', onUncaught));
    const hostFetch = createHostFetch({
      policy: compilePolicy({ networking: { type: 'unrestricted' }, credentials: [] }),
      destinations: createDestinationRule({
        allowPrivateDestinations: [`127.0.0.1:${port}`],
        resolve: async () => ['127.0.0.1'],
        resolveTimeoutMs: 1000,
      }),
      onRequest: () => undefined,
      responseSwaps: [{ from: 'a-vault-secret', to: 'berth_withheld_x' }],
    });
    cleanups.push(() => hostFetch.close());
    const controller = new AbortController();
    const response = await hostFetch.fetch(`http://events.test:${port}/`, { signal: controller.signal });
    const reader = response.body!.getReader();
    expect(new TextDecoder().decode((await reader.read()).value)).toContain('first');
    controller.abort();
    await expect(reader.read()).rejects.toThrow();
    // Give an unhandled stream error its turn to surface.
    await new Promise((resolve) => setTimeout(resolve, 100));
    expect(uncaught).toEqual([]);
  });

  it('stops after too many redirects', async () => {
    let loop: Site | undefined;
    loop = await startSite(() => `http://loop.test:${loop!.port}/again`);
    cleanups.push(loop.close);
    const { hostFetch } = client({ allowedPorts: [loop.port] });
    const refused = await hostFetch.fetch(`http://loop.test:${loop.port}/`).catch((error: unknown) => error);
    expect((refused as Error).message).toMatch(/more than 5 redirects/);
    expect(loop.seen).toHaveLength(6);
  });

  it('refuses schemes other than http and https', async () => {
    const { hostFetch } = client({ allowedPorts: [] });
    const refused = await hostFetch.fetch('file:///etc/passwd').catch((error: unknown) => error);
    expect((refused as Error).message).toMatch(/only http and https/);
  });
});
