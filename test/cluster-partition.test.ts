import { execFileSync } from 'node:child_process';
import { randomBytes, randomInt } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { formatVaultKey, generateVaultKey } from '../src/vault/keyring.js';
import {
  type BerthProcess,
  findFreePort,
  killProcessesUsing,
  startBerthProcess,
} from './support/berth-process.js';
import { clusterClient, clusterNodeEnvironment } from './support/cluster-client.js';
import { type FakeOpenAiServer, startFakeOpenAiServer } from './support/fake-openai-server.js';
import { createTestDatabase, type TestDatabaseUrls } from './support/postgres-database.js';
import { startTcpRelay, type TcpRelay } from './support/tcp-relay.js';

const serverUrl = inject('postgresUrl');
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));
const LEASE_MS = 1500;

const ip = (...args: string[]) => execFileSync('ip', args, { stdio: ['ignore', 'pipe', 'pipe'] }).toString();

/** Whether this machine lets the test create a network namespace and a veth pair (root, iproute2). */
function canPartition(): boolean {
  const name = `berthprobe${randomBytes(3).toString('hex')}`;
  try {
    ip('netns', 'add', name);
    ip('netns', 'del', name);
    return true;
  } catch {
    return false;
  }
}

/** The same URL with its host and port replaced. */
function via(url: string, host: string, port: number): string {
  const parsed = new URL(url);
  parsed.hostname = host;
  parsed.port = String(port);
  return parsed.toString();
}

/**
 * A network partition: three nodes on one PostgreSQL, one of them in a network namespace the
 * test creates, joined to the host by a veth pair. PostgreSQL and the fake model listen on
 * loopback; the namespaced node reaches them through TCP relays on the host's end of the veth.
 * Cutting the veth (link down) cuts that node off from PostgreSQL, from the model and from the
 * other nodes, while it is in the middle of turns. The other nodes must finish those turns, and
 * when the link comes back the cut-off node must not append anything: no split brain.
 */
describe.skipIf(!canPartition())('a cluster node cut off from PostgreSQL (network partition)', () => {
  const suffix = randomBytes(3).toString('hex');
  const namespace = `berthpart${suffix}`;
  const hostSide = `bph${suffix}`;
  const nodeSide = `bpn${suffix}`;
  // A random /30 in 10.200–249.x.x, so parallel runs on one machine do not collide.
  const subnet = `10.${200 + randomInt(50)}.${randomInt(256)}`;
  const hostAddress = `${subnet}.1`;
  const nodeAddress = `${subnet}.2`;

  let database: TestDatabaseUrls;
  let owner: pg.Client;
  let model: FakeOpenAiServer;
  let root: string;
  let apiKey: string;
  const relays: TcpRelay[] = [];
  const hostNodes: BerthProcess[] = [];
  let cutOff: BerthProcess;
  const vaultKeys = generateVaultKey();

  const environment = (nodeId: string, modelUrl: string, migrationUrl: string) =>
    clusterNodeEnvironment({
      nodeId,
      modelUrl,
      migrationUrl,
      leaseMs: LEASE_MS,
      vaultKeys: formatVaultKey(vaultKeys),
    });

  beforeAll(async () => {
    database = await createTestDatabase(serverUrl);
    owner = new pg.Client({ connectionString: database.migrationUrl });
    await owner.connect();
    root = await mkdtemp(join(tmpdir(), 'berth-partition-'));
    // Slow replies, so the cut lands while the namespaced node is in the middle of turns.
    model = await startFakeOpenAiServer((request) => {
      const last = (request.body.messages ?? []).at(-1);
      if (last?.role === 'tool') return { text: 'Done.', delayMs: 600 };
      const marker = `marker-${Math.random().toString(36).slice(2)}`;
      return {
        delayMs: 600,
        toolCalls: [{ name: 'bash', arguments: { command: `sleep 0.5; echo ${marker}` } }],
      };
    });

    ip('netns', 'add', namespace);
    ip('link', 'add', hostSide, 'type', 'veth', 'peer', 'name', nodeSide);
    ip('link', 'set', nodeSide, 'netns', namespace);
    ip('addr', 'add', `${hostAddress}/30`, 'dev', hostSide);
    ip('link', 'set', hostSide, 'up');
    ip('netns', 'exec', namespace, 'ip', 'addr', 'add', `${nodeAddress}/30`, 'dev', nodeSide);
    ip('netns', 'exec', namespace, 'ip', 'link', 'set', nodeSide, 'up');
    ip('netns', 'exec', namespace, 'ip', 'link', 'set', 'lo', 'up');

    const postgres = new URL(database.url);
    const pgRelay = await startTcpRelay({
      host: hostAddress,
      target: { host: postgres.hostname, port: Number(postgres.port) },
    });
    const modelUrl = new URL(model.url);
    const modelRelay = await startTcpRelay({
      host: hostAddress,
      target: { host: modelUrl.hostname, port: Number(modelUrl.port) },
    });
    relays.push(pgRelay, modelRelay);

    for (let index = 0; index < 2; index++) {
      hostNodes.push(
        await startBerthProcess({
          dataDir: join(root, `node-${index}`),
          environment: environment(`node-${index}`, model.url, database.migrationUrl),
          args: ['--cluster', database.url],
          ...(apiKey ? { apiKey } : {}),
        }),
      );
      apiKey ??= hostNodes[0]!.apiKey;
    }
    cutOff = await startBerthProcess({
      dataDir: join(root, 'node-cut'),
      environment: environment(
        'node-cut',
        via(model.url, hostAddress, modelRelay.port),
        via(database.migrationUrl, hostAddress, pgRelay.port),
      ),
      args: ['--cluster', via(database.url, hostAddress, pgRelay.port)],
      host: nodeAddress,
      port: await findFreePort(),
      prefix: ['ip', 'netns', 'exec', namespace],
      apiKey,
    });
  }, 90_000);

  afterAll(async () => {
    try {
      ip('link', 'set', hostSide, 'up');
    } catch {
      // Never created.
    }
    for (const node of [...hostNodes, cutOff]) await node?.stop().catch(() => undefined);
    for (const relay of relays) await relay.close();
    await model?.close();
    await owner?.end();
    for (const command of [
      ['link', 'del', hostSide],
      ['netns', 'del', namespace],
    ]) {
      try {
        ip(...command);
      } catch {
        // Already gone.
      }
    }
    if (root) {
      killProcessesUsing(root);
      await rm(root, { recursive: true, force: true });
    }
  });

  // Clients talk to the two nodes that stay connected; requests for sessions the cut-off node
  // holds are forwarded to it (and fail over once its leases run out).
  const { send, newSessions, waitIdle, checkLogs } = clusterClient({
    nodes: () => hostNodes,
    apiKey: () => apiKey,
    owner: () => owner,
  });

  const heldBy = async (nodeId: string, sessionIds: readonly string[]) =>
    (
      await owner.query<{ session_id: string }>(
        'SELECT session_id FROM berth.session_leases WHERE node_id = $1 AND session_id = ANY($2)',
        [nodeId, sessionIds],
      )
    ).rows.map((row) => row.session_id);

  it('finishes the cut-off node’s turns elsewhere, and after the link heals it appends nothing', async () => {
    const sessionIds = await newSessions(30);
    const acknowledged = new Map<string, string[]>();
    const sendAll = async (text: string) => {
      await Promise.all(
        sessionIds.map(async (id) => {
          const sent = await send(id, text);
          acknowledged.set(id, [...(acknowledged.get(id) ?? []), ...sent.data.map((event) => event.id)]);
        }),
      );
    };
    // A first round places the sessions over all three nodes.
    await sendAll('before the partition');
    await waitIdle(sessionIds, 60_000);
    const stranded = await heldBy('node-cut', sessionIds);
    expect(stranded.length).toBeGreaterThan(0);

    // A second round; the cut lands while the namespaced node runs its share of the turns.
    await sendAll('during the partition');
    await sleep(400);
    const headsAtCut = await owner.query<{ session_id: string; last_seq: string }>(
      `SELECT session_id, last_seq FROM berth.session_heads WHERE session_id = ANY($1)`,
      [stranded],
    );
    ip('link', 'set', hostSide, 'down');
    const cutAt = Date.now();

    // The connected nodes take the stranded sessions over once their leases run out, and
    // finish every turn.
    await waitIdle(sessionIds, 90_000);
    const failover = Date.now() - cutAt;
    expect(await heldBy('node-cut', stranded)).toEqual([]);
    // The stranded turns really were in flight at the cut: they went on after it.
    const headsNow = await owner.query<{ session_id: string; last_seq: string }>(
      `SELECT session_id, last_seq FROM berth.session_heads WHERE session_id = ANY($1)`,
      [stranded],
    );
    const grew = headsNow.rows.filter(
      (row) =>
        Number(row.last_seq) >
        Number(headsAtCut.rows.find((before) => before.session_id === row.session_id)?.last_seq),
    );
    expect(grew.length).toBe(stranded.length);

    // The link comes back: whatever the cut-off node queued for its old sessions reaches
    // PostgreSQL now, with tokens that are stale.
    const before = await owner.query<{ count: string }>(
      'SELECT count(*) FROM berth.events WHERE session_id = ANY($1)',
      [sessionIds],
    );
    ip('link', 'set', hostSide, 'up');
    await sleep(LEASE_MS * 3);
    const after = await owner.query<{ count: string }>(
      'SELECT count(*) FROM berth.events WHERE session_id = ANY($1)',
      [sessionIds],
    );
    expect(Number(after.rows[0]!.count)).toBe(Number(before.rows[0]!.count));
    expect(cutOff.child.exitCode).toBeNull();
    expect(cutOff.output()).toMatch(/lost the lease of a session|another writer took over the session/);

    // The healed node rejoins: a third round over every session, through any node, completes.
    await sendAll('after the partition');
    await waitIdle(sessionIds, 60_000);
    await checkLogs(sessionIds, acknowledged);
    console.info(
      `partition: ${stranded.length} of ${sessionIds.length} sessions cut off mid-turn; all turns finished ${failover} ms after the cut`,
    );
  }, 240_000);
});
