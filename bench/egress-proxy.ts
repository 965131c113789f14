/**
 * Added latency of the egress proxy (issue 4), on loopback: the same request timed directly and
 * through a session's proxy, for plain HTTP (a 2-byte and a 1 MiB answer, both scanned for the
 * session's secret although the host has no credential), HTTPS passed through (CONNECT tunnel,
 * the proxy never opens it) and HTTPS intercepted with a credential's placeholder swapped in. Each sample
 * is one request on a fresh connection (what a sandboxed `curl` does); direct and proxied
 * requests alternate so both see the same machine load.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { createServer as createHttpServer, request as httpRequest, type Server } from 'node:http';
import {
  createServer as createHttpsServer,
  Agent as HttpsAgent,
  type RequestOptions as HttpsRequestOptions,
  request as httpsRequest,
} from 'node:https';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Duplex } from 'node:stream';
import { connect as tlsConnect } from 'node:tls';
import { createCertificateAuthority } from '../src/egress/certificates.js';
import { createEgressProxy } from '../src/egress/proxy.js';
import { ms, type Summary, summarize, table } from './stats.js';

export const TARGET_PASSTHROUGH_ADDED_P50_MS = 2;

/** An agent whose connections are TLS over a CONNECT tunnel through the proxy (kept alive). */
class TunnelAgent extends HttpsAgent {
  constructor(
    private readonly socketPath: string,
    private readonly roots: string[],
  ) {
    super({ keepAlive: true, maxSockets: 1 });
  }

  override createConnection(
    options: HttpsRequestOptions,
    callback?: (error: Error | null, stream: Duplex) => void,
  ): Duplex | null | undefined {
    const connect = httpRequest({
      socketPath: this.socketPath,
      method: 'CONNECT',
      path: `${options.servername}:${options.port}`,
    });
    connect.on('connect', (response, socket) => {
      if (response.statusCode !== 200) {
        callback?.(new Error(`CONNECT ${response.statusCode}`), socket);
        return;
      }
      const tls = tlsConnect({ socket, servername: options.servername ?? undefined, ca: this.roots });
      tls.once('secureConnect', () => callback?.(null, tls));
      tls.once('error', (error) => callback?.(error, tls));
    });
    connect.on('error', (error) => callback?.(error, connect.socket as Duplex));
    connect.end();
    return undefined;
  }
}

export interface EgressBenchRow {
  mode: string;
  direct: Summary;
  proxied: Summary;
  /** p50 and p99 of proxied minus the same percentile direct. */
  addedP50: number;
  addedP99: number;
}

const PLACEHOLDER = 'berth_placeholder_bench';
const SECRET = 'bench-secret-value';

/** The body of `/large`: 1 MiB of text, to show what scanning a response costs per byte. */
const LARGE_BODY = Buffer.from(
  'lorem ipsum dolor sit amet, consectetur adipiscing elit. '.repeat(18_400),
).subarray(0, 1024 * 1024);

function answer(server: Server): void {
  server.on('request', (request, response) => {
    if (request.url === '/large') {
      response.writeHead(200, { 'content-type': 'text/plain', 'content-length': String(LARGE_BODY.length) });
      response.end(LARGE_BODY);
      return;
    }
    response.writeHead(200, { 'content-type': 'text/plain', 'content-length': '2' });
    response.end('ok');
  });
}

async function listen(server: Server): Promise<number> {
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return (server.address() as AddressInfo).port;
}

/** Reads a response to its end; rejects on a status other than 200. */
function drain(response: import('node:http').IncomingMessage): Promise<void> {
  return new Promise((resolve, reject) => {
    if (response.statusCode !== 200) reject(new Error(`status ${response.statusCode}`));
    response.resume();
    response.on('end', resolve);
  });
}

export interface EgressBenchResults {
  rows: EgressBenchRow[];
  /** Minting a leaf certificate for a new host (ECDSA P-256 key + signature), p50 and p99 ms. */
  leafMint: Summary;
}

export async function runEgressBench(requests = 300): Promise<EgressBenchResults> {
  const directory = await mkdtemp(join(tmpdir(), 'berth-egress-bench-'));
  const ca = await createCertificateAuthority('bench upstream');
  const leaf = await ca.issue('api.test');
  const plain = createHttpServer();
  answer(plain);
  const secure = createHttpsServer({ cert: leaf.certificatePem, key: leaf.keyPem });
  answer(secure);
  const plainPort = await listen(plain);
  const securePort = await listen(secure);
  const proxy = await createEgressProxy({
    socketPath: join(directory, 'egress.sock'),
    label: 'bench',
    policy: {
      networking: { type: 'limited', allowedHosts: ['api.test', 'open.test'], allowPackageManagers: false },
      credentials: [
        {
          id: 'vcrd_bench',
          name: 'bench',
          placeholder: PLACEHOLDER,
          secret: SECRET,
          allowedHosts: ['api.test'],
          injection: { header: true, body: false },
        },
      ],
    },
    allowPrivateDestinations: [`127.0.0.1:${plainPort}`, `127.0.0.1:${securePort}`],
    upstreamCaCertificates: [ca.certificatePem],
    resolve: async () => ['127.0.0.1'],
  });
  const roots = [ca.certificatePem, proxy.caCertificatePem];

  const directPlain = (path: string) => () =>
    new Promise<void>((resolve, reject) => {
      const request = httpRequest({ host: '127.0.0.1', port: plainPort, path, agent: false }, (response) =>
        drain(response).then(resolve, reject),
      );
      request.on('error', reject);
      request.end();
    });
  const proxiedPlain = (path: string) => () =>
    new Promise<void>((resolve, reject) => {
      const request = httpRequest(
        {
          socketPath: proxy.socketPath,
          path: `http://open.test:${plainPort}${path}`,
          headers: { host: `open.test:${plainPort}` },
          agent: false,
        },
        (response) => drain(response).then(resolve, reject),
      );
      request.on('error', reject);
      request.end();
    });
  const directTls = () =>
    new Promise<void>((resolve, reject) => {
      const request = httpsRequest(
        {
          host: '127.0.0.1',
          port: securePort,
          servername: 'api.test',
          path: '/',
          ca: roots,
          agent: false,
          headers: { authorization: `Bearer ${SECRET}` },
        },
        (response) => drain(response).then(resolve, reject),
      );
      request.on('error', reject);
      request.end();
    });
  /** HTTPS over a CONNECT tunnel to `host` (api.test is intercepted, open.test passes through). */
  const proxiedTls = (host: string) => () =>
    new Promise<void>((resolve, reject) => {
      const connect = httpRequest({
        socketPath: proxy.socketPath,
        method: 'CONNECT',
        path: `${host}:${securePort}`,
      });
      connect.on('connect', (response, socket) => {
        if (response.statusCode !== 200) return reject(new Error(`CONNECT ${response.statusCode}`));
        const tls = tlsConnect({ socket, servername: 'api.test', ca: roots }, () => {
          tls.write(
            `GET / HTTP/1.1\r\nhost: api.test\r\nauthorization: Bearer ${PLACEHOLDER}\r\nconnection: close\r\n\r\n`,
          );
          let text = '';
          tls.on('data', (chunk: Buffer) => {
            text += chunk.toString('latin1');
          });
          tls.on('end', () =>
            text.startsWith('HTTP/1.1 200')
              ? resolve()
              : reject(new Error(text.slice(0, 80) || 'no response')),
          );
        });
        tls.on('error', reject);
      });
      connect.on('error', reject);
      connect.end();
    });

  /** One GET with the placeholder (proxied) or the secret (direct) through `agent`. */
  const keptAlive = (agent: HttpsAgent, credential: string, servername: string) => () =>
    new Promise<void>((resolve, reject) => {
      const request = httpsRequest(
        {
          host: '127.0.0.1',
          port: securePort,
          servername,
          path: '/',
          ca: roots,
          agent,
          headers: { host: `api.test:${securePort}`, authorization: `Bearer ${credential}` },
        },
        (response) => drain(response).then(resolve, reject),
      );
      request.on('error', reject);
      request.end();
    });
  const directAgent = new HttpsAgent({ keepAlive: true, maxSockets: 1 });
  const tunnelAgent = new TunnelAgent(proxy.socketPath, roots);

  const time = async (once: () => Promise<void>) => {
    const started = performance.now();
    await once();
    return performance.now() - started;
  };
  const compare = async (mode: string, direct: () => Promise<void>, proxied: () => Promise<void>) => {
    for (let index = 0; index < 20; index++) {
      await direct();
      await proxied();
    }
    const directTimes: number[] = [];
    const proxiedTimes: number[] = [];
    for (let index = 0; index < requests; index++) {
      directTimes.push(await time(direct));
      proxiedTimes.push(await time(proxied));
    }
    const directSummary = summarize(directTimes);
    const proxiedSummary = summarize(proxiedTimes);
    return {
      mode,
      direct: directSummary,
      proxied: proxiedSummary,
      addedP50: proxiedSummary.p50 - directSummary.p50,
      addedP99: proxiedSummary.p99 - directSummary.p99,
    };
  };
  try {
    const rows = [
      await compare('plain HTTP (absolute-form)', directPlain('/'), proxiedPlain('/')),
      await compare('plain HTTP, 1 MiB answer', directPlain('/large'), proxiedPlain('/large')),
      await compare('HTTPS passed through (CONNECT tunnel)', directTls, proxiedTls('open.test')),
      await compare('HTTPS intercepted, placeholder → secret', directTls, proxiedTls('api.test')),
      await compare(
        'kept-alive: HTTPS intercepted, placeholder → secret',
        keptAlive(directAgent, SECRET, 'api.test'),
        keptAlive(tunnelAgent, PLACEHOLDER, 'api.test'),
      ),
    ];
    const mints: number[] = [];
    const fresh = await createCertificateAuthority('bench mint');
    for (let index = 0; index < 100; index++) {
      const started = performance.now();
      await fresh.issue(`host-${index}.test`);
      mints.push(performance.now() - started);
    }
    return { rows, leafMint: summarize(mints) };
  } finally {
    directAgent.destroy();
    tunnelAgent.destroy();
    await proxy.close();
    plain.close();
    secure.close();
    await rm(directory, { recursive: true, force: true });
  }
}

export function formatEgressResults(results: EgressBenchResults, requests: number): string {
  const rows = results.rows;
  const rendered = table(
    [
      `request (n=${requests} each; a new connection each unless kept-alive)`,
      'direct p50 / p99 ms',
      'through the proxy p50 / p99 ms',
      'added p50 ms',
      'added p99 ms',
    ],
    rows.map((row) => [
      row.mode,
      `${ms(row.direct.p50)} / ${ms(row.direct.p99)}`,
      `${ms(row.proxied.p50)} / ${ms(row.proxied.p99)}`,
      ms(row.addedP50),
      ms(row.addedP99),
    ]),
    'lrrrr',
  );
  return `${rendered}\n\nLeaf certificate minted for a host's first interception: ${ms(results.leafMint.p50)} ms p50, ${ms(results.leafMint.p99)} ms p99 (then cached).`;
}

export function egressTargetRows(results: EgressBenchResults): string[][] {
  const passthrough = results.rows.find((row) => row.mode.includes('passed through'));
  if (!passthrough) return [];
  return [
    [
      'egress proxy: added p50, HTTPS pass-through on loopback',
      `≤ ${TARGET_PASSTHROUGH_ADDED_P50_MS} ms`,
      `${ms(passthrough.addedP50)} ms`,
      passthrough.addedP50 <= TARGET_PASSTHROUGH_ADDED_P50_MS ? 'met' : 'MISSED',
    ],
  ];
}
