import type { StoredEvent } from '../store/event-store.js';

/**
 * What the harness should do next, derived only from the log. The harness is stateless:
 * after a crash, a new wake reads the same log and reaches the same decision.
 */
export type NextStep =
  /** Nothing to do: the session is idle (or terminated) with no unprocessed input. */
  | { kind: 'none' }
  /** A turn must start: mark the session running. */
  | { kind: 'start_turn' }
  /** Built-in tool uses have no result yet (run the first; the rest follow in order). */
  | { kind: 'run_tools'; toolUses: StoredEvent[] }
  /** The client denied an `always_ask` tool use: its result is the denial, the tool never runs. */
  | { kind: 'deny_tool'; toolUse: StoredEvent; message: string | null }
  /**
   * Custom tool results or `always_ask` confirmations are awaited from the client (also after
   * an answer to only some of them: the idle is re-emitted with the rest).
   */
  | { kind: 'await_client'; eventIds: string[] }
  /** The model must be called with the log so far; `failures` counts failed calls in a row. */
  | { kind: 'call_model'; failures: number }
  /** The model finished its turn; the session goes idle. */
  | { kind: 'end_turn' }
  /**
   * An interrupt arrived: close every open tool use and go idle. `restart` is true when new
   * input came after the interrupt: the next turn starts at once (redirecting the agent).
   */
  | { kind: 'interrupted'; openToolUses: StoredEvent[]; restart: boolean }
  /** The model failed in a way retrying cannot fix (a configuration problem): go idle. */
  | { kind: 'give_up' };

const toolUseTypes = new Set(['agent.tool_use', 'agent.custom_tool_use', 'agent.mcp_tool_use']);

/** The event id a result answers, for each result type. */
function answeredToolUseId(stored: StoredEvent): string | undefined {
  const event = stored.event;
  switch (event.type) {
    case 'agent.tool_result':
      return event.tool_use_id as string;
    case 'agent.mcp_tool_result':
      return event.mcp_tool_use_id as string;
    case 'user.custom_tool_result':
      return event.custom_tool_use_id as string;
    default:
      return undefined;
  }
}

/** The client's answer to an `always_ask` tool use, by tool use id. */
function confirmationsOf(
  log: readonly StoredEvent[],
): Map<string, { allow: boolean; denyMessage: string | null }> {
  const confirmations = new Map<string, { allow: boolean; denyMessage: string | null }>();
  for (const { event } of log) {
    if (event.type !== 'user.tool_confirmation') continue;
    const id = event.tool_use_id as string;
    if (!confirmations.has(id)) {
      confirmations.set(id, {
        allow: event.result === 'allow',
        denyMessage: (event.deny_message as string | null) ?? null,
      });
    }
  }
  return confirmations;
}

/**
 * What the client still owes the session: custom tool uses without a result, and
 * `always_ask` tool uses without a confirmation (and without a result).
 */
export function pendingClientActions(log: readonly StoredEvent[]): StoredEvent[] {
  const answered = answeredIds(log);
  const confirmations = confirmationsOf(log);
  return log.filter(
    (stored) =>
      !answered.has(stored.event.id) &&
      (stored.event.type === 'agent.custom_tool_use' ||
        ((stored.event.type === 'agent.tool_use' || stored.event.type === 'agent.mcp_tool_use') &&
          stored.event.evaluated_permission === 'ask' &&
          !confirmations.has(stored.event.id))),
  );
}

/** Tool uses the runtime runs (built-in and MCP) that have no result yet. */
export function openRuntimeToolUses(log: readonly StoredEvent[]): StoredEvent[] {
  const answered = answeredIds(log);
  return log.filter(
    (stored) =>
      (stored.event.type === 'agent.tool_use' || stored.event.type === 'agent.mcp_tool_use') &&
      !answered.has(stored.event.id),
  );
}

function answeredIds(log: readonly StoredEvent[]): Set<string> {
  const answered = new Set<string>();
  for (const stored of log) {
    const id = answeredToolUseId(stored);
    if (id !== undefined) answered.add(id);
  }
  return answered;
}

const inputTypes = new Set(['user.message', 'user.custom_tool_result', 'user.tool_confirmation']);
const resultTypes = new Set(['agent.tool_result', 'agent.mcp_tool_result', 'user.custom_tool_result']);

/**
 * Decides the next step from the session's log. Rules, in order:
 * - a turn opens with the first input (`user.message`, `user.custom_tool_result`,
 *   `user.tool_confirmation`) after the newest `session.status_idle` and lasts until the next
 *   idle; while the client still owes results or confirmations, no turn starts;
 * - an interrupt after that first input ends the turn (before or after it started running);
 *   while idle and waiting on the client, an interrupt cancels the wait;
 * - tool uses without results are run in order (`always_ask` ones once allowed; a denied one
 *   gets the denial as its result), or awaited (custom tools, unconfirmed `always_ask`);
 * - a model request that started but never ended is retried, and so is one that failed;
 * - input that arrived after the newest model request started (a message sent while the
 *   model was writing, tool results) needs another model call;
 * - otherwise, after a model response with no tool uses, the turn ends.
 */
export function decideNextStep(log: readonly StoredEvent[]): NextStep {
  let lastIdle = -1;
  for (let index = log.length - 1; index >= 0; index--) {
    const type = log[index]!.event.type;
    if (type === 'session.status_terminated') return { kind: 'none' };
    if (type === 'session.status_idle') {
      lastIdle = index;
      break;
    }
  }
  const sinceIdle = log.slice(lastIdle + 1);
  const answered = answeredIds(log);
  const confirmations = confirmationsOf(log);
  const firstInput = sinceIdle.findIndex((stored) => inputTypes.has(stored.event.type));
  let lastInterrupt = -1;
  for (let index = sinceIdle.length - 1; index >= 0; index--) {
    if (sinceIdle[index]!.event.type === 'user.interrupt') {
      lastInterrupt = index;
      break;
    }
  }
  const running = sinceIdle.some((stored) => stored.event.type === 'session.status_running');
  const waiting = pendingClientActions(log);
  // Open tool uses of the whole log: those of a turn paused for the client came before its idle.
  const open = log.filter((stored) => toolUseTypes.has(stored.event.type) && !answered.has(stored.event.id));
  // An interrupt counts once the turn has input before it (or while the client is awaited).
  const firstRunning = sinceIdle.findIndex((stored) => stored.event.type === 'session.status_running');
  const turnOpened = [firstInput, firstRunning].filter((index) => index >= 0);
  const interrupted =
    lastInterrupt >= 0 &&
    ((turnOpened.length > 0 && Math.min(...turnOpened) < lastInterrupt) || waiting.length > 0);
  if (interrupted) {
    const restart = sinceIdle.slice(lastInterrupt + 1).some((stored) => stored.event.type === 'user.message');
    return { kind: 'interrupted', openToolUses: open, restart };
  }

  if (!running) {
    if (firstInput < 0) return { kind: 'none' };
    // A turn waiting on several client answers starts only when all have arrived; an answer
    // to some of them re-emits the idle with the rest (the SDK's requires_action contract).
    if (waiting.length > 0)
      return { kind: 'await_client', eventIds: waiting.map((stored) => stored.event.id) };
    return { kind: 'start_turn' };
  }

  // Tools the runtime runs itself: built-in (sandbox) and MCP.
  const openBuiltin = open.filter(
    (stored) => stored.event.type === 'agent.tool_use' || stored.event.type === 'agent.mcp_tool_use',
  );
  const first = openBuiltin[0];
  if (first && (first.event.evaluated_permission !== 'ask' || confirmations.has(first.event.id))) {
    const confirmation = confirmations.get(first.event.id);
    if (confirmation && !confirmation.allow) {
      return { kind: 'deny_tool', toolUse: first, message: confirmation.denyMessage };
    }
    return { kind: 'run_tools', toolUses: openBuiltin };
  }
  if (waiting.length > 0) return { kind: 'await_client', eventIds: waiting.map((stored) => stored.event.id) };

  // The newest model request, and whether it ended.
  let lastStart = -1;
  let lastEnd = -1;
  for (let index = sinceIdle.length - 1; index >= 0; index--) {
    const type = sinceIdle[index]!.event.type;
    if (type === 'span.model_request_end' && lastEnd < 0) lastEnd = index;
    if (type === 'span.model_request_start') {
      lastStart = index;
      break;
    }
  }
  let failures = 0;
  for (let index = sinceIdle.length - 1; index >= 0; index--) {
    const event = sinceIdle[index]!.event;
    if (event.type !== 'span.model_request_end') continue;
    if (event.is_error !== true) break;
    failures++;
  }
  if (lastStart < 0 || lastEnd < lastStart) return { kind: 'call_model', failures };
  const afterStart = sinceIdle.slice(lastStart + 1);
  const unseenInput = afterStart.some(
    (stored) => inputTypes.has(stored.event.type) || resultTypes.has(stored.event.type),
  );
  if (unseenInput) return { kind: 'call_model', failures: 0 };
  // Only a model failure ends the turn; other errors (an MCP server down) are reported and the
  // turn goes on without those tools.
  const terminal = afterStart.some((stored) => {
    const error = stored.event.error as { type?: string; retry_status?: { type?: string } } | undefined;
    return (
      stored.event.type === 'session.error' &&
      error?.type === 'model_request_failed_error' &&
      error.retry_status?.type === 'terminal'
    );
  });
  if (terminal) return { kind: 'give_up' };
  if (sinceIdle[lastEnd]!.event.is_error === true) return { kind: 'call_model', failures };
  return { kind: 'end_turn' };
}
