/**
 * What a session used, measured (never estimated): the unit every price book is applied to.
 * Written to the log as `session.usage` events (cumulative totals at the time of the event) and
 * shown as the session's `usage`.
 */
export interface UsageTotals {
  /** Seconds the session spent running (a turn in flight). */
  activeSeconds: number;
  /** Seconds the session existed and was not running (idle, waiting on the client). */
  idleSeconds: number;
  /** CPU time the session's sandbox consumed, from its cgroup or driver stats. */
  sandboxCpuSeconds: number;
  /** Integral of the sandbox's memory use over time, in GB × seconds. */
  sandboxMemoryGbSeconds: number;
  /** Tokens per model id (`provider/model`). */
  tokens: Record<string, TokenCounts>;
  /** Bytes through the egress proxy (both directions). */
  egressBytes: number;
  /** Events in the session's log. */
  events: number;
}

/** Tokens of one model, as the provider reported them. */
export interface TokenCounts {
  input: number;
  output: number;
  cacheRead: number;
  cacheWrite: number;
}

/** One session's usage with what it is grouped by in reports. */
export interface UsageRecord extends UsageTotals {
  sessionId: string;
  tenantId: string;
  agentId: string;
  /** UTC day the session was created on (`YYYY-MM-DD`). */
  day: string;
}

/** Usage of nothing yet. */
export function emptyUsage(): UsageTotals {
  return {
    activeSeconds: 0,
    idleSeconds: 0,
    sandboxCpuSeconds: 0,
    sandboxMemoryGbSeconds: 0,
    tokens: {},
    egressBytes: 0,
    events: 0,
  };
}
