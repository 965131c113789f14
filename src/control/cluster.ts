/**
 * One node of a Berth cluster: several nodes share one PostgreSQL, each session has one live
 * instance (the node holding its lease, `leases.ts`), and any node accepts any request.
 *
 * - `route(session)` says where a request that needs the session's live instance goes: this
 *   node (it holds the lease, or takes it), or the holder's URL (the API forwards). A session
 *   nobody holds is placed by consistent hashing with bounded loads over the live, undrained
 *   nodes (`placement.ts`), so placement is stable and even.
 * - `mayWake(session)` gates the supervisor: a node wakes only sessions it holds.
 * - Every heartbeat (a third of the lease time) renews this node's leases and refreshes the
 *   node list. Every node watches for expired leases (a cheap query, every lease/15): when one
 *   expired since it last looked, it sweeps at once for orphans, sessions with work left whose
 *   node died, and wakes those placement gives it, and any orphan still unclaimed a moment
 *   later (the lease row settles who wins). So a killed node's turns in flight resume
 *   elsewhere within the lease time plus a fraction of a second. A full sweep (also sessions
 *   this node holds but runs no wake for) runs every lease time.
 * - `drain()` (graceful shutdown) stops new placements here; `leave()` hands every lease back.
 */
import type pg from 'pg';
import type { SessionKey } from '../store/event-store.js';
import type { ClusterLeases, ClusterNode } from './leases.js';
import { PlacementRing } from './placement.js';
import type { Logger, SessionOwnerKey } from './supervisor.js';

const sessionName = (session: SessionKey) => `${session.tenantId}/${session.id}`;

export type Route = { local: true } | { local: false; nodeId: string; url: string } | { retry: string };

export interface ClusterOptions {
  leases: ClusterLeases;
  /** The pool the sweep reads orphans with (the store's database). */
  pool: pg.Pool;
  /** The quoted schema name. */
  schema: string;
  logger: Logger;
  /** Wakes a session here (the supervisor's notify). */
  wake(session: SessionOwnerKey): void;
  /** Whether a wake of the session is in flight here. */
  isLive(session: SessionKey): boolean;
  /**
   * Whether the session has a sandbox on this node in any state but stopped. A session with
   * neither a wake in flight nor such a sandbox is quiet; only a quiet session's lease is given
   * up when it sits idle. Without it, leases stay while the node lives.
   */
  hasSandbox?(session: SessionKey): boolean;
  /**
   * A lease whose session was quiet here this long is given up (`BERTH_LEASE_IDLE_MS`, default
   * 60,000; 0 keeps leases while the node lives). The next request places the session again.
   */
  idleReleaseMs?: number;
}

/** The default of `ClusterOptions.idleReleaseMs`. */
export const DEFAULT_IDLE_RELEASE_MS = 60_000;

export class Cluster {
  readonly nodeId: string;
  readonly #leases: ClusterLeases;
  readonly #options: ClusterOptions;
  #nodes: ClusterNode[] = [];
  #ring = new PlacementRing([]);
  #timer: NodeJS.Timeout | undefined;
  #watchTimer: NodeJS.Timeout | undefined;
  #lastSweep = 0;
  /** The newest expiry of another node's lease seen expired (PostgreSQL's clock, ms). */
  #newestExpirySeen = 0;
  /** Orphans the last sweep found, with when this node first saw each (ms since the epoch). */
  #orphans = new Map<string, number>();
  #beating: Promise<void> | undefined;
  #refreshing: Promise<void> | undefined;
  #watching: Promise<void> | undefined;
  #sweeping: Promise<void> | undefined;
  #draining = false;
  /** When each session this node holds was last routed or woken here (ms since the epoch). */
  readonly #lastActive = new Map<string, number>();
  /** Idle leases being given up right now, by session. */
  readonly #releasing = new Map<string, Promise<void>>();
  /** Other nodes believed to hold sessions, for a moment, by session id (see `knownHolder`). */
  readonly #holders = new Map<string, { nodeId: string; url: string; until: number }>();

  constructor(options: ClusterOptions) {
    this.#options = options;
    this.#leases = options.leases;
    this.nodeId = options.leases.nodeId;
  }

  /** Registers this node at `url` and starts heartbeats and sweeps. */
  async start(url: string): Promise<void> {
    await this.#leases.register(url);
    await this.#refreshNodes();
    const every = Math.max(100, Math.floor(this.#leases.leaseMs / 3));
    this.#timer = setInterval(() => {
      // One beat at a time, and one refresh-and-sweep at a time, apart: a refresh or sweep
      // waiting on a busy pool must never hold the next heartbeat back (late heartbeats make
      // other nodes think this one is gone).
      this.#beating ??= this.#beat().finally(() => {
        this.#beating = undefined;
      });
      this.#refreshing ??= this.#refreshAndSweep().finally(() => {
        this.#refreshing = undefined;
      });
    }, every);
    this.#timer.unref();
    // Orphans are looked for right after a lease expires, not a lease time later, on a chain of
    // its own: a slow refresh or idle release must not hold a failover back.
    this.#watchTimer = setInterval(() => {
      this.#watching ??= this.#watchExpiries().finally(() => {
        this.#watching = undefined;
      });
    }, this.#watchMs);
    this.#watchTimer.unref();
  }

  /** How often this node looks for newly expired leases. */
  get #watchMs(): number {
    return Math.max(50, Math.floor(this.#leases.leaseMs / 15));
  }

  /** Sweeps when another node's lease expired since the last look, or orphans are pending. */
  async #watchExpiries(): Promise<void> {
    try {
      if (this.#draining) return;
      const newest = await this.#leases.newestExpiry();
      const expired = newest !== undefined && newest > this.#newestExpirySeen;
      if (!expired && !this.#orphansPending()) return;
      if (newest !== undefined) this.#newestExpirySeen = Math.max(this.#newestExpirySeen, newest);
      // The dead node's heartbeat ran out with its leases: the ring must not place on it.
      await this.#refreshNodes();
      await this.#sweepOnce();
    } catch (error) {
      this.#warn('cluster watch failed', error);
    }
  }

  /** Whether the last sweep left orphans unclaimed that are young enough to watch closely. */
  #orphansPending(): boolean {
    const since = Date.now() - 2 * this.#leases.leaseMs;
    for (const firstSeen of this.#orphans.values()) if (firstSeen > since) return true;
    return false;
  }

  async #beat(): Promise<void> {
    try {
      const lost = await this.#leases.heartbeat();
      for (const session of lost) {
        this.#options.logger.warn('lost the lease of a session (this node was too slow to renew it)', {
          session: session.id,
        });
      }
    } catch (error) {
      this.#warn('cluster heartbeat failed', error);
    }
  }

  async #refreshAndSweep(): Promise<void> {
    try {
      await this.#refreshNodes();
      if (!this.#draining && Date.now() - this.#lastSweep >= this.#leases.leaseMs) {
        this.#lastSweep = Date.now();
        await this.#sweepOnce();
        await this.#releaseQuiet();
      }
    } catch (error) {
      this.#warn('cluster refresh failed', error);
    }
  }

  #warn(message: string, error: unknown): void {
    this.#options.logger.warn(message, {
      node: this.nodeId,
      error: error instanceof Error ? error.message : String(error),
    });
  }

  async #refreshNodes(): Promise<void> {
    const nodes = await this.#leases.liveNodes();
    const names = nodes.filter((node) => !node.draining).map((node) => node.nodeId);
    const previous = this.#ring.nodes;
    if (names.length !== previous.length || names.some((name, index) => name !== previous[index])) {
      this.#ring = new PlacementRing(names);
    }
    this.#nodes = nodes;
  }

  /** Runs a sweep after any sweep already running (never two at once). */
  async #sweepOnce(): Promise<void> {
    while (this.#sweeping) await this.#sweeping.catch(() => undefined);
    this.#sweeping = this.#sweep().finally(() => {
      this.#sweeping = undefined;
    });
    await this.#sweeping;
  }

  /**
   * Wakes sessions with work left that nobody runs: orphans (their node died) that the ring
   * gives to this node, or that stayed orphans for a moment (two nodes whose node lists differ
   * for an instant may each think the other should take one: whoever claims first runs it),
   * and sessions this node holds with no wake in flight (input that reached a node which had
   * just lost the session is picked up here by the new holder). Orphans are placed by hashing
   * alone, not by loads: every node then agrees on who takes each, whatever it read when.
   */
  async #sweep(): Promise<void> {
    const result = await this.#options.pool.query<{
      tenant_id: string;
      session_id: string;
      owner_id: string;
      holder: string | null;
    }>(`SELECT * FROM ${this.#options.schema}.sessions_with_work($1, 500)`, [this.nodeId]);
    const orphans = new Map<string, number>();
    if (result.rows.length > 0) {
      const now = Date.now();
      const graceMs = Math.max(100, this.#leases.leaseMs / 6);
      for (const row of result.rows) {
        const session = { tenantId: row.tenant_id, id: row.session_id, ownerId: row.owner_id };
        if (this.#options.isLive(session)) continue;
        if (row.holder !== null) {
          this.#options.wake(session);
          continue;
        }
        const name = sessionName(session);
        const firstSeen = this.#orphans.get(name) ?? now;
        orphans.set(name, firstSeen);
        const placed = this.#ring.place(row.session_id);
        if (placed === this.nodeId || now - firstSeen >= graceMs) this.#options.wake(session);
      }
    }
    this.#orphans = orphans;
  }

  /**
   * Gives up the leases of sessions quiet here for `idleReleaseMs`: a session's live instance
   * is torn down when idle (its sandbox stopped, with its snapshot stored, by the lifecycle's
   * idle timeout), so renewals grow with sessions in use, not with every session ever run. A
   * request routed or a wake begun here marks the session active, so a lease is never given up
   * under a request that was just told to run here.
   */
  async #releaseQuiet(): Promise<void> {
    const idleMs = this.#idleReleaseMs;
    if (idleMs <= 0) return;
    // Leases placed here for a request that never came (it went elsewhere, or its client left);
    // never so soon that a request still on its way, on a loaded machine, finds none.
    await this.#leases
      .releaseUnclaimed(Math.max(idleMs, 10 * this.#leases.leaseMs))
      .catch((error: unknown) => this.#warn('giving up unclaimed leases failed', error));
    const quiet = (session: SessionKey) =>
      !this.#options.isLive(session) && !this.#options.hasSandbox?.(session);
    const now = Date.now();
    const held = this.#leases.heldSessions();
    const heldNames = new Set(held.map(sessionName));
    for (const name of this.#lastActive.keys()) if (!heldNames.has(name)) this.#lastActive.delete(name);
    for (const session of held) {
      const name = sessionName(session);
      const lastActive = this.#lastActive.get(name);
      // Held without a route or wake seen here (claimed for a writer): counts from now.
      if (lastActive === undefined) {
        this.#lastActive.set(name, now);
        continue;
      }
      if (now - lastActive < idleMs) continue;
      if (!quiet(session)) {
        this.#lastActive.set(name, now);
        continue;
      }
      this.#lastActive.delete(name);
      // Requests and wakes for the session wait for the release to finish (the row is gone),
      // so a claim cannot land before the delete and be deleted by it.
      const releasing = this.#leases.release(session).finally(() => this.#releasing.delete(name));
      this.#releasing.set(name, releasing);
      await releasing.catch((error: unknown) => this.#warn('giving up an idle lease failed', error));
    }
  }

  /** How long a session sits quiet before its lease goes; 0: never. */
  get #idleReleaseMs(): number {
    return this.#options.hasSandbox ? (this.#options.idleReleaseMs ?? DEFAULT_IDLE_RELEASE_MS) : 0;
  }

  #active(session: SessionKey): void {
    // Tracked only when idle leases are given up (nothing would ever prune it otherwise).
    if (this.#idleReleaseMs > 0) this.#lastActive.set(sessionName(session), Date.now());
  }

  /**
   * Where a request that needs the session's live instance should run. `forwarded`: another
   * node sent the request here; if nobody holds the session, that node placed it here, so this
   * node takes it rather than placing it again (loads change between two looks).
   */
  async route(session: SessionKey, options: { forwarded?: boolean } = {}): Promise<Route> {
    await this.#releasing.get(sessionName(session))?.catch(() => undefined);
    const route = await this.#route(session, options);
    if ('local' in route && route.local) this.#active(session);
    return route;
  }

  async #route(session: SessionKey, options: { forwarded?: boolean }): Promise<Route> {
    if (this.#leases.holds(session)) return { local: true };
    let holder = await this.#leases.holderOf(session);
    if (holder === undefined && !options.forwarded) {
      // Placed under the cluster's placement lock, with the lease reserved for the chosen node
      // in the same transaction: placements at once see each other (loads of committed leases
      // alone let a burst of 30 end 30/0/0). Nowhere live to place (the ring is empty): here.
      let joined = false;
      holder = await this.#leases.place(session, (loads, liveNodeIds) => {
        // A node that joined since the last refresh of the node list is placed on at once.
        joined = liveNodeIds.some((nodeId) => !this.#ring.nodes.includes(nodeId));
        const ring = joined ? new PlacementRing(liveNodeIds) : this.#ring;
        return ring.place(session.id, loads);
      });
      // Learn the newcomer's address before routing to it.
      if (joined) await this.#refreshNodes();
    }
    if (holder === undefined) {
      // Forwarded here by the node that placed it, or placed nowhere: take it.
      const claim = await this.#leases.claim(session);
      if (claim.held) return { local: true };
      holder = claim.holder;
    }
    if (holder === this.nodeId) {
      const claim = await this.#leases.claim(session);
      return claim.held ? { local: true } : this.#towards(claim.holder, session);
    }
    return this.#towards(holder, session);
  }

  #towards(holder: string, session?: SessionKey): Route {
    const node = this.#nodes.find((candidate) => candidate.nodeId === holder);
    // A holder with a live lease but no heartbeat is dying: its lease ends within a lease time.
    if (!node) {
      return { retry: `the node holding this session (${holder}) is not responding; retry in a few seconds` };
    }
    if (session) this.#remember(session, node);
    return { local: false, nodeId: node.nodeId, url: node.url };
  }

  #remember(session: SessionKey, node: ClusterNode): void {
    if (this.#holders.size >= 10_000) this.#holders.clear();
    this.#holders.set(session.id, {
      nodeId: node.nodeId,
      url: node.url,
      // Until the next heartbeat or so: a lease moves only when its holder stops renewing.
      until: Date.now() + this.#leases.leaseMs / 3,
    });
  }

  /**
   * The other node believed to hold the session, if this node routed a request for it a moment
   * ago. By id alone (ids are unique across tenants), so a request can be sent on before this
   * node looks at its key: the holder checks the key and the session's owner as for any request.
   */
  knownHolder(sessionId: string): { nodeId: string; url: string } | undefined {
    const known = this.#holders.get(sessionId);
    if (!known) return undefined;
    if (known.until < Date.now()) {
      this.#holders.delete(sessionId);
      return undefined;
    }
    return known;
  }

  /** Drops the belief about who holds the session. */
  forget(sessionId: string): void {
    this.#holders.delete(sessionId);
  }

  /** Whether this node may wake the session: it holds the lease, or takes it now. */
  async mayWake(session: SessionKey): Promise<boolean> {
    await this.#releasing.get(sessionName(session))?.catch(() => undefined);
    this.#active(session);
    if (this.#leases.holds(session)) return true;
    const claim = await this.#leases.claim(session);
    return claim.held;
  }

  /** Stops new placements here (the registry says draining); held sessions stay until `leave`. */
  async drain(): Promise<void> {
    this.#draining = true;
    await this.#leases.setDraining(true);
  }

  /** Stops heartbeats and hands every lease back (after the node's own work has stopped). */
  async leave(): Promise<void> {
    if (this.#timer) clearInterval(this.#timer);
    if (this.#watchTimer) clearInterval(this.#watchTimer);
    this.#timer = undefined;
    this.#watchTimer = undefined;
    await Promise.all([this.#beating, this.#refreshing, this.#watching]);
    await this.#leases.leave();
  }
}
