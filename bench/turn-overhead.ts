import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type {
  LanguageModelV3,
  LanguageModelV3CallOptions,
  LanguageModelV3GenerateResult,
  LanguageModelV3StreamResult,
} from '@ai-sdk/provider';
import { loadConfig } from '../src/config/config.js';
import type { Logger } from '../src/control/supervisor.js';
import { DEFAULT_TENANT_ID } from '../src/identity/api-keys.js';
import type { ModelRegistry } from '../src/models/model-registry.js';
import { createModelRegistry } from '../src/models/provider-registry.js';
import { startBerth } from '../src/server.js';
import type { StoredEvent } from '../src/store/event-store.js';
import type { TestDatabaseUrls } from '../test/support/postgres-database.js';
import { type Summary, summarize } from './stats.js';

/** Timestamps (performance.now) of one turn, from just before the POST. */
interface TurnTimes {
  /** The POST response body has been read. */
  postDone: number;
  /** Subscribers saw the user.message, session.status_running and span.model_request_start commits. */
  userMessage: number;
  running: number;
  spanStart: number;
  /** The model's doStream was called. */
  doStream: number;
  /** The session went idle again (the whole turn). */
  idle: number;
}

export interface TurnRun {
  /** `one session` (a growing conversation) or `new session per turn`. */
  mode: string;
  turns: number;
  /** POST sent -> doStream called. */
  toModel: Summary;
  /** POST round trip (send -> response body read). */
  post: Summary;
  /** POST sent -> commit of user.message / status_running / span.model_request_start seen. */
  toUserMessage: Summary;
  toRunning: Summary;
  toSpanStart: Summary;
  /** First and last 100 measured turns, for the one-session mode (history grows). */
  toModelFirst100?: Summary;
  toModelLast100?: Summary;
}

export interface TurnBenchOptions {
  /** `undefined` for SQLite in the data dir, or a postgres:// URL. */
  database: TestDatabaseUrls | undefined;
  turns: number;
  warmup: number;
  /** Extra environment for Berth's configuration (e.g. OTEL_* to turn tracing on). */
  environment?: Record<string, string>;
}

const quietLogger: Logger = {
  info: () => undefined,
  warn: () => undefined,
  error: (message, fields) => console.error(message, fields),
};

/** A model that records when `doStream` is called, then delegates to the real one. */
class TimedModel implements LanguageModelV3 {
  readonly specificationVersion = 'v3';
  readonly provider: string;
  readonly modelId: string;
  readonly supportedUrls: LanguageModelV3['supportedUrls'];
  streamCalledAt: number | undefined;

  constructor(private readonly inner: LanguageModelV3) {
    this.provider = inner.provider;
    this.modelId = inner.modelId;
    this.supportedUrls = inner.supportedUrls;
  }

  doGenerate(options: LanguageModelV3CallOptions): PromiseLike<LanguageModelV3GenerateResult> {
    return this.inner.doGenerate(options);
  }

  doStream(options: LanguageModelV3CallOptions): PromiseLike<LanguageModelV3StreamResult> {
    this.streamCalledAt = performance.now();
    return this.inner.doStream(options);
  }
}

/**
 * Starts Berth in-process with a scripted `echo` agent and measures, over sequential turns,
 * the time from sending `POST /v1/sessions/:id/events` (a user.message) to the model's
 * `doStream` being called; each turn waits for the session to go idle before the next.
 */
export async function runTurnBench(options: TurnBenchOptions): Promise<TurnRun[]> {
  const rig = await startTurnRig(options);
  try {
    const { turn, newSession } = rig;
    // A conversation: every turn in one session, so the log the harness reads grows.
    const conversation = await newSession();
    const conversationTimes: TurnTimes[] = [];
    for (let index = 0; index < options.warmup + options.turns; index++) {
      const times = await turn(conversation, index);
      if (index >= options.warmup) conversationTimes.push(times);
    }
    const oneSession = summarizeTurns('one session', conversationTimes);
    oneSession.toModelFirst100 = summarize(conversationTimes.slice(0, 100).map((time) => time.doStream));
    oneSession.toModelLast100 = summarize(conversationTimes.slice(-100).map((time) => time.doStream));

    // A first turn in a new session each time: runtime overhead without history to read.
    const freshTimes: TurnTimes[] = [];
    for (let index = 0; index < options.warmup + options.turns; index++) {
      const sessionId = await newSession();
      const times = await turn(sessionId, index);
      if (index >= options.warmup) freshTimes.push(times);
    }
    const freshSessions = summarizeTurns('new session per turn', freshTimes);
    return [oneSession, freshSessions];
  } finally {
    await rig.close();
  }
}

function summarizeTurns(mode: string, times: TurnTimes[]): TurnRun {
  return {
    mode,
    turns: times.length,
    toModel: summarize(times.map((time) => time.doStream)),
    post: summarize(times.map((time) => time.postDone)),
    toUserMessage: summarize(times.map((time) => time.userMessage)),
    toRunning: summarize(times.map((time) => time.running)),
    toSpanStart: summarize(times.map((time) => time.spanStart)),
  };
}

/** One in-process Berth with a timed scripted model, and what a benchmark needs to drive it. */
async function startTurnRig(options: TurnBenchOptions) {
  const dataDir = await mkdtemp(join(tmpdir(), 'berth-bench-'));
  const config = loadConfig({
    flags: { port: 0, dataDir, database: options.database?.url },
    // Each turn is measured alone; the per-user rate limits must not pace a benchmark.
    environment: {
      BERTH_DATABASE_MIGRATION_URL: options.database?.migrationUrl,
      BERTH_USER_EVENTS_PER_MINUTE: '0',
      BERTH_TENANT_EVENTS_PER_MINUTE: '0',
      BERTH_USER_SESSIONS_PER_MINUTE: '0',
      BERTH_TENANT_SESSIONS_PER_MINUTE: '0',
      ...options.environment,
    },
  });
  const real = createModelRegistry({ environment: config.modelEnvironment });
  const timed = new Map<string, TimedModel>();
  const models: ModelRegistry = {
    resolve(modelId) {
      let model = timed.get(modelId);
      if (model === undefined) {
        model = new TimedModel(real.resolve(modelId));
        timed.set(modelId, model);
      }
      return model;
    },
  };
  const berth = await startBerth(config, { logger: quietLogger, models });
  try {
    const apiKey = (await readFile(join(dataDir, 'admin.key'), 'utf8')).trim();
    const api = async (method: string, path: string, body?: unknown) => {
      const response = await fetch(`${berth.url}${path}`, {
        method,
        headers: { 'x-api-key': apiKey, 'content-type': 'application/json' },
        body: body === undefined ? undefined : JSON.stringify(body),
      });
      const json = (await response.json()) as Record<string, unknown>;
      if (!response.ok) throw new Error(`${method} ${path}: ${response.status} ${JSON.stringify(json)}`);
      return json;
    };
    const agent = await api('POST', '/v1/agents', { name: 'bench-echo', model: 'scripted/echo' });
    const environment = await api('POST', '/v1/environments', { name: 'bench-env' });
    const newSession = async () =>
      (await api('POST', '/v1/sessions', { agent: agent.id, environment_id: environment.id })).id as string;

    const model = models.resolve('scripted/echo') as TimedModel;

    /** One turn in `sessionId`; resolves when the session is idle again. */
    const turn = async (sessionId: string, index: number): Promise<TurnTimes> => {
      const seen: Partial<Record<string, number>> = {};
      let idle!: () => void;
      const idleSeen = new Promise<void>((resolve) => {
        idle = resolve;
      });
      const unsubscribe = berth.store.events.subscribe(
        { tenantId: DEFAULT_TENANT_ID, id: sessionId },
        (events: readonly StoredEvent[]) => {
          const now = performance.now();
          for (const { event } of events) {
            seen[event.type] ??= now;
            if (event.type === 'session.status_idle') {
              seen.idleAt = now;
              idle();
            }
          }
        },
      );
      model.streamCalledAt = undefined;
      const started = performance.now();
      const response = await fetch(`${berth.url}/v1/sessions/${sessionId}/events`, {
        method: 'POST',
        headers: { 'x-api-key': apiKey, 'content-type': 'application/json' },
        body: JSON.stringify({
          events: [{ type: 'user.message', content: [{ type: 'text', text: `turn ${index}` }] }],
        }),
      });
      await response.json();
      const postDone = performance.now();
      if (!response.ok) throw new Error(`POST events: ${response.status}`);
      await idleSeen;
      unsubscribe();
      const at = (type: string) => (seen[type] ?? Number.NaN) - started;
      if (model.streamCalledAt === undefined) throw new Error(`turn ${index}: the model was not called`);
      return {
        postDone: postDone - started,
        userMessage: at('user.message'),
        running: at('session.status_running'),
        spanStart: at('span.model_request_start'),
        doStream: model.streamCalledAt - started,
        idle: (seen.idleAt ?? Number.NaN) - started,
      };
    };

    return {
      turn,
      newSession,
      close: async () => {
        await berth.close();
        await rm(dataDir, { recursive: true, force: true });
      },
    };
  } catch (error) {
    await berth.close();
    await rm(dataDir, { recursive: true, force: true });
    throw error;
  }
}
