import { describe, expect, it } from 'vitest';
import { isBerthError } from '../errors.js';
import { loadPresetPriceBook, loadPresetPriceBooks } from './price-books.js';
import {
  buildUsageReport,
  formatUsageCsv,
  formatUsageJsonTable,
  formatUsageTable,
  groupUsage,
  usageReportToJson,
} from './report.js';
import type { UsageRecord } from './usage.js';

const sonnet = 'anthropic/claude-sonnet-4-5';
const haiku = 'anthropic/claude-haiku-4-5';

/**
 * A recorded workload of three sessions, two tenants, two agents, two days. Together: 1.5 h
 * active, 10 h idle, 2,700 CPU-seconds, 5,400 GB-seconds, 2,000 events.
 */
const records: UsageRecord[] = [
  {
    sessionId: 'sesn_a',
    tenantId: 'acme',
    agentId: 'agent_support',
    day: '2026-03-01',
    activeSeconds: 2_700,
    idleSeconds: 18_000,
    sandboxCpuSeconds: 1_200,
    sandboxMemoryGbSeconds: 2_400,
    tokens: { [sonnet]: { input: 1_000_000, output: 100_000, cacheRead: 2_000_000, cacheWrite: 200_000 } },
    egressBytes: 30_000_000,
    events: 900,
  },
  {
    sessionId: 'sesn_b',
    tenantId: 'acme',
    agentId: 'agent_research',
    day: '2026-03-02',
    activeSeconds: 1_800,
    idleSeconds: 10_800,
    sandboxCpuSeconds: 1_000,
    sandboxMemoryGbSeconds: 2_000,
    tokens: { [haiku]: { input: 500_000, output: 50_000, cacheRead: 1_000_000, cacheWrite: 100_000 } },
    egressBytes: 15_000_000,
    events: 700,
  },
  {
    sessionId: 'sesn_c',
    tenantId: 'globex',
    agentId: 'agent_support',
    day: '2026-03-02',
    activeSeconds: 900,
    idleSeconds: 7_200,
    sandboxCpuSeconds: 500,
    sandboxMemoryGbSeconds: 1_000,
    tokens: {
      [sonnet]: { input: 200_000, output: 20_000, cacheRead: 0, cacheWrite: 0 },
      [haiku]: { input: 100_000, output: 10_000, cacheRead: 0, cacheWrite: 0 },
    },
    egressBytes: 3_000_000,
    events: 400,
  },
];

// Token costs per session, in USD (prices per million tokens, in every preset).
const tokensA = 3 * 1.0 + 15 * 0.1 + 0.3 * 2 + 3.75 * 0.2; // Sonnet = 5.85
const tokensB = 1 * 0.5 + 5 * 0.05 + 0.1 * 1 + 1.25 * 0.1; // Haiku = 0.975
const tokensC = 3 * 0.2 + 15 * 0.02 + (1 * 0.1 + 5 * 0.01); // Sonnet 0.9 + Haiku 0.15 = 1.05

describe('usage grouped', () => {
  it('by tenant sums each tenant’s sessions', () => {
    const groups = groupUsage(records, 'tenant');
    expect(groups.map((group) => [group.group, group.sessions])).toEqual([
      ['acme', 2],
      ['globex', 1],
    ]);
    expect(groups[0]!.usage).toEqual({
      activeSeconds: 2_700 + 1_800,
      idleSeconds: 18_000 + 10_800,
      sandboxCpuSeconds: 1_200 + 1_000,
      sandboxMemoryGbSeconds: 2_400 + 2_000,
      tokens: {
        [sonnet]: { input: 1_000_000, output: 100_000, cacheRead: 2_000_000, cacheWrite: 200_000 },
        [haiku]: { input: 500_000, output: 50_000, cacheRead: 1_000_000, cacheWrite: 100_000 },
      },
      egressBytes: 30_000_000 + 15_000_000,
      events: 900 + 700,
    });
  });

  it('by agent merges the token counts of a model used in several sessions', () => {
    const [research, support] = groupUsage(records, 'agent');
    expect(research!.group).toBe('agent_research');
    expect(support!.group).toBe('agent_support');
    expect(support!.sessions).toBe(2);
    expect(support!.usage.activeSeconds).toBe(2_700 + 900);
    expect(support!.usage.sandboxCpuSeconds).toBe(1_200 + 500);
    expect(support!.usage.tokens).toEqual({
      [sonnet]: {
        input: 1_000_000 + 200_000,
        output: 100_000 + 20_000,
        cacheRead: 2_000_000,
        cacheWrite: 200_000,
      },
      [haiku]: { input: 100_000, output: 10_000, cacheRead: 0, cacheWrite: 0 },
    });
  });

  it('by session gives each session its own row', () => {
    const groups = groupUsage(records, 'session');
    expect(groups.map((group) => group.group)).toEqual(['sesn_a', 'sesn_b', 'sesn_c']);
    const { sessionId, tenantId, agentId, day, ...usageOfC } = records[2]!;
    expect(groups[2]!.usage).toEqual(usageOfC);
  });

  it('by day lists days in order and sums sessions created the same day', () => {
    const groups = groupUsage(records, 'day');
    expect(groups.map((group) => [group.group, group.sessions])).toEqual([
      ['2026-03-01', 1],
      ['2026-03-02', 2],
    ]);
    expect(groups[1]!.usage.idleSeconds).toBe(10_800 + 7_200);
    expect(groups[1]!.usage.events).toBe(700 + 400);
    expect(groups[1]!.usage.egressBytes).toBe(15_000_000 + 3_000_000);
  });
});

describe('usage report', () => {
  it('prices each tenant under each preset at the hand-computed amounts', () => {
    const report = buildUsageReport(records, { by: 'tenant', books: loadPresetPriceBooks() });
    expect(report.books.map((book) => book.id)).toEqual([
      'anthropic',
      'aws-agentcore',
      'google-agent-engine',
      'cloudflare',
    ]);
    const [acme, globex] = report.rows.map((row) => row.costs.map((cost) => cost.total));
    // acme: 1.25 active h, 2,200 CPU-s (0.6111… vCPU-h), 4,400 GB-s (1.2222… GB-h), 1,600 events.
    const acmeExpected = [
      0.08 * 1.25 + tokensA + tokensB, // = 6.925
      0.0895 * (2_200 / 3_600) + 0.00945 * (4_400 / 3_600) + tokensA + tokensB,
      0.0864 * (2_200 / 3_600) + 0.009 * (4_400 / 3_600) + 0.25 * 1.6 + tokensA + tokensB,
      0.00002 * 2_200 + tokensA + tokensB, // = 6.869
    ];
    // globex: 0.25 active h, 500 CPU-s, 1,000 GB-s, 400 events.
    const globexExpected = [
      0.08 * 0.25 + tokensC, // = 1.07
      0.0895 * (500 / 3_600) + 0.00945 * (1_000 / 3_600) + tokensC,
      0.0864 * (500 / 3_600) + 0.009 * (1_000 / 3_600) + 0.25 * 0.4 + tokensC,
      0.00002 * 500 + tokensC, // = 1.06
    ];
    for (const [index, expected] of acmeExpected.entries()) expect(acme![index]).toBeCloseTo(expected, 10);
    for (const [index, expected] of globexExpected.entries())
      expect(globex![index]).toBeCloseTo(expected, 10);
  });

  it('totals the whole workload under each preset at the hand-computed amounts', () => {
    const report = buildUsageReport(records, { by: 'day', books: loadPresetPriceBooks() });
    const tokens = tokensA + tokensB + tokensC; // = 7.875
    const expected = [
      0.08 * 1.5 + tokens, // Anthropic: 1.5 active h = 7.995
      0.0895 * 0.75 + 0.00945 * 1.5 + tokens, // AgentCore: 0.75 vCPU-h, 1.5 GB-h = 7.9563
      0.0864 * 0.75 + 0.009 * 1.5 + 0.25 * 2 + tokens, // Agent Engine: + 2 thousand events = 8.4533
      0.00002 * 2_700 + tokens, // Cloudflare: 2,700 vCPU-s = 7.929
    ];
    expect(report.total.sessions).toBe(3);
    for (const [index, cost] of report.total.costs.entries())
      expect(cost.total).toBeCloseTo(expected[index]!, 10);
    expect(expected[2]).toBeCloseTo(8.4533, 10);
  });

  it('compares two books side by side with one cost column each', () => {
    const report = buildUsageReport(records, {
      by: 'tenant',
      books: [loadPresetPriceBook('anthropic'), loadPresetPriceBook('cloudflare')],
    });
    expect(formatUsageTable(report)).toBe(
      [
        'tenant  sessions  active h  idle h  cpu s   GB·s  tokens in  tokens out  events  anthropic  cloudflare',
        '------  --------  --------  ------  -----  -----  ---------  ----------  ------  ---------  ----------',
        'acme           2      1.25    8.00  2,200  4,400  4,800,000     150,000   1,600    $6.9250     $6.8690',
        'globex         1      0.25    2.00    500  1,000    300,000      30,000     400    $1.0700     $1.0600',
        '------  --------  --------  ------  -----  -----  ---------  ----------  ------  ---------  ----------',
        'total          3      1.50   10.00  2,700  5,400  5,100,000     180,000   2,000    $7.9950     $7.9290',
        '',
        'Costs in USD. tokens in counts input, cache read and cache write tokens.',
        '',
      ].join('\n'),
    );
    const csvHeader = formatUsageCsv(report).split('\r\n')[0]!;
    expect(csvHeader.split(',').filter((column) => column.endsWith('_usd'))).toEqual([
      'anthropic_usd',
      'cloudflare_usd',
    ]);
    expect(Object.keys(usageReportToJson(report).total.costs)).toEqual(['anthropic', 'cloudflare']);
  });

  it('shows a group with a model the book cannot price as unpriced, with no amount, in every format', () => {
    const withUnknown: UsageRecord[] = [
      ...records,
      {
        ...records[0]!,
        sessionId: 'sesn_d',
        tokens: { 'acme/house-model': { input: 5, output: 5, cacheRead: 0, cacheWrite: 0 } },
      },
    ];
    const report = buildUsageReport(withUnknown, { by: 'tenant', books: [loadPresetPriceBook('anthropic')] });
    const table = formatUsageTable(report).split('\n');
    // acme has the unpriced model: its cost cell and the total's say so; globex is priced.
    expect(table.find((line) => line.startsWith('acme'))).toMatch(/ unpriced$/);
    expect(table.find((line) => line.startsWith('total'))).toMatch(/ unpriced$/);
    expect(table.find((line) => line.startsWith('globex'))).toMatch(/ \$\d+\.\d{4}$/);
    expect(table).toContain(
      'anthropic: no price for acme/house-model; rows with its tokens show "unpriced".',
    );

    const csv = formatUsageCsv(report).split('\r\n');
    expect(csv[0]!.endsWith(',anthropic_usd,anthropic_unpriced_models')).toBe(true);
    expect(csv[1]!.endsWith(',,acme/house-model')).toBe(true);
    expect(csv[2]!).toMatch(/,\d+\.\d+,$/);

    const json = usageReportToJson(report);
    expect(json.rows[0]!.costs.anthropic).toMatchObject({
      total: null,
      tokens_total: null,
      unpriced_models: ['acme/house-model'],
    });
    expect(json.rows[0]!.costs.anthropic!.tokens['acme/house-model']).toEqual({
      amount: null,
      priced_by: null,
    });
    expect(json.rows[0]!.costs.anthropic!.priced_total).toBeGreaterThan(0);
    expect(json.rows[1]!.costs.anthropic!.unpriced_models).toEqual([]);
    expect(json.rows[1]!.costs.anthropic!.total).toBe(json.rows[1]!.costs.anthropic!.priced_total);
    expect(json.total.costs.anthropic!.total).toBeNull();

    // The CLI's table of the API's JSON says the same.
    const fromJson = formatUsageJsonTable(json).split('\n');
    expect(fromJson.find((line) => line.startsWith('acme'))).toMatch(/ unpriced$/);
    expect(fromJson.find((line) => line.startsWith('total'))).toMatch(/ unpriced$/);
    expect(fromJson.find((line) => line.startsWith('globex'))).toMatch(/ \d+\.\d{4}$/);
    expect(fromJson).toContain(
      'anthropic: no price for acme/house-model; rows with its tokens show "unpriced".',
    );
  });

  it('exports CSV with commas, quotes and line breaks in a group quoted as RFC 4180 says', () => {
    const tricky: UsageRecord[] = [
      { ...records[0]!, tenantId: 'Acme, Inc. "West"' },
      { ...records[1]!, tenantId: 'line\nbreak' },
      { ...records[2]!, tenantId: 'plain' },
    ];
    const report = buildUsageReport(tricky, { by: 'tenant', books: [loadPresetPriceBook('cloudflare')] });
    const csv = formatUsageCsv(report);
    expect(csv.endsWith('\r\n')).toBe(true);
    const lines = csv.split('\r\n');
    expect(lines[0]).toBe(
      'tenant,sessions,active_seconds,idle_seconds,sandbox_cpu_seconds,sandbox_memory_gb_seconds,' +
        'input_tokens,output_tokens,cache_read_tokens,cache_write_tokens,egress_bytes,events,' +
        'cloudflare_usd,cloudflare_unpriced_models',
    );
    expect(lines[1]!.startsWith('"Acme, Inc. ""West""",1,2700,18000,1200,2400,1000000,')).toBe(true);
    expect(lines[2]!.startsWith('"line\nbreak",1,1800,')).toBe(true);
    expect(lines[3]!.startsWith('plain,1,900,')).toBe(true);
    // Raw, unrounded amounts: 1,200 CPU-s × $0.00002 + Sonnet tokens.
    expect(Number(lines[1]!.split(',').at(-2))).toBeCloseTo(0.00002 * 1_200 + tokensA, 10);
  });

  it('gives the API snake_case objects with every cost component per book', () => {
    const report = buildUsageReport(records, {
      by: 'session',
      books: [loadPresetPriceBook('google-agent-engine')],
    });
    const json = JSON.parse(JSON.stringify(usageReportToJson(report)));
    expect(json.by).toBe('session');
    expect(json.currency).toBe('USD');
    const first = json.rows[0];
    expect(first.group).toBe('sesn_a');
    expect(first.usage.tokens[sonnet]).toEqual({
      input: 1_000_000,
      output: 100_000,
      cache_read: 2_000_000,
      cache_write: 200_000,
    });
    const cost = first.costs['google-agent-engine'];
    // sesn_a: 1,200 CPU-s, 2,400 GB-s, 900 events.
    expect(cost.compute_cpu).toBeCloseTo(0.0864 * (1_200 / 3_600), 10);
    expect(cost.compute_memory).toBeCloseTo(0.009 * (2_400 / 3_600), 10);
    expect(cost.events).toBeCloseTo(0.25 * 0.9, 10);
    expect(cost.runtime).toBe(0);
    expect(cost.tokens[sonnet]).toEqual({ amount: expect.closeTo(tokensA, 10), priced_by: sonnet });
    expect(cost.total).toBeCloseTo(0.0864 / 3 + 0.009 * (2 / 3) + 0.25 * 0.9 + tokensA, 10);
  });

  it('refuses two books with the same id, whose columns could not be told apart', () => {
    const anthropic = loadPresetPriceBook('anthropic');
    try {
      buildUsageReport(records, { by: 'tenant', books: [anthropic, { ...anthropic }] });
      expect.unreachable();
    } catch (error) {
      expect(isBerthError(error, 'invalid_request')).toBe(true);
      expect((error as Error).message).toContain('"anthropic"');
    }
  });

  it('reports zeros for a period without sessions', () => {
    const report = buildUsageReport([], { by: 'day', books: [loadPresetPriceBook('anthropic')] });
    expect(report.rows).toEqual([]);
    expect(report.total.costs[0]!.total).toBe(0);
    expect(formatUsageCsv(report).split('\r\n')).toHaveLength(2);
  });
});
