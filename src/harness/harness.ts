import type {
  LanguageModelV3FunctionTool,
  LanguageModelV3StreamPart,
  LanguageModelV3Usage,
} from '@ai-sdk/provider';
import type { Context } from '@opentelemetry/api';
import { BerthError, isBerthError } from '../errors.js';
import { newId } from '../ids.js';
import { costOf, type PriceBook } from '../metering/price-books.js';
import {
  budgetOf,
  modelOfSession,
  type SandboxUsageDelta,
  usageEvent,
  usageFromLog,
} from '../metering/session-usage.js';
import { emptyUsage } from '../metering/usage.js';
import type { ModelRegistry } from '../models/model-registry.js';
import {
  type NewEvent,
  type SessionKey,
  type StoredEvent,
  sessionKeyString,
  type WriterToken,
} from '../store/event-store.js';
import type { SessionRecord, Store } from '../store/resource-store.js';
import { buildPrompt, modelToolName } from './context.js';
import type { DeltaBus } from './delta-bus.js';
import { selectTools, TOOL_SELECTION_THRESHOLD } from './tool-selection.js';
import { decideNextStep, openRuntimeToolUses } from './turn-state.js';

/** A tool the model may call, as the harness offers it. */
export interface HarnessTool {
  name: string;
  description: string;
  inputSchema: Record<string, unknown>;
  /** `builtin` runs in the sandbox; `custom` is run by the client; `mcp` by an MCP server. */
  kind: 'builtin' | 'custom' | 'mcp';
  /** For `mcp` tools: the server, and the tool's own name there (`name` is what the model sees). */
  mcp?: { serverName: string; toolName: string };
  /** Read-only tools are safe to re-run after a crash. */
  readOnly: boolean;
  /** `ask`: the client must confirm each use (`always_ask`); built-in tools only. */
  permission: 'allow' | 'ask';
}

export interface ToolOutcome {
  content: string;
  isError: boolean;
}

/** Runs built-in tools for one session (the sandbox is provisioned lazily behind it). */
export interface SessionToolbox {
  /** The tools on offer (MCP tool lists are fetched once per session, on first call). */
  listTools(): Promise<readonly HarnessTool[]>;
  execute(
    name: string,
    input: unknown,
    options: { signal: AbortSignal; toolUseId?: string },
  ): Promise<ToolOutcome>;
  /** MCP servers whose tools are missing, and why (reported once per session as `session.error`). */
  failures?(): { serverName: string; message: string }[];
  /** Text the system prompt gains after the agent's own (the session's available skills). */
  instructions?(): Promise<string | undefined>;
}

/** Per-wake controls from the supervisor. */
export interface WakeControl {
  /**
   * Aborted when the process is shutting down: the step in flight is cancelled and left open
   * in the log (the next wake, here or elsewhere, finishes it).
   */
  shutdown: AbortSignal;
  /** Trace context of the request that asked for this wake (W3C `traceparent`), if any. */
  trace?: Context;
}

export interface HarnessDependencies {
  store: Store;
  models: ModelRegistry;
  deltas: DeltaBus;
  /** Builds the toolbox for a session from its pinned agent version. */
  toolboxFor(session: SessionRecord): SessionToolbox;
  /** Failed model calls in a row before the turn ends with `retries_exhausted` (default 3). */
  maxModelRetries?: number;
  /**
   * Usage metering: a `session.usage` snapshot goes with every idle, priced under `book` (the
   * list cost budgets compare with), and a session with a budget stops with `budget_reached`
   * before a model call that would exceed it.
   */
  metering?: {
    book: PriceBook;
    /** Sandbox work measured since the last snapshot; `commit` once the snapshot is stored. */
    measureSandbox(session: SessionKey): Promise<SandboxUsageDelta & { commit(): void }>;
  };
  /** Sessions whose logs stay cached between wakes (default 256). */
  logCacheSessions?: number;
  /** Backoff before retry n is `retryBaseDelayMs * 2^(n-1)` (default 500). */
  retryBaseDelayMs?: number;
  /**
   * Where a wake gets the writer token it appends with. By default the store's, taken once and
   * kept per process; in a cluster, the token of the session's lease (so taking a lease never
   * fences this node's own wakes), and it fails with `stale_writer` when another node holds it.
   */
  writers?: {
    acquire(session: SessionKey): Promise<WriterToken>;
    /** An append found `token` stale: another writer took the session. */
    lost(session: SessionKey, token: WriterToken): void;
  };
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
 * The stateless agent loop. `wake(session)` reads the log, decides the next step with
 * `decideNextStep`, performs it, appends the outcome, and repeats until nothing is left to
 * do. Everything it needs comes from the log and the pinned agent version, so any process
 * can finish a turn another one started.
 */
export function createHarness(dependencies: HarnessDependencies) {
  const { store, models, deltas, metering } = dependencies;
  const maxRetries = dependencies.maxModelRetries ?? 3;
  const retryBaseDelayMs = dependencies.retryBaseDelayMs ?? 500;

  // Writer tokens this process holds, so a wake does not pay a commit to re-acquire one.
  // A stale token (another writer took over) is dropped and the wake fails.
  const writers = new Map<string, WriterToken>();
  async function writerFor(key: SessionKey): Promise<WriterToken> {
    if (dependencies.writers) return dependencies.writers.acquire(key);
    let writer = writers.get(sessionKeyString(key));
    if (!writer) {
      writer = await store.events.acquireWriter(key);
      writers.set(sessionKeyString(key), writer);
    }
    return writer;
  }
  function writerLost(key: SessionKey, writer: WriterToken): void {
    if (writers.get(sessionKeyString(key)) === writer) writers.delete(sessionKeyString(key));
    dependencies.writers?.lost(key, writer);
  }

  // Recently woken sessions: their record (the pinned agent never changes) and their log.
  // Events are immutable and seq is gapless, so a cached prefix plus the tail read from the
  // store is exactly the log: a wake reads only what is new.
  const cache = new Map<string, { session: SessionRecord; log: StoredEvent[] }>();
  const cacheSize = dependencies.logCacheSessions ?? 256;
  async function load(key: SessionKey) {
    let entry = cache.get(sessionKeyString(key));
    if (!entry) {
      const session = await store.resources.getSession(key.tenantId, key.id);
      if (!session) return undefined;
      entry = { session, log: [] };
    }
    // Always read the tail, even after `observe`: the wake subscribed to interrupts just
    // before, so this read sees any that were committed before the subscription.
    const afterSeq = entry.log.length > 0 ? entry.log[entry.log.length - 1]!.seq : 0;
    const tail = await store.events.read(key, { afterSeq, limit: Number.MAX_SAFE_INTEGER });
    if (tail.length > 0) entry = { session: entry.session, log: entry.log.concat(tail) };
    remember(entry.session, entry.log);
    return entry;
  }

  /**
   * Tells the harness about a session and the events this process just committed to it
   * (client input), so the wake they cause need not look the session up or read those events
   * back. The events are used only when they directly follow the cached log.
   */
  function observe(session: SessionRecord, committed: readonly StoredEvent[]): void {
    const key = sessionKeyString(session);
    // The API's record is fresh: it replaces the cached one (a budget or title may have changed;
    // the pinned agent never does).
    const entry = { session, log: cache.get(key)?.log ?? [] };
    const lastSeq = entry.log.length > 0 ? entry.log[entry.log.length - 1]!.seq : 0;
    if (committed.length > 0 && committed[0]!.seq === lastSeq + 1) {
      remember(entry.session, entry.log.concat(committed));
    } else {
      remember(session, entry.log);
    }
  }
  function remember(session: SessionRecord, log: StoredEvent[]): void {
    const key = sessionKeyString(session);
    cache.delete(key);
    cache.set(key, { session, log });
    if (cache.size > cacheSize) cache.delete(cache.keys().next().value!);
  }

  async function wake(key: SessionKey, control: WakeControl): Promise<void> {
    // Interrupts come from the log: a committed `user.interrupt` aborts the step in flight.
    // Subscribing before the first read means none can slip in between.
    let step = new AbortController();
    let newestInterrupt = 0;
    /** The head of the log the current step was decided on: older interrupts are in it already. */
    let decidedHead = 0;
    const unsubscribe = store.events.subscribe(key, (events) => {
      for (const stored of events) {
        // Across nodes a subscription may also hear events from just before it began.
        if (stored.event.type !== 'user.interrupt' || stored.seq <= decidedHead) continue;
        newestInterrupt = Math.max(newestInterrupt, stored.seq);
        step.abort(new Error('interrupted by the user'));
      }
    });
    const onShutdown = () => step.abort(new Error('shutting down'));
    control.shutdown.addEventListener('abort', onShutdown);
    /** A signal for the next step; already aborted if input it must not ignore has arrived. */
    const stepSignal = (log: readonly StoredEvent[]) => {
      step = new AbortController();
      decidedHead = headOf(log);
      if (control.shutdown.aborted || newestInterrupt > headOf(log)) step.abort(new Error('interrupted'));
      return step.signal;
    };
    try {
      await runWake(key, control, stepSignal);
    } catch (error) {
      // Whatever the wake appended before failing is not in the cache: start over from the store.
      cache.delete(sessionKeyString(key));
      throw error;
    } finally {
      unsubscribe();
      control.shutdown.removeEventListener('abort', onShutdown);
    }
  }

  async function runWake(
    key: SessionKey,
    control: WakeControl,
    stepSignal: (log: readonly StoredEvent[]) => AbortSignal,
  ): Promise<void> {
    // The token first, then the log: nobody can append a step after the token is taken, so the
    // log read next is complete. (Read the other way round, a writer fenced just after the read
    // could have appended a tool result this wake never sees, and the tool would run twice.)
    let writer: WriterToken;
    try {
      writer = await writerFor(key);
    } catch (error) {
      // A session deleted meanwhile has nothing left to do.
      if (isBerthError(error, 'not_found')) return;
      throw error;
    }
    const loaded = await load(key);
    if (!loaded) return;
    const { session } = loaded;
    const sessionId = session.id;
    const append = async (events: NewEvent[], expectedHeadSeq?: number) => {
      try {
        return (await store.events.append(session, events, { writer, expectedHeadSeq })).events;
      } catch (error) {
        if (isBerthError(error, 'stale_writer')) writerLost(session, writer);
        throw error;
      }
    };
    // Ending a turn is conditional on the log not having grown since the decision: input that
    // arrived meanwhile (a message, a tool result) is never left behind an idle.
    const appendIfUnchanged = async (events: NewEvent[], log: readonly StoredEvent[]) => {
      // Every idle carries a usage snapshot, committed with it.
      const idleAt = events.findIndex((event) => event.type === 'session.status_idle');
      const measured = idleAt >= 0 && metering ? await metering.measureSandbox(session) : undefined;
      let batch = events;
      if (measured && metering) {
        const usage = usageFromLog(session, log, Date.now(), measured);
        usage.events += events.length + 1;
        const snapshot = usageEvent(session, usage, costOf(usage, metering.book), metering.book);
        batch = [...events.slice(0, idleAt), snapshot, ...events.slice(idleAt)];
      }
      try {
        const appended = await append(batch, headOf(log));
        measured?.commit();
        return appended;
      } catch (error) {
        if (isBerthError(error, 'head_moved')) return [];
        throw error;
      }
    };
    /** True when the next model call would take the session past its budget (see `metering`). */
    const overBudget = (log: readonly StoredEvent[]): boolean => {
      const max = budgetOf(session);
      if (max === undefined || !metering) return false;
      const usage = usageFromLog(session, log, Date.now());
      const spent = costOf(usage, metering.book);
      // A model without a list price cannot be measured against a budget: the session stops
      // rather than spend without a limit (a budget is refused for such a model up front, but
      // the budget book may change under a running session).
      if (spent.total === null) return true;
      // The next prompt holds at least the last one's input: that much is certain to be spent.
      const lastEnd = log.findLast((stored) => stored.event.type === 'span.model_request_end');
      const lastInput =
        (lastEnd?.event.model_usage as { input_tokens?: number } | undefined)?.input_tokens ?? 0;
      const floor = costOf(
        {
          ...emptyUsage(),
          tokens: { [modelOfSession(session)]: { input: lastInput, output: 0, cacheRead: 0, cacheWrite: 0 } },
        },
        metering.book,
      ).total;
      // Before its first call a session has spent no tokens yet: its model is probed here.
      if (floor === null) return true;
      return spent.total + floor >= max;
    };
    const agent = session.body.agent as PinnedAgent;
    const toolbox = dependencies.toolboxFor(session);
    // Tool uses this wake wrote itself; any other open tool use was left by a dead process.
    const startedHere = new Set<string>();
    const model = (log: readonly StoredEvent[], leading: NewEvent[] = []) =>
      callModel({
        session,
        agent,
        toolbox,
        log,
        append,
        signal: stepSignal(log),
        control,
        startedHere,
        leading,
      });

    let log = loaded.log;
    while (!control.shutdown.aborted) {
      const next = decideNextStep(log);
      let appended: StoredEvent[] = [];
      switch (next.kind) {
        case 'none':
          return;
        case 'start_turn': {
          const running: NewEvent = { type: 'session.status_running' };
          const then = decideNextStep([
            ...log,
            { sessionId, seq: headOf(log) + 1, event: { ...running, id: '', processed_at: '' } },
          ]);
          if (then.kind === 'call_model') {
            if (overBudget(log)) {
              appended = await appendIfUnchanged([running, idleEvent({ type: 'budget_reached' })], log);
              break;
            }
            // The usual case: one commit for the status and the model request start.
            appended = await model(log, [running]);
            break;
          }
          // Resuming confirmed tool uses: this wake starts the turn, so it is the first to run them.
          appended = await append([running]);
          for (const toolUse of openRuntimeToolUses(log)) startedHere.add(toolUse.event.id);
          break;
        }
        case 'deny_tool':
          appended = await append([
            resultEvent(next.toolUse, {
              content: `The user denied this tool call${next.message ? `: ${next.message}` : '.'}`,
              isError: true,
            }),
          ]);
          break;
        case 'end_turn':
          appended = await appendIfUnchanged([idleEvent({ type: 'end_turn' })], log);
          break;
        case 'await_client':
          appended = await appendIfUnchanged(
            [idleEvent({ type: 'requires_action', event_ids: next.eventIds })],
            log,
          );
          break;
        case 'give_up':
          appended = await appendIfUnchanged([idleEvent({ type: 'retries_exhausted' })], log);
          break;
        case 'interrupted':
          appended = await appendIfUnchanged(
            [
              ...next.openToolUses.map((toolUse) =>
                resultEvent(toolUse, {
                  content: 'Interrupted by the user before this tool finished.',
                  isError: true,
                }),
              ),
              idleEvent({ type: 'end_turn' }),
              // Input after the interrupt redirects the agent: the next turn starts at once.
              ...(next.restart ? [{ type: 'session.status_running' }] : []),
            ],
            log,
          );
          break;
        case 'run_tools': {
          const toolUse = next.toolUses[0]!;
          const outcome = await runTool(toolbox, toolUse, startedHere.has(toolUse.event.id), stepSignal(log));
          // On shutdown the tool was killed: leave it open for the crash rule of the next wake.
          if (control.shutdown.aborted) return;
          appended = await append([resultEvent(toolUse, outcome)]);
          break;
        }
        case 'call_model':
          if (next.failures >= maxRetries) {
            appended = await appendIfUnchanged(
              [
                {
                  type: 'session.error',
                  error: {
                    type: 'model_request_failed_error',
                    message: `The model request failed ${next.failures} times in a row; giving up on this turn.`,
                    retry_status: { type: 'exhausted' },
                  },
                },
                idleEvent({ type: 'retries_exhausted' }),
              ],
              log,
            );
            break;
          }
          if (overBudget(log)) {
            appended = await appendIfUnchanged([idleEvent({ type: 'budget_reached' })], log);
            break;
          }
          if (next.failures > 0) await sleep(retryBaseDelayMs * 2 ** (next.failures - 1), stepSignal(log));
          appended = await model(log);
          break;
      }
      // Re-read the tail rather than trusting `appended`: client events (an interrupt, a
      // custom tool result) may have landed in between.
      const tail = await store.events.read(session, {
        afterSeq: headOf(log),
        limit: Number.MAX_SAFE_INTEGER,
      });
      if (tail.length === 0 && appended.length === 0) return;
      log = log.concat(tail);
      remember(session, log);
    }
  }

  async function runTool(
    toolbox: SessionToolbox,
    toolUse: StoredEvent,
    startedHere: boolean,
    signal: AbortSignal,
  ): Promise<ToolOutcome> {
    const name = modelToolName(toolUse.event);
    try {
      const tool = (await toolbox.listTools()).find((candidate) => candidate.name === name);
      if (!tool) return { content: `Unknown tool "${name}".`, isError: true };
      if (!startedHere && !tool.readOnly) return { content: RESTART_NOTICE, isError: true };
      return await toolbox.execute(name, toolUse.event.input, { signal, toolUseId: toolUse.event.id });
    } catch (error) {
      // A sandbox that died is a tool error, never a dead session.
      const message = error instanceof Error ? error.message : String(error);
      return { content: `The tool failed: ${message}`, isError: true };
    }
  }

  async function callModel(request: {
    session: SessionRecord;
    agent: PinnedAgent;
    toolbox: SessionToolbox;
    log: readonly StoredEvent[];
    append: (events: NewEvent[]) => Promise<StoredEvent[]>;
    signal: AbortSignal;
    control: WakeControl;
    startedHere: Set<string>;
    leading: NewEvent[];
  }): Promise<StoredEvent[]> {
    const { session, agent, toolbox, log, append, control, startedHere } = request;
    const startId = newId('sevt');
    // The request starts while its start event commits: the model is not kept waiting on an
    // fsync. Should the process die before that commit, the log shows no request and the
    // next wake makes it again, exactly as if it had died a moment earlier.
    const startCommitted = append([...request.leading, { id: startId, type: 'span.model_request_start' }]);
    const cancel = new AbortController();
    const signal = AbortSignal.any([request.signal, cancel.signal]);
    let start: StoredEvent[] = [];
    const messageId = newId('sevt');
    try {
      const model = models.resolve(agent.model.id, { session });
      // Built-in tools always go along; many custom or MCP tools are narrowed by tool search.
      const available = await toolbox.listTools();
      const builtin = available.filter((tool) => tool.kind === 'builtin');
      const others = available.filter((tool) => tool.kind !== 'builtin');
      const offered =
        available.length > TOOL_SELECTION_THRESHOLD ? [...builtin, ...selectTools(others, log)] : available;
      const tools: LanguageModelV3FunctionTool[] = offered.map((tool) => ({
        type: 'function',
        name: tool.name,
        description: tool.description,
        inputSchema: tool.inputSchema,
      }));
      const extra = await toolbox.instructions?.();
      const system = [agent.system, extra].filter(
        (part) => part !== null && part !== undefined && part !== '',
      );
      const call = model.doStream({
        prompt: buildPrompt(system.length > 0 ? system.join('\n\n') : null, log),
        tools,
        abortSignal: signal,
      });
      call.then(undefined, () => undefined); // Awaited below; never an unhandled rejection.
      try {
        start = await startCommitted;
      } catch (error) {
        cancel.abort(error);
        throw error;
      }
      const { stream } = await call;
      const response = await collect(stream, session, messageId, signal);
      const events: NewEvent[] = [];
      const reported = new Set(
        log
          .filter((stored) => stored.event.type === 'session.error')
          .map((stored) => (stored.event.error as { mcp_server_name?: string } | undefined)?.mcp_server_name),
      );
      for (const failure of toolbox.failures?.() ?? []) {
        if (reported.has(failure.serverName)) continue;
        events.push({
          type: 'session.error',
          error: {
            type: 'mcp_connection_failed_error',
            mcp_server_name: failure.serverName,
            message: failure.message,
            retry_status: { type: 'terminal' },
          },
        });
      }
      if (response.reasoning) events.push({ type: 'agent.thinking' });
      if (response.text) {
        events.push({
          id: messageId,
          type: 'agent.message',
          content: [{ type: 'text', text: response.text }],
        });
      }
      for (const toolCall of response.toolCalls) {
        const id = newId('sevt');
        const tool = available.find((candidate) => candidate.name === toolCall.toolName);
        if (tool?.kind === 'custom') {
          events.push({ id, type: 'agent.custom_tool_use', name: toolCall.toolName, input: toolCall.input });
        } else if (tool?.kind === 'mcp') {
          const ask = tool.permission === 'ask';
          events.push({
            id,
            type: 'agent.mcp_tool_use',
            name: tool.mcp!.toolName,
            mcp_server_name: tool.mcp!.serverName,
            input: toolCall.input,
            evaluated_permission: ask ? 'ask' : 'allow',
            evaluation: { type: ask ? 'always_ask' : 'always_allow' },
          });
        } else {
          const ask = tool?.permission === 'ask';
          events.push({
            id,
            type: 'agent.tool_use',
            name: toolCall.toolName,
            input: toolCall.input,
            evaluated_permission: ask ? 'ask' : 'allow',
            evaluation: { type: ask ? 'always_ask' : 'always_allow' },
          });
        }
        startedHere.add(id);
      }
      events.push({
        type: 'span.model_request_end',
        model_request_start_id: startId,
        is_error: false,
        model_usage: usageOf(response.usage),
      });
      return [...start, ...(await append(events))];
    } catch (error) {
      if (start.length === 0) start = await startCommitted;
      if (isBerthError(error, 'stale_writer')) throw error;
      // On shutdown the request stays open in the log; the next wake makes it again.
      if (control.shutdown.aborted) return start;
      const interrupted = request.signal.aborted;
      const terminal = isBerthError(error, 'invalid_request');
      const events: NewEvent[] = [];
      if (!interrupted) {
        events.push({
          type: 'session.error',
          error: {
            type: 'model_request_failed_error',
            message: error instanceof Error ? error.message : String(error),
            retry_status: { type: terminal ? 'terminal' : 'retrying' },
          },
        });
      }
      events.push({
        type: 'span.model_request_end',
        model_request_start_id: startId,
        is_error: true,
        model_usage: usageOf(undefined),
      });
      // A configuration problem (unknown model, missing key) will not fix itself by retrying:
      // the `terminal` error makes the next decision `give_up`.
      return [...start, ...(await append(events))];
    }
  }

  async function collect(
    stream: ReadableStream<LanguageModelV3StreamPart>,
    session: SessionKey,
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
              deltas.publish(session, {
                type: 'event_start',
                event: { id: messageId, type: 'agent.message' },
              });
            }
            text += part.delta;
            deltas.publish(session, {
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
  // A custom tool use is answered by the event the SDK pairs with it, even when the runtime
  // closes it (an interrupt cancelled the wait for the client's result).
  if (toolUse.event.type === 'agent.custom_tool_use') {
    return {
      type: 'user.custom_tool_result',
      custom_tool_use_id: toolUse.event.id,
      content: [{ type: 'text', text: outcome.content }],
      is_error: outcome.isError,
    };
  }
  if (toolUse.event.type === 'agent.mcp_tool_use') {
    return {
      type: 'agent.mcp_tool_result',
      mcp_tool_use_id: toolUse.event.id,
      content: [{ type: 'text', text: outcome.content }],
      is_error: outcome.isError,
    };
  }
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
    if (signal.aborted) return resolve();
    const done = () => {
      clearTimeout(timer);
      signal.removeEventListener('abort', done);
      resolve();
    };
    const timer = setTimeout(done, milliseconds);
    signal.addEventListener('abort', done);
  });
}

/** The seq of the newest event of a log, 0 for an empty one. */
function headOf(log: readonly StoredEvent[]): number {
  return log.length > 0 ? log[log.length - 1]!.seq : 0;
}
