import { invalidRequest } from '../errors.js';
import { type CostBreakdown, costOf, type PriceBook } from './price-books.js';
import { emptyUsage, type TokenCounts, type UsageRecord, type UsageTotals } from './usage.js';

/**
 * Usage reports: sessions' usage summed by tenant, agent, session or day, each group priced
 * under one or more price books side by side. One report renders three ways: a text table for
 * a terminal, CSV for a spreadsheet, and snake_case objects for the API.
 */

/** What a report can group sessions by. */
export const usageGroupKeys = ['tenant', 'agent', 'session', 'day'] as const;

/** One of `usageGroupKeys`. */
export type UsageGroupKey = (typeof usageGroupKeys)[number];

/** The summed usage of the sessions sharing one group value. */
export interface UsageGroup {
  /** The tenant id, agent id, session id or day the sessions share. */
  group: string;
  sessions: number;
  usage: UsageTotals;
}

/** A group with its cost under each book of the report, in the report's book order. */
export interface UsageReportRow extends UsageGroup {
  costs: CostBreakdown[];
}

/** Groups priced under books; `total` covers every record. */
export interface UsageReport {
  by: UsageGroupKey;
  books: { id: string; name: string; description: string }[];
  /** Sorted by group value (days therefore chronologically). */
  rows: UsageReportRow[];
  /** All records together; its `group` is `total`. */
  total: UsageReportRow;
}

/** Two usages added together; token counts are summed per model. Neither input is changed. */
export function addUsage(left: UsageTotals, right: UsageTotals): UsageTotals {
  const tokens: Record<string, TokenCounts> = {};
  for (const source of [left.tokens, right.tokens]) {
    for (const [model, counts] of Object.entries(source)) {
      const sum = tokens[model] ?? { input: 0, output: 0, cacheRead: 0, cacheWrite: 0 };
      tokens[model] = {
        input: sum.input + counts.input,
        output: sum.output + counts.output,
        cacheRead: sum.cacheRead + counts.cacheRead,
        cacheWrite: sum.cacheWrite + counts.cacheWrite,
      };
    }
  }
  return {
    activeSeconds: left.activeSeconds + right.activeSeconds,
    idleSeconds: left.idleSeconds + right.idleSeconds,
    sandboxCpuSeconds: left.sandboxCpuSeconds + right.sandboxCpuSeconds,
    sandboxMemoryGbSeconds: left.sandboxMemoryGbSeconds + right.sandboxMemoryGbSeconds,
    tokens,
    egressBytes: left.egressBytes + right.egressBytes,
    events: left.events + right.events,
  };
}

/** Sums records per tenant, agent, session or day, sorted by the group value. */
export function groupUsage(records: readonly UsageRecord[], by: UsageGroupKey): UsageGroup[] {
  const groups = new Map<string, UsageGroup>();
  for (const record of records) {
    const group = groupValueOf(record, by);
    const sum = groups.get(group) ?? { group, sessions: 0, usage: emptyUsage() };
    groups.set(group, { group, sessions: sum.sessions + 1, usage: addUsage(sum.usage, record) });
  }
  return [...groups.values()].sort((left, right) => compareText(left.group, right.group));
}

/**
 * Groups records and prices every group and the total under each book. Books are compared by
 * id, so two books with one id (say a custom `anthropic.yaml` beside the preset) are refused.
 */
export function buildUsageReport(
  records: readonly UsageRecord[],
  options: { by: UsageGroupKey; books: readonly PriceBook[] },
): UsageReport {
  const { by, books } = options;
  if (books.length === 0) throw invalidRequest('a usage report needs at least one price book');
  const seen = new Set<string>();
  for (const book of books) {
    if (seen.has(book.id)) {
      throw invalidRequest(`two price books have the id "${book.id}"; rename one of the files`, {
        bookId: book.id,
      });
    }
    seen.add(book.id);
  }
  const price = (group: UsageGroup): UsageReportRow => ({
    ...group,
    costs: books.map((book) => costOf(group.usage, book)),
  });
  const total = records.reduce<UsageTotals>((sum, record) => addUsage(sum, record), emptyUsage());
  return {
    by,
    books: books.map(({ id, name, description }) => ({ id, name, description })),
    rows: groupUsage(records, by).map(price),
    total: price({ group: 'total', sessions: records.length, usage: total }),
  };
}

/**
 * The report as an aligned text table for a terminal: one row per group, a total row, one cost
 * column per book (`unpriced` where the book has no price for a model of the row), then a note
 * for each book that has no price for some model.
 */
export function formatUsageTable(report: UsageReport): string {
  const header = [
    report.by,
    'sessions',
    'active h',
    'idle h',
    'cpu s',
    'GB·s',
    'tokens in',
    'tokens out',
    'events',
    ...report.books.map((book) => book.id),
  ];
  const cells = (row: UsageReportRow): string[] => {
    const tokens = tokenSums(row.usage);
    return [
      row.group,
      formatCount(row.sessions),
      formatDecimal(row.usage.activeSeconds / 3600, 2),
      formatDecimal(row.usage.idleSeconds / 3600, 2),
      formatCount(row.usage.sandboxCpuSeconds),
      formatCount(row.usage.sandboxMemoryGbSeconds),
      formatCount(tokens.in),
      formatCount(tokens.out),
      formatCount(row.usage.events),
      ...row.costs.map((cost) => formatCost(cost.total)),
    ];
  };
  const body = report.rows.map(cells);
  const total = cells(report.total);
  const widths = header.map((title, column) =>
    Math.max(title.length, total[column]!.length, ...body.map((row) => row[column]!.length)),
  );
  // The group column reads left to right; every other column is a number.
  const line = (row: string[]) =>
    row
      .map((cell, column) => (column === 0 ? cell.padEnd(widths[column]!) : cell.padStart(widths[column]!)))
      .join('  ')
      .trimEnd();
  const rule = widths.map((width) => '-'.repeat(width)).join('  ');
  const lines = [line(header), rule, ...body.map(line), rule, line(total), ''];
  lines.push('Costs in USD. tokens in counts input, cache read and cache write tokens.');
  report.books.forEach((book, index) => {
    lines.push(...unpricedNote(book.id, report.total.costs[index]!.unpricedModels));
  });
  return `${lines.join('\n')}\n`;
}

/** A cost cell: dollars, or `unpriced` when the book cannot price the row. */
function formatCost(total: number | null): string {
  return total === null ? 'unpriced' : `$${formatDecimal(total, 4)}`;
}

/** The line under a table naming the models a book has no price for, if any. */
function unpricedNote(bookId: string, models: readonly string[]): string[] {
  if (models.length === 0) return [];
  return [`${bookId}: no price for ${models.join(', ')}; rows with its tokens show "unpriced".`];
}

/**
 * A report the API returned (`UsageReportJson`) as a terminal table, the way `berth usage`
 * shows it without `--store`: one cost column per book, `unpriced` where a book cannot price
 * a row, and the same notes as `formatUsageTable`.
 */
export function formatUsageJsonTable(report: UsageReportJson): string {
  const header = [
    'group',
    'sessions',
    'active h',
    'idle h',
    'cpu s',
    'GB·s',
    'events',
    ...report.books.map((book) => `${book.id} $`),
  ];
  const line = (row: UsageReportRowJson) => [
    row.group,
    String(row.sessions),
    (row.usage.active_seconds / 3600).toFixed(3),
    (row.usage.idle_seconds / 3600).toFixed(3),
    row.usage.sandbox_cpu_seconds.toFixed(1),
    row.usage.sandbox_memory_gb_seconds.toFixed(1),
    String(row.usage.events),
    ...report.books.map((book) => {
      const total = row.costs[book.id]?.total;
      return total === null || total === undefined ? 'unpriced' : total.toFixed(4);
    }),
  ];
  const rows = [header, ...report.rows.map(line), line({ ...report.total, group: 'total' })];
  const widths = header.map((_, column) => Math.max(...rows.map((row) => row[column]!.length)));
  const table = rows.map((row) =>
    row
      .map((cell, column) => (column === 0 ? cell.padEnd(widths[column]!) : cell.padStart(widths[column]!)))
      .join('  '),
  );
  const notes = report.books.flatMap((book) =>
    unpricedNote(book.id, report.total.costs[book.id]?.unpriced_models ?? []),
  );
  return [...table, ...(notes.length > 0 ? ['', ...notes] : [])].join('\n');
}

/**
 * The report as CSV (RFC 4180: CRLF line ends, fields with a comma, quote or line break quoted):
 * a header, then one line per group with raw, unrounded numbers; no total line, a spreadsheet
 * sums. Per book, `<id>_usd` (empty when the book cannot price the row) and
 * `<id>_unpriced_models` (space-separated model ids).
 */
export function formatUsageCsv(report: UsageReport): string {
  const header = [
    report.by,
    'sessions',
    'active_seconds',
    'idle_seconds',
    'sandbox_cpu_seconds',
    'sandbox_memory_gb_seconds',
    'input_tokens',
    'output_tokens',
    'cache_read_tokens',
    'cache_write_tokens',
    'egress_bytes',
    'events',
    ...report.books.flatMap((book) => [`${book.id}_usd`, `${book.id}_unpriced_models`]),
  ];
  const lines = [header];
  for (const row of report.rows) {
    const tokens = tokenSums(row.usage);
    lines.push(
      [
        row.group,
        row.sessions,
        row.usage.activeSeconds,
        row.usage.idleSeconds,
        row.usage.sandboxCpuSeconds,
        row.usage.sandboxMemoryGbSeconds,
        tokens.input,
        tokens.output,
        tokens.cacheRead,
        tokens.cacheWrite,
        row.usage.egressBytes,
        row.usage.events,
        ...row.costs.flatMap((cost) => [cost.total ?? '', cost.unpricedModels.join(' ')]),
      ].map(String),
    );
  }
  return lines.map((fields) => `${fields.map(csvField).join(',')}\r\n`).join('');
}

/** One report row as the API shows it. */
export interface UsageReportRowJson {
  group: string;
  sessions: number;
  usage: {
    active_seconds: number;
    idle_seconds: number;
    sandbox_cpu_seconds: number;
    sandbox_memory_gb_seconds: number;
    tokens: Record<string, { input: number; output: number; cache_read: number; cache_write: number }>;
    egress_bytes: number;
    events: number;
  };
  /**
   * Keyed by book id; amounts in USD, unrounded. A model the book has no price for has a null
   * amount and makes `tokens_total` and `total` null (the row has no cost under that book);
   * `priced_total` is what the book could price.
   */
  costs: Record<
    string,
    {
      runtime: number;
      compute_cpu: number;
      compute_memory: number;
      events: number;
      tokens: Record<string, { amount: number | null; priced_by: string | null }>;
      tokens_total: number | null;
      total: number | null;
      priced_total: number;
      unpriced_models: string[];
    }
  >;
}

/** The report as the API returns it. */
export interface UsageReportJson {
  by: UsageGroupKey;
  currency: 'USD';
  books: { id: string; name: string; description: string }[];
  rows: UsageReportRowJson[];
  total: UsageReportRowJson;
}

/** The report as plain snake_case objects, ready for `JSON.stringify`. */
export function usageReportToJson(report: UsageReport): UsageReportJson {
  return {
    by: report.by,
    currency: 'USD',
    books: report.books,
    rows: report.rows.map(rowToJson),
    total: rowToJson(report.total),
  };
}

function rowToJson(row: UsageReportRow): UsageReportRowJson {
  const { usage } = row;
  return {
    group: row.group,
    sessions: row.sessions,
    usage: {
      active_seconds: usage.activeSeconds,
      idle_seconds: usage.idleSeconds,
      sandbox_cpu_seconds: usage.sandboxCpuSeconds,
      sandbox_memory_gb_seconds: usage.sandboxMemoryGbSeconds,
      tokens: Object.fromEntries(
        Object.entries(usage.tokens).map(([model, counts]) => [
          model,
          {
            input: counts.input,
            output: counts.output,
            cache_read: counts.cacheRead,
            cache_write: counts.cacheWrite,
          },
        ]),
      ),
      egress_bytes: usage.egressBytes,
      events: usage.events,
    },
    costs: Object.fromEntries(
      row.costs.map((cost) => [
        cost.bookId,
        {
          runtime: cost.runtime,
          compute_cpu: cost.computeCpu,
          compute_memory: cost.computeMemory,
          events: cost.events,
          tokens: Object.fromEntries(
            Object.entries(cost.tokens).map(([model, { amount, pricedBy }]) => [
              model,
              { amount, priced_by: pricedBy },
            ]),
          ),
          tokens_total: cost.tokensTotal,
          total: cost.total,
          priced_total: cost.pricedTotal,
          unpriced_models: cost.unpricedModels,
        },
      ]),
    ),
  };
}

function groupValueOf(record: UsageRecord, by: UsageGroupKey): string {
  switch (by) {
    case 'tenant':
      return record.tenantId;
    case 'agent':
      return record.agentId;
    case 'session':
      return record.sessionId;
    case 'day':
      return record.day;
  }
}

/** Token counts summed over models; `in` is every prompt token, cached or not. */
function tokenSums(usage: UsageTotals) {
  const sum = { input: 0, output: 0, cacheRead: 0, cacheWrite: 0 };
  for (const counts of Object.values(usage.tokens)) {
    sum.input += counts.input;
    sum.output += counts.output;
    sum.cacheRead += counts.cacheRead;
    sum.cacheWrite += counts.cacheWrite;
  }
  return { ...sum, in: sum.input + sum.cacheRead + sum.cacheWrite, out: sum.output };
}

function compareText(left: string, right: string): number {
  return left < right ? -1 : left > right ? 1 : 0;
}

function formatCount(value: number): string {
  return Math.round(value).toLocaleString('en-US');
}

function formatDecimal(value: number, digits: number): string {
  return value.toLocaleString('en-US', { minimumFractionDigits: digits, maximumFractionDigits: digits });
}

function csvField(value: string): string {
  return /[",\r\n]/.test(value) ? `"${value.replaceAll('"', '""')}"` : value;
}
