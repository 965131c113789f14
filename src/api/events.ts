import { Hono } from 'hono';
import { type SSEStreamingApi, streamSSE } from 'hono/streaming';
import { invalidRequest } from '../errors.js';
import type { DeltaEvent } from '../harness/delta-bus.js';
import { pendingClientActions } from '../harness/turn-state.js';
import type { NewEvent, StoredEvent } from '../store/event-store.js';
import type { SessionRecord } from '../store/resource-store.js';
import { extractTraceContext } from '../telemetry/tracing.js';
import {
  type ApiDependencies,
  type ApiEnvironment,
  readArrayQuery,
  readBody,
  readIdempotencyKey,
  readOrder,
  readPageQuery,
} from './context.js';
import { describeZodError } from './errors.js';
import {
  type ClientEvent,
  clientEvent,
  eventSend,
  knownEventTypes,
  unsupportedClientEventTypes,
} from './schemas.js';

const encodeCursor = (seq: number) => Buffer.from(`seq:${seq}`).toString('base64url');
function decodeCursor(cursor: string): number {
  const match = /^seq:(\d{1,15})$/.exec(Buffer.from(cursor, 'base64url').toString('utf8'));
  if (!match) throw invalidRequest('page is not a cursor returned by this endpoint');
  return Number(match[1]);
}

const timeFilters = ['created_at[gt]', 'created_at[gte]', 'created_at[lt]', 'created_at[lte]'] as const;

/** Validates every event of a send; one bad event rejects the whole request. */
function parseClientEvents(events: unknown[]): ClientEvent[] {
  return events.map((raw, index) => {
    const type = (raw as { type?: unknown })?.type;
    if (typeof type === 'string' && type in unsupportedClientEventTypes) {
      throw invalidRequest(`events.${index}: ${unsupportedClientEventTypes[type]}`);
    }
    const parsed = clientEvent.safeParse(raw);
    if (!parsed.success) {
      const known = typeof type === 'string' && knownEventTypes.has(type);
      if (typeof type === 'string' && !known) {
        throw invalidRequest(
          `events.${index}.type: unknown event type "${type}"; clients may send user.message, user.interrupt, user.tool_confirmation or user.custom_tool_result`,
        );
      }
      throw invalidRequest(`events.${index}: ${describeZodError(parsed.error)}`);
    }
    const event = parsed.data;
    // As the official API: a deny_message explains a deny, and only a deny.
    if (event.type === 'user.tool_confirmation' && event.result === 'allow' && event.deny_message != null) {
      throw invalidRequest(`events.${index}.deny_message: only allowed when result is "deny"`);
    }
    return event;
  });
}

/** `/v1/sessions/:id/events`: list the log, send client events, and stream (history + live). */
export function eventRoutes(dependencies: ApiDependencies) {
  const { store, supervisor, deltas, limits, authenticator } = dependencies;
  const app = new Hono<ApiEnvironment>();

  /**
   * Checks a send against the session's log: a custom tool result must answer an open custom
   * tool use, a confirmation an unconfirmed `always_ask` tool use, each once; a new message
   * cannot start a turn while the client still owes results or confirmations.
   */
  async function checkAgainstLog(session: SessionRecord, events: readonly ClientEvent[]) {
    if (events.every((event) => event.type === 'user.interrupt')) return;
    // Plain messages need the log only when the session waits on the client (the common
    // case, a message to an idle or running session, stays off this read).
    const answersClient = events.some(
      (event) => event.type !== 'user.message' && event.type !== 'user.interrupt',
    );
    const waiting = session.status === 'idle' && session.stopReason?.type === 'requires_action';
    if (!answersClient && !waiting) return;
    const relevant = await store.events.read(session, {
      types: [
        'agent.custom_tool_use',
        'agent.tool_use',
        'agent.mcp_tool_use',
        'agent.mcp_tool_result',
        'user.custom_tool_result',
        'agent.tool_result',
        'user.tool_confirmation',
      ],
      limit: Number.MAX_SAFE_INTEGER,
    });
    const pending = new Map(
      pendingClientActions(relevant).map((stored) => [stored.event.id, stored.event.type]),
    );
    const answeredHere = new Set<string>();
    const answer = (id: string, expectedType: string, what: string) => {
      if (answeredHere.has(id)) throw invalidRequest(`${what} ${id} is answered twice in this request`);
      if (pending.get(id) !== expectedType) {
        const known = relevant.some((stored) => stored.event.id === id && stored.event.type === expectedType);
        throw invalidRequest(
          known
            ? `${what} ${id} is not waiting for an answer any more`
            : `${id} is not a ${what} of this session that awaits an answer`,
        );
      }
      answeredHere.add(id);
    };
    for (const event of events) {
      if (event.type === 'user.custom_tool_result')
        answer(event.custom_tool_use_id, 'agent.custom_tool_use', 'custom tool use');
      if (event.type === 'user.tool_confirmation') {
        const type =
          pending.get(event.tool_use_id) === 'agent.mcp_tool_use' ? 'agent.mcp_tool_use' : 'agent.tool_use';
        answer(event.tool_use_id, type, 'tool use');
      }
      if (event.type === 'user.message' && pending.size > answeredHere.size) {
        const waiting = [...pending.keys()].filter((id) => !answeredHere.has(id));
        throw invalidRequest(
          `the session is waiting for the client on ${waiting.join(', ')} (user.custom_tool_result for custom tools, user.tool_confirmation for tools that ask first); answer each, or send user.interrupt to cancel, before a new message`,
        );
      }
    }
  }

  app.get('/:id/events', async (context) => {
    const session = context.get('session');
    const { limit, cursor } = readPageQuery(context, 100);
    const order = readOrder(context, 'asc');
    const types = readArrayQuery(context, 'types');
    for (const type of types ?? []) {
      if (!knownEventTypes.has(type) && !type.startsWith('berth.'))
        throw invalidRequest(`unknown event type "${type}"`);
    }
    const bounds: Partial<Record<(typeof timeFilters)[number], number>> = {};
    for (const filter of timeFilters) {
      const value = context.req.query(filter);
      if (value === undefined) continue;
      const time = Date.parse(value);
      if (Number.isNaN(time)) throw invalidRequest(`${filter} must be an RFC 3339 timestamp`);
      bounds[filter] = time;
    }
    const position = cursor === undefined ? undefined : decodeCursor(cursor);
    const inRange = (stored: StoredEvent) => {
      const time = Date.parse(stored.event.processed_at);
      return (
        (bounds['created_at[gt]'] === undefined || time > bounds['created_at[gt]']) &&
        (bounds['created_at[gte]'] === undefined || time >= bounds['created_at[gte]']) &&
        (bounds['created_at[lt]'] === undefined || time < bounds['created_at[lt]']) &&
        (bounds['created_at[lte]'] === undefined || time <= bounds['created_at[lte]'])
      );
    };
    // Time filters are applied on top of seq order (processed_at grows with seq).
    const data: StoredEvent[] = [];
    let next = position;
    let exhausted = false;
    while (data.length < limit + 1 && !exhausted) {
      const batch = await store.events.read(session, {
        order,
        types,
        limit: limit + 1,
        ...(order === 'asc' ? { afterSeq: next } : { beforeSeq: next }),
      });
      exhausted = batch.length < limit + 1;
      for (const stored of batch) if (inRange(stored)) data.push(stored);
      if (batch.length > 0) next = batch[batch.length - 1]!.seq;
    }
    const page = data.slice(0, limit);
    const more = data.length > limit;
    return context.json({
      data: page.map((stored) => stored.event),
      next_page: more && page.length > 0 ? encodeCursor(page[page.length - 1]!.seq) : null,
    });
  });

  app.post('/:id/events', async (context) => {
    const principal = context.get('principal');
    const session = context.get('session');
    const input = await readBody(context, eventSend);
    const events = parseClientEvents(input.events);
    const idempotencyKey = readIdempotencyKey(context);
    // A repeated send is answered as the first one was, before any check of the current state.
    const repeated =
      idempotencyKey === undefined
        ? undefined
        : await store.events.findByIdempotencyKey(session, idempotencyKey);
    if (repeated) return context.json({ data: repeated.map((stored) => stored.event) });
    if (session.status === 'terminated') throw invalidRequest(`session ${session.id} is terminated`);
    if (session.archivedAt) throw invalidRequest(`session ${session.id} is archived`);
    await checkAgainstLog(session, events);
    // Interrupts are never limited: a client must always be able to stop a turn.
    const charged = events.filter((event) => event.type !== 'user.interrupt').length;
    const refund = charged > 0 ? await limits.chargeEvents(principal, charged) : () => undefined;
    // Anything but an interrupt may start a turn: a session that is not live yet must fit
    // under its owner's live-session limits.
    const startsTurn = events.some((event) => event.type !== 'user.interrupt') && !supervisor.isLive(session);
    let admitted: (() => void) | undefined;
    try {
      admitted = startsTurn
        ? await limits.admitLiveSession({ tenantId: session.tenantId, userId: session.ownerId })
        : undefined;
    } catch (error) {
      // Refused: the request costs none of the events allowance.
      refund();
      throw error;
    }
    try {
      const result = await store.events.append(session, events as NewEvent[], { idempotencyKey });
      if (!result.duplicate) {
        // An interrupt needs nothing special here: the running wake sees it in the log.
        supervisor.notify(
          session,
          { session, events: result.events },
          { trace: extractTraceContext((name) => context.req.header(name)) },
        );
      }
      return context.json({ data: result.events.map((stored) => stored.event) });
    } finally {
      admitted?.();
    }
  });

  app.get('/:id/events/stream', async (context) => {
    const session = context.get('session');
    const wantedDeltas = new Set(readArrayQuery(context, 'event_deltas') ?? []);
    for (const type of wantedDeltas) {
      if (type !== 'agent.message' && type !== 'agent.thinking') {
        throw invalidRequest(`event_deltas accepts agent.message and agent.thinking, not "${type}"`);
      }
    }
    // Cursor: the SSE `Last-Event-ID` header (an event id) or Berth's `after_id` query parameter.
    const cursorId = context.req.header('last-event-id') || context.req.query('after_id') || undefined;
    let afterSeq: number | undefined;
    if (cursorId !== undefined) {
      const cursorEvent = await store.events.getEvent(session, cursorId);
      if (!cursorEvent) throw invalidRequest(`after_id ${cursorId} is not an event of this session`);
      afterSeq = cursorEvent.seq;
    }
    const pingMs = dependencies.streamPingMs ?? 15_000;
    context.header('cache-control', 'no-cache');
    context.header('x-accel-buffering', 'no');

    // Subscribe before reading history (or the head), then dedupe by seq: no gap and no
    // duplicate at the seam. Both happen before the response starts, so an event a client
    // sends after seeing the stream open is always delivered.
    const queue: StoredEvent[] = [];
    let wake: (() => void) | undefined;
    const unsubscribe = store.events.subscribe(session, (events) => {
      queue.push(...events);
      wake?.();
    });
    const deltaQueue: DeltaEvent[] = [];
    const unsubscribeDeltas =
      wantedDeltas.size > 0
        ? deltas.subscribe(session, (_session, delta) => {
            const type = delta.type === 'event_start' ? delta.event.type : 'agent.message';
            if (!wantedDeltas.has(type)) return;
            deltaQueue.push(delta);
            wake?.();
          })
        : () => undefined;
    let lastSent: number;
    try {
      lastSent = afterSeq ?? (await store.events.headSeq(session));
    } catch (error) {
      unsubscribe();
      unsubscribeDeltas();
      throw error;
    }

    return streamSSE(context, async (stream) => {
      let closed = false;
      const close = () => {
        closed = true;
        wake?.();
      };
      stream.onAbort(close);
      // The stream lives only as long as the key that opened it: revoking it (or its expiry)
      // ends the stream at once.
      const release = authenticator.hold(context.get('principal'), close);
      const ping = setInterval(() => {
        stream.writeSSE({ event: 'ping', data: '{"type":"ping"}' }).catch(() => undefined);
      }, pingMs);
      try {
        if (afterSeq !== undefined) {
          for (;;) {
            const history = await store.events.read(session, { afterSeq: lastSent, limit: 1000 });
            for (const stored of history) lastSent = await send(stream, stored, lastSent);
            if (history.length < 1000) break;
          }
        }
        while (!closed) {
          while (deltaQueue.length > 0) {
            const delta = deltaQueue.shift()!;
            await stream.writeSSE({ event: delta.type, data: JSON.stringify(delta) });
          }
          while (queue.length > 0) lastSent = await send(stream, queue.shift()!, lastSent);
          if (closed) break;
          await new Promise<void>((resolve) => {
            wake = resolve;
            if (queue.length > 0 || deltaQueue.length > 0 || closed) resolve();
          });
          wake = undefined;
        }
      } finally {
        release();
        clearInterval(ping);
        unsubscribe();
        unsubscribeDeltas();
      }
    });
  });

  return app;
}

async function send(stream: SSEStreamingApi, stored: StoredEvent, lastSent: number): Promise<number> {
  if (stored.seq <= lastSent) return lastSent;
  await stream.writeSSE({
    id: stored.event.id,
    event: stored.event.type,
    data: JSON.stringify(stored.event),
  });
  return stored.seq;
}
