/**
 * Issue 8's numbers: placement balance over 10,000 session ids (max/mean load) and under a burst
 * of sessions placed at once through one node (issue 14, item 21), the added latency of a
 * request sent to a node that does not hold the session (forwarded to the holder, on loopback),
 * and failover of turns in flight (issue 14, item 19): from SIGKILL of a node running turns
 * (mid-model-call or mid-tool) to the first event a surviving node appends to each of them,
 * with the default lease (3 s), over many kills.
 *
 * Nodes are `berth serve --cluster` child processes on the bench's private PostgreSQL, talking
 * to a fake OpenAI-compatible model (test/support) that answers slowly, so kills land mid-turn.
 */
import { spawn } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pg from 'pg';
import { PlacementRing } from '../src/control/placement.js';
import { formatVaultKey, generateVaultKey } from '../src/vault/keyring.js';
import { type BerthProcess, killProcessesUsing, startBerthProcess } from '../test/support/berth-process.js';
import { startFakeOpenAiServer } from '../test/support/fake-openai-server.js';
import { createTestDatabase } from '../test/support/postgres-database.js';
import { ms, type Summary, summarize, table } from './stats.js';

export const TARGET_FORWARD_ADDED_P50_MS = 1;
export const TARGET_FAILOVER_MS = 5000;
export const TARGET_PLACEMENT_MAX_OVER_MEAN = 1.25;

export interface ClusterBenchResults {
  placement: { nodes: number; sessions: number; maxOverMean: number; minOverMean: number }[];
  direct: Summary;
  forwarded: Summary;
  addedP50: number;
  addedP99: number;
  /** The same request through bench/reference-forwarder.mjs (a bare Node proxy) to the holder. */
  reference: Summary;
  referenceAddedP50: number;
  /** Sessions placed at once through one node of 3, per node (fresh nodes). */
  burst: number[];
  /** Kill → first event by the new holder, one sample per turn in flight on the killed node. */
  failover: Summary;
  kills: number;
}

/** Sessions created and sent their first message at once through one node. */
const BURST_SESSIONS = 30;
/** Turns started before each kill (about a third run on the node killed). */
const SESSIONS_PER_KILL = 9;

function placementBalance(nodes: number, sessions: number) {
  const ring = new PlacementRing(Array.from({ length: nodes }, (_, index) => `node-${index}`));
  const loads = new Map<string, number>();
  for (let index = 0; index < sessions; index++) {
    const node = ring.place(
      `sesn_${index.toString(36).padStart(8, '0')}${(index * 7919).toString(36)}`,
      loads,
    )!;
    loads.set(node, (loads.get(node) ?? 0) + 1);
  }
  const mean = sessions / nodes;
  const counts = [...loads.values()];
  return {
    nodes,
    sessions,
    maxOverMean: Math.max(...counts) / mean,
    minOverMean: Math.min(...counts) / mean,
  };
}

/** Starts bench/reference-forwarder.mjs in front of `targetUrl`. */
async function startReferenceForwarder(targetUrl: string): Promise<{ url: string; stop: () => void }> {
  const child = spawn(process.execPath, [join(import.meta.dirname, 'reference-forwarder.mjs'), targetUrl], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const port = await new Promise<number>((resolve, reject) => {
    child.once('error', reject);
    child.once('exit', (code) => reject(new Error(`the reference forwarder exited (${code})`)));
    child.stdout.once('data', (chunk: Buffer) => resolve(Number(chunk.toString('utf8').trim())));
  });
  return { url: `http://127.0.0.1:${port}`, stop: () => child.kill() };
}

const sleep = (milliseconds: number) => new Promise((resolve) => setTimeout(resolve, milliseconds));

export async function runClusterBench(
  postgresUrl: string,
  requests = 400,
  kills = 20,
): Promise<ClusterBenchResults> {
  const placement = [placementBalance(3, 10_000), placementBalance(5, 10_000), placementBalance(10, 10_000)];
  const database = await createTestDatabase(postgresUrl);
  const root = await mkdtemp(join(tmpdir(), 'berth-cluster-bench-'));
  const key = formatVaultKey(generateVaultKey());
  const nodes: BerthProcess[] = [];
  const owner = new pg.Client({ connectionString: database.migrationUrl });
  await owner.connect();
  // "slow": a slow model call, a bash call of a second, another slow model call; else at once.
  const model = await startFakeOpenAiServer((request) => {
    const last = (request.body.messages ?? []).at(-1);
    if (last?.role === 'tool') return { text: 'Done.', delayMs: 1500 };
    if (!JSON.stringify(last?.content ?? '').includes('slow')) return { text: 'Hello.' };
    return { delayMs: 1500, toolCalls: [{ name: 'bash', arguments: { command: 'sleep 1; echo done' } }] };
  });
  let apiKey: string | undefined;
  const start = async (index: number) => {
    const node = await startBerthProcess({
      dataDir: join(root, `node-${index}`),
      environment: {
        BERTH_DATABASE_MIGRATION_URL: database.migrationUrl,
        BERTH_NODE_ID: `node-${index}`,
        BERTH_VAULT_KEYS: key,
        BERTH_SANDBOX_WARM_POOL: '0',
        BERTH_RETRY_BASE_DELAY_MS: '20',
        OPENAI_COMPATIBLE_BASE_URL: model.url,
      },
      args: ['--cluster', database.url],
      ...(apiKey ? { apiKey } : {}),
    });
    apiKey ??= node.apiKey;
    nodes[index] = node;
    return node;
  };
  try {
    await start(0);
    await start(1);
    await start(2);
    const call = async (node: Pick<BerthProcess, 'url'>, method: string, path: string, body?: unknown) => {
      const response = await fetch(`${node.url}${path}`, {
        method,
        headers: { 'x-api-key': apiKey!, 'content-type': 'application/json' },
        body: body === undefined ? undefined : JSON.stringify(body),
      });
      const text = await response.text();
      return { status: response.status, body: text ? (JSON.parse(text) as Record<string, unknown>) : {} };
    };
    const agent = (await call(nodes[0]!, 'POST', '/v1/agents', { name: 'bench', model: 'scripted/echo' }))
      .body;
    const environment = (await call(nodes[0]!, 'POST', '/v1/environments', { name: 'bench' })).body;
    const newSession = async (agentId = agent.id, node = nodes[0]!) =>
      (await call(node, 'POST', '/v1/sessions', { agent: agentId, environment_id: environment.id })).body
        .id as string;
    const message = (text: string) => ({
      events: [{ type: 'user.message', content: [{ type: 'text', text }] }],
    });

    // A burst: sessions created and sent their first message all at once through one node.
    const entry = nodes[0]!;
    const burstIds = await Promise.all(
      Array.from({ length: BURST_SESSIONS }, async () => {
        const id = await newSession(agent.id as string, entry);
        const sent = await call(entry, 'POST', `/v1/sessions/${id}/events`, message('hello'));
        if (sent.status !== 200) throw new Error(`a burst's message answered ${sent.status}`);
        return id;
      }),
    );
    const placed = await owner.query<{ node_id: string; count: string }>(
      'SELECT node_id, count(*) FROM berth.session_leases WHERE session_id = ANY($1) GROUP BY node_id',
      [burstIds],
    );
    const burst = nodes.map((_, index) =>
      Number(placed.rows.find((row) => row.node_id === `node-${index}`)?.count ?? 0),
    );
    const holderOf = async (sessionId: string) =>
      (
        await owner.query<{ node_id: string }>(
          'SELECT node_id FROM berth.session_leases WHERE session_id = $1',
          [sessionId],
        )
      ).rows[0]?.node_id;
    const turn = async (node: BerthProcess, sessionId: string) => {
      for (;;) {
        const sent = await call(node, 'POST', `/v1/sessions/${sessionId}/events`, {
          events: [{ type: 'user.message', content: [{ type: 'text', text: 'hello' }] }],
        }).catch(() => ({ status: 0, body: {} }));
        if (sent.status === 200) break;
        await sleep(50);
      }
      for (;;) {
        const newest = await call(node, 'GET', `/v1/sessions/${sessionId}/events?order=desc&limit=1`).catch(
          () => undefined,
        );
        const data = newest?.body.data as { type: string }[] | undefined;
        if (data?.[0]?.type === 'session.status_idle') return;
        await sleep(10);
      }
    };

    // Forwarding: one session held by a node; the same owner-routed request (the session's
    // sandbox description) timed at the holder and at another node, alternating.
    const sessionId = await newSession();
    await turn(nodes[0]!, sessionId);
    const holder = nodes[Number((await holderOf(sessionId))!.slice('node-'.length))]!;
    const other = nodes.find((node) => node !== holder)!;
    const time = async (node: Pick<BerthProcess, 'url'>) => {
      const started = performance.now();
      const answer = await call(node, 'GET', `/v1/sessions/${sessionId}/sandbox`);
      if (answer.status !== 200) throw new Error(`sandbox description answered ${answer.status}`);
      return performance.now() - started;
    };
    const reference = await startReferenceForwarder(holder.url);
    const direct: number[] = [];
    const forwarded: number[] = [];
    const viaReference: number[] = [];
    try {
      for (let index = 0; index < 50; index++) {
        await time(holder);
        await time(other);
        await time(reference);
      }
      for (let index = 0; index < requests; index++) {
        direct.push(await time(holder));
        forwarded.push(await time(other));
        viaReference.push(await time(reference));
      }
    } finally {
      reference.stop();
    }

    // Failover of turns in flight: start turns on every node, kill the node running the most,
    // and time, for each turn it ran, the first event stamped after the kill (only a surviving
    // node can have stamped it). Nodes share this machine's clock.
    const slowAgent = (
      await call(nodes[0]!, 'POST', '/v1/agents', {
        name: 'bench-slow',
        model: 'openai-compatible/fake-model',
        tools: [{ type: 'agent_toolset_20260401' }],
      })
    ).body.id as string;
    const failoverMs: number[] = [];
    const waitFor = async (condition: () => Promise<boolean>, what: string) => {
      const deadline = Date.now() + 60_000;
      while (!(await condition())) {
        if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
        await sleep(50);
      }
    };
    for (let kill = 0; kill < kills; kill++) {
      const ids = await Promise.all(
        Array.from({ length: SESSIONS_PER_KILL }, async (_, index) => {
          const id = await newSession(slowAgent, nodes[index % 3]!);
          const sent = await call(nodes[index % 3]!, 'POST', `/v1/sessions/${id}/events`, message('slow'));
          if (sent.status !== 200) throw new Error(`a message answered ${sent.status}`);
          return id;
        }),
      );
      await waitFor(
        async () =>
          (
            await owner.query(
              `SELECT 1 FROM berth.events WHERE session_id = ANY($1) AND type = 'span.model_request_start'`,
              [ids],
            )
          ).rowCount === ids.length,
        'the turns to start',
      );
      const held = await owner.query<{ node_id: string }>(
        `SELECT node_id FROM berth.session_leases WHERE session_id = ANY($1)
         GROUP BY node_id ORDER BY count(*) DESC LIMIT 1`,
        [ids],
      );
      const victimId = held.rows[0]!.node_id;
      const victimIndex = Number(victimId.slice('node-'.length));
      const killedAt = Date.now();
      await nodes[victimIndex]!.kill();
      const orphans = (
        await owner.query<{ session_id: string }>(
          'SELECT session_id FROM berth.session_leases WHERE session_id = ANY($1) AND node_id = $2',
          [ids, victimId],
        )
      ).rows.map((row) => row.session_id);
      const firstAfterKill = async () =>
        (
          await owner.query<{ first: string }>(
            `SELECT min(processed_at) AS first FROM berth.events
             WHERE session_id = ANY($1) AND processed_at >= $2 GROUP BY session_id`,
            [orphans, new Date(killedAt).toISOString()],
          )
        ).rows;
      await waitFor(async () => (await firstAfterKill()).length === orphans.length, 'the turns to resume');
      for (const row of await firstAfterKill()) failoverMs.push(Date.parse(row.first) - killedAt);
      process.stderr.write(`kill ${kill + 1}/${kills}: ${failoverMs.slice(-orphans.length).join(', ')} ms\n`);
      await start(victimIndex);
      await waitFor(
        async () =>
          (
            await owner.query(
              `SELECT 1 FROM berth.session_heads WHERE session_id = ANY($1) AND status = 'idle'`,
              [ids],
            )
          ).rowCount === ids.length,
        'the turns to end',
      );
    }
    const directSummary = summarize(direct);
    const forwardedSummary = summarize(forwarded);
    const referenceSummary = summarize(viaReference);
    return {
      placement,
      direct: directSummary,
      forwarded: forwardedSummary,
      addedP50: forwardedSummary.p50 - directSummary.p50,
      addedP99: forwardedSummary.p99 - directSummary.p99,
      reference: referenceSummary,
      referenceAddedP50: referenceSummary.p50 - directSummary.p50,
      burst,
      failover: summarize(failoverMs),
      kills,
    };
  } finally {
    for (const node of nodes) await node?.stop().catch(() => undefined);
    await model.close();
    await owner.end();
    killProcessesUsing(root);
    // A killed node's sandbox may hold its workspace for a moment after its processes die.
    for (let attempt = 0; ; attempt++) {
      try {
        await rm(root, { recursive: true, force: true });
        break;
      } catch (error) {
        if (attempt >= 20) {
          process.stderr.write(`could not remove ${root}: ${String(error)}\n`);
          break;
        }
        await sleep(250);
      }
    }
  }
}

export function formatClusterResults(results: ClusterBenchResults, requests: number): string {
  const placement = table(
    ['nodes', 'sessions placed', 'max / mean', 'min / mean'],
    results.placement.map((row) => [
      String(row.nodes),
      row.sessions.toLocaleString('en-US'),
      row.maxOverMean.toFixed(3),
      row.minOverMean.toFixed(3),
    ]),
    'rrrr',
  );
  const forwarding = table(
    ['request (GET /v1/sessions/:id/sandbox)', 'p50', 'p99'],
    [
      ['at the holder', `${ms(results.direct.p50)} ms`, `${ms(results.direct.p99)} ms`],
      ['at another node (forwarded)', `${ms(results.forwarded.p50)} ms`, `${ms(results.forwarded.p99)} ms`],
      ['added by forwarding', `${ms(results.addedP50)} ms`, `${ms(results.addedP99)} ms`],
      [
        'through a bare Node proxy to the holder (reference)',
        `${ms(results.reference.p50)} ms`,
        `${ms(results.reference.p99)} ms`,
      ],
      ['added by the bare proxy (what the machine costs)', `${ms(results.referenceAddedP50)} ms`, ''],
    ],
    'lrr',
  );
  const burstMean = results.burst.reduce((sum, value) => sum + value, 0) / results.burst.length;
  const burst = `Burst: ${BURST_SESSIONS} sessions placed at once through one node of 3: ${results.burst.join(
    '/',
  )} (max / mean ${(Math.max(...results.burst) / burstMean).toFixed(3)})`;
  const seconds = (value: number) => `${(value / 1000).toFixed(2)} s`;
  const failover = `Failover of turns in flight (SIGKILL → first event appended by the new holder, lease 3 s; ${results.kills} kills, ${results.failover.count} turns): p50 ${seconds(results.failover.p50)}, p99 ${seconds(results.failover.p99)}, max ${seconds(results.failover.max)}`;
  return `${placement}\n\n${burst}\n\n${forwarding}\n(${requests} requests each, taking turns)\n\n${failover}`;
}

export function clusterTargetRows(results: ClusterBenchResults): string[][] {
  const worstPlacement = results.placement[0]!;
  const worstFailover = results.failover.max;
  const burstMean = results.burst.reduce((sum, value) => sum + value, 0) / results.burst.length;
  const burstMaxOverMean = Math.max(...results.burst) / burstMean;
  return [
    [
      'cluster: forwarding through a non-holder, added p50 on loopback',
      `≤ ${TARGET_FORWARD_ADDED_P50_MS} ms`,
      `${ms(results.addedP50)} ms (bare proxy: ${ms(results.referenceAddedP50)} ms)`,
      results.addedP50 <= TARGET_FORWARD_ADDED_P50_MS ? 'met' : 'MISSED',
    ],
    [
      `cluster: failover of turns in flight, kill → first event by the new holder (worst of ${results.failover.count})`,
      `≤ ${TARGET_FAILOVER_MS / 1000} s`,
      `${(worstFailover / 1000).toFixed(2)} s`,
      worstFailover <= TARGET_FAILOVER_MS ? 'met' : 'MISSED',
    ],
    [
      'cluster: placement of 10,000 sessions on 3 nodes, max / mean',
      `≤ ${TARGET_PLACEMENT_MAX_OVER_MEAN}`,
      worstPlacement.maxOverMean.toFixed(3),
      worstPlacement.maxOverMean <= TARGET_PLACEMENT_MAX_OVER_MEAN ? 'met' : 'MISSED',
    ],
    [
      `cluster: burst of ${BURST_SESSIONS} placed at once through one node, max / mean`,
      `≤ ${TARGET_PLACEMENT_MAX_OVER_MEAN}`,
      burstMaxOverMean.toFixed(3),
      burstMaxOverMean <= TARGET_PLACEMENT_MAX_OVER_MEAN ? 'met' : 'MISSED',
    ],
  ];
}
