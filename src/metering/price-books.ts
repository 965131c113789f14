import { existsSync, readFileSync } from 'node:fs';
import { basename, extname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseDocument } from 'yaml';
import { z } from 'zod';
import { BerthError, invalidRequest, notFound } from '../errors.js';
import type { TokenCounts, UsageTotals } from './usage.js';

/**
 * Price books: what measured usage would cost under a vendor's pricing model. A book is a YAML
 * file (the presets live in `price-books/` at the repository root; its file name is its id):
 *
 * ```yaml
 * name: Google Agent Engine          # required, shown to people
 * description: …                     # optional
 * currency: USD                      # required; USD is the only currency
 * rates:                             # optional; an absent rate is 0
 *   active_session_hour: 0.08        # × hours a turn was in flight (activeSeconds)
 *   vcpu_hour: 0.0864                # × sandbox CPU-seconds / 3600
 *   active_vcpu_second: 0.00002      # × sandbox CPU-seconds
 *   gb_hour: 0.0090                  # × sandbox memory GB-seconds / 3600
 *   per_thousand_events: 0.25        # × session log events / 1000
 * tokens:                            # required; USD per million tokens, all four prices required
 *   anthropic/claude-sonnet-4-5:     # an exact model id …
 *     input_per_million: 3
 *     output_per_million: 15
 *     cache_read_per_million: 0.30
 *     cache_write_per_million: 3.75
 *   scripted/*: { … }                # … a prefix ending in `*` (the longest match wins) …
 *   default: { … }                   # … or the price of every model nothing else matches
 * ```
 *
 * Compute is billed per second of measured usage: rates apply to the unrounded seconds. Token
 * `input` is the count billed at the full input rate; cache reads and writes are priced apart.
 * A model no entry matches is unpriced: it is listed in `unpricedModels`, its amount is null and
 * so are the token total and the total (a cost that leaves out some tokens is no cost at all),
 * so a missing price shows up instead of passing as free. `pricedTotal` keeps the sum of what
 * the book could price.
 */

/** The ids of the books shipped in `price-books/`. */
export const presetPriceBookIds = [
  'anthropic',
  'aws-agentcore',
  'google-agent-engine',
  'cloudflare',
] as const;

/** One of the shipped books. */
export type PresetPriceBookId = (typeof presetPriceBookIds)[number];

/** The folder holding the preset books (the same relative path from `src/` and `dist/`). */
export const presetPriceBookDirectory = fileURLToPath(new URL('../../price-books/', import.meta.url));

/** Token prices of one model, in USD per million tokens. */
export interface TokenPrices {
  inputPerMillion: number;
  outputPerMillion: number;
  cacheReadPerMillion: number;
  cacheWritePerMillion: number;
}

/** A validated price book. Absent rates are 0. */
export interface PriceBook {
  /** The file name without its extension; names the book's cost column. */
  id: string;
  name: string;
  description: string;
  currency: 'USD';
  /** The file the book was read from. */
  file: string;
  rates: {
    activeSessionHour: number;
    vcpuHour: number;
    activeVcpuSecond: number;
    gbHour: number;
    perThousandEvents: number;
  };
  /** Keyed by model id, by a prefix ending in `*`, or `default`. */
  tokens: Record<string, TokenPrices>;
}

/** What one model's tokens cost under a book. */
export interface ModelCost {
  /** USD, or null when the book has no price for the model. */
  amount: number | null;
  /** The book's `tokens` key that priced the model, or null when none did (then `amount` is null too). */
  pricedBy: string | null;
}

/** What some usage costs under one book, per component, in USD, unrounded. */
export interface CostBreakdown {
  bookId: string;
  currency: 'USD';
  /** Active session hours × `active_session_hour`. */
  runtime: number;
  /** Sandbox CPU time × `vcpu_hour` and `active_vcpu_second`. */
  computeCpu: number;
  /** Sandbox memory GB-seconds × `gb_hour`. */
  computeMemory: number;
  /** Session log events × `per_thousand_events`. */
  events: number;
  /** Per model id of the usage. */
  tokens: Record<string, ModelCost>;
  /** Sum of `tokens`, or null when some model is unpriced. */
  tokensTotal: number | null;
  /** Every component, or null when some model is unpriced: the usage has no cost under this book. */
  total: number | null;
  /** The sum of what the book could price (equal to `total` when nothing is unpriced). */
  pricedTotal: number;
  /** Model ids the usage has tokens for that the book has no price for, sorted. */
  unpricedModels: string[];
}

const modelKeyPattern = /^[^\s/*]+\/([^\s*]+\*?|\*)$/;
const modelKeyRule = 'model keys are <provider>/<model>, <provider>/<prefix>*, or default';

const price = z
  .number({ error: 'must be a number (USD)' })
  .finite('must be a finite number')
  .min(0, 'must not be negative');

const tokenPricesSchema = z.strictObject({
  input_per_million: price,
  output_per_million: price,
  cache_read_per_million: price,
  cache_write_per_million: price,
});

const priceBookSchema = z.strictObject({
  name: z.string({ error: 'must be text' }).trim().min(1, 'must not be empty'),
  description: z.string({ error: 'must be text' }).default(''),
  currency: z.literal('USD', { error: 'must be USD, the only currency price books support' }),
  rates: z
    .strictObject({
      active_session_hour: price.default(0),
      vcpu_hour: price.default(0),
      active_vcpu_second: price.default(0),
      gb_hour: price.default(0),
      per_thousand_events: price.default(0),
    })
    .default({
      active_session_hour: 0,
      vcpu_hour: 0,
      active_vcpu_second: 0,
      gb_hour: 0,
      per_thousand_events: 0,
    }),
  tokens: z.record(
    z.string().refine((key) => key === 'default' || modelKeyPattern.test(key), modelKeyRule),
    tokenPricesSchema,
    { error: 'must be a mapping of model ids to token prices' },
  ),
});

/**
 * Validates the YAML text of a book. `file` names the book in errors and gives its id. Throws
 * an `invalid_request` BerthError naming the file and every bad field (also in `details`).
 */
export function parsePriceBook(text: string, file: string): PriceBook {
  const document = parseDocument(text);
  const yamlError = document.errors[0];
  if (yamlError) {
    // The message goes on to quote the offending lines; its first line already says where.
    const where = yamlError.message.split('\n')[0]!.replace(/:$/, '');
    throw invalidRequest(`price book ${file}: not valid YAML: ${where}`, { file });
  }
  const parsed = priceBookSchema.safeParse(document.toJS() ?? {}, { reportInput: true });
  if (!parsed.success) {
    const problems = parsed.error.issues.flatMap(describeIssue);
    const listed = problems.map(({ field, message }) => (field ? `${field}: ${message}` : message));
    throw invalidRequest(`price book ${file}: ${listed.join('; ')}`, { file, problems });
  }
  const book = parsed.data;
  return {
    id: basename(file, extname(file)),
    name: book.name,
    description: book.description.trim(),
    currency: book.currency,
    file,
    rates: {
      activeSessionHour: book.rates.active_session_hour,
      vcpuHour: book.rates.vcpu_hour,
      activeVcpuSecond: book.rates.active_vcpu_second,
      gbHour: book.rates.gb_hour,
      perThousandEvents: book.rates.per_thousand_events,
    },
    tokens: Object.fromEntries(
      Object.entries(book.tokens).map(([model, prices]) => [
        model,
        {
          inputPerMillion: prices.input_per_million,
          outputPerMillion: prices.output_per_million,
          cacheReadPerMillion: prices.cache_read_per_million,
          cacheWritePerMillion: prices.cache_write_per_million,
        },
      ]),
    ),
  };
}

/** Reads and validates a book from a YAML file; its id is the file name without extension. */
export function loadPriceBookFile(file: string): PriceBook {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (error) {
    if (!existsSync(file)) throw notFound('price book', file);
    throw new BerthError('invalid_request', `price book ${file} could not be read`, { cause: error });
  }
  return parsePriceBook(text, file);
}

/** True when `reference` is the id of a shipped book. */
export function isPresetPriceBookId(reference: string): reference is PresetPriceBookId {
  return (presetPriceBookIds as readonly string[]).includes(reference);
}

/** Loads one shipped book by id. */
export function loadPresetPriceBook(id: PresetPriceBookId): PriceBook {
  return loadPriceBookFile(join(presetPriceBookDirectory, `${id}.yaml`));
}

/** Loads every shipped book, in `presetPriceBookIds` order. */
export function loadPresetPriceBooks(): PriceBook[] {
  return presetPriceBookIds.map(loadPresetPriceBook);
}

/**
 * Loads what a user named with `--price-book` or the API: a preset id, or else a path to a YAML
 * file. A bare word that is neither is reported with the list of presets.
 */
export function loadPriceBook(reference: string): PriceBook {
  if (isPresetPriceBookId(reference)) return loadPresetPriceBook(reference);
  const looksLikePath = /[/\\]/.test(reference) || /\.ya?ml$/i.test(reference);
  if (!looksLikePath && !existsSync(reference)) {
    throw invalidRequest(
      `unknown price book "${reference}"; presets are ${presetPriceBookIds.join(', ')}, or give the path of a .yaml file`,
    );
  }
  return loadPriceBookFile(reference);
}

/** What `usage` costs under `book`: each component in USD, unrounded, and the models it has no price for. */
export function costOf(usage: UsageTotals, book: PriceBook): CostBreakdown {
  const { rates } = book;
  const runtime = (usage.activeSeconds / 3600) * rates.activeSessionHour;
  const computeCpu =
    (usage.sandboxCpuSeconds / 3600) * rates.vcpuHour + usage.sandboxCpuSeconds * rates.activeVcpuSecond;
  const computeMemory = (usage.sandboxMemoryGbSeconds / 3600) * rates.gbHour;
  const events = (usage.events / 1000) * rates.perThousandEvents;

  const tokens: Record<string, ModelCost> = {};
  const unpricedModels: string[] = [];
  let tokensPriced = 0;
  for (const [model, counts] of Object.entries(usage.tokens)) {
    const pricedBy = priceKeyFor(model, book);
    const amount = pricedBy === null ? null : tokenCost(counts, book.tokens[pricedBy]!);
    if (amount === null) unpricedModels.push(model);
    else tokensPriced += amount;
    tokens[model] = { amount, pricedBy };
  }
  const pricedTotal = runtime + computeCpu + computeMemory + events + tokensPriced;
  const complete = unpricedModels.length === 0;
  return {
    bookId: book.id,
    currency: book.currency,
    runtime,
    computeCpu,
    computeMemory,
    events,
    tokens,
    tokensTotal: complete ? tokensPriced : null,
    total: complete ? pricedTotal : null,
    pricedTotal,
    unpricedModels: unpricedModels.sort(),
  };
}

/** The `tokens` key pricing `model`: the exact id, else the longest matching `*` prefix, else `default`. */
function priceKeyFor(model: string, book: PriceBook): string | null {
  if (Object.hasOwn(book.tokens, model) && model !== 'default') return model;
  let best: string | null = null;
  for (const key of Object.keys(book.tokens)) {
    if (!key.endsWith('*') || !model.startsWith(key.slice(0, -1))) continue;
    if (best === null || key.length > best.length) best = key;
  }
  if (best !== null) return best;
  return Object.hasOwn(book.tokens, 'default') ? 'default' : null;
}

function tokenCost(counts: TokenCounts, prices: TokenPrices): number {
  return (
    (counts.input * prices.inputPerMillion +
      counts.output * prices.outputPerMillion +
      counts.cacheRead * prices.cacheReadPerMillion +
      counts.cacheWrite * prices.cacheWritePerMillion) /
    1_000_000
  );
}

/** One zod issue as the fields a person would fix. */
function describeIssue(issue: z.core.$ZodIssue): { field: string; message: string }[] {
  const path = issue.path.map(String);
  if (issue.code === 'unrecognized_keys') {
    return issue.keys.map((key) => ({
      field: [...path, key].join('.'),
      message: `unknown field${knownFieldsHint(path)}`,
    }));
  }
  if ((issue.code === 'invalid_type' || issue.code === 'invalid_value') && issue.input === undefined) {
    return [{ field: path.join('.'), message: 'is required' }];
  }
  if (path.length === 0) {
    return [{ field: '', message: 'a book must be a YAML mapping with name, currency, rates and tokens' }];
  }
  if (issue.code === 'invalid_key') {
    return [{ field: path.join('.'), message: modelKeyRule }];
  }
  return [{ field: path.join('.'), message: issue.message }];
}

function knownFieldsHint(path: string[]): string {
  if (path.length === 0) return ' (a book has name, description, currency, rates, tokens)';
  if (path[0] === 'rates' && path.length === 1) {
    return ' (rates are active_session_hour, vcpu_hour, active_vcpu_second, gb_hour, per_thousand_events)';
  }
  if (path[0] === 'tokens' && path.length === 2) {
    return ' (a model has input_per_million, output_per_million, cache_read_per_million, cache_write_per_million)';
  }
  return '';
}
