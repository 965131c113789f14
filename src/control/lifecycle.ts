import type { SessionKey } from '../store/event-store.js';
import type { SessionRecord, Store } from '../store/resource-store.js';
import { lifecycleOf, type SandboxManager } from './sandbox-manager.js';
import type { Logger, Supervisor } from './supervisor.js';

/** How often sessions with a live sandbox are checked against their max lifetime. */
const CHECK_INTERVAL_MS = 500;
/** How often every idle session of the store is checked (sessions without a live sandbox). */
const SWEEP_INTERVAL_MS = 60_000;

/**
 * Terminates sessions that outlived their environment's `max_lifetime_s` (counted from the
 * session's creation): appends `session.status_terminated` and stops the sandbox into its
 * snapshot (the files stay downloadable). Sessions that had a sandbox in this process are
 * checked twice a second; all idle sessions of the store once a minute and at start. A turn in flight is never cut: the
 * session is terminated when it next goes idle.
 */
export class LifetimeReaper {
  readonly #store: Store;
  readonly #supervisor: Supervisor;
  readonly #sandboxes: SandboxManager;
  readonly #logger: Logger;
  readonly #releaseTools: (session: SessionKey) => Promise<void>;
  readonly #terminating = new Set<string>();
  #check: NodeJS.Timeout | undefined;
  #sweep: NodeJS.Timeout | undefined;

  constructor(options: {
    store: Store;
    supervisor: Supervisor;
    sandboxes: SandboxManager;
    logger: Logger;
    /** Closes what the session's tools hold open (MCP connections). */
    releaseTools: (session: SessionKey) => Promise<void>;
  }) {
    this.#store = options.store;
    this.#supervisor = options.supervisor;
    this.#sandboxes = options.sandboxes;
    this.#logger = options.logger;
    this.#releaseTools = options.releaseTools;
  }

  start(): void {
    this.#check = setInterval(() => {
      for (const session of this.#sandboxes.pastLifetime()) void this.#terminate(session);
    }, CHECK_INTERVAL_MS);
    this.#check.unref();
    this.#sweep = setInterval(() => void this.sweep(), SWEEP_INTERVAL_MS);
    this.#sweep.unref();
    void this.sweep();
  }

  stop(): void {
    clearInterval(this.#check);
    clearInterval(this.#sweep);
  }

  /** Terminates every idle session of the store that is past its lifetime; returns how many. */
  async sweep(now = Date.now()): Promise<number> {
    const sessions = await this.#store.resources
      .findSessionsByStatus(['idle', 'rescheduling'])
      .catch(() => [] as SessionRecord[]);
    const lifetimes = new Map<string, number>();
    let terminated = 0;
    for (const session of sessions) {
      const environmentKey = `${session.tenantId}/${session.environmentId}`;
      let maxLifetimeMs = lifetimes.get(environmentKey);
      if (maxLifetimeMs === undefined) {
        const environment = await this.#store.resources
          .get('environment', session.tenantId, session.environmentId)
          .catch(() => undefined);
        maxLifetimeMs = lifecycleOf(environment?.body.config).maxLifetimeMs;
        lifetimes.set(environmentKey, maxLifetimeMs);
      }
      if (now - Date.parse(session.createdAt) >= maxLifetimeMs && (await this.#terminate(session)))
        terminated++;
    }
    return terminated;
  }

  /** Ends one session unless a turn is in flight or it already ended; true when it did. */
  async #terminate(session: SessionKey): Promise<boolean> {
    const key = `${session.tenantId}/${session.id}`;
    if (this.#terminating.has(key) || this.#supervisor.isLive(session)) return false;
    this.#terminating.add(key);
    try {
      const record = await this.#store.resources.getSession(session.tenantId, session.id);
      if (!record || record.status === 'terminated') {
        this.#sandboxes.forgetLifetime(session);
        return false;
      }
      if (record.status === 'running') return false;
      await this.#store.events.append(session, [
        { type: 'session.status_terminated', reason: 'max_lifetime' },
      ]);
      await this.#releaseTools(session);
      await this.#sandboxes.stop(session, 'max_lifetime');
      this.#sandboxes.forgetLifetime(session);
      this.#logger.info('terminated a session past its max lifetime', {
        tenant: session.tenantId,
        session: session.id,
      });
      return true;
    } catch (error) {
      this.#logger.warn('could not terminate a session past its max lifetime', {
        session: session.id,
        error: error instanceof Error ? error.message : String(error),
      });
      return false;
    } finally {
      this.#terminating.delete(key);
    }
  }
}
