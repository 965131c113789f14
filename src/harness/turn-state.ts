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
  /** Built-in tool uses have no result yet (run them in order). */
  | { kind: 'run_tools'; toolUses: StoredEvent[] }
  /** Custom tool uses wait for the client's results. */
  | { kind: 'await_client'; eventIds: string[] }
  /** The model must be called with the log so far; `failures` counts failed calls in a row. */
  | { kind: 'call_model'; failures: number }
  /** The model finished its turn; the session goes idle. */
  | { kind: 'end_turn' }
  /** An interrupt arrived: close open tool uses (or cancelled custom ones) and go idle. */
  | { kind: 'interrupted'; openToolUses: StoredEvent[] };

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

/** Custom tool uses in the log that no result (client result or closing error) answers yet. */
export function pendingCustomToolUses(log: readonly StoredEvent[]): StoredEvent[] {
  const answered = answeredIds(log);
  return log.filter(
    (stored) => stored.event.type === 'agent.custom_tool_use' && !answered.has(stored.event.id),
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

const inputTypes = new Set(['user.message', 'user.custom_tool_result']);
const resultTypes = new Set(['agent.tool_result', 'agent.mcp_tool_result', 'user.custom_tool_result']);

/**
 * Decides the next step from the session's log. Rules, in order:
 * - a turn opens with the first input (`user.message`, `user.custom_tool_result`) after the
 *   newest `session.status_idle` and lasts until the next idle;
 * - an interrupt after that first input ends the turn (before or after it started running);
 *   while idle and waiting on custom tool results, an interrupt cancels the wait;
 * - tool uses without results are run (built-in) or awaited (custom);
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
  const firstInput = sinceIdle.findIndex((stored) => inputTypes.has(stored.event.type));
  const interrupted =
    firstInput >= 0 && sinceIdle.slice(firstInput).some((stored) => stored.event.type === 'user.interrupt');
  const running = sinceIdle.some((stored) => stored.event.type === 'session.status_running');

  if (!running) {
    const waiting = log.filter(
      (stored) => stored.event.type === 'agent.custom_tool_use' && !answered.has(stored.event.id),
    );
    if (waiting.length > 0) {
      // A turn waiting on several custom tool results starts only when all have arrived.
      const cancelled = sinceIdle.some((stored) => stored.event.type === 'user.interrupt');
      return cancelled ? { kind: 'interrupted', openToolUses: waiting } : { kind: 'none' };
    }
    if (firstInput < 0) return { kind: 'none' };
    return interrupted ? { kind: 'interrupted', openToolUses: [] } : { kind: 'start_turn' };
  }

  const open = sinceIdle.filter(
    (stored) => toolUseTypes.has(stored.event.type) && !answered.has(stored.event.id),
  );
  if (interrupted) return { kind: 'interrupted', openToolUses: open };

  const openBuiltin = open.filter((stored) => stored.event.type === 'agent.tool_use');
  if (openBuiltin.length > 0) return { kind: 'run_tools', toolUses: openBuiltin };
  const openCustom = open.filter((stored) => stored.event.type === 'agent.custom_tool_use');
  if (openCustom.length > 0)
    return { kind: 'await_client', eventIds: openCustom.map((stored) => stored.event.id) };

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
  const unseenInput = sinceIdle
    .slice(lastStart + 1)
    .some((stored) => inputTypes.has(stored.event.type) || resultTypes.has(stored.event.type));
  if (unseenInput) return { kind: 'call_model', failures: 0 };
  if (sinceIdle[lastEnd]!.event.is_error === true) return { kind: 'call_model', failures };
  return { kind: 'end_turn' };
}
