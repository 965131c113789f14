/**
 * Cluster routing for the API (src/control/cluster.ts decides where): a request that needs a
 * session's live instance (new events, interrupts, the sandbox and its files, changes to the
 * session) runs on the node holding the session, and any other node forwards it there. Reads
 * run wherever they arrive: the store is shared, and event streams hear every node's appends
 * (LISTEN/NOTIFY). A forwarded request is marked, so it is never forwarded twice.
 */
import type { Context, Next } from 'hono';
import { BerthError } from '../errors.js';
import type { SessionKey } from '../store/event-store.js';
import type { ApiEnvironment } from './context.js';

/** Marks a request one node forwarded to another (its value: the forwarding node). */
export const FORWARDED_HEADER = 'x-berth-forwarded-by';

/** What the API needs of the cluster. */
export interface ClusterRouter {
  readonly nodeId: string;
  route(
    session: SessionKey,
  ): Promise<{ local: true } | { local: false; nodeId: string; url: string } | { retry: string }>;
}

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
async function forward(request: Request, baseUrl: string, fromNode: string): Promise<Response> {
  const incoming = new URL(request.url);
  const target = new URL(`${incoming.pathname}${incoming.search}`, baseUrl);
  const headers = new Headers(request.headers);
  for (const name of HOP_BY_HOP) headers.delete(name);
  headers.set(FORWARDED_HEADER, fromNode);
  const body =
    request.method === 'GET' || request.method === 'HEAD'
      ? undefined
      : new Uint8Array(await request.arrayBuffer());
  let response: Response;
  try {
    response = await fetch(target, { method: request.method, headers, body, redirect: 'manual' });
  } catch (error) {
    throw new BerthError('store_unavailable', `the node holding this session could not be reached; retry`, {
      retryable: true,
      cause: error,
    });
  }
  const answer = new Headers(response.headers);
  for (const name of [...HOP_BY_HOP, 'content-encoding']) answer.delete(name);
  return new Response(response.body, {
    status: response.status,
    statusText: response.statusText,
    headers: answer,
  });
}

/** Middleware for `/v1/sessions/:id[/…]`, after the session was loaded for the caller. */
export function clusterRouting(cluster: ClusterRouter) {
  return async (context: Context<ApiEnvironment>, next: Next) => {
    if (servedAnywhere(context.req.method, context.req.path)) return next();
    const session = context.get('session');
    const route = await cluster.route(session);
    if ('retry' in route) throw new BerthError('store_unavailable', route.retry, { retryable: true });
    if (route.local) return next();
    if (context.req.header(FORWARDED_HEADER) !== undefined) {
      // Moved again while the request travelled: the client retries, no forwarding loops.
      throw new BerthError('store_unavailable', 'the session is moving between nodes; retry', {
        retryable: true,
      });
    }
    return forward(context.req.raw, route.url, cluster.nodeId);
  };
}
