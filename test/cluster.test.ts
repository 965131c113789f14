import { createHash, randomBytes } from 'node:crypto';
import { mkdtemp } from 'node:fs/promises';
import { request as httpRequest } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import Anthropic from '@anthropic-ai/sdk';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { formatVaultKey, generateVaultKey } from '../src/vault/keyring.js';
import { type BerthProcess, findFreePort, startBerthProcess } from './support/berth-process.js';
import { clusterClient, clusterNodeEnvironment, stopCluster } from './support/cluster-client.js';
import { type FakeOpenAiServer, startFakeOpenAiServer } from './support/fake-openai-server.js';
import { createTestDatabase, type TestDatabaseUrls } from './support/postgres-database.js';

const serverUrl = inject('postgresUrl');
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));
/**
 * The default lease. (1.5 s leases made a node whose event loop lagged on a loaded CI machine
 * count as gone for placement; the partition test keeps 1.5 s.)
 */
const LEASE_MS = 3000;

/**
 * Three Berth nodes (separate processes, loopback ports) on one real PostgreSQL. Requests go to
 * random nodes; whatever node holds a session runs it. Turns are tool-using (bash in a bwrap
 * sandbox) with a slow fake model, so kills and pauses land mid-turn.
 */
describe('a three-node cluster', () => {
  let database: TestDatabaseUrls;
  let owner: pg.Client;
  let model: FakeOpenAiServer;
  let root: string;
  let apiKey: string;
  const nodes: (BerthProcess | undefined)[] = [];
  const ports: number[] = [];
  const vaultKeys = generateVaultKey();

  const environment = (index: number) =>
    clusterNodeEnvironment({
      nodeId: `node-${index}`,
      modelUrl: model.url,
      migrationUrl: database.migrationUrl,
      leaseMs: LEASE_MS,
      vaultKeys: formatVaultKey(vaultKeys),
    });

  const startNode = async (index: number) => {
    nodes[index] = await startBerthProcess({
      dataDir: join(root, `node-${index}`),
      environment: environment(index),
      args: ['--cluster', database.url],
      port: ports[index],
      ...(apiKey ? { apiKey } : {}),
    });
    return nodes[index]!;
  };

  beforeAll(async () => {
    database = await createTestDatabase(serverUrl);
    owner = new pg.Client({ connectionString: database.migrationUrl });
    await owner.connect();
    root = await mkdtemp(join(tmpdir(), 'berth-cluster-'));
    // A turn: one bash call that leaves a marker, then a final text; replies are slow enough
    // that kills land during model calls and tool runs.
    model = await startFakeOpenAiServer((request) => {
      const messages = request.body.messages ?? [];
      const last = messages.at(-1);
      if (last?.role === 'tool') return { text: 'Done.', delayMs: 150 };
      const asked = JSON.stringify(last?.content ?? '');
      const marker = `marker-${Math.random().toString(36).slice(2)}`;
      const command = asked.includes('write-file')
        ? 'echo kept-across-nodes > /workspace/kept.txt'
        : asked.includes('big-file')
          ? 'head -c 3000000 /dev/urandom > /workspace/big.bin && sha256sum /workspace/big.bin'
          : asked.includes('read-file')
            ? 'cat /workspace/kept.txt'
            : `sleep 0.2; echo ${marker}`;
      return { delayMs: 150, toolCalls: [{ name: 'bash', arguments: { command } }] };
    });
    for (let index = 0; index < 3; index++) ports.push(await findFreePort());
    apiKey = (await startNode(0)).apiKey;
    await startNode(1);
    await startNode(2);
  }, 60_000);

  afterAll(() => stopCluster({ nodes, model, owner, root }));

  const { events, waitIdle, send, newSessions, checkLogs } = clusterClient({
    nodes: () => nodes,
    apiKey: () => apiKey,
    owner: () => owner,
  });

  it('runs sessions sent to random nodes: one holder each, gapless logs, nothing duplicated', async () => {
    const sessionIds = await newSessions(200);
    const acknowledged = new Map<string, string[]>();
    for (let round = 0; round < 2; round++) {
      await Promise.all(
        sessionIds.map(async (id) => {
          const sent = await send(id, `round ${round}`);
          acknowledged.set(id, [...(acknowledged.get(id) ?? []), ...sent.data.map((event) => event.id)]);
        }),
      );
      await waitIdle(sessionIds, 90_000);
    }
    await checkLogs(sessionIds, acknowledged);
    // Placement spread the sessions over all three nodes, one lease row each.
    const leases = await owner.query<{ node_id: string; count: string }>(
      `SELECT node_id, count(*) FROM berth.session_leases WHERE session_id = ANY($1) GROUP BY node_id`,
      [sessionIds],
    );
    expect(leases.rows.map((row) => row.node_id).sort()).toEqual(['node-0', 'node-1', 'node-2']);
    const counts = leases.rows.map((row) => Number(row.count));
    expect(counts.reduce((sum, count) => sum + count, 0)).toBe(200);
    // Balance itself is the bench's measure (10,000 placements, max/mean 1.065): here 200
    // sessions are placed at once, on loads a moment old, on a machine other suites load too.
  }, 180_000);

  it('streams a session from any node while another node runs it (official SDK)', async () => {
    const [sessionId] = await newSessions(1);
    await send(sessionId!, 'first turn');
    await waitIdle([sessionId!], 30_000);
    const holder = await owner.query<{ node_id: string }>(
      `SELECT node_id FROM berth.session_leases WHERE session_id = $1`,
      [sessionId],
    );
    const others = nodes.filter(
      (node, index) => node !== undefined && `node-${index}` !== holder.rows[0]!.node_id,
    );
    expect(others).toHaveLength(2);
    const watcher = new Anthropic({ apiKey, baseURL: others[0]!.url, maxRetries: 3 });
    const sender = new Anthropic({ apiKey, baseURL: others[1]!.url, maxRetries: 3 });
    const stream = await watcher.beta.sessions.events.stream(sessionId!);
    await sender.beta.sessions.events.send(sessionId!, {
      events: [{ type: 'user.message', content: [{ type: 'text', text: 'second turn' }] }],
    });
    const seen: string[] = [];
    for await (const event of stream) {
      seen.push(event.type);
      if (event.type === 'session.status_idle') break;
    }
    expect(seen, seen.join(', ')).toEqual(
      expect.arrayContaining([
        'user.message',
        'session.status_running',
        'agent.tool_use',
        'agent.tool_result',
        'agent.message',
      ]),
    );
    expect(seen.at(-1)).toBe('session.status_idle');
  }, 60_000);

  it("serves a session's files from any node byte for byte, and checks every key at the holder", async () => {
    const [sessionId] = await newSessions(1);
    await send(sessionId!, 'big-file');
    await waitIdle([sessionId!], 30_000);
    const written = (await events(sessionId!)).filter((event) => event.type === 'agent.tool_result').at(-1)!;
    const digest = /[0-9a-f]{64}/.exec(JSON.stringify(written.content))![0];
    const holder = await owner.query<{ node_id: string }>(
      `SELECT node_id FROM berth.session_leases WHERE session_id = $1`,
      [sessionId],
    );
    const [first, second] = nodes.filter(
      (node, index) => node !== undefined && `node-${index}` !== holder.rows[0]!.node_id,
    ) as BerthProcess[];
    const call = (node: BerthProcess, method: string, path: string, init: RequestInit = {}, key = apiKey) =>
      fetch(`${node.url}/v1/sessions/${sessionId}${path}`, {
        ...init,
        method,
        headers: { 'x-api-key': key, ...(init.headers as Record<string, string>) },
      });
    const sha256 = (bytes: ArrayBuffer) => createHash('sha256').update(Buffer.from(bytes)).digest('hex');
    // The first request through a node routes by the lease table; later ones go straight to the
    // holder (streamed: 3 MB is more than the node reads whole).
    for (let round = 0; round < 3; round++) {
      for (const node of [first!, second!]) {
        const download = await call(node, 'GET', '/files/big.bin');
        expect(download.status).toBe(200);
        expect(download.headers.get('content-length')).toBe('3000000');
        expect(sha256(await download.arrayBuffer())).toBe(digest);
      }
    }
    // An upload through one non-holder, read back through the other, deleted, gone.
    const upload = randomBytes(200_000);
    const put = await call(second!, 'PUT', '/files/in/up.bin', {
      body: upload,
      headers: { 'content-type': 'application/octet-stream' },
    });
    expect(put.status, await put.clone().text()).toBe(200);
    expect(await put.json()).toMatchObject({ path: 'in/up.bin', size_bytes: 200_000 });
    const back = await call(first!, 'GET', '/files/in/up.bin');
    expect(Buffer.from(await back.arrayBuffer()).equals(upload)).toBe(true);
    expect((await call(first!, 'DELETE', '/files/in/up.bin')).status).toBe(200);
    const gone = await call(second!, 'GET', '/files/in/up.bin');
    expect(gone.status).toBe(404);
    expect(((await gone.json()) as { type: string }).type).toBe('error');
    // Sent on before the node looks at the key: the holder refuses a bad key, and another
    // user's key, exactly as it would have itself.
    const badKey = await call(first!, 'GET', '/files/big.bin', {}, 'berth_sk_not-a-key');
    expect(badKey.status).toBe(401);
    expect(await badKey.json()).toMatchObject({ type: 'error', error: { type: 'authentication_error' } });
    // A body is read only for a valid key: a bad key with a body that never finishes arriving
    // is refused at once, not held in memory while it trickles.
    const trickle = await new Promise<number>((resolve, reject) => {
      const request = httpRequest(`${first!.url}/v1/sessions/${sessionId}/files/trickle.bin`, {
        method: 'PUT',
        headers: { 'x-api-key': 'berth_sk_not-a-key', 'content-length': '500000' },
      });
      request.once('response', (response) => {
        resolve(response.statusCode ?? 0);
        request.destroy();
      });
      request.once('error', reject);
      request.write('only the first bytes');
      setTimeout(() => reject(new Error('no answer while the body was still arriving')), 5000).unref();
    });
    expect(trickle).toBe(401);
    const admin = { 'x-api-key': apiKey, 'content-type': 'application/json' };
    const member = (await (
      await fetch(`${first!.url}/v1/users`, {
        method: 'POST',
        headers: admin,
        body: JSON.stringify({ name: 'mallory', role: 'member' }),
      })
    ).json()) as { id: string };
    const memberKey = (
      (await (
        await fetch(`${first!.url}/v1/api_keys`, {
          method: 'POST',
          headers: admin,
          body: JSON.stringify({ name: 'mallory', user_id: member.id }),
        })
      ).json()) as { key: string }
    ).key;
    for (const node of [first!, second!]) {
      const stranger = await call(node, 'GET', '/files/big.bin', {}, memberKey);
      expect(stranger.status).toBe(404);
      expect(await stranger.text()).not.toContain('big.bin"');
      const strangerPut = await call(node, 'PUT', '/files/planted.txt', { body: 'x' }, memberKey);
      expect(strangerPut.status).toBe(404);
    }
    const listing = (await (await call(first!, 'GET', '/files')).json()) as { data: { path: string }[] };
    expect(listing.data.map((file) => file.path).sort()).toEqual(['big.bin']);
  }, 60_000);

  it('moves a session with its files when its node drains (snapshot shared through PostgreSQL)', async () => {
    const [sessionId] = await newSessions(1);
    await send(sessionId!, 'write-file');
    await waitIdle([sessionId!], 30_000);
    const holder = await owner.query<{ node_id: string }>(
      `SELECT node_id FROM berth.session_leases WHERE session_id = $1`,
      [sessionId],
    );
    const index = Number(holder.rows[0]!.node_id.slice('node-'.length));
    // A clean stop: turns end, the sandbox is stopped with a snapshot, the leases are handed back.
    await nodes[index]!.stop();
    nodes[index] = undefined;
    const archived = await owner.query(`SELECT 1 FROM berth.sandbox_snapshots WHERE session_id = $1`, [
      sessionId,
    ]);
    expect(archived.rowCount).toBe(1);
    expect(
      (await owner.query(`SELECT 1 FROM berth.session_leases WHERE session_id = $1`, [sessionId])).rowCount,
    ).toBe(0);
    await send(sessionId!, 'read-file');
    await waitIdle([sessionId!], 30_000);
    const log = await events(sessionId!);
    const read = log.filter((event) => event.type === 'agent.tool_result').at(-1)!;
    expect(JSON.stringify(read.content)).toContain('kept-across-nodes');
    await startNode(index);
    // The drained node held about a third of the first test's 200 sandboxes and snapshots each
    // of them into PostgreSQL: on a loaded 2-core machine that alone can take a minute.
  }, 180_000);

  it('finishes the turns of a node killed with SIGKILL on the other nodes, losing no acknowledged event (3 kills)', async () => {
    for (let kill = 0; kill < 3; kill++) {
      const sessionIds = await newSessions(24);
      const acknowledged = new Map<string, string[]>();
      await Promise.all(
        sessionIds.map(async (id) =>
          acknowledged.set(
            id,
            (await send(id, `go ${kill}`)).data.map((event) => event.id),
          ),
        ),
      );
      // Once every turn is going (its session.status_running committed), kill the node holding
      // the most of them.
      await expect
        .poll(
          async () =>
            (
              await owner.query(
                `SELECT DISTINCT session_id FROM berth.events WHERE session_id = ANY($1) AND type = 'session.status_running'`,
                [sessionIds],
              )
            ).rowCount,
          { timeout: 30_000, interval: 50 },
        )
        .toBe(sessionIds.length);
      const held = await owner.query<{ node_id: string; count: string }>(
        `SELECT node_id, count(*) FROM berth.session_leases WHERE session_id = ANY($1) GROUP BY node_id ORDER BY count(*) DESC`,
        [sessionIds],
      );
      const victim = Number(held.rows[0]!.node_id.slice('node-'.length));
      const killedAt = Date.now();
      await nodes[victim]!.kill();
      await waitIdle(sessionIds, 60_000);
      const failoverMs = Date.now() - killedAt;
      await checkLogs(sessionIds, acknowledged);
      // Within a few lease times (the sweep runs every lease time).
      expect(failoverMs).toBeLessThan(LEASE_MS * 10);
      await startNode(victim);
    }
  }, 180_000);

  it('fences a node paused with SIGSTOP: after it resumes it cannot append for sessions others took', async () => {
    const sessionIds = await newSessions(12);
    const acknowledged = new Map<string, string[]>();
    await Promise.all(
      sessionIds.map(async (id) =>
        acknowledged.set(
          id,
          (await send(id, 'go')).data.map((event) => event.id),
        ),
      ),
    );
    await sleep(300);
    const held = await owner.query<{ node_id: string; session_id: string }>(
      `SELECT node_id, session_id FROM berth.session_leases WHERE session_id = ANY($1)`,
      [sessionIds],
    );
    const victim = Number(held.rows[0]!.node_id.slice('node-'.length));
    const victimSessions = held.rows
      .filter((row) => row.node_id === held.rows[0]!.node_id)
      .map((row) => row.session_id);
    const paused = nodes[victim]!;
    paused.child.kill('SIGSTOP');
    // Out of the node list for the test's requests while paused.
    nodes[victim] = undefined;
    try {
      await waitIdle(victimSessions, 60_000);
    } finally {
      paused.child.kill('SIGCONT');
    }
    // Give the resumed node time to try (and fail) to go on with its old turns.
    await sleep(LEASE_MS * 2);
    nodes[victim] = paused;
    await waitIdle(sessionIds, 60_000);
    await checkLogs(sessionIds, acknowledged);
    // The resumed node found out it had been fenced (its renewals failed; any append it still
    // tried was refused as a stale writer, see src/control/leases.test.ts), and the logs above
    // show no tool run twice and no gap.
    expect(paused.output()).toMatch(/lost the lease of a session/);
  }, 120_000);
});
