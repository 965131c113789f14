/**
 * The event log port. Every session is an append-only, gapless log of events; the log is
 * the truth and everything else (session status, model context, usage) is derived from it.
 * Invariants (DESIGN.md §3), enforced by every adapter and checked by `contract.test-suite.ts`:
 *  1. per session, `seq` starts at 1 and is gapless and strictly increasing; event ids are unique;
 *  2. an append that resolved survives kill -9 (durable before acknowledgement);
 *  3. an append with an idempotency key that was already used returns the first answer and
 *     writes nothing;
 *  4. an append carrying a writer token is refused unless that token is the session's newest;
 *  5. subscribers see each committed event once, in order, after it is durable;
 *  6. every call names the session together with its tenant (`SessionKey`): a key whose tenant
 *     is not the session's finds nothing (`not_found`), so a log is never reached by id alone.
 */

/**
 * Which log: a session id within its tenant. Session records satisfy it, so callers pass the
 * record they already loaded through the one ownership check.
 */
export interface SessionKey {
  readonly tenantId: string;
  readonly id: string;
}

/** A map key for a session that carries its tenant: in-memory maps never key by id alone. */
export function sessionKeyString(session: SessionKey): string {
  return `${session.tenantId}/${session.id}`;
}

/** An event as the API shows it: `id`, `type`, `processed_at`, then type-specific fields. */
export interface SessionEvent {
  id: string;
  type: string;
  processed_at: string;
  [field: string]: unknown;
}

/** An event as stored: the API body plus its place in the log. */
export interface StoredEvent {
  sessionId: string;
  seq: number;
  event: SessionEvent;
}

/** An event to append. The store assigns `processed_at` and, when absent, `id`. */
export interface NewEvent {
  id?: string;
  type: string;
  [field: string]: unknown;
}

/** Proof of being the session's one writer; fencing token grows on every acquire. */
export interface WriterToken {
  sessionId: string;
  token: number;
}

export interface AppendOptions {
  /** When set, the append fails with `stale_writer` unless this is the newest token. */
  writer?: WriterToken;
  /** Client-chosen key; a repeat returns the events first stored under it. */
  idempotencyKey?: string;
  /**
   * Compare-and-append: fails with `head_moved` (nothing written) unless the log's newest seq
   * is exactly this. The harness uses it so a decision taken on the log (such as "the turn is
   * over") cannot land after input it never saw.
   */
  expectedHeadSeq?: number;
}

export interface AppendResult {
  events: StoredEvent[];
  /** True when the idempotency key had been used and nothing new was written. */
  duplicate: boolean;
}

export interface ReadQuery {
  /** Only events with seq > after. */
  afterSeq?: number;
  /** Only events with seq < before. */
  beforeSeq?: number;
  /** Most events to return (adapter default 1000). */
  limit?: number;
  order?: 'asc' | 'desc';
  /** Only these event types. */
  types?: readonly string[];
}

/** Called with each batch of newly committed events of one session, in seq order. */
export type EventListener = (events: readonly StoredEvent[]) => void;

/** Session lifecycle columns the store keeps in step with the log, in the same transaction. */
export type SessionStatus = 'idle' | 'running' | 'rescheduling' | 'terminated';

export interface EventStore {
  /**
   * Appends events atomically (all or none) to the end of the session's log. Events of type
   * `session.status_*` also update the session's status (and `stop_reason` for idle) in the
   * same transaction. Fails with `not_found` for an unknown session, `stale_writer` for a
   * stale token, `conflict` for an event id already used by another append.
   */
  append(session: SessionKey, events: readonly NewEvent[], options?: AppendOptions): Promise<AppendResult>;
  /** Reads a range of the log (empty for an unknown session or another tenant's). */
  read(session: SessionKey, query?: ReadQuery): Promise<StoredEvent[]>;
  /** Finds one event by id. */
  getEvent(session: SessionKey, eventId: string): Promise<StoredEvent | undefined>;
  /** The events first stored under an idempotency key, or undefined when the key is unused. */
  findByIdempotencyKey(session: SessionKey, key: string): Promise<StoredEvent[] | undefined>;
  /** The seq of the newest event, 0 when the log is empty. */
  headSeq(session: SessionKey): Promise<number>;
  /** Live committed events of a session; returns the unsubscribe function. */
  subscribe(session: SessionKey, listener: EventListener): () => void;
  /** Makes the caller the session's writer, fencing off every earlier token. */
  acquireWriter(session: SessionKey): Promise<WriterToken>;
}
