/**
 * The egress proxy of one session: an HTTP proxy on a unix socket (inside the sandbox,
 * 127.0.0.1:3128 relays to it; see the bwrap driver's services directory). It is the sandbox's
 * only way out. Rules, in order (see `policy.ts`):
 *
 * 1. The host name must be allowed by the session's `networking`, checked before any lookup.
 * 2. The proxy resolves it and refuses any address on the host's own or private networks
 *    (loopback, RFC 1918, link-local and metadata, CGNAT, ULA, …) unless the operator listed that
 *    exact `address:port` in `allowPrivateDestinations`; it connects to the address it checked.
 * 3. HTTPS (CONNECT) to a host where one of the session's credentials applies is intercepted: the
 *    proxy terminates TLS with a certificate from the session's own CA (`certificates.ts`) and
 *    re-originates to the host with full certificate verification. There, placeholders become
 *    secrets in the request (headers and/or body, as the credential says), and a secret the
 *    upstream sends back becomes its placeholder again. Every other CONNECT is a byte tunnel the
 *    proxy never opens. Plain HTTP follows the same injection rules.
 * 4. Every request and tunnel, allowed or denied, is reported to `onRequest` (method, host, path,
 *    status, bytes, which credentials by name; never a value).
 *
 * Redirects are the client's business: the proxy never follows one, so a redirect to another
 * host carries only what the sandbox has, the placeholder.
 */

import { lookup } from 'node:dns/promises';
import { chmodSync, rmSync } from 'node:fs';
import {
  createServer as createHttpServer,
  request as httpRequest,
  type IncomingHttpHeaders,
  type IncomingMessage,
  type Server,
  type ServerResponse,
} from 'node:http';
import { request as httpsRequest } from 'node:https';
import { isIP, connect as netConnect, type Socket } from 'node:net';
import type { Duplex } from 'node:stream';
import { createSecureContext, rootCertificates, TLSSocket } from 'node:tls';
import { type CertificateAuthority, createCertificateAuthority } from './certificates.js';
import {
  credentialsFor,
  type EgressCredential,
  type EgressPolicy,
  hostReachable,
  isPublicAddress,
  normalizeHost,
} from './policy.js';
import { type Replacement, replaceAll, replacingStream } from './replace-stream.js';

/** One request through the proxy (or one CONNECT tunnel), as the session's audit sees it. */
export interface EgressAuditRecord {
  method: string;
  host: string;
  port: number;
  /** Path and query for requests the proxy saw; null for tunnels it did not open. */
  path: string | null;
  /** The upstream's status, the proxy's own refusal (403, 502), or null when none came. */
  status: number | null;
  bytesSent: number;
  bytesReceived: number;
  /** Names of the credentials whose placeholders were swapped in. */
  credentials: string[];
  decision: 'allowed' | 'denied';
  reason?: string;
  tls: 'intercepted' | 'passthrough' | 'none';
  durationMs: number;
}

export interface EgressProxyOptions {
  /** Unix socket to listen on (created with mode 0666; its directory is the caller's). */
  socketPath: string;
  policy: EgressPolicy;
  /** Names the CA (e.g. the session id). */
  label: string;
  onRequest?(record: EgressAuditRecord): void;
  /** Exact `address:port` pairs on private networks that may still be reached (tests, operators). */
  allowPrivateDestinations?: readonly string[];
  /** Roots trusted for upstream TLS besides Node's own (PEM). */
  upstreamCaCertificates?: readonly string[];
  /** Name resolution (default: the system resolver); returns addresses. */
  resolve?(host: string): Promise<string[]>;
}

export interface EgressProxy {
  readonly socketPath: string;
  /** The session's CA certificate (PEM), for the sandbox's trust store. */
  readonly caCertificatePem: string;
  updatePolicy(policy: EgressPolicy): void;
  close(): Promise<void>;
}

/** Headers that belong to one hop and are never forwarded. */
const HOP_HEADERS = new Set([
  'connection',
  'keep-alive',
  'proxy-connection',
  'proxy-authorization',
  'proxy-authenticate',
  'te',
  'trailer',
  'transfer-encoding',
  'upgrade',
]);
const MAX_CONNECTIONS = 256;
const IDLE_TIMEOUT_MS = 5 * 60_000;
const CONNECT_TIMEOUT_MS = 15_000;

class Refusal extends Error {
  constructor(
    readonly status: number,
    message: string,
  ) {
    super(message);
  }
}

/** Parses `host:port` (IPv6 in brackets) with a default port. */
function splitHostPort(authority: string, defaultPort: number): { host: string; port: number } {
  const match = /^\[([^\]]+)\](?::(\d+))?$/.exec(authority) ?? /^([^:]+)(?::(\d+))?$/.exec(authority);
  if (!match) throw new Refusal(400, `bad host: ${authority}`);
  const port = match[2] === undefined ? defaultPort : Number(match[2]);
  if (!(port > 0 && port < 65536)) throw new Refusal(400, `bad port in ${authority}`);
  return { host: normalizeHost(match[1]!), port };
}

/** Starts the proxy; resolves once it listens. */
export async function createEgressProxy(options: EgressProxyOptions): Promise<EgressProxy> {
  let policy = options.policy;
  const authority: CertificateAuthority = await createCertificateAuthority(options.label);
  const allowedPrivate = new Set(options.allowPrivateDestinations ?? []);
  // Built once: parsing ~150 roots per upstream connection would cost ~30 ms each.
  const upstreamContext = createSecureContext({
    ca: [...rootCertificates, ...(options.upstreamCaCertificates ?? [])],
  });
  const resolve =
    options.resolve ??
    (async (host: string) =>
      (await lookup(host, { all: true, verbatim: true })).map((entry) => entry.address));
  const sockets = new Set<Duplex>();
  const audit = (record: EgressAuditRecord) => {
    try {
      options.onRequest?.(record);
    } catch {
      // An audit sink's failure must not break the sandbox's request.
    }
  };

  /** Rules 1 and 2: the address to connect to, or a Refusal saying which rule. */
  const destination = async (host: string, port: number): Promise<string> => {
    const reachable = hostReachable(policy.networking, host);
    if (!reachable.ok) throw new Refusal(403, reachable.reason);
    let addresses: string[];
    if (isIP(host)) addresses = [host];
    else {
      try {
        addresses = await resolve(host);
      } catch {
        throw new Refusal(502, `cannot resolve ${host}`);
      }
    }
    const usable = addresses.filter(
      (address) => isPublicAddress(address) || allowedPrivate.has(`${address}:${port}`),
    );
    if (usable.length === 0) {
      throw new Refusal(
        403,
        addresses.length === 0
          ? `${host} has no address`
          : `${host} resolves to ${addresses[0]}, on a private or host network that sandboxes may not reach`,
      );
    }
    return usable[0]!;
  };

  /** Request headers for upstream: hop headers dropped, placeholders swapped where allowed. */
  const upstreamHeaders = (
    headers: IncomingHttpHeaders,
    applying: readonly EgressCredential[],
  ): Record<string, string | string[]> => {
    const toSecret = applying
      .filter((credential) => credential.injection.header)
      .map((credential) => ({ from: credential.placeholder, to: credential.secret }));
    const result: Record<string, string | string[]> = {};
    for (const [name, value] of Object.entries(headers)) {
      if (value === undefined || HOP_HEADERS.has(name)) continue;
      // Bodies that pass a credential's host are rewritten: ask for them uncompressed.
      if (name === 'accept-encoding' && applying.length > 0) continue;
      const swap = (text: string) => replaceAll(Buffer.from(text, 'latin1'), toSecret).toString('latin1');
      result[name] = Array.isArray(value) ? value.map(swap) : swap(value);
    }
    return result;
  };

  /** Response headers back to the sandbox: secrets swapped back to placeholders. */
  const downstreamHeaders = (
    headers: IncomingHttpHeaders,
    toPlaceholder: readonly Replacement[],
    rewritingBody: boolean,
  ): Record<string, string | string[]> => {
    const result: Record<string, string | string[]> = {};
    for (const [name, value] of Object.entries(headers)) {
      if (value === undefined || HOP_HEADERS.has(name)) continue;
      if (rewritingBody && name === 'content-length') continue;
      const swap = (text: string) =>
        replaceAll(Buffer.from(text, 'latin1'), toPlaceholder).toString('latin1');
      result[name] = Array.isArray(value) ? value.map(swap) : swap(value);
    }
    return result;
  };

  /** Forwards one request (plain HTTP, or an intercepted HTTPS one) and audits it. */
  const forward = async (
    request: IncomingMessage,
    response: ServerResponse,
    target: { host: string; port: number; path: string; tls: boolean },
  ): Promise<void> => {
    const started = performance.now();
    const record: EgressAuditRecord = {
      method: request.method ?? 'GET',
      host: target.host,
      port: target.port,
      path: target.path,
      status: null,
      bytesSent: 0,
      bytesReceived: 0,
      credentials: [],
      decision: 'allowed',
      tls: target.tls ? 'intercepted' : 'none',
      durationMs: 0,
    };
    const finish = () => {
      record.durationMs = performance.now() - started;
      audit(record);
    };
    const refuse = (status: number, reason: string) => {
      record.status = status;
      record.decision = status === 403 ? 'denied' : 'allowed';
      record.reason = reason;
      if (!response.headersSent) {
        response.writeHead(status, { 'content-type': 'text/plain; charset=utf-8', connection: 'close' });
      }
      response.end(`berth egress: ${reason}\n`);
      request.resume();
      finish();
    };
    let address: string;
    try {
      address = await destination(target.host, target.port);
    } catch (error) {
      if (error instanceof Refusal) return refuse(error.status, error.message);
      throw error;
    }
    const applying = credentialsFor(policy, target.host);
    record.credentials = applying.map((credential) => credential.name);
    const toPlaceholder = applying.map((credential) => ({
      from: credential.secret,
      to: credential.placeholder,
    }));
    const bodyToSecret = applying
      .filter((credential) => credential.injection.body)
      .map((credential) => ({ from: credential.placeholder, to: credential.secret }));
    const headers = upstreamHeaders(request.headers, applying);
    if (bodyToSecret.length > 0) delete headers['content-length'];
    const send = target.tls ? httpsRequest : httpRequest;
    const upstream = send({
      host: address,
      port: target.port,
      method: request.method,
      path: target.path,
      headers: { ...headers, host: request.headers.host ?? target.host },
      setHost: false,
      timeout: CONNECT_TIMEOUT_MS,
      ...(target.tls
        ? {
            servername: isIP(target.host) ? undefined : target.host,
            secureContext: upstreamContext,
            rejectUnauthorized: true,
          }
        : {}),
      agent: false,
    });
    upstream.on('timeout', () => upstream.destroy(new Error('upstream timed out')));
    upstream.on('error', (error) => {
      const reason = /certificate|self.signed|unable to verify|altnames|CERT_/i.test(error.message)
        ? `the upstream's TLS certificate did not verify (${error.message})`
        : `upstream error: ${error.message}`;
      refuse(502, reason);
    });
    upstream.on('response', (answer) => {
      record.status = answer.statusCode ?? null;
      const rewriting = toPlaceholder.length > 0;
      response.writeHead(
        answer.statusCode ?? 502,
        downstreamHeaders(answer.headers, toPlaceholder, rewriting),
      );
      answer.on('data', (chunk: Buffer) => {
        record.bytesReceived += chunk.length;
      });
      const body = rewriting ? answer.pipe(replacingStream(toPlaceholder)) : answer;
      body.pipe(response);
      response.on('close', finish);
      answer.on('error', () => response.destroy());
    });
    request.on('data', (chunk: Buffer) => {
      record.bytesSent += chunk.length;
    });
    (bodyToSecret.length > 0 ? request.pipe(replacingStream(bodyToSecret)) : request).pipe(upstream);
  };

  /** Handles requests of an intercepted TLS connection (origin-form, to `host:port`). */
  const interceptor = createHttpServer((request, response) => {
    const { host, port } = (request.socket as TLSSocket & { berthTarget: { host: string; port: number } })
      .berthTarget;
    void forward(request, response, { host, port, path: request.url ?? '/', tls: true }).catch(() =>
      response.destroy(),
    );
  });

  const server: Server = createHttpServer((request, response) => {
    // Absolute-form requests: plain HTTP through the proxy.
    let url: URL;
    try {
      url = new URL(request.url ?? '');
    } catch {
      response.writeHead(400, { 'content-type': 'text/plain' });
      response.end('berth egress: this is a proxy; send absolute-form requests or CONNECT\n');
      return;
    }
    if (url.protocol !== 'http:') {
      response.writeHead(400, { 'content-type': 'text/plain' });
      response.end(`berth egress: ${url.protocol} requests go through CONNECT\n`);
      return;
    }
    const host = normalizeHost(url.hostname);
    const port = url.port ? Number(url.port) : 80;
    void forward(request, response, { host, port, path: `${url.pathname}${url.search}`, tls: false }).catch(
      () => response.destroy(),
    );
  });
  server.maxConnections = MAX_CONNECTIONS;
  server.maxHeadersCount = 200;
  server.on('connection', (socket: Socket) => {
    sockets.add(socket);
    socket.setTimeout(IDLE_TIMEOUT_MS, () => socket.destroy());
    socket.on('close', () => sockets.delete(socket));
  });

  server.on('connect', (request: IncomingMessage, client: Duplex, head: Buffer) => {
    const started = performance.now();
    client.on('error', () => undefined);
    let target: { host: string; port: number };
    try {
      target = splitHostPort(request.url ?? '', 443);
    } catch (error) {
      client.end(`HTTP/1.1 400 Bad Request\r\n\r\n`);
      void error;
      return;
    }
    const record: EgressAuditRecord = {
      method: 'CONNECT',
      host: target.host,
      port: target.port,
      path: null,
      status: null,
      bytesSent: 0,
      bytesReceived: 0,
      credentials: [],
      decision: 'allowed',
      tls: 'passthrough',
      durationMs: 0,
    };
    const deny = (status: number, reason: string) => {
      record.status = status;
      record.decision = status === 403 ? 'denied' : 'allowed';
      record.reason = reason;
      record.durationMs = performance.now() - started;
      audit(record);
      client.end(
        `HTTP/1.1 ${status} ${status === 403 ? 'Forbidden' : 'Bad Gateway'}\r\ncontent-type: text/plain\r\nconnection: close\r\n\r\nberth egress: ${reason}\n`,
      );
    };
    void (async () => {
      let address: string;
      try {
        address = await destination(target.host, target.port);
      } catch (error) {
        if (error instanceof Refusal) return deny(error.status, error.message);
        return deny(502, String(error));
      }
      if (credentialsFor(policy, target.host).length > 0) {
        // Rule 3: terminate TLS here; each request is then forwarded (and audited) by `forward`.
        const issued = await authority.issue(target.host);
        client.write('HTTP/1.1 200 Connection established\r\n\r\n');
        const tls = new TLSSocket(client as Socket, {
          isServer: true,
          cert: issued.certificatePem,
          key: issued.keyPem,
          ALPNProtocols: ['http/1.1'],
        }) as TLSSocket & { berthTarget: { host: string; port: number } };
        tls.berthTarget = target;
        tls.on('error', () => client.destroy());
        if (head.length > 0) client.unshift(head);
        sockets.add(tls);
        tls.on('close', () => sockets.delete(tls));
        interceptor.emit('connection', tls);
        return;
      }
      const upstream = netConnect({ host: address, port: target.port });
      sockets.add(upstream);
      upstream.setTimeout(CONNECT_TIMEOUT_MS, () => upstream.destroy(new Error('connect timed out')));
      upstream.once('connect', () => {
        upstream.setTimeout(IDLE_TIMEOUT_MS);
        record.status = 200;
        client.write('HTTP/1.1 200 Connection established\r\n\r\n');
        if (head.length > 0) upstream.write(head);
        client.on('data', (chunk: Buffer) => {
          record.bytesSent += chunk.length;
        });
        upstream.on('data', (chunk: Buffer) => {
          record.bytesReceived += chunk.length;
        });
        client.pipe(upstream);
        upstream.pipe(client);
      });
      let reported = false;
      const report = () => {
        if (reported) return;
        reported = true;
        record.durationMs = performance.now() - started;
        audit(record);
      };
      upstream.on('error', (error) => {
        if (record.status === null) {
          reported = true;
          deny(502, `cannot connect to ${target.host}:${target.port} (${error.message})`);
        } else client.destroy();
      });
      upstream.on('close', () => {
        sockets.delete(upstream);
        client.destroy();
        report();
      });
      client.on('close', () => upstream.destroy());
    })();
  });

  rmSync(options.socketPath, { force: true });
  await new Promise<void>((resolvePromise, reject) => {
    server.once('error', reject);
    server.listen(options.socketPath, () => {
      server.off('error', reject);
      resolvePromise();
    });
  });
  // The sandbox user (uid 1000) connects; the directory it sits in is what guards it.
  chmodSync(options.socketPath, 0o666);

  return {
    socketPath: options.socketPath,
    caCertificatePem: authority.certificatePem,
    updatePolicy(next) {
      policy = next;
    },
    async close() {
      const closed = new Promise<void>((resolvePromise) => server.close(() => resolvePromise()));
      for (const socket of sockets) socket.destroy();
      server.closeAllConnections?.();
      await closed;
      rmSync(options.socketPath, { force: true });
    },
  };
}
