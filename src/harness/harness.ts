import type {
  LanguageModelV3FunctionTool,
  LanguageModelV3StreamPart,
  LanguageModelV3Usage,
} from '@ai-sdk/provider';
import { BerthError, isBerthError } from '../errors.js';
import { newId } from '../ids.js';
import type { ModelRegistry } from '../models/model-registry.js';
import type { NewEvent, StoredEvent, WriterToken } from '../store/event-store.js';
import type { SessionRecord, Store } from '../store/resource-store.js';
import { buildPrompt } from './context.js';
import type { DeltaBus } from './delta-bus.js';
import { decideNextStep } from './turn-state.js';

/** A tool the model may call, as the harness offers it. */
export interface HarnessTool {
  name: string;
  description: string;
  inputSchema: Record<string, unknown>;
  /** `builtin` runs in the sandbox; `custom` is run by the client. */
  kind: 'builtin' | 'custom';
  /** Read-only tools are safe to re-run after a crash. */
  readOnly: boolean;
}

export interface ToolOutcome {
  content: string;
  isError: boolean;
}

/** Runs built-in tools for one session (the sandbox is provisioned lazily behind it). */
export interface SessionToolbox {
  tools: readonly HarnessTool[];
  execute(name: string, input: unknown, options: { signal: AbortSignal }): Promise<ToolOutcome>;
}

/** Per-wake controls from the supervisor. */
export interface WakeControl {
  /** A fresh signal for the next model call or tool run; aborted when an interrupt arrives. */
  stepSignal(): AbortSignal;
  /** Aborted when the process is shutting down: the wake stops between steps. */
  shutdown: AbortSignal;
}

export interface HarnessDependencies {
  store: Store;
  models: ModelRegistry;
  deltas: DeltaBus;
  /** Builds the toolbox for a session from its pinned agent version. */
  toolboxFor(session: SessionRecord): SessionToolbox;
  /** Failed model calls in a row before the turn ends with `retries_exhausted` (default 3). */
  maxModelRetries?: number;
  /** Sessions whose logs stay cached between wakes (default 256). */
  logCacheSessions?: number;
  /** Backoff before retry n is `retryBaseDelayMs * 2^(n-1)` (default 500). */
  retryBaseDelayMs?: number;
}

/** The agent version pinned by a session, as the harness reads it. */
interface PinnedAgent {
  system: string | null;
  model: { id: string };
}

const RESTART_NOTICE =
  'The Berth runtime restarted while this tool was running, so its effect is unknown. ' +
  'Check the current state before running it again.';

/**
 * The stateless agent loop. `wake(sessionId)` reads the log, decides the next step with
 * `decideNextStep`, performs it, appends the outcome, and repeats until nothing is left to
 * do. Everything it needs comes from the log and the pinned agent version, so any process
 * can finish a turn another one started.
 */
export function createHarness(dependencies: HarnessDependencies) {
  const { store, models, deltas } = dependencies;
  const maxRetries = dependencies.maxModelRetries ?? 3;
  const retryBaseDelayMs = dependencies.retryBaseDelayMs ?? 500;

  // Writer tokens this process holds, so a wake does not pay a commit to re-acquire one.
  // A stale token (another writer took over) is dropped and the wake fails.
  const writers = new Map<string, WriterToken>();
  async function writerFor(sessionId: string): Promise<WriterToken> {
    let writer = writers.get(sessionId);
    if (!writer) {
      writer = await store.events.acquireWriter(sessionId);
      writers.set(sessionId, writer);
    }
    return writer;
  }

  // Recently woken sessions: their record (the pinned agent never changes) and their log.
  // Events are immutable and seq is gapless, so a cached prefix plus the tail read from the
  // store is exactly the log: a wake reads only what is new.
  const cache = new Map<string, { session: SessionRecord; log: StoredEvent[]; current?: boolean }>();
  const cacheSize = dependencies.logCacheSessions ?? 256;
  async function load(sessionId: string) {
    let entry = cache.get(sessionId);
    if (!entry) {
      const session = await store.resources.getSessionUnscoped(sessionId);
      if (!session) return undefined;
      entry = { session, log: [] };
    }
    // A log just extended by `observe` is a prefix of the truth that ends with the input
    // that caused this wake: deciding on it is the same as having woken a moment earlier,
    // and every step re-reads the tail anyway. Otherwise read what is new.
    if (!entry.current) {
      const afterSeq = entry.log.length > 0 ? entry.log[entry.log.length - 1]!.seq : 0;
      const tail = await store.events.read(sessionId, { afterSeq, limit: Number.MAX_SAFE_INTEGER });
      if (tail.length > 0) entry = { session: entry.session, log: entry.log.concat(tail) };
    }
    remember(sessionId, entry.session, entry.log);
    return entry;
  }

  /**
   * Tells the harness about a session and the events this process just committed to it
   * (client input), so the wake they cause need not read them back. The events are used only
   * when they directly follow the cached log (the first events of a new log included).
   */
  function observe(session: SessionRecord, committed: readonly StoredEvent[]): void {
    const entry = cache.get(session.id) ?? { session, log: [] };
    const lastSeq = entry.log.length > 0 ? entry.log[entry.log.length - 1]!.seq : 0;
    if (committed.length > 0 && committed[0]!.seq === lastSeq + 1) {
      remember(session.id, entry.session, entry.log.concat(committed));
      cache.get(session.id)!.current = true;
    } else if (!cache.has(session.id)) {
      remember(session.id, session, []);
    }
  }
  function remember(sessionId: string, session: SessionRecord, log: StoredEvent[]): void {
    cache.delete(sessionId);
    cache.set(sessionId, { session, log });
    if (cache.size > cacheSize) cache.delete(cache.keys().next().value!);
  }

  async function wake(sessionId: string, control: WakeControl): Promise<void> {
    const loaded = await load(sessionId);
    if (!loaded) return;
    const { session } = loaded;
    const writer = await writerFor(sessionId);
    const append = async (events: NewEvent[]) => {
      try {
        return await store.events.append(sessionId, events, { writer });
      } catch (error) {
        if (isBerthError(error, 'stale_writer')) writers.delete(sessionId);
        throw error;
      }
    };
    const agent = session.body.agent as PinnedAgent;
    const toolbox = dependencies.toolboxFor(session);
    // Tool uses this wake wrote itself; any other open tool use was left by a dead process.
    const startedHere = new Set<string>();

    let log = loaded.log;
    while (!control.shutdown.aborted) {
      const step = decideNextStep(log);
      let appended: StoredEvent[] = [];
      switch (step.kind) {
        case 'none':
          return;
        case 'start_turn':
          // A new turn always calls the model next: one commit for both events.
          appended = await callModel(session, agent, toolbox, log, append, control, startedHere, [
            { type: 'session.status_running' },
          ]);
          break;
        case 'end_turn':
          appended = (await append([idleEvent({ type: 'end_turn' })])).events;
          break;
        case 'await_client':
          appended = (await append([idleEvent({ type: 'requires_action', event_ids: step.eventIds })]))
            .events;
          break;
        case 'interrupted':
          appended = (
            await append([
              ...step.openToolUses.map((toolUse) =>
                resultEvent(toolUse, {
                  content: 'Interrupted by the user before this tool finished.',
                  isError: true,
                }),
              ),
              idleEvent({ type: 'end_turn' }),
            ])
          ).events;
          break;
        case 'run_tools': {
          const toolUse = step.toolUses[0]!;
          const outcome = await runTool(toolbox, toolUse, startedHere.has(toolUse.event.id), control);
          appended = (await append([resultEvent(toolUse, outcome)])).events;
          break;
        }
        case 'call_model':
          if (step.failures >= maxRetries) {
            appended = (
              await append([
                {
                  type: 'session.error',
                  error: {
                    type: 'model_request_failed_error',
                    message: `The model request failed ${step.failures} times in a row; giving up on this turn.`,
                    retry_status: { type: 'exhausted' },
                  },
                },
                idleEvent({ type: 'retries_exhausted' }),
              ])
            ).events;
            break;
          }
          if (step.failures > 0) await sleep(retryBaseDelayMs * 2 ** (step.failures - 1), control.shutdown);
          appended = await callModel(session, agent, toolbox, log, append, control, startedHere);
          break;
      }
      // Re-read the tail rather than trusting `appended`: client events (an interrupt, a
      // custom tool result) may have landed in between.
      const afterSeq = log.length > 0 ? log[log.length - 1]!.seq : 0;
      const tail = await store.events.read(sessionId, { afterSeq, limit: Number.MAX_SAFE_INTEGER });
      if (tail.length === 0 && appended.length === 0) return;
      log = log.concat(tail);
      remember(sessionId, session, log);
    }
  }

  async function runTool(
    toolbox: SessionToolbox,
    toolUse: StoredEvent,
    startedHere: boolean,
    control: WakeControl,
  ): Promise<ToolOutcome> {
    const name = toolUse.event.name as string;
    const tool = toolbox.tools.find((candidate) => candidate.name === name);
    if (!tool) return { content: `Unknown tool "${name}".`, isError: true };
    if (!startedHere && !tool.readOnly) return { content: RESTART_NOTICE, isError: true };
    try {
      return await toolbox.execute(name, toolUse.event.input, { signal: control.stepSignal() });
    } catch (error) {
      // A sandbox that died is a tool error, never a dead session.
      const message = error instanceof Error ? error.message : String(error);
      return { content: `The tool failed: ${message}`, isError: true };
    }
  }

  async function callModel(
    session: SessionRecord,
    agent: PinnedAgent,
    toolbox: SessionToolbox,
    log: readonly StoredEvent[],
    append: (events: NewEvent[]) => Promise<{ events: StoredEvent[] }>,
    control: WakeControl,
    startedHere: Set<string>,
    leading: NewEvent[] = [],
  ): Promise<StoredEvent[]> {
    const startId = newId('sevt');
    // The request starts while its start event commits: the model is not kept waiting on an
    // fsync. Should the process die before that commit, the log shows no request and the
    // next wake makes it again, exactly as if it had died a moment earlier.
    const startCommitted = append([...leading, { id: startId, type: 'span.model_request_start' }]);
    const cancel = new AbortController();
    const stepSignal = control.stepSignal();
    const signal = AbortSignal.any([stepSignal, cancel.signal]);
    let start: StoredEvent[] = [];
    const messageId = newId('sevt');
    try {
      const model = models.resolve(agent.model.id);
      const tools: LanguageModelV3FunctionTool[] = toolbox.tools.map((tool) => ({
        type: 'function',
        name: tool.name,
        description: tool.description,
        inputSchema: tool.inputSchema,
      }));
      const request = model.doStream({ prompt: buildPrompt(agent.system, log), tools, abortSignal: signal });
      request.then(undefined, () => undefined); // Awaited below; never an unhandled rejection.
      try {
        start = (await startCommitted).events;
      } catch (error) {
        cancel.abort(error);
        throw error;
      }
      const { stream } = await request;
      const response = await collect(stream, session.id, messageId, signal);
      const events: NewEvent[] = [];
      if (response.reasoning) events.push({ type: 'agent.thinking' });
      if (response.text)
        events.push({
          id: messageId,
          type: 'agent.message',
          content: [{ type: 'text', text: response.text }],
        });
      for (const call of response.toolCalls) {
        const id = newId('sevt');
        const custom = toolbox.tools.find((tool) => tool.name === call.toolName)?.kind === 'custom';
        events.push({
          id,
          type: custom ? 'agent.custom_tool_use' : 'agent.tool_use',
          name: call.toolName,
          input: call.input,
        });
        startedHere.add(id);
      }
      events.push({
        type: 'span.model_request_end',
        model_request_start_id: startId,
        is_error: false,
        model_usage: usageOf(response.usage),
      });
      return [...start, ...(await append(events)).events];
    } catch (error) {
      if (start.length === 0) start = (await startCommitted).events;
      if (isBerthError(error, 'stale_writer')) throw error;
      const interrupted = stepSignal.aborted;
      const message = error instanceof Error ? error.message : String(error);
      const events: NewEvent[] = [];
      if (!interrupted) {
        events.push({
          type: 'session.error',
          error: {
            type: isBerthError(error, 'invalid_request')
              ? 'model_request_failed_error'
              : 'model_request_failed_error',
            message,
            retry_status: { type: isBerthError(error, 'invalid_request') ? 'terminal' : 'retrying' },
          },
        });
      }
      events.push({
        type: 'span.model_request_end',
        model_request_start_id: startId,
        is_error: true,
        model_usage: usageOf(undefined),
      });
      if (isBerthError(error, 'invalid_request')) {
        // A configuration problem (unknown model, missing key) will not fix itself by retrying.
        events.push(idleEvent({ type: 'retries_exhausted' }));
      }
      return [...start, ...(await append(events)).events];
    }
  }

  async function collect(
    stream: ReadableStream<LanguageModelV3StreamPart>,
    sessionId: string,
    messageId: string,
    signal: AbortSignal,
  ) {
    let text = '';
    let reasoning = '';
    let started = false;
    let usage: LanguageModelV3Usage | undefined;
    const toolCalls: { toolName: string; input: unknown }[] = [];
    const reader = stream.getReader();
    try {
      for (;;) {
        if (signal.aborted) throw new BerthError('model_failed', 'Interrupted');
        const { done, value: part } = await reader.read();
        if (done) break;
        switch (part.type) {
          case 'text-delta':
            if (!started) {
              started = true;
              deltas.publish(sessionId, {
                type: 'event_start',
                event: { id: messageId, type: 'agent.message' },
              });
            }
            text += part.delta;
            deltas.publish(sessionId, {
              type: 'event_delta',
              event_id: messageId,
              delta: { type: 'content_delta', content: { type: 'text', text: part.delta }, index: 0 },
            });
            break;
          case 'reasoning-delta':
            reasoning += part.delta;
            break;
          case 'tool-call':
            toolCalls.push({ toolName: part.toolName, input: parseToolInput(part.input) });
            break;
          case 'finish':
            usage = part.usage;
            break;
          case 'error':
            throw part.error instanceof Error
              ? part.error
              : new BerthError('model_failed', String(part.error));
          default:
            break;
        }
      }
    } finally {
      reader.releaseLock();
    }
    return { text, reasoning, toolCalls, usage };
  }

  return { wake, observe };
}

export type Harness = ReturnType<typeof createHarness>;

function idleEvent(stopReason: Record<string, unknown>): NewEvent {
  return { type: 'session.status_idle', stop_reason: stopReason, stop_details: null };
}

function resultEvent(toolUse: StoredEvent, outcome: ToolOutcome): NewEvent {
  return {
    type: 'agent.tool_result',
    tool_use_id: toolUse.event.id,
    content: [{ type: 'text', text: outcome.content }],
    is_error: outcome.isError,
  };
}

function parseToolInput(input: string): unknown {
  try {
    return input.trim() === '' ? {} : JSON.parse(input);
  } catch {
    return { _raw: input };
  }
}

function usageOf(usage: LanguageModelV3Usage | undefined) {
  return {
    input_tokens: usage?.inputTokens.total ?? 0,
    output_tokens: usage?.outputTokens.total ?? 0,
    cache_read_input_tokens: usage?.inputTokens.cacheRead ?? 0,
    cache_creation_input_tokens: usage?.inputTokens.cacheWrite ?? 0,
  };
}

function sleep(milliseconds: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, milliseconds);
    signal.addEventListener('abort', () => {
      clearTimeout(timer);
      resolve();
    });
  });
}
