/**
 * Added latency of the egress proxy (issue 4), on loopback: the same request timed directly and
 * through a session's proxy, for plain HTTP, HTTPS passed through (CONNECT tunnel, the proxy
 * never opens it) and HTTPS intercepted with a credential's placeholder swapped in. Each sample
 * is one request on a fresh connection (what a sandboxed `curl` does); direct and proxied
 * requests alternate so both see the same machine load.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { createServer as createHttpServer, request as httpRequest, type Server } from 'node:http';
import { createServer as createHttpsServer, request as httpsRequest } from 'node:https';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { connect as tlsConnect } from 'node:tls';
import { createCertificateAuthority } from '../src/egress/certificates.js';
import { createEgressProxy } from '../src/egress/proxy.js';
import { ms, type Summary, summarize, table } from './stats.js';

export const TARGET_PASSTHROUGH_ADDED_P50_MS = 2;

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

function answer(server: Server): void {
  server.on('request', (_request, response) => {
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

export async function runEgressBench(requests = 300): Promise<EgressBenchRow[]> {
  const directory = await mkdtemp(join(tmpdir(), 'berth-egress-bench-'));
  const ca = await createCertificateAuthority('bench upstream');
  const leaf = await ca.issue('api.test');
  const plain = createHttpServer({ keepAlive: false });
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

  const directPlain = () =>
    new Promise<void>((resolve, reject) => {
      const request = httpRequest(
        { host: '127.0.0.1', port: plainPort, path: '/', agent: false },
        (response) => drain(response).then(resolve, reject),
      );
      request.on('error', reject);
      request.end();
    });
  const proxiedPlain = () =>
    new Promise<void>((resolve, reject) => {
      const request = httpRequest(
        {
          socketPath: proxy.socketPath,
          path: `http://open.test:${plainPort}/`,
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
    return [
      await compare('plain HTTP (absolute-form)', directPlain, proxiedPlain),
      await compare('HTTPS passed through (CONNECT tunnel)', directTls, proxiedTls('open.test')),
      await compare('HTTPS intercepted, placeholder → secret', directTls, proxiedTls('api.test')),
    ];
  } finally {
    await proxy.close();
    plain.close();
    secure.close();
    await rm(directory, { recursive: true, force: true });
  }
}

export function formatEgressResults(rows: readonly EgressBenchRow[], requests: number): string {
  return table(
    [
      `request on a new connection (n=${requests} each)`,
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
}

export function egressTargetRows(rows: readonly EgressBenchRow[]): string[][] {
  const passthrough = rows.find((row) => row.mode.includes('passed through'));
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
