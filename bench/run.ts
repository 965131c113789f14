/**
 * `npm run bench`: event store append throughput and the runtime's POST-to-model overhead, on
 * SQLite (a temp file, WAL + synchronous=FULL, group commit) and on a private PostgreSQL.
 * Prints the machine, then Markdown tables of medians and p99s. Not pass/fail: targets are
 * shown next to the measured numbers.
 *
 * Flags: --store sqlite|postgres (default both), --seconds <per append configuration>,
 * --concurrency <comma-separated sessions, e.g. 16,64,256>, --no-batch, --turns <measured turns>,
 * --skip-appends, --skip-turns, --skip-tracing; --skip-sandboxes, --only-sandboxes (the sandbox driver
 * table of bench/sandbox-drivers.ts alone); --skip-egress, --only-egress (the egress proxy's added
 * latency, bench/egress-proxy.ts, alone); --skip-cluster, --only-cluster (3 `--cluster` nodes:
 * forwarding, failover, placement; bench/cluster.ts).
 */
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { openStore } from '../src/store/open-store.js';
import { createTestDatabase, ensureTestRoles, testRoleUrls } from '../test/support/postgres-database.js';
import { startPostgres, type TestPostgres } from '../test/support/postgres-server.js';
import { type AppendRun, runAppendBench } from './append-throughput.js';
import {
  type ClusterBenchResults,
  clusterTargetRows,
  formatClusterResults,
  runClusterBench,
} from './cluster.js';
import {
  type EgressBenchResults,
  egressTargetRows,
  formatEgressResults,
  runEgressBench,
} from './egress-proxy.js';
import { describeMachine, formatMachine } from './machine.js';
import {
  DEFAULT_SANDBOX_BENCH_OPTIONS,
  formatSandboxResults,
  runSandboxBench,
  type SandboxBenchResults,
  sandboxTargetRows,
} from './sandbox-drivers.js';
import { count, ms, table } from './stats.js';
import { runTracingOverheadBench } from './tracing-overhead.js';
import { runTurnBench, type TurnRun } from './turn-overhead.js';

const TARGET_APPENDS_PER_SECOND = 20_000;
const TARGET_TURN_P50_MS = 2;
const TARGET_TURN_P99_MS = 10;

const { values: flags } = parseArgs({
  options: {
    store: { type: 'string' },
    seconds: { type: 'string', default: '3' },
    concurrency: { type: 'string', default: '1,16,64,256' },
    'no-batch': { type: 'boolean', default: false },
    turns: { type: 'string', default: '300' },
    'skip-appends': { type: 'boolean', default: false },
    'skip-turns': { type: 'boolean', default: false },
    'skip-tracing': { type: 'boolean', default: false },
    'skip-sandboxes': { type: 'boolean', default: false },
    'only-sandboxes': { type: 'boolean', default: false },
    'skip-egress': { type: 'boolean', default: false },
    'only-egress': { type: 'boolean', default: false },
    'skip-cluster': { type: 'boolean', default: false },
    'only-cluster': { type: 'boolean', default: false },
  },
});
const onlyCluster = flags['only-cluster'];
const onlySandboxes = flags['only-sandboxes'];
if (onlySandboxes && flags['skip-sandboxes'])
  throw new Error('--only-sandboxes and --skip-sandboxes conflict');
const onlyEgress = flags['only-egress'];
const stores =
  onlySandboxes || onlyEgress || onlyCluster
    ? []
    : flags.store === undefined
      ? ['sqlite', 'postgres']
      : [flags.store];
for (const store of stores) {
  if (store !== 'sqlite' && store !== 'postgres') throw new Error(`--store must be sqlite or postgres`);
}
const seconds = Number(flags.seconds);
const turns = Number(flags.turns);

const appendOptions = {
  concurrency: flags.concurrency.split(',').map((text) => {
    const sessions = Number(text);
    if (!Number.isSafeInteger(sessions) || sessions < 1) throw new Error(`bad --concurrency ${text}`);
    return sessions;
  }),
  batches: flags['no-batch'] ? [] : ([[64, 10]] as const),
  seconds,
  warmupSeconds: 0.5,
};

const log = (line = '') => process.stdout.write(`${line}\n`);

function appendTable(runs: readonly AppendRun[]): string {
  return table(
    ['sessions', 'events/append', 'appends/s', 'events/s', 'p50 ms', 'p99 ms', 'max ms', 'appends'],
    runs.map((run) => [
      String(run.sessions),
      String(run.eventsPerAppend),
      count(run.appendsPerSecond),
      count(run.eventsPerSecond),
      ms(run.latency.p50),
      ms(run.latency.p99),
      ms(run.latency.max),
      count(run.appends),
    ]),
    'rrrrrrrr',
  );
}

function turnTable(runs: readonly TurnRun[]): string {
  const rows: string[][] = [];
  for (const run of runs) {
    const row = (what: string, summary: TurnRun['toModel']) => [
      run.mode,
      what,
      ms(summary.p50),
      ms(summary.p99),
      ms(summary.mean),
      ms(summary.max),
    ];
    rows.push(row('POST sent → doStream called', run.toModel));
    rows.push(row('POST round trip', run.post));
    rows.push(row('  … user.message committed', run.toUserMessage));
    rows.push(row('  … status_running committed', run.toRunning));
    rows.push(row('  … model_request_start committed', run.toSpanStart));
    if (run.toModelFirst100) rows.push(row('→ doStream, first 100 turns', run.toModelFirst100));
    if (run.toModelLast100) rows.push(row('→ doStream, last 100 turns', run.toModelLast100));
  }
  return table(
    ['mode', 'interval (from POST sent)', 'p50 ms', 'p99 ms', 'mean ms', 'max ms'],
    rows,
    'llrrrr',
  );
}

interface Results {
  appends: Map<string, AppendRun[]>;
  turns: Map<string, TurnRun[]>;
  /** POST → doStream p50 per mode, tracing off and exporting (median of alternating rounds). */
  tracing?: { mode: string; offP50: number; onP50: number }[];
  sandboxes?: SandboxBenchResults;
  egress?: EgressBenchResults;
  cluster?: ClusterBenchResults;
}

const TARGET_TRACING_OVERHEAD = 0.05;

/** Turn overhead with tracing exporting vs off, in two server processes (bench/tracing-overhead.ts). */
async function benchTracing(results: Results): Promise<void> {
  log(
    `\n### Tracing overhead: whole first turn (message sent → idle on the stream), two server processes, ${turns} paired turns\n`,
  );
  const { off, on } = await runTracingOverheadBench({ turns, warmup: 20 });
  results.tracing = [{ mode: 'whole turn, client-timed', offP50: off.p50, onP50: on.p50 }];
  log(
    table(
      ['tracing', 'p50 ms', 'p99 ms', 'mean ms'],
      [
        ['off', ms(off.p50), ms(off.p99), ms(off.mean)],
        ['exporting (OTLP/HTTP, 50 ms batches)', ms(on.p50), ms(on.p99), ms(on.mean)],
        ['added', `${(((on.p50 - off.p50) / off.p50) * 100).toFixed(1)}%`, '', ''],
      ],
      'lrrr',
    ),
  );
}

async function benchSqlite(results: Results): Promise<void> {
  if (!flags['skip-appends']) {
    const directory = await mkdtemp(join(tmpdir(), 'berth-bench-sqlite-'));
    const store = await openStore({ kind: 'sqlite', path: join(directory, 'bench.db') });
    try {
      log('\n### SQLite: sustained appends (WAL, synchronous=FULL, group commit)\n');
      const runs = await runAppendBench(store, appendOptions, (run) =>
        process.stderr.write(
          `  sqlite ${run.sessions}x${run.eventsPerAppend}: ${count(run.appendsPerSecond)} appends/s\n`,
        ),
      );
      results.appends.set('SQLite', runs);
      log(appendTable(runs));
    } finally {
      await store.close();
      await rm(directory, { recursive: true, force: true });
    }
  }
  if (!flags['skip-turns']) {
    log(`\n### SQLite: POST user.message → model doStream (${turns} turns after 20 warm-up)\n`);
    const runs = await runTurnBench({ database: undefined, turns, warmup: 20 });
    results.turns.set('SQLite', runs);
    log(turnTable(runs));
  }
}

async function benchPostgres(results: Results, postgres: TestPostgres): Promise<void> {
  if (!flags['skip-appends']) {
    const schema = `bench_${randomBytes(4).toString('hex')}`;
    const store = await openStore({ kind: 'postgres', ...testRoleUrls(postgres.url), schema });
    try {
      log(`\n### PostgreSQL: sustained appends (schema ${schema}, pool of 10 connections)\n`);
      const runs = await runAppendBench(store, appendOptions, (run) =>
        process.stderr.write(
          `  postgres ${run.sessions}x${run.eventsPerAppend}: ${count(run.appendsPerSecond)} appends/s\n`,
        ),
      );
      results.appends.set('PostgreSQL', runs);
      log(appendTable(runs));
    } finally {
      await store.close();
    }
  }
  if (!flags['skip-turns']) {
    log(`\n### PostgreSQL: POST user.message → model doStream (${turns} turns after 20 warm-up)\n`);
    const database = await createTestDatabase(postgres.url);
    const runs = await runTurnBench({ database, turns, warmup: 20 });
    results.turns.set('PostgreSQL', runs);
    log(turnTable(runs));
  }
}

const EGRESS_REQUESTS = 300;

/** The egress proxy's added latency per request (bench/egress-proxy.ts). */
const CLUSTER_REQUESTS = 400;

async function benchCluster(results: Results): Promise<void> {
  log('\n### Cluster: three `berth serve --cluster` nodes on one PostgreSQL\n');
  const postgres = await startPostgres();
  await ensureTestRoles(postgres.url);
  try {
    results.cluster = await runClusterBench(postgres.url, CLUSTER_REQUESTS);
  } finally {
    await postgres.stop();
  }
  log(formatClusterResults(results.cluster, CLUSTER_REQUESTS));
}

async function benchEgress(results: Results): Promise<void> {
  log('\n### Egress proxy: added latency per request on loopback\n');
  results.egress = await runEgressBench(EGRESS_REQUESTS);
  log(formatEgressResults(results.egress, EGRESS_REQUESTS));
}

/** Every sandbox driver on this host side by side, and the peer (bench/sandbox-drivers.ts). */
async function benchSandboxes(results: Results): Promise<void> {
  log('\n### Sandboxes: drivers side by side, and the peer\n');
  results.sandboxes = await runSandboxBench(DEFAULT_SANDBOX_BENCH_OPTIONS);
  log(formatSandboxResults(results.sandboxes, DEFAULT_SANDBOX_BENCH_OPTIONS));
}

function targetTable(results: Results): string {
  const rows: string[][] = [];
  const sqliteAppends = results.appends.get('SQLite');
  if (sqliteAppends) {
    const best = Math.max(
      ...sqliteAppends.filter((run) => run.eventsPerAppend === 1).map((run) => run.appendsPerSecond),
    );
    rows.push([
      'SQLite sustained single-event appends/s (best concurrency)',
      `≥ ${count(TARGET_APPENDS_PER_SECOND)}`,
      count(best),
      best >= TARGET_APPENDS_PER_SECOND ? 'met' : 'MISSED',
    ]);
  }
  for (const [store, runs] of results.turns) {
    for (const run of runs) {
      rows.push([
        `${store} POST → doStream p50 (${run.mode})`,
        `≤ ${TARGET_TURN_P50_MS} ms`,
        `${ms(run.toModel.p50)} ms`,
        run.toModel.p50 <= TARGET_TURN_P50_MS ? 'met' : 'MISSED',
      ]);
      rows.push([
        `${store} POST → doStream p99 (${run.mode})`,
        `≤ ${TARGET_TURN_P99_MS} ms`,
        `${ms(run.toModel.p99)} ms`,
        run.toModel.p99 <= TARGET_TURN_P99_MS ? 'met' : 'MISSED',
      ]);
    }
  }
  for (const { mode, offP50, onP50 } of results.tracing ?? []) {
    const added = (onP50 - offP50) / offP50;
    rows.push([
      `Tracing exporting: added p50, ${mode}`,
      `≤ ${TARGET_TRACING_OVERHEAD * 100}%`,
      `${(added * 100).toFixed(1)}%`,
      added <= TARGET_TRACING_OVERHEAD ? 'met' : 'MISSED',
    ]);
  }
  if (results.sandboxes) rows.push(...sandboxTargetRows(results.sandboxes));
  if (results.egress) rows.push(...egressTargetRows(results.egress));
  if (results.cluster) rows.push(...clusterTargetRows(results.cluster));
  return table(['target', 'wanted', 'measured', ''], rows, 'lrrl');
}

async function main(): Promise<void> {
  log('## Berth benchmarks\n');
  log(formatMachine(describeMachine(tmpdir())));
  log(`- Command: npm run bench${process.argv.length > 2 ? ` -- ${process.argv.slice(2).join(' ')}` : ''}`);
  const results: Results = { appends: new Map(), turns: new Map() };
  const started = performance.now();
  if (stores.includes('sqlite')) await benchSqlite(results);
  if (stores.includes('sqlite') && !flags['skip-turns'] && !flags['skip-tracing'])
    await benchTracing(results);
  if (stores.includes('postgres')) {
    const postgres = await startPostgres();
    await ensureTestRoles(postgres.url);
    try {
      await benchPostgres(results, postgres);
    } finally {
      await postgres.stop();
    }
  }
  if (!flags['skip-sandboxes'] && !onlyEgress && !onlyCluster) await benchSandboxes(results);
  if (!flags['skip-egress'] && !onlySandboxes && !onlyCluster) await benchEgress(results);
  if (!flags['skip-cluster'] && !onlySandboxes && !onlyEgress) await benchCluster(results);
  log('\n### Targets\n');
  log(targetTable(results));
  log(`\n(bench took ${((performance.now() - started) / 1000).toFixed(0)} s)`);
}

await main();
