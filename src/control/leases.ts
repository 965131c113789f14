/**
 * The cluster's node registry and session leases, in PostgreSQL (no consensus of our own:
 * PostgreSQL is the source of truth; DESIGN.md §7).
 *
 * - A node registers and heartbeats; it is live while its heartbeat is younger than the lease
 *   time. Times are PostgreSQL's `now()`, never a node's clock, so skewed clocks cannot make two
 *   nodes disagree about an expiry.
 * - A session's live instance is held by a lease (session → node, expiry). Claiming is one
 *   conditional upsert: it succeeds when the session has no lease, an expired one, or one this
 *   node already holds. Only then does the claimer take the session's writer token
 *   (`EventStore.acquireWriter`), which fences every earlier holder: an append with an older
 *   token is refused by the store. So a node that was paused (SIGSTOP) or cut off from
 *   PostgreSQL past its expiry can never append again for a session another node took.
 * - Holders renew all their leases in one statement per heartbeat. A lease that expired while
 *   its holder was slow but that nobody took (the row still names the holder: taking it changes
 *   the row in the same statement that checks the expiry) is simply renewed; a lease another
 *   node took is reported lost.
 * - Heartbeats run on their own connection, so a node busy with requests (each of which may
 *   look a holder up or claim a lease) still renews its leases on time.
 * - Placing a session nobody holds reads the loads and reserves the lease for the chosen node
 *   in one transaction under an advisory lock, so placements at once see each other.
 */
import type pg from 'pg';
import { BerthError } from '../errors.js';
import type { SessionKey, WriterToken } from '../store/event-store.js';

/** A node as the registry knows it. */
export interface ClusterNode {
  nodeId: string;
  /** Where other nodes forward requests to (`http://host:port`). */
  url: string;
  draining: boolean;
}

/** What claiming a session gave. */
export type LeaseClaim =
  | { held: true; writer: WriterToken; fresh: boolean }
  | { held: false; holder: string };

export interface ClusterLeasesOptions {
  pool: pg.Pool;
  /** Where heartbeats run (default `pool`); a pool of its own keeps them off the request path. */
  heartbeatPool?: pg.Pool;
  /** The quoted schema name. */
  schema: string;
  nodeId: string;
  /** How long a lease and a heartbeat last without renewal (default 3 s). */
  leaseMs?: number;
  /** Fences earlier writers; the store's `acquireWriter`. */
  acquireWriter(session: SessionKey): Promise<WriterToken>;
}

export const DEFAULT_LEASE_MS = 3000;

const key = (session: SessionKey) => `${session.tenantId}/${session.id}`;
const quoteLiteral = (text: string) => `'${text.replaceAll("'", "''")}'`;

/** One node's view of the registry and of the leases it holds. */
export class ClusterLeases {
  readonly nodeId: string;
  readonly leaseMs: number;
  readonly #pool: pg.Pool;
  readonly #heartbeatPool: pg.Pool;
  readonly #s: string;
  readonly #acquireWriter: (session: SessionKey) => Promise<WriterToken>;
  /** Leases this node believes it holds, with the writer token it took. */
  readonly #held = new Map<string, { session: SessionKey; writer: WriterToken }>();

  constructor(options: ClusterLeasesOptions) {
    this.nodeId = options.nodeId;
    this.leaseMs = options.leaseMs ?? DEFAULT_LEASE_MS;
    this.#pool = options.pool;
    this.#heartbeatPool = options.heartbeatPool ?? options.pool;
    this.#s = options.schema;
    this.#acquireWriter = options.acquireWriter;
  }

  /** Registers (or re-registers) this node at `url`, live and not draining. */
  async register(url: string): Promise<void> {
    await this.#pool.query(
      `INSERT INTO ${this.#s}.cluster_nodes (node_id, url) VALUES ($1, $2)
       ON CONFLICT (node_id) DO UPDATE SET url = EXCLUDED.url, started_at = now(), heartbeat_at = now(), draining = false`,
      [this.nodeId, url],
    );
  }

  /**
   * Heartbeat and lease renewal in one round trip. Returns the sessions whose leases this node
   * lost (expired before it could renew them); it must stop working on them.
   */
  async heartbeat(): Promise<SessionKey[]> {
    // Only leases held before the renewal started can be judged by it: one claimed meanwhile
    // may be missing from the statement's snapshot.
    const before = new Map(this.#held);
    const result = await this.#heartbeatPool.query<{ tenant_id: string; session_id: string }>(
      `WITH beat AS (
         UPDATE ${this.#s}.cluster_nodes SET heartbeat_at = now() WHERE node_id = $1
       )
       UPDATE ${this.#s}.session_leases SET expires_at = now() + $2 * interval '1 millisecond'
       WHERE node_id = $1
       RETURNING tenant_id, session_id`,
      [this.nodeId, this.leaseMs],
    );
    const renewed = new Set(result.rows.map((row) => `${row.tenant_id}/${row.session_id}`));
    const lost: SessionKey[] = [];
    for (const [name, entry] of before) {
      if (renewed.has(name) || this.#held.get(name) !== entry) continue;
      this.#held.delete(name);
      lost.push(entry.session);
    }
    return lost;
  }

  /** Marks this node as draining (placement skips it) or not. */
  async setDraining(draining: boolean): Promise<void> {
    await this.#pool.query(`UPDATE ${this.#s}.cluster_nodes SET draining = $2 WHERE node_id = $1`, [
      this.nodeId,
      draining,
    ]);
  }

  /** Removes this node from the registry and gives up every lease it holds. */
  async leave(): Promise<void> {
    await this.#pool.query(`DELETE FROM ${this.#s}.session_leases WHERE node_id = $1`, [this.nodeId]);
    await this.#pool.query(`DELETE FROM ${this.#s}.cluster_nodes WHERE node_id = $1`, [this.nodeId]);
    this.#held.clear();
  }

  /** Nodes with a heartbeat younger than the lease time. */
  async liveNodes(): Promise<ClusterNode[]> {
    const result = await this.#pool.query<{ node_id: string; url: string; draining: boolean }>(
      `SELECT node_id, url, draining FROM ${this.#s}.cluster_nodes
       WHERE heartbeat_at > now() - $1 * interval '1 millisecond' ORDER BY node_id`,
      [this.leaseMs],
    );
    return result.rows.map((row) => ({ nodeId: row.node_id, url: row.url, draining: row.draining }));
  }

  /**
   * Leases per node, for placement with bounded loads. Expired leases count too: a node whose
   * heartbeat is late still runs its sessions (it renews them unless someone takes them), and
   * not counting them would send a busy node more work exactly when it is slowest. Placement
   * reads the loads of live nodes only, so a dead node's rows do not matter.
   */
  async loads(): Promise<Map<string, number>> {
    return this.#loadsOn(this.#pool);
  }

  async #loadsOn(client: pg.Pool | pg.PoolClient): Promise<Map<string, number>> {
    const result = await client.query<{ node_id: string; count: string }>(
      `SELECT node_id, count(*) AS count FROM ${this.#s}.session_leases GROUP BY node_id`,
    );
    return new Map(result.rows.map((row) => [row.node_id, Number(row.count)]));
  }

  /**
   * When the newest of other nodes' expired leases expired (ms since the epoch, PostgreSQL's
   * clock), or undefined when none has. A value newer than the last one seen means a lease
   * expired since: its node may have died with turns in flight (the cluster then sweeps).
   */
  async newestExpiry(): Promise<number | undefined> {
    const result = await this.#pool.query<{ newest: string | null }>(
      `SELECT (extract(epoch FROM max(expires_at)) * 1000)::float8 AS newest
       FROM ${this.#s}.session_leases WHERE expires_at <= now() AND node_id <> $1`,
      [this.nodeId],
    );
    const newest = result.rows[0]?.newest;
    return newest === null || newest === undefined ? undefined : Number(newest);
  }

  /**
   * Places a session nobody holds: under a cluster-wide lock (an advisory lock in PostgreSQL),
   * reads every node's load, lets `choose` pick a node, and reserves the lease for that node
   * (no writer token yet: the node takes one when it claims). Placements that run at once, on
   * one node or several, so see each other's choices, and the load bound holds under a burst.
   * `choose` also gets the live nodes that take new sessions (heartbeat within a lease, not
   * draining) as the registry has them now, so a node that joined a moment ago is a candidate
   * before the caller's own node list is refreshed. Returns the holder: the chosen node, or
   * whoever holds the session already; undefined when `choose` finds no node.
   */
  async place(
    session: SessionKey,
    choose: (loads: ReadonlyMap<string, number>, liveNodeIds: readonly string[]) => string | undefined,
  ): Promise<string | undefined> {
    const client = await this.#pool.connect();
    let failed = false;
    try {
      await client.query(`BEGIN; SELECT pg_advisory_xact_lock(${this.#placementLock})`);
      // A statement after the lock: its snapshot holds every placement committed before.
      const loads = await this.#loadsOn(client);
      const live = await client.query<{ node_id: string }>(
        `SELECT node_id FROM ${this.#s}.cluster_nodes
         WHERE heartbeat_at > now() - $1 * interval '1 millisecond' AND NOT draining ORDER BY node_id`,
        [this.leaseMs],
      );
      const chosen = choose(
        loads,
        live.rows.map((row) => row.node_id),
      );
      if (chosen === undefined) {
        await client.query('COMMIT');
        return undefined;
      }
      const reserved = await client.query<{ node_id: string }>(
        `INSERT INTO ${this.#s}.session_leases AS lease (tenant_id, session_id, node_id, expires_at)
         VALUES ($1, $2, $3, now() + $4 * interval '1 millisecond')
         ON CONFLICT (tenant_id, session_id) DO UPDATE
           SET node_id = EXCLUDED.node_id, expires_at = EXCLUDED.expires_at, acquired_at = now(),
               writer_token = 0
           WHERE lease.expires_at <= now()
         RETURNING node_id`,
        [session.tenantId, session.id, chosen, this.leaseMs],
      );
      const holder =
        reserved.rows[0]?.node_id ??
        (
          await client.query<{ node_id: string }>(
            `SELECT node_id FROM ${this.#s}.session_leases WHERE tenant_id = $1 AND session_id = $2`,
            [session.tenantId, session.id],
          )
        ).rows[0]?.node_id;
      await client.query('COMMIT');
      return holder;
    } catch (error) {
      failed = true;
      throw error;
    } finally {
      // A connection that failed mid-transaction is not given back to the pool.
      client.release(failed);
    }
  }

  /** The advisory lock placements take (one per schema). */
  get #placementLock(): string {
    return `hashtext(${quoteLiteral(`${this.#s}.placement`)})`;
  }

  /**
   * Gives up leases reserved for this node by a placement that it never claimed (the request
   * that placed the session never arrived here), once they are older than `olderThanMs`.
   */
  async releaseUnclaimed(olderThanMs: number): Promise<void> {
    await this.#pool.query(
      `DELETE FROM ${this.#s}.session_leases
       WHERE node_id = $1 AND writer_token = 0 AND acquired_at < now() - $2 * interval '1 millisecond'`,
      [this.nodeId, olderThanMs],
    );
  }

  /** The node holding an unexpired lease on the session, if any. */
  async holderOf(session: SessionKey): Promise<string | undefined> {
    const result = await this.#pool.query<{ node_id: string }>(
      `SELECT node_id FROM ${this.#s}.session_leases
       WHERE tenant_id = $1 AND session_id = $2 AND expires_at > now()`,
      [session.tenantId, session.id],
    );
    return result.rows[0]?.node_id;
  }

  /**
   * Takes the session's lease for this node (or keeps it). When the lease is new to this node,
   * the writer token is taken after the lease, which fences whoever held the session before.
   */
  async claim(session: SessionKey): Promise<LeaseClaim> {
    const claimed = await this.#pool.query<{ node_id: string; writer_token: string }>(
      `INSERT INTO ${this.#s}.session_leases AS lease (tenant_id, session_id, node_id, expires_at)
       VALUES ($1, $2, $3, now() + $4 * interval '1 millisecond')
       ON CONFLICT (tenant_id, session_id) DO UPDATE
         SET node_id = EXCLUDED.node_id, expires_at = EXCLUDED.expires_at,
             acquired_at = CASE WHEN lease.node_id = EXCLUDED.node_id AND lease.expires_at > now()
                                     AND lease.writer_token <> 0
                                THEN lease.acquired_at ELSE now() END
         WHERE lease.node_id = EXCLUDED.node_id OR lease.expires_at <= now()
       RETURNING node_id, writer_token`,
      [session.tenantId, session.id, this.nodeId, this.leaseMs],
    );
    if (claimed.rows.length === 0) {
      const holder = await this.holderOf(session);
      // Expired between the two statements: try again once.
      if (holder === undefined) return this.claim(session);
      return { held: false, holder };
    }
    // Still ours only if nobody took the session in between: the row still carries our token.
    const existing = this.#held.get(key(session));
    if (existing && Number(claimed.rows[0]!.writer_token) === existing.writer.token) {
      return { held: true, writer: existing.writer, fresh: false };
    }
    let writer: WriterToken;
    try {
      writer = await this.#acquireWriter(session);
    } catch (error) {
      // No such session (or the store failed): hold no lease for it.
      await this.release(session).catch(() => undefined);
      throw error;
    }
    await this.#pool.query(
      `UPDATE ${this.#s}.session_leases SET writer_token = $4
       WHERE tenant_id = $1 AND session_id = $2 AND node_id = $3`,
      [session.tenantId, session.id, this.nodeId, writer.token],
    );
    this.#held.set(key(session), { session, writer });
    return { held: true, writer, fresh: true };
  }

  /**
   * The writer token of this node's lease on the session, claiming the lease if this node does
   * not hold it. Fails with `stale_writer` when another node holds the session.
   */
  async writerFor(session: SessionKey): Promise<WriterToken> {
    const held = this.#held.get(key(session));
    if (held) return held.writer;
    const claim = await this.claim(session);
    if (!claim.held) {
      throw new BerthError('stale_writer', `node ${claim.holder} holds session ${session.id}`);
    }
    return claim.writer;
  }

  /**
   * An append with `writer` was refused as stale: another node took the session. This node no
   * longer holds it (a later claim takes a new lease and a new token).
   */
  lost(session: SessionKey, writer: WriterToken): void {
    if (this.#held.get(key(session))?.writer.token === writer.token) this.#held.delete(key(session));
  }

  /** The sessions this node believes it holds. */
  heldSessions(): SessionKey[] {
    return [...this.#held.values()].map((entry) => entry.session);
  }

  /** Whether this node believes it holds the session (as of its last claim or heartbeat). */
  holds(session: SessionKey): boolean {
    return this.#held.has(key(session));
  }

  /** Gives the session's lease up (it went idle, or the node drains). */
  async release(session: SessionKey): Promise<void> {
    this.#held.delete(key(session));
    await this.#pool.query(
      `DELETE FROM ${this.#s}.session_leases WHERE tenant_id = $1 AND session_id = $2 AND node_id = $3`,
      [session.tenantId, session.id, this.nodeId],
    );
  }
}
