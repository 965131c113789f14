/**
 * Sandbox drivers side by side (issue 3): cold start to the first `echo hi`, `echo hi` in a live
 * sandbox, suspend + resume, memory per idle sandbox, a Berth server answering with 100 idle
 * sandboxes live, and the same cold start through Anthropic's `@anthropic-ai/sandbox-runtime`
 * (bubblewrap-based, one sandbox per command) as the peer.
 *
 * Drivers are found the way they are laid out in `src/sandbox/`: a folder named after the
 * technology holding a `*-driver.ts` that exports a `create…Driver` factory (gvisor and microvm
 * are loaded only if their folders exist). A driver whose module or host support is missing is
 * reported with its reason instead of numbers. Slow drivers (a microVM under TCG) get fewer
 * repetitions so the bench stays within minutes; the table says how many runs each number has.
 */
import { spawn } from 'node:child_process';
import { readdirSync, readFileSync } from 'node:fs';
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { createBwrapDriver } from '../src/sandbox/bwrap/bwrap-driver.js';
import type { SandboxDriver, SandboxHandle, SandboxSpec } from '../src/sandbox/driver.js';
import { startTestBerth, UNLIMITED_LIMITS } from '../test/support/berth-instance.js';
import { ms, percentile, type Summary, summarize, table } from './stats.js';

/** Drivers the bench looks for; bwrap ships, the others appear once their folders exist. */
const DRIVER_NAMES = ['bwrap', 'gvisor', 'microvm'] as const;

export const TARGET_COLD_START_P50_MS = 15;
export const TARGET_COLD_START_PEER_RATIO = 0.5;
export const TARGET_EXEC_P50_MS = 3;
export const TARGET_RESUME_P50_MS = 50;
export const TARGET_IDLE_SERVER_MS = 10;

/** How many repetitions of each measurement; every field has a default (see `DEFAULT_OPTIONS`). */
export interface SandboxBenchOptions {
  coldRuns: number;
  execRuns: number;
  resumeRuns: number;
  memorySandboxes: number;
  idleSandboxes: number;
  /** GET /v1/agents requests timed with no sandboxes and again with `idleSandboxes` live. */
  requests: number;
  /** Wall time one phase of one driver may take before it stops repeating (a slow microVM). */
  phaseBudgetMs: number;
  peer: boolean;
}

export const DEFAULT_SANDBOX_BENCH_OPTIONS: SandboxBenchOptions = {
  coldRuns: 30,
  execRuns: 200,
  resumeRuns: 20,
  memorySandboxes: 20,
  idleSandboxes: 100,
  requests: 1000,
  phaseBudgetMs: 20_000,
  peer: true,
};

/** A sample that may have been cut short by the phase budget. */
interface Measured {
  summary: Summary;
  /** Runs wanted; `summary.count` is how many happened. */
  wanted: number;
}

/** What one driver measured, or why it could not. */
export type DriverRun =
  | {
      name: string;
      ok: true;
      /** e.g. `persistent, cgroup limits`. */
      detail: string;
      warnings: readonly string[];
      cold: Measured;
      /**
       * bwrap only: the cold start of a new session when a sandbox started ahead of need is
       * ready (the server's default warm pool), measured with the pool refilled between runs.
       */
      coldWarmPool?: Measured;
      /** bwrap only: suspend + resume when the warm pool has a sandbox ready. */
      resumeWarmPool?: Measured;
      /** The two halves of a cold start. */
      coldProvision: Summary;
      coldFirstExec: Summary;
      exec: Measured;
      suspend: Measured;
      resume: Measured;
      /** Whether suspend kept memory (not only files). */
      suspendKeepsMemory: boolean;
      memory: MemoryMeasurement;
      /** This process's RSS while exec was timed: Node's spawn forks it, so it costs with its size. */
      benchRssBytes: number;
    }
  | { name: string; ok: false; reason: string };

interface MemoryMeasurement {
  sandboxes: number;
  /** Drop of the host's MemAvailable per sandbox (bytes). */
  hostPerSandbox: number;
  /** Sum of the sandboxes' own memory accounting (`driver.stats`, the cgroup) per sandbox, if any. */
  statsPerSandbox: number | undefined;
}

/** The peer's cold start (`@anthropic-ai/sandbox-runtime`). */
export type PeerRun =
  | {
      ok: true;
      version: string;
      initializeMs: number;
      cold: Summary;
      /** `wrapWithSandbox` alone (builds the bwrap command line; scans the cwd for files to deny). */
      wrap: Summary;
      /** Spawning the wrapped command to its exit. */
      run: Summary;
      configuration: string;
    }
  | { ok: false; reason: string };

/** GET /v1/agents on an in-process server, with no sandboxes and with many idle ones. */
export interface IdleServerRun {
  driver: string;
  sandboxes: number;
  baseline: Summary;
  loaded: Summary;
  /** Provisioning through the API (GET /v1/sessions/:id/files on a session without a sandbox). */
  provisionViaApi: Summary;
  hostMemoryPerSandbox: number;
  /** Sandboxes the server still held after the timed requests (an idle-stop policy may end some). */
  liveAtEnd: number;
}

export interface SandboxBenchResults {
  drivers: DriverRun[];
  peer: PeerRun | undefined;
  idleServer: IdleServerRun | { ok: false; reason: string } | undefined;
}

const progress = (line: string) => process.stderr.write(`  ${line}\n`);

/** MemAvailable from /proc/meminfo in bytes. */
function memAvailable(): number {
  const match = /^MemAvailable:\s+(\d+) kB$/m.exec(readFileSync('/proc/meminfo', 'utf8'));
  return match ? Number(match[1]) * 1024 : Number.NaN;
}

/** Finds and creates a driver by the folder convention; a reason when there is none to use. */
async function loadDriver(
  name: string,
): Promise<{ ok: true; driver: SandboxDriver } | { ok: false; reason: string }> {
  if (name === 'bwrap') return { ok: true, driver: createBwrapDriver() };
  const folder = join(import.meta.dirname, '..', 'src', 'sandbox', name);
  let files: string[];
  try {
    files = readdirSync(folder).filter((file) => /-driver\.ts$/.test(file) && !file.includes('.test.'));
  } catch {
    return { ok: false, reason: `no src/sandbox/${name}/ in this checkout (driver not merged yet)` };
  }
  if (files.length === 0) return { ok: false, reason: `src/sandbox/${name}/ has no *-driver.ts yet` };
  for (const file of files) {
    let module: Record<string, unknown>;
    try {
      module = (await import(join(folder, file))) as Record<string, unknown>;
    } catch (error) {
      const message = error instanceof Error ? error.message.split('\n')[0] : String(error);
      return { ok: false, reason: `src/sandbox/${name}/${file} does not load: ${message}` };
    }
    const factory = Object.entries(module).find(
      ([key, value]) => /^create\w*Driver$/.test(key) && typeof value === 'function',
    );
    if (factory) return { ok: true, driver: (factory[1] as () => SandboxDriver)() };
  }
  return { ok: false, reason: `src/sandbox/${name}/ exports no create…Driver factory` };
}

/** Throws unless the command printed `hi`. */
function expectHi(stdout: string, what: string): void {
  if (stdout.trim() !== 'hi') throw new Error(`${what}: expected "hi", got ${JSON.stringify(stdout)}`);
}

/**
 * Runs `once` up to `wanted` times in sequence, stopping early when the phase has used its
 * budget (at least `minimum` runs). Returns the durations `once` reports.
 */
async function repeat(
  wanted: number,
  budgetMs: number,
  label: string,
  once: (index: number) => Promise<number>,
  minimum = 3,
): Promise<{ sample: number[]; wanted: number }> {
  const sample: number[] = [];
  const started = performance.now();
  for (let index = 0; index < wanted; index++) {
    sample.push(await once(index));
    if (index + 1 >= minimum && performance.now() - started > budgetMs && index + 1 < wanted) {
      progress(`${label}: stopped after ${index + 1} of ${wanted} runs (phase budget ${budgetMs / 1000} s)`);
      break;
    }
    if ((index + 1) % Math.max(1, Math.floor(wanted / 4)) === 0) progress(`${label}: ${index + 1}/${wanted}`);
  }
  return { sample, wanted };
}

function measured({ sample, wanted }: { sample: number[]; wanted: number }): Measured {
  return { summary: summarize(sample), wanted };
}

/** Every measurement of one available driver. */
async function benchDriver(
  name: string,
  driver: SandboxDriver,
  warnings: readonly string[],
  root: string,
  options: SandboxBenchOptions,
): Promise<DriverRun> {
  let counter = 0;
  const live = new Set<SandboxHandle>();
  const spec = async (): Promise<SandboxSpec> => {
    const workdir = join(root, `${name}-${counter++}`);
    await mkdir(workdir, { recursive: true });
    return { sessionId: `sesn_bench_${name}_${counter}`, workdir };
  };
  const provision = async (sandboxSpec: SandboxSpec) => {
    const handle = await driver.provision(sandboxSpec);
    live.add(handle);
    return handle;
  };
  const destroy = async (handle: SandboxHandle) => {
    live.delete(handle);
    await driver.destroy(handle);
  };
  const echo = async (handle: SandboxHandle, what: string) => {
    const result = await driver.exec(handle, ['echo', 'hi']);
    expectHi(result.stdout, `${name} ${what}`);
  };
  try {
    // 1. Cold start: provision + first exec, destroyed after. Two untimed runs first (page
    // cache, the driver's one-time host probes).
    const provisionTimes: number[] = [];
    const firstExecTimes: number[] = [];
    const coldOnce = async () => {
      const sandboxSpec = await spec();
      const started = performance.now();
      const handle = await provision(sandboxSpec);
      const provisioned = performance.now();
      await echo(handle, 'cold start');
      const done = performance.now();
      await destroy(handle);
      provisionTimes.push(provisioned - started);
      firstExecTimes.push(done - provisioned);
      return done - started;
    };
    await coldOnce();
    await coldOnce();
    provisionTimes.length = 0;
    firstExecTimes.length = 0;
    const cold = await repeat(options.coldRuns, options.phaseBudgetMs, `${name} cold start`, coldOnce);
    const coldP50 = percentile(
      [...cold.sample].sort((left, right) => left - right),
      50,
    );

    // 1b. bwrap: the same cold start when the warm pool (on by default in the server) has a
    // sandbox ready. Each run waits for the pool to be refilled first: this is the steady state
    // of sessions arriving slower than the pool refills (≈ one sandbox per cold start time).
    let coldWarmPool: Measured | undefined;
    let resumeWarmPool: Measured | undefined;
    if (name === 'bwrap' && (driver as { mode?: string }).mode === 'persistent') {
      const pooled = createBwrapDriver({ warmPool: 2, poolDirectory: join(root, 'pool') });
      pooled.warmUp();
      const waitForPool = async () => {
        const deadline = performance.now() + 10_000;
        while (pooled.warmCount < 2 && performance.now() < deadline) await sleep(5);
        if (pooled.warmCount === 0) throw new Error('bwrap warm pool: no sandbox became ready in 10 s');
      };
      try {
        const warmOnce = async () => {
          await waitForPool();
          const sandboxSpec = await spec();
          const started = performance.now();
          const handle = await pooled.provision(sandboxSpec);
          const result = await pooled.exec(handle, ['echo', 'hi']);
          const done = performance.now();
          expectHi(result.stdout, 'bwrap warm pool cold start');
          await pooled.destroy(handle);
          return done - started;
        };
        await warmOnce();
        coldWarmPool = measured(
          await repeat(options.coldRuns, options.phaseBudgetMs, 'bwrap cold start (warm pool)', warmOnce),
        );
        resumeWarmPool = measured(
          await repeat(
            options.resumeRuns,
            options.phaseBudgetMs,
            'bwrap suspend+resume (warm pool)',
            async () => {
              await waitForPool();
              const sandboxSpec = await spec();
              const before = await pooled.provision(sandboxSpec);
              await pooled.exec(before, ['sh', '-c', 'echo kept > state.txt']);
              const directory = await mkdtemp(join(root, 'suspended-'));
              await pooled.suspend(before, directory);
              await waitForPool();
              const started = performance.now();
              const after = await pooled.provision({ ...sandboxSpec, restoreFrom: directory });
              const result = await pooled.exec(after, ['echo', 'hi']);
              const elapsed = performance.now() - started;
              expectHi(result.stdout, 'bwrap warm pool resume');
              const kept = await pooled.exec(after, ['cat', 'state.txt']);
              if (kept.stdout.trim() !== 'kept')
                throw new Error('bwrap: the workspace did not survive suspend');
              await pooled.destroy(after);
              await rm(directory, { recursive: true, force: true });
              return elapsed;
            },
          ),
        );
      } finally {
        await pooled.close();
        await pooled.destroyAll();
      }
    }

    // 2. exec in one live sandbox.
    const handle = await provision(await spec());
    for (let index = 0; index < 10; index++) await echo(handle, 'exec warm-up');
    const benchRssBytes = process.memoryUsage().rss;
    const exec = await repeat(options.execRuns, options.phaseBudgetMs, `${name} exec`, async () => {
      const started = performance.now();
      await echo(handle, 'exec');
      return performance.now() - started;
    });
    await destroy(handle);

    // 3. Suspend into a temp directory, then provision from it and run the first command.
    const suspendTimes: number[] = [];
    let suspendKeepsMemory = false;
    const resume = await repeat(
      options.resumeRuns,
      options.phaseBudgetMs,
      `${name} suspend+resume`,
      async () => {
        const sandboxSpec = await spec();
        const before = await provision(sandboxSpec);
        await driver.exec(before, ['sh', '-c', 'echo kept > state.txt']);
        const directory = await mkdtemp(join(root, 'suspended-'));
        const suspendStarted = performance.now();
        live.delete(before);
        const suspended = await driver.suspend(before, directory);
        suspendTimes.push(performance.now() - suspendStarted);
        suspendKeepsMemory = suspended.memory;
        const started = performance.now();
        const after = await provision({ ...sandboxSpec, restoreFrom: directory });
        await echo(after, 'resume');
        const elapsed = performance.now() - started;
        const kept = await driver.exec(after, ['cat', 'state.txt']);
        if (kept.stdout.trim() !== 'kept') throw new Error(`${name}: the workspace did not survive suspend`);
        await destroy(after);
        await rm(directory, { recursive: true, force: true });
        return elapsed;
      },
    );

    // 4. Memory per idle sandbox: the host's MemAvailable before and after starting a batch.
    // Slow drivers get a smaller batch (what fits the phase budget at the cold-start pace).
    const memoryCount = Math.max(
      2,
      Math.min(options.memorySandboxes, Math.floor(options.phaseBudgetMs / Math.max(coldP50, 1))),
    );
    if (memoryCount < options.memorySandboxes)
      progress(`${name} memory: ${memoryCount} sandboxes (cold start ${ms(coldP50)} ms)`);
    await sleep(300);
    const availableBefore = memAvailable();
    const idle: SandboxHandle[] = [];
    for (let index = 0; index < memoryCount; index++) {
      const idleHandle = await provision(await spec());
      await echo(idleHandle, 'memory');
      idle.push(idleHandle);
    }
    await sleep(500);
    const availableAfter = memAvailable();
    let statsTotal: number | undefined;
    if (driver.stats) {
      try {
        statsTotal = 0;
        for (const idleHandle of idle) statsTotal += (await driver.stats(idleHandle)).memoryBytes;
      } catch {
        statsTotal = undefined;
      }
    }
    for (const idleHandle of idle) await destroy(idleHandle);
    progress(`${name}: done`);

    return {
      name,
      ok: true,
      detail: describeDriver(driver),
      warnings,
      cold: measured(cold),
      ...(coldWarmPool ? { coldWarmPool } : {}),
      ...(resumeWarmPool ? { resumeWarmPool } : {}),
      coldProvision: summarize(provisionTimes),
      coldFirstExec: summarize(firstExecTimes),
      exec: measured(exec),
      suspend: { summary: summarize(suspendTimes), wanted: options.resumeRuns },
      resume: measured(resume),
      suspendKeepsMemory,
      benchRssBytes,
      memory: {
        sandboxes: memoryCount,
        hostPerSandbox: (availableBefore - availableAfter) / memoryCount,
        statsPerSandbox: statsTotal === undefined ? undefined : statsTotal / memoryCount,
      },
    };
  } catch (error) {
    const message = error instanceof Error ? error.message : String(error);
    return { name, ok: false, reason: `failed during the bench: ${message}` };
  } finally {
    for (const handle of live) await driver.destroy(handle).catch(() => undefined);
  }
}

/** What kind of sandbox a driver makes here (bwrap: lifecycle mode). */
function describeDriver(driver: SandboxDriver): string {
  const mode = (driver as { mode?: unknown }).mode;
  return typeof mode === 'string' ? mode : '';
}

/**
 * The peer's cold start: `SandboxManager.initialize` once (starts its HTTP and SOCKS proxies),
 * then per run, in a fresh empty working directory, `wrapWithSandboxArgv('echo hi')` and spawning
 * the result to its exit. Network is configured as blocked (`allowedDomains: []`), its closest
 * match to Berth's loopback-only sandboxes; the library still routes through its proxies then.
 */
async function benchPeer(root: string, runs: number, budgetMs: number): Promise<PeerRun> {
  let runtime: typeof import('@anthropic-ai/sandbox-runtime');
  try {
    runtime = await import('@anthropic-ai/sandbox-runtime');
  } catch (error) {
    return { ok: false, reason: `@anthropic-ai/sandbox-runtime is not installed (${String(error)})` };
  }
  const { SandboxManager } = runtime;
  const version = (
    JSON.parse(
      readFileSync(
        join(import.meta.dirname, '..', 'node_modules', '@anthropic-ai', 'sandbox-runtime', 'package.json'),
        'utf8',
      ),
    ) as { version: string }
  ).version;
  const dependencies = await SandboxManager.checkDependenciesAsync();
  if (dependencies.errors.length > 0) {
    return {
      ok: false,
      reason: `${dependencies.errors.join(', ')} (apt-get install bubblewrap socat ripgrep)`,
    };
  }
  const configuration = {
    network: { allowedDomains: [], deniedDomains: [] },
    filesystem: { denyRead: [], allowWrite: ['.'], denyWrite: [] },
  };
  const initializeStarted = performance.now();
  await SandboxManager.initialize(configuration);
  const initializeMs = performance.now() - initializeStarted;
  const originalDirectory = process.cwd();
  const wrapTimes: number[] = [];
  const runTimes: number[] = [];
  let counter = 0;
  try {
    const once = async () => {
      const workdir = join(root, `peer-${counter++}`);
      await mkdir(workdir, { recursive: true });
      // The library scans the current directory for files to protect, and resolves '.' there.
      process.chdir(workdir);
      const started = performance.now();
      const { argv, env } = await SandboxManager.wrapWithSandboxArgv(
        'echo hi',
        undefined,
        undefined,
        undefined,
        workdir,
      );
      const wrapped = performance.now();
      const stdout = await new Promise<string>((resolve, reject) => {
        const child = spawn(argv[0]!, argv.slice(1), {
          cwd: workdir,
          env,
          stdio: ['ignore', 'pipe', 'pipe'],
        });
        let output = '';
        let errors = '';
        child.stdout.on('data', (chunk: Buffer) => {
          output += chunk.toString('utf8');
        });
        child.stderr.on('data', (chunk: Buffer) => {
          errors += chunk.toString('utf8');
        });
        child.on('error', reject);
        child.on('close', (code) =>
          code === 0 ? resolve(output) : reject(new Error(`peer exited ${code}: ${errors.trim()}`)),
        );
      });
      const done = performance.now();
      SandboxManager.cleanupAfterCommand();
      process.chdir(originalDirectory);
      expectHi(stdout, 'peer cold start');
      wrapTimes.push(wrapped - started);
      runTimes.push(done - wrapped);
      return done - started;
    };
    await once();
    await once();
    wrapTimes.length = 0;
    runTimes.length = 0;
    const cold = await repeat(runs, budgetMs, 'peer cold start', once);
    return {
      ok: true,
      version,
      initializeMs,
      cold: summarize(cold.sample),
      wrap: summarize(wrapTimes),
      run: summarize(runTimes),
      configuration: JSON.stringify(configuration),
    };
  } catch (error) {
    return { ok: false, reason: `failed: ${error instanceof Error ? error.message : String(error)}` };
  } finally {
    process.chdir(originalDirectory);
    await SandboxManager.reset();
  }
}

/** Request latencies of GET /v1/agents, paced so the sandbox manager's 1 s sampler runs meanwhile. */
async function timeListAgents(url: string, apiKey: string, requests: number): Promise<Summary> {
  const headers = { 'x-api-key': apiKey };
  const get = async () => {
    const response = await fetch(`${url}/v1/agents`, { headers });
    if (!response.ok) throw new Error(`GET /v1/agents: ${response.status}`);
    await response.arrayBuffer();
  };
  for (let index = 0; index < 20; index++) await get();
  const sample: number[] = [];
  for (let index = 0; index < requests; index++) {
    const started = performance.now();
    await get();
    sample.push(performance.now() - started);
    await sleep(4);
  }
  return summarize(sample);
}

/**
 * A Berth server in this process (SQLite in a temp data dir, `startTestBerth`) with `count`
 * sessions whose sandboxes were provisioned through the API (`GET /v1/sessions/:id/files`), so
 * the real SandboxManager holds and meters them; then GET /v1/agents timed.
 */
async function benchIdleServer(count: number, requests: number): Promise<IdleServerRun> {
  const berth = await startTestBerth({ environment: UNLIMITED_LIMITS });
  try {
    const headers = { 'x-api-key': berth.apiKey, 'content-type': 'application/json' };
    const post = async (path: string, body: unknown) => {
      const response = await fetch(`${berth.url}${path}`, {
        method: 'POST',
        headers,
        body: JSON.stringify(body),
      });
      if (!response.ok) throw new Error(`${path}: ${response.status} ${await response.text()}`);
      return (await response.json()) as { id: string };
    };
    const agent = await post('/v1/agents', { name: 'bench', model: 'scripted/echo' });
    const environment = await post('/v1/environments', { name: 'bench' });
    progress(`idle server: GET /v1/agents with no sandboxes (${requests} requests)`);
    const baseline = await timeListAgents(berth.url, berth.apiKey, requests);
    await sleep(300);
    const availableBefore = memAvailable();
    const provisionTimes: number[] = [];
    for (let index = 0; index < count; index++) {
      const session = await post('/v1/sessions', { agent: agent.id, environment_id: environment.id });
      const started = performance.now();
      const response = await fetch(`${berth.url}/v1/sessions/${session.id}/files`, { headers });
      if (!response.ok) throw new Error(`GET files: ${response.status} ${await response.text()}`);
      await response.arrayBuffer();
      provisionTimes.push(performance.now() - started);
      if ((index + 1) % 25 === 0) progress(`idle server: ${index + 1}/${count} sandboxes live`);
    }
    if (berth.sandboxes.size !== count)
      throw new Error(`expected ${count} live sandboxes, the server has ${berth.sandboxes.size}`);
    await sleep(1500);
    const availableAfter = memAvailable();
    progress(`idle server: GET /v1/agents with ${count} sandboxes live (${requests} requests)`);
    const loaded = await timeListAgents(berth.url, berth.apiKey, requests);
    const liveAtEnd = berth.sandboxes.size;
    const drivers = Object.keys(berth.sandboxes.countByDriver()).join(', ') || 'bwrap';
    progress('idle server: stopping (destroys the sandboxes)');
    return {
      driver: drivers,
      sandboxes: count,
      baseline,
      loaded,
      provisionViaApi: summarize(provisionTimes),
      hostMemoryPerSandbox: (availableBefore - availableAfter) / count,
      liveAtEnd,
    };
  } finally {
    await berth.dispose();
  }
}

/** Runs every sandbox measurement on this host; prints progress to stderr. */
export async function runSandboxBench(
  options: SandboxBenchOptions = DEFAULT_SANDBOX_BENCH_OPTIONS,
): Promise<SandboxBenchResults> {
  const root = await mkdtemp(join(tmpdir(), 'berth-bench-sandboxes-'));
  const results: SandboxBenchResults = { drivers: [], peer: undefined, idleServer: undefined };
  try {
    for (const name of DRIVER_NAMES) {
      progress(`${name}: loading and checking availability`);
      const loaded = await loadDriver(name);
      if (!loaded.ok) {
        results.drivers.push({ name, ok: false, reason: loaded.reason });
        continue;
      }
      const availability = await loaded.driver.checkAvailability();
      if (!availability.ok) {
        results.drivers.push({ name, ok: false, reason: availability.reason });
        continue;
      }
      results.drivers.push(
        await benchDriver(name, loaded.driver, availability.warnings ?? [], root, options),
      );
    }
    if (options.peer) {
      progress('peer (@anthropic-ai/sandbox-runtime): cold start');
      results.peer = await benchPeer(root, options.coldRuns, options.phaseBudgetMs);
    }
    if (results.drivers.some((run) => run.name === 'bwrap' && run.ok) && options.idleSandboxes > 0) {
      try {
        results.idleServer = await benchIdleServer(options.idleSandboxes, options.requests);
      } catch (error) {
        results.idleServer = { ok: false, reason: error instanceof Error ? error.message : String(error) };
      }
    }
  } finally {
    await rm(root, { recursive: true, force: true });
  }
  return results;
}

const mib = (bytes: number | undefined) =>
  bytes === undefined || !Number.isFinite(bytes) ? '-' : `${(bytes / 1024 ** 2).toFixed(1)} MiB`;

/** `p50 / p99`, with the run count when a phase stopped early. */
function pair(sample: Measured | Summary): string {
  const summary = 'summary' in sample ? sample.summary : sample;
  const cut =
    'summary' in sample && sample.summary.count < sample.wanted ? ` (n=${sample.summary.count})` : '';
  return `${ms(summary.p50)} / ${ms(summary.p99)}${cut}`;
}

/** The bench's results as Markdown: one row per driver and the peer, then the details. */
export function formatSandboxResults(results: SandboxBenchResults, options: SandboxBenchOptions): string {
  const lines: string[] = [];
  const rows: string[][] = [];
  for (const run of results.drivers) {
    if (!run.ok) {
      rows.push([run.name, `unavailable: ${run.reason}`, '', '', '', '']);
      continue;
    }
    rows.push([
      run.detail ? `${run.name} (${run.detail})` : run.name,
      run.coldWarmPool ? `${pair(run.coldWarmPool)} pool; ${pair(run.cold)} none` : pair(run.cold),
      pair(run.exec),
      pair(run.suspend),
      run.resumeWarmPool ? `${pair(run.resumeWarmPool)} pool; ${pair(run.resume)} none` : pair(run.resume),
      `${mib(run.memory.statsPerSandbox ?? run.memory.hostPerSandbox)}${run.memory.statsPerSandbox === undefined ? ' (host MemAvailable)' : ''}${run.memory.sandboxes < options.memorySandboxes ? ` (n=${run.memory.sandboxes})` : ''}`,
    ]);
  }
  const peer = results.peer;
  if (peer) {
    rows.push(
      peer.ok
        ? [`peer: sandbox-runtime ${peer.version}`, pair(peer.cold), 'n/a', 'n/a', 'n/a', 'n/a']
        : ['peer: sandbox-runtime', `unavailable: ${peer.reason}`, '', '', '', ''],
    );
  }
  rows.push([
    'target (p50)',
    `≤ ${TARGET_COLD_START_P50_MS} ms, ≤ ${TARGET_COLD_START_PEER_RATIO}× peer`,
    `≤ ${TARGET_EXEC_P50_MS} ms`,
    '',
    `≤ ${TARGET_RESUME_P50_MS} ms`,
    '',
  ]);
  lines.push(
    table(
      [
        'driver',
        `cold start → echo hi, p50 / p99 ms (n=${options.coldRuns})`,
        `exec echo hi, p50 / p99 ms (n=${options.execRuns})`,
        `suspend, p50 / p99 ms (n=${options.resumeRuns})`,
        `resume → echo hi, p50 / p99 ms (n=${options.resumeRuns})`,
        `memory per idle sandbox (${options.memorySandboxes} live; cgroup usage via driver stats)`,
      ],
      rows,
      'lrrrrr',
    ),
  );

  const bwrap = results.drivers.find((run) => run.name === 'bwrap');
  const detailRows: string[][] = [];
  for (const run of results.drivers) {
    if (!run.ok) continue;
    if (run.coldWarmPool) {
      detailRows.push([
        run.name,
        'cold start → echo hi from the warm pool (server default; pool refilled between runs)',
        pair(run.coldWarmPool),
      ]);
    }
    detailRows.push([run.name, 'cold start: provision', pair(run.coldProvision)]);
    detailRows.push([run.name, 'cold start: first exec', pair(run.coldFirstExec)]);
    detailRows.push([
      run.name,
      'memory per idle sandbox, driver stats (cgroup usage, page cache included)',
      mib(run.memory.statsPerSandbox),
    ]);
    detailRows.push([
      run.name,
      'memory per idle sandbox, host MemAvailable drop (noisy when other work runs)',
      mib(run.memory.hostPerSandbox),
    ]);
    detailRows.push([run.name, 'suspend keeps memory', run.suspendKeepsMemory ? 'yes' : 'no (files only)']);
    detailRows.push([run.name, 'bench process RSS while exec was timed', mib(run.benchRssBytes)]);
    for (const warning of run.warnings) detailRows.push([run.name, 'warning', warning]);
  }
  if (peer?.ok) {
    detailRows.push(['peer', 'SandboxManager.initialize (once, starts its proxies)', ms(peer.initializeMs)]);
    detailRows.push(['peer', 'cold start: wrapWithSandboxArgv', pair(peer.wrap)]);
    detailRows.push(['peer', 'cold start: spawn → exit', pair(peer.run)]);
    if (bwrap?.ok) {
      detailRows.push([
        'bwrap / peer',
        'cold start p50 ratio',
        `${(bwrap.cold.summary.p50 / peer.cold.p50).toFixed(2)}×`,
      ]);
      detailRows.push([
        'bwrap / peer',
        'cold start p50 ratio, peer spawn → exit only (its JavaScript left out)',
        `${(bwrap.cold.summary.p50 / peer.run.p50).toFixed(2)}×`,
      ]);
    }
  }
  if (detailRows.length > 0) {
    lines.push('', table(['driver', 'measurement', 'p50 / p99 ms or value'], detailRows, 'llr'));
  }
  if (peer?.ok) {
    lines.push(
      '',
      `Peer configuration: \`${peer.configuration}\` (network blocked, the closest match to Berth's loopback-only sandbox; the library still starts its HTTP/SOCKS proxies and two socat relays per command). Each run is \`wrapWithSandboxArgv('echo hi')\` in a fresh empty working directory, then spawning the result; \`initialize\` is paid once, outside the runs.`,
    );
  }

  const idle = results.idleServer;
  if (idle && 'ok' in idle) {
    lines.push('', `Idle sandboxes with the server answering: failed (${idle.reason})`);
  } else if (idle) {
    lines.push(
      '',
      `#### ${idle.sandboxes} idle ${idle.driver} sandboxes, Berth serving GET /v1/agents (in-process, SQLite; ${options.requests} requests paced 4 ms apart)`,
      '',
      table(
        ['condition', 'p50 ms', 'p99 ms', 'max ms'],
        [
          ['no sandboxes', ms(idle.baseline.p50), ms(idle.baseline.p99), ms(idle.baseline.max)],
          [`${idle.sandboxes} sandboxes live`, ms(idle.loaded.p50), ms(idle.loaded.p99), ms(idle.loaded.max)],
          [`target`, `≤ ${TARGET_IDLE_SERVER_MS}`, `≤ ${TARGET_IDLE_SERVER_MS}`, ''],
        ],
        'lrrr',
      ),
      '',
      `Provisioning through the API (first GET /v1/sessions/:id/files of a session): p50 ${ms(idle.provisionViaApi.p50)} ms, p99 ${ms(idle.provisionViaApi.p99)} ms. Host memory per sandbox (MemAvailable drop over ${idle.sandboxes}): ${mib(idle.hostMemoryPerSandbox)}. Sandboxes still live after the timed requests: ${idle.liveAtEnd} of ${idle.sandboxes}.`,
    );
  }
  return lines.join('\n');
}

/** Rows for the Targets table of `bench/run.ts`. */
export function sandboxTargetRows(results: SandboxBenchResults): string[][] {
  const rows: string[][] = [];
  const verdict = (ok: boolean) => (ok ? 'met' : 'MISSED');
  const bwrap = results.drivers.find((run) => run.name === 'bwrap');
  if (bwrap?.ok) {
    const variants: [string, number][] = [];
    if (bwrap.coldWarmPool) variants.push(['warm pool (server default)', bwrap.coldWarmPool.summary.p50]);
    variants.push(['no pool', bwrap.cold.summary.p50]);
    for (const [label, cold] of variants) {
      rows.push([
        `bwrap cold start → echo hi p50, ${label}`,
        `≤ ${TARGET_COLD_START_P50_MS} ms`,
        `${ms(cold)} ms`,
        verdict(cold <= TARGET_COLD_START_P50_MS),
      ]);
      if (results.peer?.ok) {
        const ratio = cold / results.peer.cold.p50;
        rows.push([
          `bwrap cold start p50 / peer (sandbox-runtime) p50, ${label}`,
          `≤ ${TARGET_COLD_START_PEER_RATIO}×`,
          `${ratio.toFixed(2)}×`,
          verdict(ratio <= TARGET_COLD_START_PEER_RATIO),
        ]);
      }
    }
  }
  // The issue's exec and resume targets are for bwrap (gvisor and microvm are in the table above).
  if (bwrap?.ok) {
    rows.push([
      'bwrap exec echo hi p50 (live sandbox)',
      `≤ ${TARGET_EXEC_P50_MS} ms`,
      `${ms(bwrap.exec.summary.p50)} ms`,
      verdict(bwrap.exec.summary.p50 <= TARGET_EXEC_P50_MS),
    ]);
    const resumes: [string, number][] = [];
    if (bwrap.resumeWarmPool) resumes.push(['warm pool (server default)', bwrap.resumeWarmPool.summary.p50]);
    resumes.push(['no pool', bwrap.resume.summary.p50]);
    for (const [label, resume] of resumes) {
      rows.push([
        `bwrap resume → echo hi p50, ${label}`,
        `≤ ${TARGET_RESUME_P50_MS} ms`,
        `${ms(resume)} ms`,
        verdict(resume <= TARGET_RESUME_P50_MS),
      ]);
    }
  }
  const idle = results.idleServer;
  if (idle && !('ok' in idle)) {
    for (const [label, value] of [
      ['p50', idle.loaded.p50],
      ['p99', idle.loaded.p99],
    ] as const) {
      rows.push([
        `GET /v1/agents ${label} with ${idle.sandboxes} idle sandboxes`,
        `≤ ${TARGET_IDLE_SERVER_MS} ms`,
        `${ms(value)} ms`,
        verdict(value <= TARGET_IDLE_SERVER_MS),
      ]);
    }
  }
  return rows;
}
