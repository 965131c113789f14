/**
 * Cluster routing for the API (src/control/cluster.ts decides where): a request that needs a
 * session's live instance (new events, interrupts, the sandbox and its files, changes to the
 * session) runs on the node holding the session, and any other node forwards it there. Reads
 * run wherever they arrive: the store is shared, and event streams hear every node's appends
 * (LISTEN/NOTIFY). A forwarded request is marked, so it is never forwarded twice.
 */
import { Readable } from 'node:stream';
import type { Context, Next } from 'hono';
import { Agent, type Dispatcher, request as undiciRequest } from 'undici';
import { BerthError } from '../errors.js';
import type { SessionKey } from '../store/event-store.js';
import type { ApiEnvironment } from './context.js';
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
  /** The other node believed to hold the session (cached for a moment), if any. */
  knownHolder(session: SessionKey): { nodeId: string; url: string } | undefined;
  /** Drops what `knownHolder` remembers of the session. */
  forget(session: SessionKey): void;
}

/** Kept-alive connections to the other nodes. */
const nodes = new Agent({ keepAliveTimeout: 30_000, connections: 128 });

/** Set on the 503 a node answers to a forwarded request for a session it does not hold. */
const NOT_HOLDER_HEADER = 'x-berth-not-holder';

/** Headers that describe one connection, not the request (RFC 9110 §7.6.1), and the length. */
const HOP_BY_HOP = [
  'connection',
  'keep-alive',
  'proxy-connection',
  'transfer-encoding',
  'te',
  'trailer',
  'upgrade',
  'host',
  'content-length',
];

/** Reads that any node can serve (the rest of a session's routes need its live instance). */
function servedAnywhere(method: string, path: string): boolean {
  if (method !== 'GET' && method !== 'HEAD') return false;
  return !/^\/v1\/sessions\/[^/]+\/(files|sandbox)(\/|$)/.test(path);
}

/** Sends the request to `baseUrl` and returns its answer as it streams. */
async function forward(
  request: Request,
  body: Uint8Array | undefined,
  baseUrl: string,
  fromNode: string,
): Promise<Response> {
  const incoming = new URL(request.url);
  const target = new URL(`${incoming.pathname}${incoming.search}`, baseUrl);
  const headers: Record<string, string> = {};
  request.headers.forEach((value, name) => {
    if (!HOP_BY_HOP.includes(name)) headers[name] = value;
  });
  headers[FORWARDED_HEADER] = fromNode;
  let answer: Dispatcher.ResponseData;
  try {
    answer = await undiciRequest(target, {
      method: request.method as Dispatcher.HttpMethod,
      headers,
      body,
      dispatcher: nodes,
    });
  } catch (error) {
    throw new BerthError('store_unavailable', `the node holding this session could not be reached; retry`, {
      retryable: true,
      cause: error,
    });
  }
  const out = new Headers();
  for (const [name, value] of Object.entries(answer.headers)) {
    if (value === undefined || HOP_BY_HOP.includes(name)) continue;
    for (const one of Array.isArray(value) ? value : [value]) out.append(name, one);
  }
  // Small answers whole (cheaper than piping a stream); streams (SSE, downloads) as they come.
  const length = Number(answer.headers['content-length']);
  const payload =
    Number.isFinite(length) && length <= 1024 * 1024
      ? new Uint8Array(await answer.body.arrayBuffer())
      : (Readable.toWeb(answer.body) as ReadableStream<Uint8Array>);
  return new Response(answer.statusCode === 204 || answer.statusCode === 304 ? null : payload, {
    status: answer.statusCode,
    headers: out,
  });
}

/**
 * The request's body, read through Hono's request so it is cached: a forward may be sent twice,
 * and a request that ends up handled here reads it again.
 */
async function bodyOf(context: Context<ApiEnvironment>): Promise<Uint8Array | undefined> {
  if (context.req.method === 'GET' || context.req.method === 'HEAD') return undefined;
  return new Uint8Array(await context.req.arrayBuffer());
}

/**
 * Forwards to the node believed to hold the session, before this node loads anything: the
 * cheapest path for a request that reached the wrong node. Unknown holder: the next middleware
 * (after the session's ownership check) decides. A holder that turns out not to hold the
 * session any more answers 503 `x-berth-not-holder`; the belief is dropped and the request
 * takes the slow path here.
 */
export function clusterFastForward(cluster: ClusterRouter) {
  return async (context: Context<ApiEnvironment>, next: Next) => {
    if (servedAnywhere(context.req.method, context.req.path)) return next();
    if (context.req.header(FORWARDED_HEADER) !== undefined) return next();
    const session = { tenantId: context.get('principal').tenantId, id: context.req.param('id')! };
    const holder = cluster.knownHolder(session);
    if (!holder) return next();
    const body = await bodyOf(context);
    const answer = await forward(context.req.raw, body, holder.url, cluster.nodeId);
    if (answer.status !== 503 || answer.headers.get(NOT_HOLDER_HEADER) === null) return answer;
    await answer.body?.cancel().catch(() => undefined);
    cluster.forget(session);
    return next();
  };
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
    return forward(context.req.raw, await bodyOf(context), route.url, cluster.nodeId);
  };
}
