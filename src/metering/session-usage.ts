import { canonicalModelId } from '../models/provider-registry.js';
import type { NewEvent, StoredEvent } from '../store/event-store.js';
import type { SessionRecord } from '../store/resource-store.js';
import type { CostBreakdown, PriceBook } from './price-books.js';
import { emptyUsage, type UsageTotals } from './usage.js';

/** Sandbox work measured since the last snapshot (from the sandbox's cgroup). */
export interface SandboxUsageDelta {
  cpuSeconds: number;
  memoryGbSeconds: number;
}

/** The model a session's pinned agent uses (`provider/model`, also for a bare `claude-*` id). */
export function modelOfSession(session: SessionRecord): string {
  const model = (session.body.agent as { model?: string | { id?: string } } | undefined)?.model;
  const id = typeof model === 'string' ? model : model?.id;
  return id === undefined ? 'unknown' : canonicalModelId(id);
}

/**
 * A session's usage, read from its log (the truth): active seconds from its status changes,
 * idle seconds as the rest of its life, tokens of the session's model (listed even at zero)
 * from `span.model_request_end` as the provider reported them, egress bytes from
 * `berth.egress_request` audits (sent and received), events by count. Sandbox CPU and memory
 * come from the newest `session.usage` snapshot plus what was measured since (`sandboxSince`).
 */
export function usageFromLog(
  session: SessionRecord,
  log: readonly StoredEvent[],
  now: number,
  sandboxSince: SandboxUsageDelta = { cpuSeconds: 0, memoryGbSeconds: 0 },
): UsageTotals {
  const usage = emptyUsage();
  const model = modelOfSession(session);
  // The session's model is listed from the start, so a book that cannot price it reports the
  // session as unpriced even before its first model call, rather than as free.
  usage.tokens[model] = { input: 0, output: 0, cacheRead: 0, cacheWrite: 0 };
  let runningSince: number | undefined;
  let activeMilliseconds = 0;
  let endedAt: number | undefined;
  let snapshot: SessionUsageBerth | undefined;
  for (const { event } of log) {
    const at = Date.parse(event.processed_at);
    switch (event.type) {
      case 'session.status_running':
        runningSince ??= at;
        break;
      case 'session.status_idle':
      case 'session.status_rescheduled':
      case 'session.status_terminated':
        if (runningSince !== undefined) activeMilliseconds += at - runningSince;
        runningSince = undefined;
        if (event.type === 'session.status_terminated') endedAt = at;
        break;
      case 'span.model_request_end': {
        const reported = event.model_usage as Partial<Record<string, number>> | undefined;
        const cacheRead = reported?.cache_read_input_tokens ?? 0;
        const cacheWrite = reported?.cache_creation_input_tokens ?? 0;
        const counts = usage.tokens[model]!;
        // Providers report input including cache reads and writes; price books bill them apart.
        counts.input += Math.max(0, (reported?.input_tokens ?? 0) - cacheRead - cacheWrite);
        counts.output += reported?.output_tokens ?? 0;
        counts.cacheRead += cacheRead;
        counts.cacheWrite += cacheWrite;
        break;
      }
      case 'session.usage':
        snapshot = (event.berth as SessionUsageBerth | undefined) ?? snapshot;
        break;
      case 'berth.egress_request':
        // Every request and tunnel of the sandbox's proxy and of Berth's own fetches, both ways.
        usage.egressBytes += (Number(event.bytes_sent) || 0) + (Number(event.bytes_received) || 0);
        break;
    }
  }
  const end = endedAt ?? now;
  if (runningSince !== undefined) activeMilliseconds += end - runningSince;
  usage.activeSeconds = activeMilliseconds / 1000;
  usage.idleSeconds = Math.max(0, (end - Date.parse(session.createdAt)) / 1000 - usage.activeSeconds);
  usage.sandboxCpuSeconds = (snapshot?.sandbox_cpu_seconds ?? 0) + sandboxSince.cpuSeconds;
  usage.sandboxMemoryGbSeconds = (snapshot?.sandbox_memory_gb_seconds ?? 0) + sandboxSince.memoryGbSeconds;
  usage.events = log.length;
  return usage;
}

/** Berth's part of a `session.usage` event: what the official snapshot has no field for. */
export interface SessionUsageBerth {
  idle_seconds: number;
  sandbox_cpu_seconds: number;
  sandbox_memory_gb_seconds: number;
  egress_bytes: number;
  events: number;
  tokens_by_model: Record<string, { input: number; output: number; cache_read: number; cache_write: number }>;
  /** The price book `list_cost` was computed with. */
  price_book: string;
  /**
   * Models of the session that price book has no price for, sorted. When any is listed the
   * session has no list cost: `list_cost` is absent, not zero.
   */
  unpriced_models: string[];
}

/** USD as the API's monetary amount: minor units (cents) as an integer string. */
function monetaryAmount(usd: number): { amount: string; currency: 'USD' } {
  return { amount: String(Math.round(usd * 100)), currency: 'USD' };
}

/** The budget of a session in USD, or undefined when it has none. */
export function budgetOf(session: SessionRecord): number | undefined {
  const budget = session.body.budget as { max_list_cost?: { amount?: string | number } } | null | undefined;
  const amount = budget?.max_list_cost?.amount;
  if (amount === undefined) return undefined;
  // Minor units: "2500" is $25.00.
  return Number(amount) / 100;
}

/**
 * A `session.usage` event: the official snapshot fields (cumulative tokens, active seconds,
 * list cost under the budget price book, absent when that book cannot price a model of the
 * session) plus Berth's measured extras (with the unpriced models).
 */
export function usageEvent(
  session: SessionRecord,
  usage: UsageTotals,
  cost: CostBreakdown,
  book: PriceBook,
): NewEvent {
  let input = 0;
  let output = 0;
  let cacheRead = 0;
  let cacheWrite = 0;
  const byModel: SessionUsageBerth['tokens_by_model'] = {};
  for (const [model, counts] of Object.entries(usage.tokens)) {
    input += counts.input + counts.cacheRead + counts.cacheWrite;
    output += counts.output;
    cacheRead += counts.cacheRead;
    cacheWrite += counts.cacheWrite;
    byModel[model] = {
      input: counts.input,
      output: counts.output,
      cache_read: counts.cacheRead,
      cache_write: counts.cacheWrite,
    };
  }
  const berth: SessionUsageBerth = {
    idle_seconds: round(usage.idleSeconds),
    sandbox_cpu_seconds: round(usage.sandboxCpuSeconds),
    sandbox_memory_gb_seconds: round(usage.sandboxMemoryGbSeconds),
    egress_bytes: usage.egressBytes,
    events: usage.events,
    tokens_by_model: byModel,
    price_book: book.id,
    unpriced_models: cost.unpricedModels,
  };
  return {
    type: 'session.usage',
    usage: {
      active_seconds: round(usage.activeSeconds),
      input_tokens: input,
      output_tokens: output,
      cache_read_input_tokens: cacheRead,
      cache_creation: { ephemeral_5m_input_tokens: cacheWrite },
      // An unpriced model leaves the cost unknown: no amount at all, never a zero that reads as free.
      ...(cost.total === null ? {} : { list_cost: monetaryAmount(cost.total) }),
    },
    budget: (session.body.budget as unknown) ?? null,
    berth,
  };
}

function round(value: number): number {
  return Math.round(value * 1000) / 1000;
}
