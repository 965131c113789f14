import { mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { isBerthError } from '../errors.js';
import {
  costOf,
  loadPresetPriceBook,
  loadPresetPriceBooks,
  loadPriceBook,
  presetPriceBookDirectory,
  presetPriceBookIds,
} from './price-books.js';
import { emptyUsage, type UsageTotals } from './usage.js';

/**
 * A recorded workload: 1.5 h active, 10 h idle, 2,700 sandbox CPU-seconds, 5,400 GB-seconds,
 * 2,000 log events, tokens on two models.
 */
const workload: UsageTotals = {
  activeSeconds: 5_400,
  idleSeconds: 36_000,
  sandboxCpuSeconds: 2_700,
  sandboxMemoryGbSeconds: 5_400,
  tokens: {
    'anthropic/claude-sonnet-4-5': {
      input: 1_200_000,
      output: 120_000,
      cacheRead: 2_000_000,
      cacheWrite: 200_000,
    },
    'anthropic/claude-haiku-4-5': {
      input: 600_000,
      output: 60_000,
      cacheRead: 1_000_000,
      cacheWrite: 100_000,
    },
  },
  egressBytes: 48_000_000,
  events: 2_000,
};

// Sonnet 4.5: $3 in, $15 out, $0.30 cache read, $3.75 cache write per million tokens.
const sonnetTokens = 3 * 1.2 + 15 * 0.12 + 0.3 * 2 + 3.75 * 0.2; // = 6.75
// Haiku 4.5: $1 in, $5 out, $0.10 cache read, $1.25 cache write per million tokens.
const haikuTokens = 1 * 0.6 + 5 * 0.06 + 0.1 * 1 + 1.25 * 0.1; // = 1.125
const tokens = sonnetTokens + haikuTokens; // = 7.875

const temporaryDirectory = mkdtempSync(join(tmpdir(), 'berth-price-books-'));
afterAll(() => rmSync(temporaryDirectory, { recursive: true, force: true }));

function writeBook(fileName: string, text: string): string {
  const file = join(temporaryDirectory, fileName);
  writeFileSync(file, text);
  return file;
}

function errorOf(run: () => unknown): Error {
  try {
    run();
  } catch (error) {
    return error as Error;
  }
  throw new Error('expected an error');
}

describe('preset price books', () => {
  it('price the recorded workload on Anthropic at $0.08 per active session-hour plus tokens', () => {
    const cost = costOf(workload, loadPresetPriceBook('anthropic'));
    // 1.5 active hours × $0.08; idle time is free.
    expect(cost.runtime).toBeCloseTo(0.08 * 1.5, 10);
    expect(cost.total).toBeCloseTo(0.08 * 1.5 + tokens, 10); // = 7.995
    expect(cost.total).toBeCloseTo(7.995, 10);
  });

  it('price the recorded workload on AWS AgentCore per vCPU-hour and GB-hour of measured use', () => {
    const cost = costOf(workload, loadPresetPriceBook('aws-agentcore'));
    // 2,700 CPU-seconds = 0.75 vCPU-hours × $0.0895; 5,400 GB-seconds = 1.5 GB-hours × $0.00945.
    expect(cost.computeCpu).toBeCloseTo(0.0895 * 0.75, 10);
    expect(cost.computeMemory).toBeCloseTo(0.00945 * 1.5, 10);
    expect(cost.runtime).toBe(0);
    expect(cost.total).toBeCloseTo(0.0895 * 0.75 + 0.00945 * 1.5 + tokens, 10); // = 7.9563
    expect(cost.total).toBeCloseTo(7.9563, 10);
  });

  it('price the recorded workload on Google Agent Engine per vCPU-hour, GB-hour and thousand events', () => {
    const cost = costOf(workload, loadPresetPriceBook('google-agent-engine'));
    // 0.75 vCPU-hours × $0.0864 + 1.5 GB-hours × $0.0090 + 2 thousand events × $0.25.
    expect(cost.events).toBeCloseTo(0.25 * 2, 10);
    expect(cost.total).toBeCloseTo(0.0864 * 0.75 + 0.009 * 1.5 + 0.25 * 2 + tokens, 10); // = 8.4533
    expect(cost.total).toBeCloseTo(8.4533, 10);
  });

  it('price the recorded workload on Cloudflare per active vCPU-second, idle free', () => {
    const cost = costOf(workload, loadPresetPriceBook('cloudflare'));
    // 2,700 CPU-seconds × $0.00002; neither idle time nor memory is charged.
    expect(cost.computeCpu).toBeCloseTo(0.00002 * 2_700, 10);
    expect(cost.computeMemory).toBe(0);
    expect(cost.total).toBeCloseTo(0.00002 * 2_700 + tokens, 10); // = 7.929
    expect(cost.total).toBeCloseTo(7.929, 10);
  });

  it('show the token cost of each model and which entry priced it', () => {
    const cost = costOf(workload, loadPresetPriceBook('anthropic'));
    expect(cost.tokens['anthropic/claude-sonnet-4-5']!.amount).toBeCloseTo(sonnetTokens, 10);
    expect(cost.tokens['anthropic/claude-haiku-4-5']!.amount).toBeCloseTo(haikuTokens, 10);
    expect(cost.tokens['anthropic/claude-haiku-4-5']!.pricedBy).toBe('anthropic/claude-haiku-4-5');
    expect(cost.tokensTotal).toBeCloseTo(tokens, 10);
    expect(cost.unpricedModels).toEqual([]);
  });

  it('are exactly the files in price-books/, each named after its id', () => {
    const files = readdirSync(presetPriceBookDirectory).filter((file) => file.endsWith('.yaml'));
    expect(files.sort()).toEqual(presetPriceBookIds.map((id) => `${id}.yaml`).sort());
    expect(loadPresetPriceBooks().map((book) => book.id)).toEqual([...presetPriceBookIds]);
  });

  it('all price tokens the same, so they differ only in runtime and compute charges', () => {
    const [first, ...others] = loadPresetPriceBooks();
    for (const book of others) expect(book.tokens).toEqual(first!.tokens);
  });

  it('charge nothing for scripted models', () => {
    const usage = {
      ...emptyUsage(),
      tokens: { 'scripted/echo': { input: 10, output: 5, cacheRead: 0, cacheWrite: 0 } },
    };
    const cost = costOf(usage, loadPresetPriceBook('anthropic'));
    expect(cost.tokens['scripted/echo']).toEqual({ amount: 0, pricedBy: 'scripted/*' });
    expect(cost.unpricedModels).toEqual([]);
  });
});

describe('unknown models', () => {
  const usage: UsageTotals = {
    ...emptyUsage(),
    tokens: {
      'acme/house-model': { input: 1_000_000, output: 0, cacheRead: 0, cacheWrite: 0 },
      'anthropic/claude-sonnet-4-5': { input: 1_000_000, output: 0, cacheRead: 0, cacheWrite: 0 },
    },
  };

  it('are listed as unpriced and leave the usage without a cost, instead of silently costing nothing', () => {
    const cost = costOf(usage, loadPresetPriceBook('cloudflare'));
    expect(cost.unpricedModels).toEqual(['acme/house-model']);
    expect(cost.tokens['acme/house-model']).toEqual({ amount: null, pricedBy: null });
    expect(cost.tokensTotal).toBeNull();
    expect(cost.total).toBeNull();
    // What the book could price is kept apart: the Sonnet tokens.
    expect(cost.pricedTotal).toBeCloseTo(3, 10);
  });

  it('count as unpriced even with no tokens yet (a model called once for nothing is still unpriced)', () => {
    const cost = costOf(
      {
        ...emptyUsage(),
        tokens: { 'acme/house-model': { input: 0, output: 0, cacheRead: 0, cacheWrite: 0 } },
      },
      loadPresetPriceBook('anthropic'),
    );
    expect(cost.total).toBeNull();
    expect(cost.unpricedModels).toEqual(['acme/house-model']);
  });

  it('take the price of a default entry when the book has one', () => {
    const file = writeBook(
      'with-default.yaml',
      `name: With default
currency: USD
tokens:
  anthropic/claude-sonnet-4-5: { input_per_million: 3, output_per_million: 15, cache_read_per_million: 0.3, cache_write_per_million: 3.75 }
  default: { input_per_million: 10, output_per_million: 30, cache_read_per_million: 1, cache_write_per_million: 12.5 }
`,
    );
    const cost = costOf(usage, loadPriceBook(file));
    expect(cost.tokens['acme/house-model']).toEqual({ amount: 10, pricedBy: 'default' });
    expect(cost.unpricedModels).toEqual([]);
    expect(cost.total).toBeCloseTo(10 + 3, 10);
  });

  it('match the longest prefix pattern when no exact id is listed', () => {
    const file = writeBook(
      'patterns.yaml',
      `name: Patterns
currency: USD
tokens:
  acme/*: { input_per_million: 1, output_per_million: 1, cache_read_per_million: 1, cache_write_per_million: 1 }
  acme/house-*: { input_per_million: 2, output_per_million: 2, cache_read_per_million: 2, cache_write_per_million: 2 }
`,
    );
    const cost = costOf(usage, loadPriceBook(file));
    expect(cost.tokens['acme/house-model']).toEqual({ amount: 2, pricedBy: 'acme/house-*' });
    expect(cost.unpricedModels).toEqual(['anthropic/claude-sonnet-4-5']);
  });
});

describe('custom price books', () => {
  it('load from a file path and price usage by their own rates', () => {
    const file = writeBook(
      'on-premises.yaml',
      `name: On premises
description: Our own racks at cost.
currency: USD
rates:
  vcpu_hour: 0.04
  gb_hour: 0.005
tokens:
  anthropic/claude-sonnet-4-5:
    input_per_million: 3
    output_per_million: 15
    cache_read_per_million: 0.3
    cache_write_per_million: 3.75
`,
    );
    const book = loadPriceBook(file);
    expect(book.id).toBe('on-premises');
    expect(book.name).toBe('On premises');
    const cost = costOf(workload, book);
    // 0.75 vCPU-hours × $0.04 + 1.5 GB-hours × $0.005 + Sonnet tokens; Haiku has no price here,
    // so the workload has no total under this book, only what it could price.
    expect(cost.pricedTotal).toBeCloseTo(0.04 * 0.75 + 0.005 * 1.5 + sonnetTokens, 10);
    expect(cost.total).toBeNull();
    expect(cost.unpricedModels).toEqual(['anthropic/claude-haiku-4-5']);
  });

  it('fail without a currency, naming the file and the field', () => {
    const file = writeBook('no-currency.yaml', 'name: No currency\ntokens: {}\n');
    const error = errorOf(() => loadPriceBook(file));
    expect(isBerthError(error, 'invalid_request')).toBe(true);
    expect(error.message).toContain(file);
    expect(error.message).toContain('currency: is required');
  });

  it('fail on a negative price, naming the file and the field', () => {
    const file = writeBook(
      'negative.yaml',
      `name: Negative
currency: USD
tokens:
  openai/gpt-4o: { input_per_million: -2.5, output_per_million: 10, cache_read_per_million: 1.25, cache_write_per_million: 2.5 }
`,
    );
    const error = errorOf(() => loadPriceBook(file));
    expect(error.message).toContain(file);
    expect(error.message).toContain('tokens.openai/gpt-4o.input_per_million: must not be negative');
  });

  it('fail on an unknown field, naming the file and the field', () => {
    const file = writeBook(
      'typo.yaml',
      'name: Typo\ncurrency: USD\nrates:\n  vcpu_hours: 0.09\ntokens: {}\n',
    );
    const error = errorOf(() => loadPriceBook(file));
    expect(error.message).toContain(file);
    expect(error.message).toContain('rates.vcpu_hours: unknown field');
  });

  it('fail on a model price left out, rather than treating it as free', () => {
    const file = writeBook(
      'partial.yaml',
      'name: Partial\ncurrency: USD\ntokens:\n  openai/gpt-4o: { input_per_million: 2.5, output_per_million: 10 }\n',
    );
    const error = errorOf(() => loadPriceBook(file));
    expect(error.message).toContain('tokens.openai/gpt-4o.cache_read_per_million: is required');
    expect(error.message).toContain('tokens.openai/gpt-4o.cache_write_per_million: is required');
  });

  it('fail on broken YAML, naming the file and the line', () => {
    const file = writeBook('broken.yaml', 'name: Broken\ncurrency: [USD\n');
    const error = errorOf(() => loadPriceBook(file));
    expect(error.message).toContain(file);
    expect(error.message).toMatch(/not valid YAML: .*line \d+/);
  });

  it('fail for a missing file as not found', () => {
    const error = errorOf(() => loadPriceBook(join(temporaryDirectory, 'absent.yaml')));
    expect(isBerthError(error, 'not_found')).toBe(true);
  });

  it('fail for a misspelt preset by listing the presets', () => {
    const error = errorOf(() => loadPriceBook('anthropik'));
    expect(error.message).toContain('unknown price book "anthropik"');
    expect(error.message).toContain('aws-agentcore');
  });
});
