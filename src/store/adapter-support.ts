import { BerthError, invalidRequest } from '../errors.js';
import { newId } from '../ids.js';
import type {
  AppendOptions,
  EventListener,
  NewEvent,
  SessionEvent,
  SessionStatus,
  StoredEvent,
} from './event-store.js';

/**
 * What both store adapters share: the rules that turn appended events into stored ones, the
 * status a `session.status_*` event implies, the opaque pagination cursor and the in-process
 * subscriber registry. Adapters own only their SQL.
 */

/** Events per read when the caller gives no limit. */
export const DEFAULT_READ_LIMIT = 1000;

/** Turns appended events into API bodies: the store's `processed_at`, an id when absent. */
export function prepareEvents(events: readonly NewEvent[], processedAt: string): SessionEvent[] {
  if (events.length === 0) throw invalidRequest('an append needs at least one event');
  const seen = new Set<string>();
  return events.map((event) => {
    if (typeof event.type !== 'string' || event.type.length === 0) {
      throw invalidRequest('every event needs a type');
    }
    if (event.id !== undefined && (typeof event.id !== 'string' || event.id.length === 0)) {
      throw invalidRequest('an event id must be a non-empty string');
    }
    const { id, type, processed_at: _ignored, ...fields } = event;
    const eventId = id ?? newId('sevt');
    if (seen.has(eventId))
      throw new BerthError('conflict', `event id ${eventId} appears twice in one append`);
    seen.add(eventId);
    return { id: eventId, type, processed_at: processedAt, ...fields };
  });
}

/** Refuses a writer token that names another session (a caller bug, not a race). */
export function checkWriterSession(sessionId: string, options: AppendOptions | undefined): void {
  if (options?.writer !== undefined && options.writer.sessionId !== sessionId) {
    throw invalidRequest(`writer token is for session ${options.writer.sessionId}, not ${sessionId}`);
  }
}

/** The error for an append whose writer token is not the session's newest. */
export function staleWriter(sessionId: string, token: number, newest: number): BerthError {
  return new BerthError(
    'stale_writer',
    `session ${sessionId} has a newer writer (token ${newest} > ${token})`,
    {
      details: { sessionId, token, newestToken: newest },
    },
  );
}

/** The error for an event id already stored by an earlier append. */
/** The log grew past the head an append was conditioned on. */
export function headMoved(sessionId: string, expected: number, actual: number): BerthError {
  return new BerthError('head_moved', `session ${sessionId} log is at seq ${actual}, not ${expected}`, {
    retryable: true,
  });
}

export function eventIdTaken(cause?: unknown): BerthError {
  return new BerthError('conflict', 'an event id in this append is already used', { cause });
}

/** The session columns a `session.status_*` event changes. */
export interface StatusChange {
  status: SessionStatus;
  /** `undefined` leaves stop_reason as it is; null clears it. */
  stopReason: Record<string, unknown> | null | undefined;
}

/** The status change the newest status event of a batch implies, or undefined if none. */
export function statusChangeOf(events: readonly SessionEvent[]): StatusChange | undefined {
  let change: StatusChange | undefined;
  for (const event of events) {
    switch (event.type) {
      case 'session.status_running':
        change = { status: 'running', stopReason: null };
        break;
      case 'session.status_idle': {
        const stopReason = event.stop_reason;
        change = {
          status: 'idle',
          stopReason:
            typeof stopReason === 'object' && stopReason !== null
              ? (stopReason as Record<string, unknown>)
              : null,
        };
        break;
      }
      case 'session.status_rescheduled':
      case 'session.status_rescheduling':
        change = { status: 'rescheduling', stopReason: change?.stopReason };
        break;
      case 'session.status_terminated':
        change = { status: 'terminated', stopReason: change?.stopReason };
        break;
    }
  }
  return change;
}

/** Encodes a row's creation position as an opaque page cursor. */
export function encodeCursor(position: number): string {
  return Buffer.from(JSON.stringify({ p: position })).toString('base64url');
}

/** Decodes a cursor from `encodeCursor`; anything else is an `invalid_request`. */
export function decodeCursor(cursor: string): number {
  try {
    const parsed: unknown = JSON.parse(Buffer.from(cursor, 'base64url').toString('utf8'));
    const position = (parsed as { p?: unknown }).p;
    if (typeof position === 'number' && Number.isSafeInteger(position)) return position;
  } catch {
    // fall through to the error below
  }
  throw invalidRequest('invalid page cursor');
}

/** Checks a page size: a positive integer. */
export function checkLimit(limit: number): number {
  if (!Number.isSafeInteger(limit) || limit < 1) throw invalidRequest('limit must be a positive integer');
  return limit;
}

/**
 * In-process subscribers per session. Adapters call `deliver` after a commit, in commit order;
 * a listener that throws is reported as a process warning and never reaches the store.
 */
export class EventSubscribers {
  readonly #listeners = new Map<string, Set<EventListener>>();

  /** Registers a listener; returns the function that removes it. */
  add(sessionId: string, listener: EventListener): () => void {
    let listeners = this.#listeners.get(sessionId);
    if (listeners === undefined) {
      listeners = new Set();
      this.#listeners.set(sessionId, listeners);
    }
    // Wrap so the same function subscribed twice is two subscriptions, each removable once.
    const subscription: EventListener = (events) => listener(events);
    listeners.add(subscription);
    return () => {
      const current = this.#listeners.get(sessionId);
      if (current === undefined) return;
      current.delete(subscription);
      if (current.size === 0) this.#listeners.delete(sessionId);
    };
  }

  /** True when someone listens to the session (lets adapters skip work). */
  has(sessionId: string): boolean {
    return this.#listeners.has(sessionId);
  }

  /** Hands newly committed events of one session to its listeners. */
  deliver(sessionId: string, events: readonly StoredEvent[]): void {
    const listeners = this.#listeners.get(sessionId);
    if (listeners === undefined || events.length === 0) return;
    for (const listener of [...listeners]) {
      try {
        listener(events);
      } catch (error) {
        process.emitWarning(`berth: an event listener of session ${sessionId} threw: ${String(error)}`);
      }
    }
  }

  /** Drops every listener (on close). */
  clear(): void {
    this.#listeners.clear();
  }
}
