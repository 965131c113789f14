import { isBerthError } from '../errors.js';
import type { Harness } from '../harness/harness.js';
import type { StoredEvent } from '../store/event-store.js';
import type { SessionRecord, Store } from '../store/resource-store.js';

/** Where the supervisor reports what it does; `console`-compatible. */
export interface Logger {
  info(message: string, fields?: Record<string, unknown>): void;
  warn(message: string, fields?: Record<string, unknown>): void;
  error(message: string, fields?: Record<string, unknown>): void;
}

interface Actor {
  /** The wake in progress. */
  running: Promise<void>;
  /** Another wake was asked for while this one ran: run again when it ends. */
  again: boolean;
  failures: number;
}

/**
 * One live instance per session: the session's actor. `notify` asks for a wake; wakes of
 * one session never overlap, and a notify during a wake causes exactly one more wake after
 * it, so no appended input is ever left unprocessed.
 */
export class Supervisor {
  readonly #actors = new Map<string, Actor>();
  readonly #shutdown = new AbortController();
  readonly #harness: Harness;
  readonly #store: Store;
  readonly #logger: Logger;

  constructor(options: { harness: Harness; store: Store; logger: Logger }) {
    this.#harness = options.harness;
    this.#store = options.store;
    this.#logger = options.logger;
  }

  /**
   * Asks for a wake of the session (new input arrived, or a crash left work behind). Pass the
   * events this process just committed, if any, so the wake need not read them back.
   */
  notify(sessionId: string, committed?: { session: SessionRecord; events: readonly StoredEvent[] }): void {
    if (this.#shutdown.signal.aborted) return;
    if (committed) this.#harness.observe(committed.session, committed.events);
    const actor = this.#actors.get(sessionId);
    if (actor) {
      actor.again = true;
      return;
    }
    this.#start(sessionId, 0);
  }

  /** Wakes every session a previous process may have left mid-turn. */
  async recover(): Promise<number> {
    const sessions = await this.#store.resources.findSessionsByStatus(['running', 'rescheduling', 'idle']);
    let woken = 0;
    for (const session of sessions) {
      if (session.status === 'idle') {
        // Cheap check: only an idle session whose newest event is client input has work.
        const [newest] = await this.#store.events.read(session.id, { order: 'desc', limit: 1 });
        if (!newest?.event.type.startsWith('user.')) continue;
      }
      this.notify(session.id);
      woken++;
    }
    if (woken > 0) this.#logger.info('resuming sessions left mid-turn', { count: woken });
    return woken;
  }

  /** Resolves when the session has no wake running (tests and graceful shutdown). */
  async settled(sessionId: string): Promise<void> {
    for (let actor = this.#actors.get(sessionId); actor; actor = this.#actors.get(sessionId)) {
      await actor.running.catch(() => undefined);
    }
  }

  /** Stops taking work, interrupts steps in flight, and waits for every wake to end. */
  async shutdown(): Promise<void> {
    this.#shutdown.abort();
    await Promise.all([...this.#actors.values()].map((actor) => actor.running.catch(() => undefined)));
  }

  #start(sessionId: string, failures: number): void {
    const actor: Actor = { running: Promise.resolve(), again: false, failures };
    this.#actors.set(sessionId, actor);
    actor.running = this.#run(sessionId, actor);
  }

  async #run(sessionId: string, actor: Actor): Promise<void> {
    let retryDelay = 0;
    try {
      do {
        actor.again = false;
        await this.#harness.wake(sessionId, { shutdown: this.#shutdown.signal });
      } while (actor.again && !this.#shutdown.signal.aborted);
    } catch (error) {
      if (isBerthError(error, 'stale_writer')) {
        this.#logger.warn('another writer took over the session', { sessionId });
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
      this.#actors.delete(sessionId);
    }
    if (retryDelay > 0 && !this.#shutdown.signal.aborted) {
      const timer = setTimeout(() => {
        if (!this.#actors.has(sessionId)) this.#start(sessionId, actor.failures);
      }, retryDelay);
      timer.unref();
    }
  }
}
