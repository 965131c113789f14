import { mkdtemp } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { formatVaultKey, generateVaultKey } from '../src/vault/keyring.js';
import { type BerthProcess, startBerthProcess } from './support/berth-process.js';
import { clusterNodeEnvironment, stopCluster } from './support/cluster-client.js';
import { createTestDatabase, type TestDatabaseUrls } from './support/postgres-database.js';
import { type OpenStream, openSseStream } from './support/sse-stream.js';

const serverUrl = inject('postgresUrl');

/**
 * Taking rights away on one node of a cluster applies on every node at once: the README's "stops
 * working at once, open streams close" holds for a key revoked through any node (or in the
 * store directly), a user's role changed through any node, and a user removed from the store.
 * Two `berth serve --cluster` processes on one real PostgreSQL; each test warms the other
 * node's key cache first, so what it shows is the cache being told, not the cache missing.
 */
describe('revocation across a two-node cluster', () => {
  let database: TestDatabaseUrls;
  let owner: pg.Client;
  let root: string;
  let adminKey: string;
  let agentId: string;
  let environmentId: string;
  const nodes: BerthProcess[] = [];
  const vaultKeys = formatVaultKey(generateVaultKey());

  const request = (node: BerthProcess, key: string, method: string, path: string, body?: unknown) =>
    fetch(`${node.url}${path}`, {
      method,
      headers: { 'x-api-key': key, 'content-type': 'application/json' },
      body: body === undefined ? undefined : JSON.stringify(body),
    });

  async function json<T>(response: Response, status = 200): Promise<T> {
    const text = await response.text();
    expect(response.status, text).toBe(status);
    return JSON.parse(text) as T;
  }

  /** A user of the admin's tenant with a key, made through node `via`. */
  async function newUser(via: BerthProcess, name: string, role: 'admin' | 'member') {
    const user = await json<{ id: string }>(
      await request(via, adminKey, 'POST', '/v1/users', { name, role }),
    );
    const key = await json<{ id: string; key: string }>(
      await request(via, adminKey, 'POST', '/v1/api_keys', { name: `${name} key`, user_id: user.id }),
    );
    return { userId: user.id, keyId: key.id, key: key.key };
  }

  async function newSession(via: BerthProcess, key: string): Promise<string> {
    return (
      await json<{ id: string }>(
        await request(via, key, 'POST', '/v1/sessions', { agent: agentId, environment_id: environmentId }),
      )
    ).id;
  }

  /** Opens the session's stream on each node with `key`, and proves each delivers events. */
  async function openLiveStreams(key: string, sessionId: string, marker: string): Promise<OpenStream[]> {
    const streams = await Promise.all(
      nodes.map((node) => openSseStream(`${node.url}/v1/sessions/${sessionId}/events/stream`, key)),
    );
    await json(
      await request(nodes[0]!, adminKey, 'POST', `/v1/sessions/${sessionId}/events`, {
        events: [{ type: 'user.message', content: [{ type: 'text', text: marker }] }],
      }),
    );
    await Promise.all(streams.map((stream) => stream.waitForText(marker)));
    return streams;
  }

  /**
   * How long after `answeredAt` each stream ended (ms; negative: before the answer), waiting at
   * most a second past it; a stream still open then is reported as null.
   */
  async function closedAfter(streams: OpenStream[], answeredAt: number): Promise<(number | null)[]> {
    const ended = await Promise.all(
      streams.map((stream) => stream.endedWithin(Math.max(0, answeredAt + 1_000 - Date.now()))),
    );
    await Promise.all(streams.map((stream) => stream.cancel()));
    return ended.map((at) => (at === undefined ? null : at - answeredAt));
  }

  /**
   * How long after `since` each node first refused the key (ms), asking every few ms for at
   * most a second; null for a node that still accepted it then.
   */
  async function refusedAfter(key: string, since: number): Promise<(number | null)[]> {
    return Promise.all(
      nodes.map(async (node) => {
        while (Date.now() - since <= 1_000) {
          if ((await request(node, key, 'GET', '/v1/me')).status === 401) return Date.now() - since;
          await new Promise((resolve) => setTimeout(resolve, 5));
        }
        return null;
      }),
    );
  }

  /**
   * Waits until `key` is refused on every node and `streams` are closed, counting from a change
   * committed at `committedAt` that no node's API took part in; each must happen within 1 s.
   */
  async function expectGoneEverywhere(
    key: string,
    streams: OpenStream[],
    committedAt: number,
    label: string,
  ) {
    const [refused, closed] = await Promise.all([
      refusedAfter(key, committedAt),
      closedAfter(streams, committedAt),
    ]);
    console.log(`${label}: refused ${refused.join(' / ')} ms, streams closed ${closed.join(' / ')} ms`);
    expect(
      refused.every((after) => after !== null && after <= 1_000),
      `refused after: ${refused}`,
    ).toBe(true);
    expect(
      closed.every((after) => after !== null && after <= 1_000),
      `closed after: ${closed}`,
    ).toBe(true);
  }

  beforeAll(async () => {
    database = await createTestDatabase(serverUrl);
    owner = new pg.Client({ connectionString: database.migrationUrl });
    await owner.connect();
    root = await mkdtemp(join(tmpdir(), 'berth-cluster-revocation-'));
    for (let index = 0; index < 2; index++) {
      nodes[index] = await startBerthProcess({
        dataDir: join(root, `node-${index}`),
        environment: clusterNodeEnvironment({
          nodeId: `node-${index}`,
          // No model is called: the agent is scripted.
          modelUrl: 'http://127.0.0.1:9/v1',
          migrationUrl: database.migrationUrl,
          leaseMs: 3000,
          vaultKeys,
        }),
        args: ['--cluster', database.url],
        ...(adminKey ? { apiKey: adminKey } : {}),
      });
      adminKey ??= nodes[index]!.apiKey;
    }
    const [first] = nodes;
    agentId = (
      await json<{ id: string }>(
        await request(first!, adminKey, 'POST', '/v1/agents', { name: 'revocation', model: 'scripted/echo' }),
      )
    ).id;
    environmentId = (
      await json<{ id: string }>(
        await request(first!, adminKey, 'POST', '/v1/environments', { name: 'revocation' }),
      )
    ).id;
  }, 60_000);

  afterAll(() => stopCluster({ nodes, owner, root }));

  it('refuses a key revoked through one node on every node, and closes its streams on every node within 1 s', async () => {
    const [nodeA, nodeB] = nodes as [BerthProcess, BerthProcess];
    const member = await newUser(nodeA, 'revoked-member', 'member');
    const sessionId = await newSession(nodeB, member.key);
    // Both nodes have the key cached, as working.
    for (const node of nodes) expect((await request(node, member.key, 'GET', '/v1/me')).status).toBe(200);
    const streams = await openLiveStreams(member.key, sessionId, 'before revocation');

    const revoked = await json<{ revoked_at: string | null }>(
      await request(nodeA, adminKey, 'POST', `/v1/api_keys/${member.keyId}/revoke`),
    );
    const answeredAt = Date.now();
    expect(revoked.revoked_at).not.toBeNull();
    // The very next request on each node is refused: no waiting for a cache to age.
    const answers = await Promise.all(
      nodes.map(async (node) => (await request(node, member.key, 'GET', `/v1/sessions/${sessionId}`)).status),
    );
    const closed = await closedAfter(streams, answeredAt);
    console.log(`streams closed ${closed.join(' / ')} ms after the revocation's answer (node A / node B)`);
    expect(answers).toEqual([401, 401]);
    expect(
      closed.every((after) => after !== null && after <= 1_000),
      `closed after: ${closed}`,
    ).toBe(true);
    for (const node of nodes) {
      expect((await request(node, member.key, 'GET', `/v1/sessions/${sessionId}/events/stream`)).status).toBe(
        401,
      );
      expect(
        (
          await request(node, member.key, 'POST', `/v1/sessions/${sessionId}/events`, {
            events: [{ type: 'user.message', content: [{ type: 'text', text: 'after revocation' }] }],
          })
        ).status,
      ).toBe(401);
    }
  }, 60_000);

  it('refuses a key revoked in the store directly (not through any node) on every node, and closes its streams', async () => {
    const member = await newUser(nodes[0]!, 'store-revoked', 'member');
    const sessionId = await newSession(nodes[1]!, member.key);
    for (const node of nodes) expect((await request(node, member.key, 'GET', '/v1/me')).status).toBe(200);
    const streams = await openLiveStreams(member.key, sessionId, 'before the store');

    await owner.query('UPDATE berth.api_keys SET revoked_at = $1 WHERE id = $2', [
      new Date().toISOString(),
      member.keyId,
    ]);
    const committedAt = Date.now();
    // No node took part in the change: each hears of it from the database (milliseconds).
    await expectGoneEverywhere(member.key, streams, committedAt, 'after the commit');
  }, 60_000);

  it("applies a role change made through one node on every node at once: a demoted admin's rights and admin streams are gone", async () => {
    const [nodeA, nodeB] = nodes as [BerthProcess, BerthProcess];
    const member = await newUser(nodeA, 'watched-member', 'member');
    const memberSession = await newSession(nodeA, member.key);
    const demoted = await newUser(nodeA, 'soon-member', 'admin');
    // As an admin, on both nodes: lists users and reads the member's session (cached as admin).
    for (const node of nodes) {
      expect((await request(node, demoted.key, 'GET', '/v1/users')).status).toBe(200);
      expect((await request(node, demoted.key, 'GET', `/v1/sessions/${memberSession}`)).status).toBe(200);
    }
    // Streams of the member's session, visible to the user only as an admin.
    const streams = await openLiveStreams(demoted.key, memberSession, 'watched as admin');

    const changed = await json<{ role: string }>(
      await request(nodeA, adminKey, 'POST', `/v1/users/${demoted.userId}`, { role: 'member' }),
    );
    const answeredAt = Date.now();
    expect(changed.role).toBe('member');
    const answers = await Promise.all(
      nodes.map(async (node) => [
        (await request(node, demoted.key, 'GET', '/v1/users')).status,
        (await request(node, demoted.key, 'GET', `/v1/sessions/${memberSession}`)).status,
      ]),
    );
    const closed = await closedAfter(streams, answeredAt);
    console.log(`admin streams closed ${closed.join(' / ')} ms after the role change's answer`);
    expect(answers).toEqual([
      [403, 404],
      [403, 404],
    ]);
    expect(
      closed.every((after) => after !== null && after <= 1_000),
      `closed after: ${closed}`,
    ).toBe(true);
    // Still a member with a working key, on both nodes.
    for (const node of nodes) {
      const me = await json<{ role: string }>(await request(node, demoted.key, 'GET', '/v1/me'));
      expect(me.role).toBe('member');
    }
    expect((await request(nodeB, member.key, 'GET', `/v1/sessions/${memberSession}`)).status).toBe(200);
  }, 60_000);

  it('closes the streams of a key revoked while the nodes could not hear the database, once they hear it again', async () => {
    const member = await newUser(nodes[0]!, 'unheard-member', 'member');
    const sessionId = await newSession(nodes[1]!, member.key);
    for (const node of nodes) expect((await request(node, member.key, 'GET', '/v1/me')).status).toBe(200);
    const streams = await openLiveStreams(member.key, sessionId, 'before the outage');

    // Cut every node's listening connection, and revoke while none is listening: the notice is
    // lost. A node that reconnects must assume anything changed (streams checked, cache dropped).
    // Other roles' backends are visible to a superuser only: the test server's own role, in
    // this test's database.
    const superuser = new URL(serverUrl);
    superuser.pathname = new URL(database.url).pathname;
    const inspector = new pg.Client({ connectionString: superuser.toString() });
    await inspector.connect();
    const listening = `FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'LISTEN %'`;
    let cut = false;
    try {
      expect((await inspector.query(`SELECT pid ${listening}`)).rows).toHaveLength(2);
      await inspector.query(`SELECT pg_terminate_backend(pid) ${listening}`);
      // Until both are gone (each node reconnects 200 ms after losing its connection).
      const deadline = Date.now() + 150;
      while (!cut && Date.now() < deadline) {
        cut = (await inspector.query(`SELECT pid ${listening}`)).rows.length === 0;
      }
    } finally {
      await inspector.end();
    }
    console.log(`revoking while ${cut ? 'no node listens' : 'a node may already listen again'}`);
    await owner.query('UPDATE berth.api_keys SET revoked_at = $1 WHERE id = $2', [
      new Date().toISOString(),
      member.keyId,
    ]);
    const committedAt = Date.now();
    await expectGoneEverywhere(member.key, streams, committedAt, 'after an outage');
  }, 60_000);

  it("stops a removed user's keys on every node at once, and closes their streams", async () => {
    const member = await newUser(nodes[0]!, 'removed-member', 'member');
    const sessionId = await newSession(nodes[1]!, member.key);
    for (const node of nodes) expect((await request(node, member.key, 'GET', '/v1/me')).status).toBe(200);
    const streams = await openLiveStreams(member.key, sessionId, 'before removal');

    // An operator removes the user in the database (no API removes users yet).
    await owner.query('DELETE FROM berth.users WHERE id = $1', [member.userId]);
    const committedAt = Date.now();
    await expectGoneEverywhere(member.key, streams, committedAt, 'after the removal');
  }, 60_000);
});
