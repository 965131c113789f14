import { setMaxListeners } from 'node:events';
import type { Context } from '@opentelemetry/api';
import { isBerthError } from '../errors.js';
import type { Harness } from '../harness/harness.js';
import { type SessionKey, type StoredEvent, sessionKeyString } from '../store/event-store.js';
import type { SessionRecord, Store } from '../store/resource-store.js';

/** Where the supervisor reports what it does; `console`-compatible. */
export interface Logger {
  info(message: string, fields?: Record<string, unknown>): void;
  warn(message: string, fields?: Record<string, unknown>): void;
  error(message: string, fields?: Record<string, unknown>): void;
}

/** A session as the supervisor places it: its key and the user it belongs to. */
export interface SessionOwnerKey extends SessionKey {
  readonly ownerId: string;
}

interface Actor {
  session: SessionOwnerKey;
  /** Trace context of the newest request that asked for a wake (W3C), if any. */
  trace?: Context;
  /** The wake in progress. */
  running: Promise<void>;
  /** Another wake was asked for while this one ran: run again when it ends. */
  again: boolean;
  failures: number;
}

/**
 * One live instance per session: the session's actor. `notify` asks for a wake; wakes of
 * one session never overlap, and a notify during a wake causes exactly one more wake after
 * it, so no appended input is ever left unprocessed. Actors are keyed by tenant and session,
 * and counted per tenant and per user (the live-session limits read those counts).
 */
export class Supervisor {
  readonly #actors = new Map<string, Actor>();
  /** Live actors per tenant, and per tenant + user. */
  readonly #liveCounts = new Map<string, number>();
  readonly #shutdown = new AbortController();
  readonly #harness: Harness;
  readonly #store: Store;
  readonly #logger: Logger;
  readonly #mayWake: ((session: SessionKey) => Promise<boolean>) | undefined;

  constructor(options: {
    harness: Harness;
    store: Store;
    logger: Logger;
    /** In a cluster: whether this node may run the session (it holds or takes the lease). */
    mayWake?: (session: SessionKey) => Promise<boolean>;
  }) {
    this.#harness = options.harness;
    this.#store = options.store;
    this.#logger = options.logger;
    this.#mayWake = options.mayWake;
    // Every live wake listens on this one signal (and removes its listener when it ends), so
    // more than 10 live sessions is normal, not a leak: no MaxListenersExceededWarning.
    setMaxListeners(0, this.#shutdown.signal);
  }

  /**
   * Asks for a wake of the session (new input arrived, or a crash left work behind). Pass the
   * events this process just committed, if any, so the wake need not read them back.
   */
  notify(
    session: SessionOwnerKey,
    committed?: { session: SessionRecord; events: readonly StoredEvent[] },
    options: { trace?: Context } = {},
  ): void {
    if (this.#shutdown.signal.aborted) return;
    if (committed) this.#harness.observe(committed.session, committed.events);
    const actor = this.#actors.get(sessionKeyString(session));
    if (actor) {
      actor.again = true;
      actor.trace = options.trace ?? actor.trace;
      return;
    }
    this.#start(session, 0, options.trace);
  }

  /** The session's record changed (budget, title, metadata): later wakes use the new one. */
  sessionChanged(session: SessionRecord): void {
    this.#harness.observe(session, []);
  }

  /** Sessions with a wake in flight on this node: the tenant's, or one user's in it. */
  liveCount(tenantId: string, userId?: string): number {
    return this.#liveCounts.get(userId === undefined ? tenantId : `${tenantId}/${userId}`) ?? 0;
  }

  /** True when the session has a wake in flight (it counts as live already). */
  isLive(session: SessionKey): boolean {
    return this.#actors.has(sessionKeyString(session));
  }

  /** Wakes every session a previous process may have left mid-turn. */
  async recover(): Promise<number> {
    const sessions = await this.#store.resources.findSessionsByStatus(['running', 'rescheduling', 'idle']);
    let woken = 0;
    for (const session of sessions) {
      if (session.status === 'idle') {
        // Cheap check: only an idle session whose newest event is client input has work.
        const [newest] = await this.#store.events.read(session, { order: 'desc', limit: 1 });
        if (!newest?.event.type.startsWith('user.')) continue;
      }
      this.notify(session);
      woken++;
    }
    if (woken > 0) this.#logger.info('resuming sessions left mid-turn', { count: woken });
    return woken;
  }

  /** Resolves when the session has no wake running (tests and graceful shutdown). */
  async settled(session: SessionKey): Promise<void> {
    const key = sessionKeyString(session);
    for (let actor = this.#actors.get(key); actor; actor = this.#actors.get(key)) {
      await actor.running.catch(() => undefined);
    }
  }

  /** Stops taking work, interrupts steps in flight, and waits for every wake to end. */
  async shutdown(): Promise<void> {
    this.#shutdown.abort();
    await Promise.all([...this.#actors.values()].map((actor) => actor.running.catch(() => undefined)));
  }

  #start(session: SessionOwnerKey, failures: number, trace?: Context): void {
    const owner = { tenantId: session.tenantId, id: session.id, ownerId: session.ownerId };
    const actor: Actor = { session: owner, trace, running: Promise.resolve(), again: false, failures };
    this.#actors.set(sessionKeyString(owner), actor);
    this.#count(owner, 1);
    actor.running = this.#run(actor);
  }

  #count(session: SessionOwnerKey, change: number): void {
    for (const key of [session.tenantId, `${session.tenantId}/${session.ownerId}`]) {
      const count = (this.#liveCounts.get(key) ?? 0) + change;
      if (count > 0) this.#liveCounts.set(key, count);
      else this.#liveCounts.delete(key);
    }
  }

  async #run(actor: Actor): Promise<void> {
    const { session } = actor;
    const sessionId = session.id;
    let retryDelay = 0;
    let recheck = false;
    try {
      if (this.#mayWake && !(await this.#mayWake(session))) {
        // Another node holds the session: its instance runs the turn.
        return;
      }
      do {
        actor.again = false;
        const trace = actor.trace;
        actor.trace = undefined;
        await this.#harness.wake(session, { shutdown: this.#shutdown.signal, trace });
      } while (actor.again && !this.#shutdown.signal.aborted);
    } catch (error) {
      if (isBerthError(error, 'stale_writer')) {
        this.#logger.warn('another writer took over the session', { sessionId });
        // Input arrived during the wake: whoever holds the session now must see it. Go through
        // `mayWake` again (in a cluster it says which node that is).
        recheck = actor.again;
      } else {
        actor.failures++;
        retryDelay = Math.min(30_000, 250 * 2 ** actor.failures);
        this.#logger.error('wake failed; will retry', {
          sessionId,
          attempt: actor.failures,
          error: error instanceof Error ? error.message : String(error),
        });
      }
    } finally {
      this.#actors.delete(sessionKeyString(session));
      this.#count(session, -1);
    }
    if (recheck && !this.#shutdown.signal.aborted && !this.#actors.has(sessionKeyString(session))) {
      this.#start(session, 0, actor.trace);
    }
    if (retryDelay > 0 && !this.#shutdown.signal.aborted) {
      const timer = setTimeout(() => {
        if (!this.#actors.has(sessionKeyString(session))) this.#start(session, actor.failures);
      }, retryDelay);
      timer.unref();
    }
  }
}
