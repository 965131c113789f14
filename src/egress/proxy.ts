/**
 * The egress proxy of one session: an HTTP proxy on a unix socket (inside the sandbox,
 * 127.0.0.1:3128 relays to it; see the bwrap driver's services directory). It is the sandbox's
 * only way out. Rules, in order (see `policy.ts` and `addresses.ts`):
 *
 * 1. The host name must be allowed by the session's `networking`, checked before any lookup.
 * 2. The proxy resolves it and refuses any address off the public internet (loopback, RFC 1918,
 *    link-local and metadata, CGNAT, ULA, …) unless the operator listed that exact
 *    `address:port` in `allowPrivateDestinations`; it connects to the address it checked.
 * 3. HTTPS (CONNECT) to a host where one of the session's credentials applies is intercepted: the
 *    proxy terminates TLS with a certificate from the session's own CA (`certificates.ts`) and
 *    re-originates to the host with full certificate verification. There, placeholders become
 *    secrets in the request (credential headers and/or the body, as the credential says). Every
 *    other CONNECT is a byte tunnel the proxy never opens. Plain HTTP follows the same injection
 *    rules. Every response the proxy reads (plain HTTP from any host, intercepted HTTPS) is
 *    scanned for every secret of the session, and refused (502) when its content or transfer
 *    coding is one the proxy cannot decode.
 * 4. Every request and tunnel, allowed or denied, is reported to `onRequest` (method, host, path,
 *    status, bytes, which credentials by name; never a value).
 *
 * Redirects are the client's business: the proxy never follows one, so a redirect to another
 * host carries only what the sandbox has, the placeholder.
 */

import { chmodSync, rmSync } from 'node:fs';
import {
  type ClientRequest,
  createServer as createHttpServer,
  Agent as HttpAgent,
  request as httpRequest,
  type IncomingHttpHeaders,
  type IncomingMessage,
  type OutgoingHttpHeaders,
  type Server,
  type ServerResponse,
  STATUS_CODES,
} from 'node:http';
import { Agent as HttpsAgent, request as httpsRequest } from 'node:https';
import { isIP, connect as netConnect, type Socket } from 'node:net';
import { type Duplex, pipeline, type Readable, type Transform } from 'node:stream';
import { createSecureContext, rootCertificates, type SecureContext, TLSSocket } from 'node:tls';
import { createBrotliDecompress, createUnzip } from 'node:zlib';
import { type Authority, canonicalHost, formatAuthority, parseAuthority } from './addresses.js';
import { type CertificateAuthority, createCertificateAuthority } from './certificates.js';
import { createDestinationRule, Refusal } from './destinations.js';
import {
  type CompiledPolicy,
  compilePolicy,
  type EgressCredential,
  type EgressPolicy,
  isCredentialHeader,
} from './policy.js';
import { type Replacement, replaceAll, replacingStream } from './replace-stream.js';

/** One request through the proxy (or one CONNECT tunnel), as the session's audit sees it. */
export interface EgressAuditRecord {
  method: string;
  /** The host the sandbox asked for (canonical form), or the raw target when it did not parse. */
  host: string;
  port: number;
  /** Path and query for requests the proxy saw; null for tunnels it did not open. */
  path: string | null;
  /** The upstream's status, the proxy's own answer (400, 403, 413, 502), or null when none came. */
  status: number | null;
  /** Body bytes from the sandbox (tunnels: every byte), before any swap. */
  bytesSent: number;
  /** Body bytes from the upstream (tunnels: every byte), before any swap or decoding. */
  bytesReceived: number;
  /** Names of the credentials whose placeholders were swapped into this request. */
  credentials: string[];
  /** `denied`: a rule of the policy or a limit refused it (`reason` says which). */
  decision: 'allowed' | 'denied';
  /** Why the proxy refused or failed it; absent when the upstream answered. */
  reason?: string;
  tls: 'intercepted' | 'passthrough' | 'none';
  durationMs: number;
  /** Set on Berth's own requests for the session (`web_fetch`, `mcp:<server>`); absent for the sandbox's. */
  purpose?: string;
}

/** The proxy's limits; every one has a default (`DEFAULT_EGRESS_LIMITS`). */
export interface EgressLimits {
  /** Connections from the sandbox at once; more are closed at once. */
  maxConnections: number;
  /** Size of a request's header block from the sandbox (larger: 431). */
  maxHeaderBytes: number;
  /** To resolve a name. */
  resolveTimeoutMs: number;
  /** To connect (and finish TLS) to an upstream. */
  connectTimeoutMs: number;
  /** A tunnel, connection or upstream request with no bytes either way for this long is closed. */
  idleTimeoutMs: number;
  /** Request bodies where a placeholder may be swapped are read whole, up to this (larger: 413). */
  maxInjectedBodyBytes: number;
}

export const DEFAULT_EGRESS_LIMITS: Readonly<EgressLimits> = {
  maxConnections: 256,
  maxHeaderBytes: 32 * 1024,
  resolveTimeoutMs: 10_000,
  connectTimeoutMs: 15_000,
  idleTimeoutMs: 5 * 60_000,
  maxInjectedBodyBytes: 16 * 1024 * 1024,
};

export interface EgressProxyOptions {
  /** Unix socket to listen on (created with mode 0666; its directory is the caller's). */
  socketPath: string;
  policy: EgressPolicy;
  /** Names the CA (e.g. the session id). */
  label?: string;
  /** Hears every request and tunnel; a throwing sink never breaks the sandbox's request. */
  onRequest?(record: EgressAuditRecord): void;
  /**
   * Exact `address:port` pairs off the public internet that may still be reached (tests,
   * operators): `127.0.0.1:8080`, `[::1]:8080`.
   */
  allowPrivateDestinations?: readonly string[];
  /** Roots trusted for upstream TLS besides Node's own (PEM). */
  upstreamCaCertificates?: readonly string[];
  /** Name resolution (default: the system resolver); returns addresses. Never called for a denied name. */
  resolve?(host: string): Promise<readonly string[]>;
  limits?: Partial<EgressLimits>;
}

export interface EgressProxy {
  readonly socketPath: string;
  /** The session's CA certificate (PEM), for the sandbox's trust store. */
  readonly caCertificatePem: string;
  /** Replaces the policy for requests and tunnels that start from now on. */
  updatePolicy(policy: EgressPolicy): void;
  /** Stops listening and ends every open tunnel, connection and upstream request. */
  close(): Promise<void>;
}

/** A Host header's value: the port only when it is not the scheme's default. */
function hostHeader(host: string, port: number, defaultPort: number): string {
  if (port !== defaultPort) return formatAuthority(host, port);
  return isIP(host) === 6 ? `[${host}]` : host;
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
/** Security contexts kept for intercepted hosts (one per host name). */
const CONTEXT_CACHE_SIZE = 1000;

/** `headers` without hop-by-hop headers (also those the Connection header names). */
function endToEnd(headers: IncomingHttpHeaders): [string, string | string[]][] {
  const named = new Set(
    String(headers.connection ?? '')
      .split(',')
      .map((token) => token.trim().toLowerCase())
      .filter(Boolean),
  );
  return Object.entries(headers).flatMap(([name, value]) =>
    value === undefined || HOP_HEADERS.has(name) || named.has(name) ? [] : [[name, value]],
  );
}

/** Header text swapped through `replacements` (header values are latin1 strings of the raw bytes). */
function swapHeader(value: string, replacements: readonly Replacement[], onMatch?: (index: number) => void) {
  if (replacements.length === 0) return value;
  return replaceAll(Buffer.from(value, 'latin1'), replacements, onMatch).toString('latin1');
}

/** Decoders that undo a response's content-encoding, or undefined for one the proxy cannot undo. */
function decodersFor(contentEncoding: string | undefined): Transform[] | undefined {
  const codings = (contentEncoding ?? '')
    .split(',')
    .map((coding) => coding.trim().toLowerCase())
    .filter((coding) => coding.length > 0 && coding !== 'identity')
    .reverse();
  const decoders: Transform[] = [];
  for (const coding of codings) {
    if (coding === 'gzip' || coding === 'x-gzip' || coding === 'deflate') decoders.push(createUnzip());
    else if (coding === 'br') decoders.push(createBrotliDecompress());
    else return undefined;
  }
  return decoders;
}

/**
 * Whether a response's transfer codings are ones the proxy decodes (only `chunked`, which
 * Node's parser undoes). Any other (`gzip, chunked`, …) would reach the sandbox as bytes nobody
 * scanned: `transfer-encoding` is hop-by-hop and dropped, the coded body passed on as it is.
 */
function decodableTransfer(transferEncoding: string | undefined): boolean {
  if (transferEncoding === undefined) return true;
  return transferEncoding
    .split(',')
    .map((coding) => coding.trim().toLowerCase())
    .every((coding) => coding === '' || coding === 'chunked');
}

/** Why an upstream request failed, in words (error codes only: messages are not ours to repeat). */
function upstreamFailure(error: NodeJS.ErrnoException, host: string): string {
  const code = error.code ?? 'unknown error';
  if (/CERT|SELF_SIGNED|UNABLE_TO|ALTNAME|ERR_TLS/.test(code)) {
    return `the TLS certificate of ${host} did not verify (${code}); the proxy does not fall back`;
  }
  if (code === 'ETIMEDOUT') return `${host} did not answer in time`;
  return `upstream ${host} failed (${code})`;
}

/** Reads a request body whole, refusing beyond `limit` bytes. */
function readBody(
  request: IncomingMessage,
  limit: number,
  counted: (bytes: number) => void,
): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let length = 0;
    request.on('data', (chunk: Buffer) => {
      length += chunk.length;
      counted(chunk.length);
      if (length > limit) {
        request.removeAllListeners('data');
        request.resume();
        reject(new Refusal(413, `request bodies to this host are limited to ${limit} bytes`, 'denied'));
        return;
      }
      chunks.push(chunk);
    });
    request.on('end', () => resolve(Buffer.concat(chunks)));
    request.on('error', reject);
  });
}

/** Starts the proxy; resolves once it listens. Throws `invalid_request` for a bad option or policy. */
export async function createEgressProxy(options: EgressProxyOptions): Promise<EgressProxy> {
  const limits: EgressLimits = { ...DEFAULT_EGRESS_LIMITS, ...options.limits };
  let compiled: CompiledPolicy = compilePolicy(options.policy);
  const destination = createDestinationRule({
    allowPrivateDestinations: options.allowPrivateDestinations,
    resolve: options.resolve,
    resolveTimeoutMs: limits.resolveTimeoutMs,
  });
  const authority: CertificateAuthority = await createCertificateAuthority(options.label ?? 'session');
  // Built once: parsing ~150 roots per upstream connection would cost ~30 ms each.
  const upstreamContext = createSecureContext({
    ca: [...rootCertificates, ...(options.upstreamCaCertificates ?? [])],
  });
  // Upstream connections are kept alive and reused (keyed by address, port and server name):
  // intercepted requests then skip the upstream handshake.
  const agentOptions = { keepAlive: true, maxFreeSockets: 16, timeout: 30_000, scheduling: 'lifo' as const };
  const httpAgent = new HttpAgent(agentOptions);
  const httpsAgent = new HttpsAgent(agentOptions);
  const contexts = new Map<string, Promise<SecureContext>>();
  const intercepted = new WeakMap<Duplex, Authority & { address: string }>();
  const sockets = new Set<Duplex>();
  const upstreamRequests = new Set<ClientRequest>();
  let closing = false;

  const audit = (record: EgressAuditRecord) => {
    try {
      options.onRequest?.(record);
    } catch {
      // An audit sink's failure must not break the sandbox's request.
    }
  };
  const track = (socket: Duplex) => {
    if (closing) {
      socket.destroy();
      return;
    }
    sockets.add(socket);
    socket.once('close', () => sockets.delete(socket));
  };

  /** The TLS context the sandbox sees for `host`: a leaf from the session's CA (cached). */
  const contextFor = (host: string): Promise<SecureContext> => {
    let context = contexts.get(host);
    if (!context) {
      context = authority
        .issue(host)
        .then((issued) => createSecureContext({ cert: issued.certificatePem, key: issued.keyPem }));
      contexts.set(host, context);
      context.catch(() => contexts.delete(host));
      if (contexts.size > CONTEXT_CACHE_SIZE) {
        const oldest = contexts.keys().next().value;
        if (oldest !== undefined) contexts.delete(oldest);
      }
    }
    return context;
  };

  /**
   * Forwards one request (plain HTTP, or one inside an intercepted TLS connection), swapping
   * placeholders where a credential applies, and audits it.
   */
  const forward = async (
    request: IncomingMessage,
    response: ServerResponse,
    target: Authority & { tls: boolean; path: string; address?: string; namedHost?: string },
  ): Promise<void> => {
    const started = performance.now();
    const policy = compiled;
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
    let reported = false;
    const report = () => {
      if (reported) return;
      reported = true;
      record.durationMs = performance.now() - started;
      audit(record);
    };
    const refuse = (refusal: Refusal) => {
      record.status = refusal.status;
      record.decision = refusal.decision;
      record.reason = refusal.message;
      if (!response.headersSent) {
        const body = `berth egress: ${refusal.message}\n`;
        response.writeHead(refusal.status, {
          'content-type': 'text/plain; charset=utf-8',
          'content-length': Buffer.byteLength(body),
          connection: 'close',
        });
        response.end(body);
      } else response.destroy();
      request.resume();
      report();
    };
    let current: ClientRequest | undefined;
    let gone = false;
    response.once('close', () => {
      // The sandbox went away before the answer was complete: stop the upstream request too.
      gone = !response.writableFinished;
      if (gone) current?.destroy();
      report();
    });

    let address: string;
    try {
      // An intercepted tunnel was checked and resolved at CONNECT; the policy may have changed since.
      if (target.address === undefined) address = await destination(policy, target);
      else {
        const reachable = policy.reachable(target.host);
        if (!reachable.ok) throw new Refusal(403, reachable.reason, 'denied');
        if (target.namedHost !== undefined && target.namedHost !== target.host) {
          // A different Host would carry the secret to another site behind the same address.
          throw new Refusal(
            403,
            `the request names host ${target.namedHost} but its tunnel goes to ${target.host}`,
            'denied',
          );
        }
        address = target.address;
      }
    } catch (error) {
      if (error instanceof Refusal) return refuse(error);
      throw error;
    }

    const applying = policy.credentialsFor(target.host);
    const injected = new Set<EgressCredential>();
    const injecting = (credentials: readonly EgressCredential[]) => (index: number) =>
      injected.add(credentials[index]!);
    const headerCredentials = applying.filter((credential) => credential.injection.header);
    const headerSwaps = headerCredentials.map((credential) => ({
      from: credential.placeholder,
      to: credential.secret,
    }));
    const bodyCredentials = applying.filter((credential) => credential.injection.body);
    // Every secret of the session is turned back into its placeholder in any response the
    // proxy reads, whatever its host: a secret stored by one host can be served by another.
    const toPlaceholder = applying.length > 0 ? policy.responseSwaps : policy.responseSwapsEverywhere;
    const scanning = toPlaceholder.length > 0;
    const headers: OutgoingHttpHeaders = {};
    const onMatch = injecting(headerCredentials);
    for (const [name, value] of endToEnd(request.headers)) {
      if (name === 'host') continue;
      // Response bodies are scanned for the session's secrets: ask for them uncompressed.
      if (name === 'accept-encoding' && scanning) continue;
      // Placeholders become secrets only in headers that carry credentials (`isCredentialHeader`).
      headers[name] =
        headerSwaps.length === 0 || !isCredentialHeader(name)
          ? value
          : Array.isArray(value)
            ? value.map((item) => swapHeader(item, headerSwaps, onMatch))
            : swapHeader(value, headerSwaps, onMatch);
    }
    // The Host is the one the proxy connects for (plain HTTP: the absolute URL's, as RFC 9112
    // says; a different Host would carry the secret to another site behind the same address).
    headers.host = hostHeader(target.host, target.port, target.tls ? 443 : 80);

    const hasBody =
      request.headers['content-length'] !== undefined || request.headers['transfer-encoding'] !== undefined;
    let body: Buffer | undefined;
    if (bodyCredentials.length > 0 && hasBody) {
      const declared = Number(request.headers['content-length'] ?? 0);
      try {
        if (declared > limits.maxInjectedBodyBytes) {
          throw new Refusal(
            413,
            `request bodies to this host are limited to ${limits.maxInjectedBodyBytes} bytes`,
            'denied',
          );
        }
        const raw = await readBody(request, limits.maxInjectedBodyBytes, (bytes) => {
          record.bytesSent += bytes;
        });
        body = replaceAll(
          raw,
          bodyCredentials.map((credential) => ({ from: credential.placeholder, to: credential.secret })),
          injecting(bodyCredentials),
        );
      } catch (error) {
        if (error instanceof Refusal) return refuse(error);
        return refuse(new Refusal(400, 'the request body could not be read', 'allowed'));
      }
      headers['content-length'] = String(body.length);
    } else if (hasBody) {
      request.on('data', (chunk: Buffer) => {
        record.bytesSent += chunk.length;
      });
    }

    const send = (attempt: number) => {
      let upstream: ClientRequest;
      try {
        upstream = (target.tls ? httpsRequest : httpRequest)({
          host: address,
          port: target.port,
          method: request.method,
          path: target.path,
          headers,
          setHost: false,
          timeout: limits.connectTimeoutMs,
          maxHeaderSize: 2 * limits.maxHeaderBytes,
          ...(target.tls
            ? {
                agent: httpsAgent,
                servername: isIP(target.host) ? undefined : target.host,
                secureContext: upstreamContext,
                rejectUnauthorized: true,
              }
            : { agent: httpAgent }),
        });
      } catch (error) {
        // Only a header value that is not allowed gets here (e.g. a secret with a line break).
        const code = (error as NodeJS.ErrnoException).code ?? 'unknown error';
        return refuse(new Refusal(502, `the request could not be forwarded (${code})`, 'allowed'));
      }
      current = upstream;
      record.credentials = [...injected].map((credential) => credential.name);
      upstreamRequests.add(upstream);
      upstream.once('close', () => upstreamRequests.delete(upstream));
      upstream.once('socket', (socket: Socket) => {
        const connected = () => upstream.setTimeout(limits.idleTimeoutMs);
        if (!socket.connecting) connected();
        else socket.once(target.tls ? 'secureConnect' : 'connect', connected);
      });
      upstream.on('timeout', () =>
        upstream.destroy(Object.assign(new Error('timed out'), { code: 'ETIMEDOUT' })),
      );
      let answered = false;
      upstream.on('error', (error: NodeJS.ErrnoException) => {
        if (answered) {
          response.destroy();
          return;
        }
        // A kept-alive connection the upstream closed meanwhile: once more on a new one, when
        // the body can be sent again.
        const replayable = !hasBody || body !== undefined;
        if (attempt === 0 && upstream.reusedSocket && replayable && error.code === 'ECONNRESET') {
          send(1);
          return;
        }
        refuse(new Refusal(502, upstreamFailure(error, target.host), 'allowed'));
      });
      upstream.on('response', (answer: IncomingMessage) => {
        answered = true;
        answer.on('data', (chunk: Buffer) => {
          record.bytesReceived += chunk.length;
        });
        const status = answer.statusCode ?? 502;
        const bodyless =
          request.method === 'HEAD' || status === 204 || status === 304 || (status >= 100 && status < 200);
        if (!decodableTransfer(answer.headers['transfer-encoding'])) {
          answer.destroy();
          return refuse(
            new Refusal(
              502,
              `the response of ${target.host} is in a transfer-encoding the proxy cannot check for secrets`,
              'allowed',
            ),
          );
        }
        const decoders = scanning && !bodyless ? decodersFor(answer.headers['content-encoding']) : [];
        if (decoders === undefined) {
          answer.destroy();
          // The value is the upstream's words: never repeated (it could be anything, a secret too).
          return refuse(
            new Refusal(
              502,
              `the response of ${target.host} is in a content-encoding the proxy cannot check for secrets`,
              'allowed',
            ),
          );
        }
        record.status = status;
        const outgoing: OutgoingHttpHeaders = {};
        for (const [name, value] of endToEnd(answer.headers)) {
          if (scanning && !bodyless && (name === 'content-length' || name === 'content-encoding')) continue;
          outgoing[name] = Array.isArray(value)
            ? value.map((item) => swapHeader(item, toPlaceholder))
            : swapHeader(value, toPlaceholder);
        }
        response.writeHead(
          status,
          answer.statusMessage ? swapHeader(answer.statusMessage, toPlaceholder) : undefined,
          outgoing,
        );
        const stages: (Readable | Transform)[] = [answer];
        if (scanning && !bodyless) stages.push(...decoders, replacingStream(toPlaceholder));
        pipeline([...stages, response] as [Readable, ...Transform[], ServerResponse], (error) => {
          if (error) response.destroy();
        });
      });
      if (body !== undefined) upstream.end(body);
      else if (hasBody) request.pipe(upstream);
      else upstream.end();
    };

    if (gone) return;
    send(0);
  };

  /** Handles requests of an intercepted TLS connection (origin-form, to its CONNECT target). */
  const interceptor = createHttpServer(
    { maxHeaderSize: limits.maxHeaderBytes, requestTimeout: 0 },
    (request, response) => {
      const target = intercepted.get(request.socket);
      if (!target) return void response.destroy();
      let path = request.url ?? '/';
      let named = request.headers.host;
      if (!path.startsWith('/') && path !== '*') {
        // Absolute-form inside the tunnel: its authority must be the tunnel's too.
        let url: URL | undefined;
        try {
          url = new URL(path);
        } catch {
          url = undefined;
        }
        named = url?.host ?? path;
        path = url ? `${url.pathname}${url.search}` : '/';
      }
      const namedHost =
        named === undefined ? target.host : (parseAuthority(named, target.port)?.host ?? named);
      forward(request, response, { ...target, tls: true, path, namedHost }).catch(() => response.destroy());
    },
  );

  const server: Server = createHttpServer(
    { maxHeaderSize: limits.maxHeaderBytes, requestTimeout: 0 },
    (request, response) => {
      // Absolute-form requests: plain HTTP through the proxy.
      let url: URL | undefined;
      try {
        url = new URL(request.url ?? '');
      } catch {
        url = undefined;
      }
      const reason =
        url === undefined
          ? 'this is a proxy; send absolute-form requests (http://host/path) or CONNECT'
          : url.protocol !== 'http:'
            ? `${url.protocol} requests go through CONNECT`
            : undefined;
      const host = url && canonicalHost(url.hostname);
      if (reason !== undefined || url === undefined || host === undefined) {
        const text = `berth egress: ${reason ?? 'bad host'}\n`;
        response.writeHead(400, {
          'content-type': 'text/plain; charset=utf-8',
          'content-length': text.length,
        });
        response.end(text);
        request.resume();
        return;
      }
      const port = url.port ? Number(url.port) : 80;
      forward(request, response, { host, port, path: `${url.pathname}${url.search}`, tls: false }).catch(() =>
        response.destroy(),
      );
    },
  );
  server.maxConnections = limits.maxConnections;
  server.on('connection', (socket: Socket) => {
    track(socket);
    socket.setTimeout(limits.idleTimeoutMs, () => socket.destroy());
  });

  server.on('connect', (request: IncomingMessage, client: Duplex, head: Buffer) => {
    const started = performance.now();
    client.on('error', () => undefined);
    const target = parseAuthority(request.url ?? '', 443);
    const record: EgressAuditRecord = {
      method: 'CONNECT',
      host: target?.host ?? (request.url ?? '').slice(0, 255),
      port: target?.port ?? 0,
      path: null,
      status: null,
      bytesSent: 0,
      bytesReceived: 0,
      credentials: [],
      decision: 'allowed',
      tls: 'passthrough',
      durationMs: 0,
    };
    let reported = false;
    const report = () => {
      if (reported) return;
      reported = true;
      record.durationMs = performance.now() - started;
      audit(record);
    };
    const answer = (refusal: Refusal) => {
      record.status = refusal.status;
      record.decision = refusal.decision;
      record.reason = refusal.message;
      report();
      const text = `berth egress: ${refusal.message}\n`;
      client.end(
        `HTTP/1.1 ${refusal.status} ${STATUS_CODES[refusal.status] ?? 'Error'}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: ${Buffer.byteLength(text)}\r\nconnection: close\r\n\r\n${text}`,
      );
    };
    if (!target) return answer(new Refusal(400, 'bad CONNECT target (want host:port)', 'denied'));
    /** Audits a tunnel that ended without an HTTP answer of the proxy's. */
    const answerless = (reason: string) => {
      record.reason = reason;
      report();
    };

    const intercept = async (address: string) => {
      record.tls = 'intercepted';
      // Rule 3: terminate TLS here; each request inside is then forwarded and audited by `forward`.
      const context = await contextFor(target.host);
      if (client.destroyed) return;
      record.status = 200;
      client.write('HTTP/1.1 200 Connection established\r\n\r\n');
      // Bytes the client sent early belong to the TLS stream; a TLSSocket reads what is buffered.
      if (head.length > 0) client.unshift(head);
      const tls = new TLSSocket(client as Socket, {
        isServer: true,
        secureContext: context,
        ALPNProtocols: ['http/1.1'],
      });
      intercepted.set(tls, { ...target, address });
      let secured = false;
      tls.once('secure', () => {
        secured = true;
      });
      // A handshake that never completes is most often a client that does not trust the
      // session's CA: audit it, since no request will be.
      let failure = 'the client closed the connection';
      tls.on('error', (error: NodeJS.ErrnoException) => {
        failure = `TLS error ${error.code ?? 'unknown'}`;
        client.destroy();
      });
      tls.once('close', () => {
        if (!secured)
          answerless(
            `TLS with the sandbox's client did not complete (${failure}); does it trust the session CA?`,
          );
      });
      track(tls);
      interceptor.emit('connection', tls);
    };

    const tunnel = (address: string) => {
      const upstream = netConnect({ host: address, port: target.port, noDelay: true });
      track(upstream);
      upstream.setTimeout(limits.connectTimeoutMs, () =>
        upstream.destroy(Object.assign(new Error('timed out'), { code: 'ETIMEDOUT' })),
      );
      upstream.once('connect', () => {
        upstream.setTimeout(limits.idleTimeoutMs);
        record.status = 200;
        client.write('HTTP/1.1 200 Connection established\r\n\r\n');
        if (head.length > 0) {
          record.bytesSent += head.length;
          upstream.write(head);
        }
        client.on('data', (chunk: Buffer) => {
          record.bytesSent += chunk.length;
        });
        upstream.on('data', (chunk: Buffer) => {
          record.bytesReceived += chunk.length;
        });
        client.pipe(upstream);
        upstream.pipe(client);
      });
      upstream.on('error', (error: NodeJS.ErrnoException) => {
        if (record.status === null) {
          answer(
            new Refusal(
              502,
              `cannot connect to ${target.host}:${target.port} (${error.code ?? 'error'})`,
              'allowed',
            ),
          );
        } else client.destroy();
      });
      upstream.on('close', () => {
        client.destroy();
        report();
      });
      client.on('close', () => upstream.destroy());
    };

    void (async () => {
      const policy = compiled;
      const address = await destination(policy, target);
      if (policy.credentialsFor(target.host).length > 0) await intercept(address);
      else tunnel(address);
    })().catch((error: unknown) =>
      answer(
        error instanceof Refusal
          ? error
          : new Refusal(502, `the proxy could not open ${target.host}:${target.port}`, 'allowed'),
      ),
    );
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
      compiled = compilePolicy(next);
    },
    async close() {
      closing = true;
      const closed = new Promise<void>((resolvePromise) => server.close(() => resolvePromise()));
      for (const upstream of upstreamRequests) upstream.destroy();
      for (const socket of sockets) socket.destroy();
      server.closeAllConnections();
      interceptor.closeAllConnections();
      httpAgent.destroy();
      httpsAgent.destroy();
      await closed;
      rmSync(options.socketPath, { force: true });
    },
  };
}
