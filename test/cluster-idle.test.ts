import { mkdtemp } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { formatVaultKey, generateVaultKey } from '../src/vault/keyring.js';
import { type BerthProcess, startBerthProcess } from './support/berth-process.js';
import { clusterClient, clusterNodeEnvironment, stopCluster } from './support/cluster-client.js';
import { type FakeOpenAiServer, startFakeOpenAiServer } from './support/fake-openai-server.js';
import { createTestDatabase, type TestDatabaseUrls } from './support/postgres-database.js';

const serverUrl = inject('postgresUrl');
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));
const LEASE_MS = 1000;
/** `BERTH_LEASE_IDLE_MS` here: a quiet session's lease goes after 1.5 s (default 60 s). */
const IDLE_RELEASE_MS = 1500;

/**
 * A session's live instance is torn down when idle: once its turn is over and its sandbox (if
 * any) stopped, its node gives the lease up, and the next request places it again, on any
 * node, with its log and files intact. Two nodes on one real PostgreSQL.
 */
describe('a cluster with idle sessions', () => {
  let database: TestDatabaseUrls;
  let owner: pg.Client;
  let model: FakeOpenAiServer;
  let root: string;
  let apiKey: string;
  const nodes: (BerthProcess | undefined)[] = [];
  const vaultKeys = formatVaultKey(generateVaultKey());

  beforeAll(async () => {
    database = await createTestDatabase(serverUrl);
    owner = new pg.Client({ connectionString: database.migrationUrl });
    await owner.connect();
    root = await mkdtemp(join(tmpdir(), 'berth-cluster-idle-'));
    model = await startFakeOpenAiServer((request) => {
      const messages = request.body.messages ?? [];
      const last = messages.at(-1);
      if (last?.role === 'tool') return { text: 'Done.' };
      const asked = JSON.stringify(last?.content ?? '');
      if (asked.includes('just-talk')) return { text: 'Hello.' };
      const command = asked.includes('write-file')
        ? 'echo kept-while-away > /workspace/kept.txt'
        : 'cat /workspace/kept.txt';
      return { toolCalls: [{ name: 'bash', arguments: { command } }] };
    });
    for (let index = 0; index < 2; index++) {
      nodes[index] = await startBerthProcess({
        dataDir: join(root, `node-${index}`),
        environment: {
          ...clusterNodeEnvironment({
            nodeId: `node-${index}`,
            modelUrl: model.url,
            migrationUrl: database.migrationUrl,
            leaseMs: LEASE_MS,
            vaultKeys,
          }),
          BERTH_LEASE_IDLE_MS: String(IDLE_RELEASE_MS),
          BERTH_MIN_LIFECYCLE_S: '1',
        },
        args: ['--cluster', database.url],
        ...(apiKey ? { apiKey } : {}),
      });
      apiKey ??= nodes[index]!.apiKey;
    }
  }, 60_000);

  afterAll(() => stopCluster({ nodes, model, owner, root }));

  const { api, events, waitIdle, send, checkLogs } = clusterClient({
    nodes: () => nodes,
    apiKey: () => apiKey,
    owner: () => owner,
  });

  const leaseOf = async (sessionId: string) =>
    (
      await owner.query<{ node_id: string }>(
        'SELECT node_id FROM berth.session_leases WHERE session_id = $1',
        [sessionId],
      )
    ).rows[0]?.node_id;

  /** Polls until the session's lease row is gone; returns how long that took. */
  const leaseGone = async (sessionId: string, timeoutMs: number) => {
    const started = Date.now();
    while ((await leaseOf(sessionId)) !== undefined) {
      if (Date.now() - started > timeoutMs) throw new Error(`the lease of ${sessionId} was still held`);
      await sleep(100);
    }
    return Date.now() - started;
  };

  const newSession = async (lifecycle?: { idle_timeout_s: number; max_lifetime_s: number }) => {
    const agent = await api<{ id: string }>('POST', '/v1/agents', {
      name: `idle-${Date.now()}`,
      model: 'openai-compatible/fake-model',
      tools: [{ type: 'agent_toolset_20260401' }],
    });
    const environment = await api<{ id: string }>('POST', '/v1/environments', {
      name: `idle-${Date.now()}`,
      config: { type: 'cloud', ...(lifecycle ? { berth: { lifecycle } } : {}) },
    });
    return (
      await api<{ id: string }>('POST', '/v1/sessions', { agent: agent.id, environment_id: environment.id })
    ).id;
  };

  it("gives up a quiet session's lease, and the next request through any node runs it again", async () => {
    const sessionId = await newSession();
    const acknowledged: string[] = [];
    acknowledged.push(...(await send(sessionId, 'just-talk')).data.map((event) => event.id));
    await waitIdle([sessionId], 20_000);
    expect(await leaseOf(sessionId)).toMatch(/^node-[01]$/);
    // Released within the idle time plus a sweep (one lease time), with some slack for load.
    const tookMs = await leaseGone(sessionId, IDLE_RELEASE_MS + 4 * LEASE_MS + 3000);
    expect(tookMs).toBeLessThan(IDLE_RELEASE_MS + 4 * LEASE_MS + 3000);
    for (const node of nodes) {
      acknowledged.push(
        ...(
          await api<{ data: { id: string }[] }>(
            'POST',
            `/v1/sessions/${sessionId}/events`,
            { events: [{ type: 'user.message', content: [{ type: 'text', text: 'just-talk again' }] }] },
            node,
          )
        ).data.map((event) => event.id),
      );
      await waitIdle([sessionId], 20_000);
      expect(await leaseOf(sessionId)).toMatch(/^node-[01]$/);
      await leaseGone(sessionId, IDLE_RELEASE_MS + 4 * LEASE_MS + 3000);
    }
    await checkLogs([sessionId], new Map([[sessionId, acknowledged]]));
    const replies = (await events(sessionId)).filter((event) => event.type === 'agent.message');
    expect(replies).toHaveLength(3);
  }, 90_000);

  it('keeps the lease while the sandbox lives, gives it up after the idle stop, and the files come back', async () => {
    const sessionId = await newSession({ idle_timeout_s: 4, max_lifetime_s: 3600 });
    await send(sessionId, 'write-file');
    await waitIdle([sessionId], 30_000);
    const holder = await leaseOf(sessionId);
    expect(holder).toMatch(/^node-[01]$/);
    // Quiet for longer than the idle release, but the sandbox still runs: the lease stays.
    await sleep(IDLE_RELEASE_MS + 2 * LEASE_MS);
    expect(await leaseOf(sessionId)).toBe(holder);
    // The sandbox stops at its 4 s idle timeout (snapshot into PostgreSQL); then the lease goes.
    await leaseGone(sessionId, 4000 + IDLE_RELEASE_MS + 4 * LEASE_MS + 5000);
    const archived = await owner.query('SELECT 1 FROM berth.sandbox_snapshots WHERE session_id = $1', [
      sessionId,
    ]);
    expect(archived.rowCount).toBe(1);
    // Sent to the node that did not hold it: placed again, and the files are there.
    const other = nodes[holder === 'node-0' ? 1 : 0]!;
    await api(
      'POST',
      `/v1/sessions/${sessionId}/events`,
      {
        events: [{ type: 'user.message', content: [{ type: 'text', text: 'read-file' }] }],
      },
      other,
    );
    await waitIdle([sessionId], 30_000);
    const read = (await events(sessionId)).filter((event) => event.type === 'agent.tool_result').at(-1)!;
    expect(JSON.stringify(read.content)).toContain('kept-while-away');
  }, 90_000);
});
