/**
 * Requests Berth makes on a session's behalf from the host (the `web_fetch` tool, remote MCP
 * servers) under the same egress rules as the sandbox's proxy: the session's `networking` is
 * checked before any lookup, the name is resolved here and only a public address (or an
 * operator's exact exception) is connected to, and every request, allowed or refused, is audited
 * like the proxy's. The sandbox is not involved, so these requests need no sandbox: a session's
 * first model call (which lists its MCP tools) never waits for one.
 *
 * Redirects are followed here, hop by hop, each hop checked and audited on its own; a credential
 * is attached only on hops whose host it is for, so a redirect elsewhere never carries it.
 */
import { isIP } from 'node:net';
import { pipeline, Readable } from 'node:stream';
import { rootCertificates } from 'node:tls';
import { Agent, buildConnector, type Dispatcher, fetch as undiciFetch } from 'undici';
import { canonicalHost } from './addresses.js';
import { type DestinationRule, Refusal } from './destinations.js';
import type { CompiledPolicy } from './policy.js';
import type { EgressAuditRecord } from './proxy.js';
import { type Replacement, replaceAll, replacingStream } from './replace-stream.js';

export { Refusal } from './destinations.js';

export interface HostFetchOptions {
  /** What the session may reach (its environment's `networking`, compiled). */
  policy: Pick<CompiledPolicy, 'reachable'>;
  /** Picks the address to connect to (shared with the proxy: `createDestinationRule`). */
  destinations: DestinationRule;
  /** Extra roots trusted for upstream TLS besides Node's own (PEM). */
  upstreamCaCertificates?: readonly string[];
  /** Hears every request, allowed or refused. */
  onRequest?(record: EgressAuditRecord): void;
  /** To connect and finish TLS (default 15 s). */
  connectTimeoutMs?: number;
  /** Redirects followed per request (default 5). */
  maxRedirects?: number;
  /**
   * Secrets of the session to replace in every answer (headers and body) before the caller
   * sees it: what Berth fetches goes to the model and the session's log, which must never hold
   * a secret a host stored and serves again.
   */
  responseSwaps?: readonly Replacement[];
}

/** A credential for one request hop: the header value and the name audits use. */
export interface HopCredential {
  /** The `Authorization` header value. */
  authorization: string;
  /** The credential's display name (never its value). */
  name: string;
}

export interface HostFetchInit {
  method?: string;
  headers?: Record<string, string> | Headers;
  /** Strings and bytes only: a body is sent again on a 307/308 redirect. */
  body?: string | Uint8Array;
  signal?: AbortSignal;
  /** `manual`: redirects are returned, not followed (the MCP client's own choice). */
  redirect?: 'follow' | 'manual';
  /** The credential for a hop to `url`, if one applies there (asked on every hop). */
  credentialFor?(url: URL): Promise<HopCredential | undefined> | HopCredential | undefined;
  /** Throws a Refusal for a hop the caller's own rules forbid (checked before the session's). */
  checkHop?(url: URL): void;
  /** What the request is for, in the audit (`web_fetch`, `mcp:<server>`). */
  purpose?: string;
}

export interface HostFetch {
  /** Like `fetch`; a refused request rejects with a `Refusal` whose message says which rule. */
  fetch(url: string | URL, init?: HostFetchInit): Promise<Response>;
  /** Closes the kept-alive connections. */
  close(): Promise<void>;
}

const REDIRECT_STATUSES = new Set([301, 302, 303, 307, 308]);

/** The Refusal behind an error from undici (it wraps connector errors as `fetch failed`). */
function refusalIn(error: unknown): Refusal | undefined {
  for (let current = error, depth = 0; current instanceof Error && depth < 4; depth++) {
    if (current instanceof Refusal) return current;
    current = current.cause;
  }
  return undefined;
}

function bodyBytes(body: HostFetchInit['body']): number {
  if (body === undefined) return 0;
  return typeof body === 'string' ? Buffer.byteLength(body) : body.byteLength;
}

/** Body bytes of one response as they arrive (before content decoding), and when it is over. */
interface ReceivedBytes {
  bytes: number;
  /** Resolves when the response's body ended, failed or was cancelled. */
  finished: Promise<void>;
}

/**
 * `dispatcher` for one request, counting the body bytes the upstream sends (undici's fetch
 * decodes gzip or brotli above this, and a chunked or streamed answer has no length to trust).
 */
function countingDispatcher(dispatcher: Dispatcher): { dispatcher: Dispatcher; received: ReceivedBytes } {
  let finish: () => void = () => undefined;
  const received: ReceivedBytes = { bytes: 0, finished: new Promise<void>((resolve) => (finish = resolve)) };
  const counting = dispatcher.compose(
    (dispatch) => (options, handler) =>
      dispatch(options, {
        onRequestStart: (controller, context) => handler.onRequestStart?.(controller, context),
        onRequestUpgrade: (controller, statusCode, headers, socket) =>
          handler.onRequestUpgrade?.(controller, statusCode, headers, socket),
        onResponseStart: (controller, statusCode, headers, statusMessage) =>
          handler.onResponseStart?.(controller, statusCode, headers, statusMessage),
        onResponseData: (controller, chunk) => {
          received.bytes += chunk.length;
          handler.onResponseData?.(controller, chunk);
        },
        onResponseEnd: (controller, trailers) => {
          finish();
          handler.onResponseEnd?.(controller, trailers);
        },
        onResponseError: (controller, error) => {
          finish();
          handler.onResponseError?.(controller, error);
        },
      }),
  );
  return { dispatcher: counting, received };
}

/**
 * `response` with `swaps` applied to its header values and its body (streamed; a secret split
 * across chunks is still found), or `response` itself when there is nothing to swap.
 */
function scanned(response: Response, swaps: readonly Replacement[]): Response {
  if (swaps.length === 0) return response;
  const headers = new Headers();
  for (const [name, value] of response.headers) {
    // The body's length may change; fetch has already undone any content-encoding.
    if (name === 'content-length') continue;
    headers.append(name, replaceAll(Buffer.from(value, 'latin1'), swaps).toString('latin1'));
  }
  let body: ReadableStream<Uint8Array> | null = null;
  if (response.body !== null) {
    const replacing = replacingStream(swaps);
    // pipeline, not pipe: an upstream that fails or a caller that aborts (an MCP client closing
    // its stream) errors the replacing stream, which the caller's read sees. With pipe the
    // source's error had no listener and was an uncaught exception that could end the server.
    pipeline(Readable.fromWeb(response.body as import('node:stream/web').ReadableStream), replacing, () => {
      // The error, if any, reaches the reader through `replacing`.
    });
    body = Readable.toWeb(replacing) as ReadableStream<Uint8Array>;
  }
  const result = new Response(body, {
    status: response.status,
    statusText: replaceAll(Buffer.from(response.statusText, 'latin1'), swaps).toString('latin1'),
    headers,
  });
  Object.defineProperty(result, 'url', { value: response.url });
  return result;
}

/** Creates the host-side client of one session (one connection pool, closed with `close`). */
export function createHostFetch(options: HostFetchOptions): HostFetch {
  const extraRoots = options.upstreamCaCertificates ?? [];
  const connectBase = buildConnector({
    timeout: options.connectTimeoutMs ?? 15_000,
    ...(extraRoots.length > 0 ? { ca: [...rootCertificates, ...extraRoots] } : {}),
  });
  const dispatcher = new Agent({
    keepAliveTimeout: 30_000,
    connect: (connectOptions, callback) => {
      const host = canonicalHost(connectOptions.hostname);
      const port = Number(connectOptions.port) || (connectOptions.protocol === 'https:' ? 443 : 80);
      if (host === undefined) {
        callback(new Refusal(400, `bad host ${connectOptions.hostname}`, 'denied'), null);
        return;
      }
      options.destinations(options.policy, { host, port }).then(
        (address) =>
          connectBase(
            // Connect to the checked address; TLS still verifies the name that was asked for.
            { ...connectOptions, hostname: address, servername: isIP(host) ? undefined : host },
            callback,
          ),
        (error: unknown) => callback(error as Error, null),
      );
    },
  });
  const maxRedirects = options.maxRedirects ?? 5;

  const audit = (record: EgressAuditRecord) => {
    try {
      options.onRequest?.(record);
    } catch {
      // An audit sink that throws must not break the request.
    }
  };

  return {
    async fetch(input, init = {}) {
      let url = new URL(String(input));
      const firstOrigin = url.origin;
      let method = (init.method ?? 'GET').toUpperCase();
      let body = init.body;
      for (let hop = 0; ; hop++) {
        const started = performance.now();
        const port = Number(url.port) || (url.protocol === 'https:' ? 443 : 80);
        const host = canonicalHost(url.hostname) ?? url.hostname;
        const record = (fields: Partial<EgressAuditRecord>): EgressAuditRecord => ({
          method,
          host,
          port,
          path: `${url.pathname}${url.search}`,
          status: null,
          bytesSent: bodyBytes(body),
          bytesReceived: 0,
          credentials: [],
          decision: 'allowed',
          tls: url.protocol === 'https:' ? 'passthrough' : 'none',
          durationMs: performance.now() - started,
          ...(init.purpose ? { purpose: init.purpose } : {}),
          ...fields,
        });
        if (url.protocol !== 'http:' && url.protocol !== 'https:') {
          const refusal = new Refusal(
            400,
            `only http and https URLs can be fetched, not ${url.protocol}`,
            'denied',
          );
          audit(record({ status: 400, decision: 'denied', reason: refusal.message }));
          throw refusal;
        }
        try {
          init.checkHop?.(url);
        } catch (error) {
          const reason = error instanceof Error ? error.message : String(error);
          audit(record({ status: 403, decision: 'denied', reason }));
          throw error instanceof Refusal ? error : new Refusal(403, reason, 'denied');
        }
        // Rule 1 before anything else, so the refusal names the policy (and nothing is looked up).
        const reachable = options.policy.reachable(host);
        if (!reachable.ok) {
          audit(record({ status: 403, decision: 'denied', reason: reachable.reason }));
          throw new Refusal(403, reachable.reason, 'denied');
        }
        const headers = new Headers(init.headers);
        if (url.origin !== firstOrigin) {
          // The caller's own credentials were for the first origin only.
          headers.delete('authorization');
          headers.delete('cookie');
        }
        const credential = await init.credentialFor?.(url);
        if (credential) headers.set('authorization', credential.authorization);
        let response: Response;
        const counted = countingDispatcher(dispatcher);
        try {
          response = (await undiciFetch(url, {
            method,
            headers: Object.fromEntries(headers),
            body,
            signal: init.signal,
            redirect: 'manual',
            dispatcher: counted.dispatcher,
          })) as unknown as Response;
        } catch (error) {
          const refusal = refusalIn(error);
          audit(
            record({
              status: refusal?.status ?? null,
              decision: refusal?.decision ?? 'allowed',
              reason: refusal?.message ?? (error instanceof Error ? error.message : String(error)),
              credentials: credential ? [credential.name] : [],
            }),
          );
          throw refusal ?? error;
        }
        // Audited once the body is over (read to its end, failed or cancelled), with the bytes
        // that really came; a body-less answer is over already.
        const status = response.status;
        const audited = (response.body === null ? Promise.resolve() : counted.received.finished).then(() =>
          audit(
            record({
              status,
              bytesReceived: counted.received.bytes,
              credentials: credential ? [credential.name] : [],
            }),
          ),
        );
        const location = response.headers.get('location');
        if (init.redirect === 'manual' || !REDIRECT_STATUSES.has(status) || location === null) {
          return scanned(response, options.responseSwaps ?? []);
        }
        await response.body?.cancel().catch(() => undefined);
        await audited;
        if (hop + 1 > maxRedirects) throw new Refusal(502, `more than ${maxRedirects} redirects`, 'allowed');
        url = new URL(location, url);
        if (
          response.status === 303 ||
          ((response.status === 301 || response.status === 302) && method === 'POST')
        ) {
          method = 'GET';
          body = undefined;
        }
      }
    },

    async close() {
      await dispatcher.close().catch(() => undefined);
    },
  };
}

/**
 * `fetch` that reports each request to `onRequest` as an audit record with `purpose`, once its
 * answer's body is over (read, failed or cancelled), with the body bytes read (after any
 * decoding `fetch` does). For requests Berth makes outside a session's policy (the vault's
 * OAuth token and validation requests), so they have spans and metrics like the others.
 * Nothing is checked or refused here.
 */
export function observedFetch(
  fetchFunction: typeof fetch,
  purpose: string,
  onRequest: (record: EgressAuditRecord) => void,
): typeof fetch {
  return async (input, init) => {
    const started = performance.now();
    const url = new URL(input instanceof Request ? input.url : String(input));
    const method = (init?.method ?? (input instanceof Request ? input.method : 'GET')).toUpperCase();
    const sent = init?.body;
    const record = (fields: Partial<EgressAuditRecord>): EgressAuditRecord => ({
      method,
      host: canonicalHost(url.hostname) ?? url.hostname,
      port: Number(url.port) || (url.protocol === 'https:' ? 443 : 80),
      path: url.pathname,
      status: null,
      bytesSent:
        typeof sent === 'string' ? Buffer.byteLength(sent) : sent instanceof Uint8Array ? sent.byteLength : 0,
      bytesReceived: 0,
      credentials: [],
      decision: 'allowed',
      tls: url.protocol === 'https:' ? 'passthrough' : 'none',
      durationMs: performance.now() - started,
      purpose,
      ...fields,
    });
    const report = (entry: EgressAuditRecord) => {
      try {
        onRequest(entry);
      } catch {
        // An observer that throws must not break the request.
      }
    };
    let response: Response;
    try {
      response = await fetchFunction(input, init);
    } catch (error) {
      const code = (error as { cause?: { code?: string } }).cause?.code ?? (error as Error).name;
      report(record({ reason: `the request failed (${code})` }));
      throw error;
    }
    const body = response.body;
    if (body === null) {
      report(record({ status: response.status }));
      return response;
    }
    let received = 0;
    let reported = false;
    const finish = () => {
      if (reported) return;
      reported = true;
      report(record({ status: response.status, bytesReceived: received }));
    };
    const reader = body.getReader();
    const counted = new ReadableStream<Uint8Array>({
      async pull(controller) {
        try {
          const { done, value } = await reader.read();
          if (done) {
            finish();
            controller.close();
            return;
          }
          received += value.byteLength;
          controller.enqueue(value);
        } catch (error) {
          finish();
          controller.error(error);
        }
      },
      cancel(reason) {
        finish();
        return reader.cancel(reason);
      },
    });
    const observed = new Response(counted, {
      status: response.status,
      statusText: response.statusText,
      headers: response.headers,
    });
    Object.defineProperty(observed, 'url', { value: response.url });
    return observed;
  };
}
