import { randomBytes } from 'node:crypto';
import pg from 'pg';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, inject, it } from 'vitest';
import { testRoleUrls } from '../../test/support/postgres-database.js';
import { isBerthError } from '../errors.js';
import { newId } from '../ids.js';
import type { SessionKey } from '../store/event-store.js';
import { openStore } from '../store/open-store.js';
import { quoteSchemaName } from '../store/postgres/schema.js';
import type { Store } from '../store/resource-store.js';
import { ClusterLeases } from './leases.js';

const serverUrl = inject('postgresUrl');
const admin = new pg.Client({ connectionString: serverUrl });
beforeAll(() => admin.connect());
afterAll(() => admin.end());

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));
const message = (text: string) => ({ type: 'user.message', content: [{ type: 'text', text }] });

/**
 * Leases on a real PostgreSQL, as Berth's application role. Each "node" is a ClusterLeases with
 * its own pool, as separate processes would have.
 */
describe('cluster leases', () => {
  let schema: string;
  let store: Store;
  const pools: pg.Pool[] = [];
  /** A node that only reads leases (see `leaseExpired`). */
  let observer: ClusterLeases | undefined;

  beforeEach(async () => {
    schema = `berth_test_${randomBytes(6).toString('hex')}`;
    store = await openStore({ kind: 'postgres', ...testRoleUrls(serverUrl), schema, maxConnections: 4 });
  });
  afterEach(async () => {
    observer = undefined;
    for (const pool of pools.splice(0)) await pool.end();
    await store.close();
    await admin.query(`DROP SCHEMA IF EXISTS "${schema}" CASCADE`);
  });

  function node(nodeId: string, leaseMs = 3000): ClusterLeases {
    const pool = new pg.Pool({ connectionString: testRoleUrls(serverUrl).url, max: 4 });
    pools.push(pool);
    return new ClusterLeases({
      pool,
      schema: quoteSchemaName(schema),
      nodeId,
      leaseMs,
      acquireWriter: (session) => store.events.acquireWriter(session),
    });
  }

  /** Resolves once no lease on `session` is live (its holder stopped renewing it), as PostgreSQL's clock says. */
  async function leaseExpired(session: SessionKey): Promise<void> {
    observer ??= node('observer');
    const watching = observer;
    await expect.poll(() => watching.holderOf(session), { timeout: 10_000, interval: 20 }).toBeUndefined();
  }

  async function newSession(): Promise<SessionKey> {
    const id = newId('sesn');
    const at = new Date().toISOString();
    await store.resources.createSession({
      id,
      tenantId: 'tnt_cluster',
      ownerId: 'user_a',
      createdAt: at,
      updatedAt: at,
      archivedAt: null,
      body: { id, type: 'session', metadata: {} },
      agentId: 'agent_a',
      agentVersion: 1,
      environmentId: 'env_a',
      status: 'idle',
      stopReason: null,
      lastSeq: 0,
    });
    return { tenantId: 'tnt_cluster', id };
  }

  it('gives each session to exactly one of three nodes claiming at once', async () => {
    const nodes = [node('node-a'), node('node-b'), node('node-c')];
    const sessions = await Promise.all(Array.from({ length: 30 }, () => newSession()));
    for (const session of sessions) {
      const claims = await Promise.all(nodes.map((each) => each.claim(session)));
      const winners = claims.flatMap((claim, index) => (claim.held ? [nodes[index]!.nodeId] : []));
      expect(winners).toHaveLength(1);
      for (const claim of claims) if (!claim.held) expect(claim.holder).toBe(winners[0]);
      expect(await nodes[0]!.holderOf(session)).toBe(winners[0]);
    }
  });

  it('fences a holder that stopped renewing: another node takes over and the old token cannot append', async () => {
    const a = node('node-a', 1000);
    const b = node('node-b', 1000);
    const session = await newSession();
    const first = await a.claim(session);
    if (!first.held) throw new Error('node-a should hold the session');
    await store.events.append(session, [message('from a')], { writer: first.writer });
    // While a's lease is live, b cannot take it.
    expect(await b.claim(session)).toEqual({ held: false, holder: 'node-a' });
    // a is "paused" (no heartbeat) past its lease.
    await leaseExpired(session);
    const second = await b.claim(session);
    if (!second.held) throw new Error('node-b should take the expired lease');
    expect(second.writer.token).toBeGreaterThan(first.writer.token);
    const refused = await store.events
      .append(session, [message('from a, after the pause')], { writer: first.writer })
      .catch((error: unknown) => error);
    expect(isBerthError(refused, 'stale_writer')).toBe(true);
    await store.events.append(session, [message('from b')], { writer: second.writer });
    // a wakes up: its heartbeat says the session is lost, and a new claim is refused.
    expect(await a.heartbeat()).toEqual([session]);
    expect(a.holds(session)).toBe(false);
    expect(await a.claim(session)).toEqual({ held: false, holder: 'node-b' });
    const texts = (await store.events.read(session)).map(
      (stored) => (stored.event.content as { text: string }[])[0]!.text,
    );
    expect(texts).toEqual(['from a', 'from b']);
  });

  it('renews a lease its holder was late to renew when nobody took it: same token, not lost', async () => {
    const a = node('node-a', 300);
    const b = node('node-b', 300);
    const session = await newSession();
    const first = await a.claim(session);
    if (!first.held) throw new Error('node-a should hold the session');
    // a's event loop stalls past its lease; nobody claims meanwhile.
    await leaseExpired(session);
    expect(await a.heartbeat()).toEqual([]);
    expect(a.holds(session)).toBe(true);
    expect(await a.writerFor(session)).toBe(first.writer);
    // Renewed: b cannot take it now, and a's token still appends.
    expect(await b.claim(session)).toEqual({ held: false, holder: 'node-a' });
    await store.events.append(session, [message('a after the stall')], { writer: first.writer });
    // Expired leases still count as their holder's load (it keeps running those sessions).
    await leaseExpired(session);
    expect(await b.loads()).toEqual(new Map([['node-a', 1]]));
  });

  it("gives a wake the lease's own token, refuses a session another node holds, and forgets a stale one", async () => {
    const a = node('node-a', 300);
    const b = node('node-b', 300);
    const session = await newSession();
    // writerFor claims when the node does not hold the session, and reuses the lease's token.
    const writer = await a.writerFor(session);
    expect(await a.writerFor(session)).toBe(writer);
    const refused = await b.writerFor(session).catch((error: unknown) => error);
    expect(isBerthError(refused, 'stale_writer')).toBe(true);
    expect(String(refused)).toContain('node-a');
    // a stalls; b takes over; a's append is refused and a forgets the lease.
    await leaseExpired(session);
    const taken = await b.writerFor(session);
    expect(taken.token).toBeGreaterThan(writer.token);
    const stale = await store.events
      .append(session, [message('late')], { writer })
      .catch((error: unknown) => error);
    expect(isBerthError(stale, 'stale_writer')).toBe(true);
    a.lost(session, writer);
    expect(a.holds(session)).toBe(false);
    expect(await a.heartbeat()).toEqual([]);
  });

  it('keeps a lease alive while its holder heartbeats', async () => {
    // Generous margins: a loaded CI machine may delay a beat by a few hundred ms.
    const a = node('node-a', 1500);
    const b = node('node-b', 1500);
    const session = await newSession();
    expect((await a.claim(session)).held).toBe(true);
    for (let beat = 0; beat < 8; beat++) {
      // The time between beats is the scenario here (a heartbeat every 300 ms), not a wait.
      await sleep(300);
      expect(await a.heartbeat()).toEqual([]);
    }
    expect(await b.claim(session)).toEqual({ held: false, holder: 'node-a' });
  });

  it('hands a node that lost a session and claims it again a new token, never its stale one', async () => {
    const a = node('node-a', 200);
    const b = node('node-b', 200);
    const session = await newSession();
    const first = await a.claim(session);
    await leaseExpired(session);
    const taken = await b.claim(session);
    await leaseExpired(session);
    // b died too; a claims again without having heartbeated in between.
    const again = await a.claim(session);
    if (!first.held || !taken.held || !again.held) throw new Error('each claim should succeed');
    expect(again.fresh).toBe(true);
    expect(again.writer.token).toBeGreaterThan(taken.writer.token);
    await store.events.append(session, [message('a again')], { writer: again.writer });
  });

  it('lists live nodes by heartbeat, with their drain state, and counts leases per node', async () => {
    const a = node('node-a', 1000);
    const b = node('node-b', 1000);
    await a.register('http://127.0.0.1:1');
    await b.register('http://127.0.0.1:2');
    await b.setDraining(true);
    expect(await a.liveNodes()).toEqual([
      { nodeId: 'node-a', url: 'http://127.0.0.1:1', draining: false },
      { nodeId: 'node-b', url: 'http://127.0.0.1:2', draining: true },
    ]);
    const sessions = await Promise.all([newSession(), newSession(), newSession()]);
    await a.claim(sessions[0]!);
    await a.claim(sessions[1]!);
    await b.claim(sessions[2]!);
    expect(await a.loads()).toEqual(
      new Map([
        ['node-a', 2],
        ['node-b', 1],
      ]),
    );
    // b stops heartbeating; a keeps going.
    await expect
      .poll(
        async () => {
          await a.heartbeat();
          return (await a.liveNodes()).map((each) => each.nodeId);
        },
        { timeout: 10_000, interval: 100 },
      )
      .toEqual(['node-a']);
    await a.leave();
    expect(await b.holderOf(sessions[0]!)).toBeUndefined();
  });

  it('places a burst from three nodes at once as if one at a time, each lease reserved for the node chosen', async () => {
    const nodes = [node('node-a'), node('node-b'), node('node-c')];
    const names = nodes.map((each) => each.nodeId);
    const sessions = await Promise.all(Array.from({ length: 60 }, () => newSession()));
    // The least loaded node (the first on ties): placements that saw each other's choices end
    // exactly even; any two that read the same loads would both pick the same node.
    const leastLoaded = (loads: ReadonlyMap<string, number>) =>
      names.reduce((best, name) => ((loads.get(name) ?? 0) < (loads.get(best) ?? 0) ? name : best));
    const holders = await Promise.all(
      sessions.map((session, index) => nodes[index % 3]!.place(session, leastLoaded)),
    );
    expect(await nodes[0]!.loads()).toEqual(
      new Map([
        ['node-a', 20],
        ['node-b', 20],
        ['node-c', 20],
      ]),
    );
    for (const [index, session] of sessions.entries()) {
      expect(await nodes[0]!.holderOf(session)).toBe(holders[index]);
    }
    // Placing again finds the holder; the chosen node claims its reservation with a token of its
    // own; reservations it never claimed are given up, claimed ones stay.
    const [first, second] = sessions.filter((_, index) => holders[index] === 'node-b');
    expect(await nodes[0]!.place(first!, () => 'node-a')).toBe('node-b');
    const claim = await nodes[1]!.claim(first!);
    expect(claim).toMatchObject({ held: true, fresh: true });
    await nodes[1]!.releaseUnclaimed(0);
    expect(await nodes[0]!.holderOf(first!)).toBe('node-b');
    expect(await nodes[0]!.holderOf(second!)).toBeUndefined();
  });

  it('offers placement every node that takes sessions now, one registered a moment ago included', async () => {
    const a = node('node-a');
    const b = node('node-b');
    const c = node('node-c');
    await a.register('http://127.0.0.1:1');
    await b.register('http://127.0.0.1:2');
    await c.register('http://127.0.0.1:3');
    await c.setDraining(true);
    let offered: readonly string[] = [];
    const session = await newSession();
    // Node a has not refreshed any node list: what it is offered comes from the registry.
    expect(
      await a.place(session, (_loads, liveNodeIds) => {
        offered = liveNodeIds;
        return 'node-b';
      }),
    ).toBe('node-b');
    expect(offered).toEqual(['node-a', 'node-b']);
    const d = node('node-d');
    await d.register('http://127.0.0.1:4');
    await a.place(await newSession(), (_loads, liveNodeIds) => {
      offered = liveNodeIds;
      return undefined;
    });
    expect(offered).toEqual(['node-a', 'node-b', 'node-d']);
  });
});
