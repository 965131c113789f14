import { newId } from '../src/ids.js';
import type { NewEvent, SessionKey } from '../src/store/event-store.js';
import type { SessionRecord, Store } from '../src/store/resource-store.js';
import { type Summary, summarize } from './stats.js';

/** One measured configuration: `sessions` appenders, each awaiting one append before the next. */
export interface AppendRun {
  sessions: number;
  eventsPerAppend: number;
  appends: number;
  seconds: number;
  appendsPerSecond: number;
  eventsPerSecond: number;
  latency: Summary;
}

export interface AppendBenchOptions {
  /** Concurrent sessions per configuration, each with its own appender loop. */
  concurrency: readonly number[];
  /** Batch appends measured after the single-event ones: [sessions, events per append]. */
  batches: readonly (readonly [number, number])[];
  /** Measured seconds per configuration (after a short warm-up). */
  seconds: number;
  warmupSeconds: number;
}

const TENANT = 'tnt_bench';

/** A system prompt of about 3 KB, the size of a real agent's instructions. */
const SYSTEM_PROMPT = Array.from(
  { length: 24 },
  (_, index) =>
    `Rule ${index + 1}: read the repository's conventions before changing code, keep every change small and reviewable, and explain what you did.`,
).join('\n');

/**
 * A session body as the API stores it: the pinned agent (system prompt, tools) is copied into
 * the session, so a real session row carries ~4 KB of JSON.
 */
function sessionBody(id: string, now: string): Record<string, unknown> {
  return {
    id,
    type: 'session',
    agent: {
      type: 'agent',
      id: 'agent_bench',
      version: 1,
      name: 'bench-coder',
      description: 'A coding agent with a realistic system prompt and tool set.',
      model: { id: 'claude-sonnet-4-5', speed: 'standard' },
      system: SYSTEM_PROMPT,
      tools: [
        {
          type: 'agent_toolset_20250101',
          default_config: { enabled: true, permission_policy: { type: 'always_allow' } },
        },
        {
          type: 'custom',
          name: 'lookup_ticket',
          description:
            'Fetches a ticket from the issue tracker by its key and returns title, body and status.',
          input_schema: { type: 'object', properties: { key: { type: 'string' } }, required: ['key'] },
        },
      ],
      mcp_servers: [],
      skills: [],
      metadata: { team: 'platform', owner: 'bench' },
    },
    environment_id: 'env_bench',
    title: 'Benchmark session',
    metadata: { purpose: 'append throughput' },
    resources: [],
    created_at: now,
    updated_at: now,
    archived_at: null,
  };
}

function sessionRecord(): SessionRecord {
  const id = newId('sesn');
  const now = new Date().toISOString();
  return {
    id,
    tenantId: TENANT,
    ownerId: 'user_bench',
    createdAt: now,
    updatedAt: now,
    archivedAt: null,
    body: sessionBody(id, now),
    agentId: 'agent_bench',
    agentVersion: 1,
    environmentId: 'env_bench',
    status: 'idle',
    stopReason: null,
    lastSeq: 0,
  };
}

/** A small event, about the size of a short user message (~120 bytes stored). */
function smallEvent(index: number): NewEvent {
  return { type: 'user.message', content: [{ type: 'text', text: `message ${index}` }] };
}

/**
 * Sustained appends: `sessions` loops run for `seconds`, each appending to its own session and
 * awaiting every append before the next, so concurrency is exactly the number of sessions.
 */
async function measure(
  store: Store,
  sessions: number,
  eventsPerAppend: number,
  seconds: number,
  warmupSeconds: number,
): Promise<AppendRun> {
  const ids: SessionKey[] = [];
  for (let index = 0; index < sessions; index++) {
    const record = sessionRecord();
    await store.resources.createSession(record);
    ids.push({ tenantId: record.tenantId, id: record.id });
  }
  const batch = (index: number) =>
    Array.from({ length: eventsPerAppend }, (_, position) => smallEvent(index * eventsPerAppend + position));

  const latencies: number[] = [];
  let appends = 0;
  let recording = false;
  let stopping = false;
  const loop = async (sessionId: SessionKey) => {
    for (let index = 0; !stopping; index++) {
      const started = performance.now();
      await store.events.append(sessionId, batch(index));
      if (recording && !stopping) {
        latencies.push(performance.now() - started);
        appends++;
      }
    }
  };
  const loops = ids.map(loop);
  await sleep(warmupSeconds * 1000);
  recording = true;
  const started = performance.now();
  await sleep(seconds * 1000);
  stopping = true;
  const elapsed = (performance.now() - started) / 1000;
  await Promise.all(loops);
  return {
    sessions,
    eventsPerAppend,
    appends,
    seconds: elapsed,
    appendsPerSecond: appends / elapsed,
    eventsPerSecond: (appends * eventsPerAppend) / elapsed,
    latency: summarize(latencies),
  };
}

/** Runs every configuration on one open store, in order, and returns the measurements. */
export async function runAppendBench(
  store: Store,
  options: AppendBenchOptions,
  progress: (run: AppendRun) => void,
): Promise<AppendRun[]> {
  const runs: AppendRun[] = [];
  const configurations: (readonly [number, number])[] = [
    ...options.concurrency.map((sessions) => [sessions, 1] as const),
    ...options.batches,
  ];
  for (const [sessions, eventsPerAppend] of configurations) {
    const run = await measure(store, sessions, eventsPerAppend, options.seconds, options.warmupSeconds);
    progress(run);
    runs.push(run);
  }
  return runs;
}

function sleep(milliseconds: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, milliseconds));
}
