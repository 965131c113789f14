/**
 * Cluster routing for the API (src/control/cluster.ts decides where): a request that needs a
 * session's live instance (new events, interrupts, the sandbox and its files, changes to the
 * session) runs on the node holding the session, and any other node forwards it there. Reads
 * run wherever they arrive: the store is shared, and event streams hear every node's appends
 * (LISTEN/NOTIFY). A forwarded request is marked, so it is never forwarded twice.
 *
 * Two ways there:
 * - The fast way (`clusterRequestListener`), in front of the HTTP framework: a request for a
 *   session another node was seen holding a moment ago goes there socket to socket, before this
 *   node parses anything but the path. The holder checks the key and the session's owner, as it
 *   does for every request, so this node need not.
 * - The slow way (`clusterRouting`), after this node checked the key and loaded the session:
 *   asks the lease table who holds the session, or places it.
 */

import {
  type ClientRequest,
  Agent as HttpAgent,
  request as httpRequest,
  type IncomingHttpHeaders,
  type IncomingMessage,
  type RequestListener,
  type ServerResponse,
} from 'node:http';
import { Agent as HttpsAgent, request as httpsRequest } from 'node:https';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import type { ReadableStream as NodeReadableStream } from 'node:stream/web';
import { getRequestListener } from '@hono/node-server';
import { RESPONSE_ALREADY_SENT } from '@hono/node-server/utils/response';
import type { Context, Next } from 'hono';
import { BerthError } from '../errors.js';
import type { Authenticator } from '../identity/api-keys.js';
import type { SessionKey } from '../store/event-store.js';
import { type ApiEnvironment, presentedKey } from './context.js';
import { errorBody } from './errors.js';

/** Marks a request one node forwarded to another (its value: the forwarding node). */
export const FORWARDED_HEADER = 'x-berth-forwarded-by';

/** What the API needs of the cluster. */
export interface ClusterRouter {
  readonly nodeId: string;
  route(
    session: SessionKey,
    options?: { forwarded?: boolean },
  ): Promise<{ local: true } | { local: false; nodeId: string; url: string } | { retry: string }>;
  /** The other node believed to hold the session (remembered for a moment), if any. */
  knownHolder(sessionId: string): { nodeId: string; url: string } | undefined;
  /** Drops what `knownHolder` remembers of the session. */
  forget(sessionId: string): void;
}

/** Kept-alive connections to the other nodes (`https` when a node advertises an https URL). */
const httpNodes = new HttpAgent({ keepAlive: true, maxSockets: 128 });
const httpsNodes = new HttpsAgent({ keepAlive: true, maxSockets: 128 });

/** A node that does not accept the connection in this long counts as unreachable. */
const CONNECT_TIMEOUT_MS = 10_000;

/** Errors after which the holder certainly did not get the request, so it may be sent again. */
const NOT_DELIVERED = new Set(['ECONNREFUSED', 'EHOSTUNREACH', 'ENETUNREACH', 'ENOTFOUND', 'EAI_AGAIN']);

/** Why a forward failed, and whether the holder may have acted on the request. */
class ForwardError extends BerthError {
  constructor(
    readonly delivered: boolean,
    cause: unknown,
  ) {
    super('store_unavailable', 'the node holding this session could not be reached; retry', {
      retryable: true,
      cause,
    });
  }
}

/** Set on the 503 a node answers to a forwarded request for a session it does not hold. */
const NOT_HOLDER_HEADER = 'x-berth-not-holder';

/** Headers that describe one connection, not the request (RFC 9110 §7.6.1). */
const HOP_BY_HOP = new Set([
  'connection',
  'keep-alive',
  'proxy-connection',
  'transfer-encoding',
  'te',
  'trailer',
  'upgrade',
]);

/** Reads that any node can serve (the rest of a session's routes need its live instance). */
function servedAnywhere(method: string, path: string): boolean {
  if (method !== 'GET' && method !== 'HEAD') return false;
  return !/^\/v1\/sessions\/[^/]+\/(files|sandbox)(\/|$)/.test(path);
}

/** A request as sent to the holder. */
interface Outbound {
  method: string;
  /** Path and query, as received. */
  path: string;
  headers: Record<string, string>;
  body: Uint8Array | undefined;
}

/** The request's headers minus hop-by-hop ones, the host and the length (Node sets both). */
function outboundHeaders(rawHeaders: readonly string[], fromNode: string): Record<string, string> {
  const headers: Record<string, string> = {};
  for (let index = 0; index < rawHeaders.length; index += 2) {
    const name = rawHeaders[index]!.toLowerCase();
    if (HOP_BY_HOP.has(name) || name === 'host' || name === 'content-length') continue;
    const value = rawHeaders[index + 1]!;
    headers[name] = headers[name] === undefined ? value : `${headers[name]}, ${value}`;
  }
  headers[FORWARDED_HEADER] = fromNode;
  return headers;
}

/**
 * Sends the request to the node at `baseUrl`; resolves with its answer, body unread. Rejects
 * with a `ForwardError` that says whether the holder may have received the request. `signal`
 * (the client went away) cancels it.
 */
function send(baseUrl: string, outbound: Outbound, signal?: AbortSignal): Promise<IncomingMessage> {
  const target = new URL(baseUrl);
  const secure = target.protocol === 'https:';
  return new Promise((resolve, reject) => {
    let answered = false;
    const request: ClientRequest = (secure ? httpsRequest : httpRequest)(
      {
        hostname: target.hostname.replace(/^\[|\]$/g, ''),
        port: target.port || (secure ? 443 : 80),
        // Never resolved against the holder's URL: a path starting with // must not name a host.
        path: outbound.path,
        method: outbound.method,
        headers: outbound.headers,
        agent: secure ? httpsNodes : httpNodes,
        // No idle timeout per request (it measurably slowed every forward): a holder that stops
        // answering is given up when the client gives up, through `signal`.
        ...(signal ? { signal } : {}),
      },
      (answer) => {
        answered = true;
        resolve(answer);
      },
    );
    request.once('socket', (socket) => {
      if (!socket.connecting) return;
      const timer = setTimeout(() => {
        const error = Object.assign(new Error('connect timed out'), { code: 'ECONNREFUSED' });
        request.destroy(error);
      }, CONNECT_TIMEOUT_MS);
      socket.once('connect', () => clearTimeout(timer));
      socket.once('close', () => clearTimeout(timer));
    });
    // Also after the answer came: a connection lost mid-body must not go unheard.
    request.on('error', (error: NodeJS.ErrnoException) => {
      if (answered) return;
      // A kept-alive connection the holder had just closed: nothing was read from it.
      const stale = request.reusedSocket && error.code === 'ECONNRESET';
      reject(new ForwardError(!(stale || NOT_DELIVERED.has(error.code ?? '')), error));
    });
    request.end(outbound.body);
  });
}

/** Whether the holder said it does not hold the session (any more). */
function notHolder(answer: IncomingMessage): boolean {
  return answer.statusCode === 503 && answer.headers[NOT_HOLDER_HEADER] !== undefined;
}

/** The answer's headers minus hop-by-hop ones; the length stays (the body passes byte for byte). */
function answerHeaders(headers: IncomingHttpHeaders): Record<string, string | string[]> {
  const out: Record<string, string | string[]> = {};
  for (const [name, value] of Object.entries(headers)) {
    if (value !== undefined && !HOP_BY_HOP.has(name)) out[name] = value;
  }
  return out;
}

/** Passes the holder's answer on to the client on Node's response; either side ending ends both. */
async function relay(answer: IncomingMessage, outgoing: ServerResponse): Promise<void> {
  outgoing.writeHead(answer.statusCode ?? 502, answerHeaders(answer.headers));
  await pipeline(answer, outgoing).catch(() => undefined);
}

/** The holder's answer as a web Response (under `app.request()`, which has no Node response). */
function toResponse(answer: IncomingMessage, method: string): Response {
  const headers = new Headers();
  for (const [name, value] of Object.entries(answerHeaders(answer.headers))) {
    for (const one of Array.isArray(value) ? value : [value]) headers.append(name, one);
  }
  const status = answer.statusCode ?? 502;
  if (status === 204 || status === 304 || method === 'HEAD') {
    answer.resume();
    return new Response(null, { status, headers });
  }
  return new Response(Readable.toWeb(answer) as ReadableStream<Uint8Array>, { status, headers });
}

/** A session path that needs the live instance, not marked forwarded: its session id. */
function sessionToForward(incoming: IncomingMessage): string | undefined {
  const url = incoming.url ?? '';
  const match = /^\/v1\/sessions\/([^/?#]+)([^?#]*)/.exec(url);
  if (!match || incoming.headers[FORWARDED_HEADER] !== undefined) return undefined;
  if (servedAnywhere(incoming.method ?? 'GET', `/v1/sessions/${match[1]}${match[2]}`)) return undefined;
  return match[1];
}

/** One request header as a string (repeated ones joined), or undefined. */
function headerValue(incoming: IncomingMessage, name: string): string | undefined {
  const value = incoming.headers[name.toLowerCase()];
  return Array.isArray(value) ? value.join(', ') : value;
}

/** Reads a body of exactly `length` bytes. */
async function readBody(incoming: IncomingMessage, length: number): Promise<Uint8Array> {
  const chunks: Buffer[] = [];
  for await (const chunk of incoming) chunks.push(chunk as Buffer);
  const body = Buffer.concat(chunks);
  if (body.length !== length)
    throw new Error(`the request body ended after ${body.length} of ${length} bytes`);
  return body;
}

/**
 * The HTTP server's request listener in cluster mode: `app` handles every request, except one
 * for a session another node was seen holding a moment ago, which goes straight there. Bodies
 * up to `maxBodyBytes` with a declared length are read first (so the request can still be
 * handled here if the holder moved); the rest, and every other request, go to `app`.
 */
export function clusterRequestListener(options: {
  cluster: ClusterRouter;
  app: { fetch: (request: Request, env?: object) => Response | Promise<Response> };
  authenticator: Pick<Authenticator, 'authenticate'>;
  maxBodyBytes: number;
}): RequestListener {
  const { cluster, app, authenticator, maxBodyBytes } = options;
  const local = getRequestListener(app.fetch);
  // The request once its body was read: handled here through a web Request.
  const localAgain = async (incoming: IncomingMessage, outgoing: ServerResponse, body: Uint8Array) => {
    const headers = new Headers();
    for (let index = 0; index < incoming.rawHeaders.length; index += 2) {
      headers.append(incoming.rawHeaders[index]!, incoming.rawHeaders[index + 1]!);
    }
    const response = await app.fetch(
      new Request(`http://localhost${incoming.url}`, {
        method: incoming.method!,
        headers,
        body,
      }),
      {},
    );
    const out: Record<string, string | string[]> = {};
    response.headers.forEach((value, name) => {
      if (name !== 'set-cookie') out[name] = value;
    });
    const cookies = response.headers.getSetCookie();
    if (cookies.length > 0) out['set-cookie'] = cookies;
    outgoing.writeHead(response.status, out);
    if (!response.body) {
      outgoing.end();
      return;
    }
    await pipeline(Readable.fromWeb(response.body as NodeReadableStream), outgoing).catch(() => undefined);
  };

  const forwardFast = async (
    incoming: IncomingMessage,
    outgoing: ServerResponse,
    sessionId: string,
    holderUrl: string,
    length: number,
  ) => {
    let body: Uint8Array | undefined;
    if (length > 0) {
      // Only a caller with a valid key gets its body read here (the app refuses others before
      // reading); the holder still checks the key and the session's owner.
      const key = presentedKey({ header: (name) => headerValue(incoming, name) });
      if (!key || !(await authenticator.authenticate(key))) return local(incoming, outgoing);
      try {
        body = await readBody(incoming, length);
      } catch {
        outgoing.destroy();
        return;
      }
    }
    const leaving = new AbortController();
    const onClose = () => {
      if (!outgoing.writableFinished) leaving.abort();
    };
    outgoing.once('close', onClose);
    let answer: IncomingMessage | undefined;
    try {
      answer = await send(
        holderUrl,
        {
          method: incoming.method!,
          path: incoming.url!,
          headers: outboundHeaders(incoming.rawHeaders, cluster.nodeId),
          body,
        },
        leaving.signal,
      );
    } catch (error) {
      if (leaving.signal.aborted) return;
      if (error instanceof ForwardError && error.delivered) {
        // The holder may have acted on it: sending it again could run it twice. The client retries.
        outgoing.writeHead(503, { 'content-type': 'application/json', 'retry-after': '1' });
        outgoing.end(JSON.stringify(errorBody('overloaded_error', error.message)));
        return;
      }
      // Never reached the holder: handled here, where routing asks the lease table again.
    }
    if (answer && !notHolder(answer)) return relay(answer, outgoing);
    outgoing.off('close', onClose);
    answer?.destroy();
    cluster.forget(sessionId);
    if (body === undefined) return local(incoming, outgoing);
    return localAgain(incoming, outgoing, body);
  };

  return (incoming, outgoing) => {
    const sessionId = sessionToForward(incoming);
    const holder = sessionId === undefined ? undefined : cluster.knownHolder(sessionId);
    const declared = incoming.headers['content-length'];
    const length = declared === undefined ? 0 : Number(declared);
    // Chunked, oversized or misplaced bodies: the framework (limits, then the slow way).
    if (
      !holder ||
      incoming.headers['transfer-encoding'] !== undefined ||
      !Number.isSafeInteger(length) ||
      length > maxBodyBytes ||
      (length > 0 && (incoming.method === 'GET' || incoming.method === 'HEAD'))
    ) {
      return local(incoming, outgoing);
    }
    forwardFast(incoming, outgoing, sessionId!, holder.url, length).catch(() => {
      if (!outgoing.headersSent) {
        outgoing.writeHead(400, { 'content-type': 'application/json', connection: 'close' });
        outgoing.end(
          JSON.stringify(errorBody('invalid_request_error', 'the request body could not be read')),
        );
      } else {
        outgoing.destroy();
      }
    });
  };
}

/**
 * The request's body, read through Hono's request so it is cached: a request that ends up
 * handled here reads it again.
 */
async function bodyOf(context: Context<ApiEnvironment>): Promise<Uint8Array | undefined> {
  if (context.req.method === 'GET' || context.req.method === 'HEAD') return undefined;
  return new Uint8Array(await context.req.arrayBuffer());
}

/** Middleware for `/v1/sessions/:id[/…]`, after the session was loaded for the caller. */
export function clusterRouting(cluster: ClusterRouter) {
  return async (context: Context<ApiEnvironment>, next: Next) => {
    if (servedAnywhere(context.req.method, context.req.path)) return next();
    const session = context.get('session');
    const forwarded = context.req.header(FORWARDED_HEADER) !== undefined;
    const route = await cluster.route(session, { forwarded });
    if ('retry' in route) throw new BerthError('store_unavailable', route.retry, { retryable: true });
    if (route.local) return next();
    if (forwarded) {
      // Moved again while the request travelled: the forwarding node re-routes (or the client
      // retries); never a forwarding loop.
      return context.json(
        errorBody(
          'overloaded_error',
          'this node does not hold the session (it is moving between nodes); retry',
        ),
        503,
        { [NOT_HOLDER_HEADER]: route.nodeId, 'retry-after': '1' },
      );
    }
    let rawHeaders = context.env?.incoming?.rawHeaders;
    if (!rawHeaders) {
      const pairs: string[] = [];
      for (const [name, value] of context.req.raw.headers) pairs.push(name, value);
      rawHeaders = pairs;
    }
    const url = new URL(context.req.url);
    const answer = await send(
      route.url,
      {
        method: context.req.method,
        path: `${url.pathname}${url.search}`,
        headers: outboundHeaders(rawHeaders, cluster.nodeId),
        body: await bodyOf(context),
      },
      context.req.raw.signal,
    );
    const outgoing = context.env?.outgoing;
    if (!outgoing) return toResponse(answer, context.req.method);
    await relay(answer, outgoing);
    return RESPONSE_ALREADY_SENT;
  };
}
