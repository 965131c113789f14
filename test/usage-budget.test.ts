import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createModelRegistry } from '../src/models/provider-registry.js';
import { berthCli } from './support/berth-cli.js';
import { startTestBerth, type TestBerth } from './support/berth-instance.js';
import { type StreamEvent, sendAndWaitIdle } from './support/session-stream.js';

/**
 * A price book that makes the scripted models the tests use expensive: one cent per input or
 * output token. It has no price for `scripted/unpriced`.
 */
const EXPENSIVE_BOOK = `
name: Expensive test book
currency: USD
rates:
  active_session_hour: 0
tokens:
  scripted/bash-once: &cent
    input_per_million: 10000
    output_per_million: 10000
    cache_read_per_million: 0
    cache_write_per_million: 0
  scripted/echo: *cent
  anthropic/claude-*:
    input_per_million: 3
    output_per_million: 15
    cache_read_per_million: 0
    cache_write_per_million: 0
`;

/** A book that prices no scripted model at all. */
const NO_SCRIPTED_BOOK = `
name: No scripted models
currency: USD
tokens:
  anthropic/claude-sonnet-4-5: { input_per_million: 3, output_per_million: 15, cache_read_per_million: 0.3, cache_write_per_million: 3.75 }
`;

/** The built-in scripted models plus `scripted/unpriced`, which answers without tools. */
const models = () =>
  createModelRegistry({
    environment: {},
    scriptedScripts: { unpriced: { name: 'unpriced', steps: [{ text: 'an answer with no list price' }] } },
  });

type Usage = {
  usage: {
    active_seconds: number;
    input_tokens: number;
    output_tokens: number;
    list_cost: { amount: string; currency: string };
  };
  berth: {
    idle_seconds: number;
    sandbox_cpu_seconds: number;
    sandbox_memory_gb_seconds: number;
    events: number;
    price_book: string;
  };
};

const message = (text: string) => [
  { type: 'user.message' as const, content: [{ type: 'text' as const, text }] },
];

/**
 * Usage is measured and written to the log as `session.usage` with every idle; budgets stop a
 * session before a model call that would take it past its `max_list_cost`.
 */
describe('usage and budgets', () => {
  let berth: TestBerth;
  let directory: string;
  let environmentId: string;
  const agents: Record<string, string> = {};

  beforeAll(async () => {
    directory = await mkdtemp(join(tmpdir(), 'berth-usage-'));
    const book = join(directory, 'expensive.yaml');
    await writeFile(book, EXPENSIVE_BOOK);
    berth = await startTestBerth({ environment: { BERTH_BUDGET_PRICE_BOOK: book }, models: models() });
    environmentId = (await berth.client.beta.environments.create({ name: 'usage' })).id;
    for (const model of ['scripted/bash-once', 'scripted/echo']) {
      agents[model] = (
        await berth.client.beta.agents.create({
          name: model.replace('/', '-'),
          model,
          tools: [{ type: 'agent_toolset_20260401' }],
        })
      ).id;
    }
  });
  afterAll(async () => {
    await berth?.dispose();
    await rm(directory, { recursive: true, force: true });
  });

  const newSession = async (model: string, budgetCents?: number) =>
    (
      await berth.client.beta.sessions.create({
        agent: agents[model]!,
        environment_id: environmentId,
        ...(budgetCents === undefined
          ? {}
          : { budget: { type: 'limit', max_list_cost: { amount: String(budgetCents), currency: 'USD' } } }),
      })
    ).id;
  const usageEvents = (seen: StreamEvent[]) =>
    seen.filter((event) => event.type === 'session.usage') as unknown as Usage[];
  const modelEnds = (seen: StreamEvent[]) => seen.filter((event) => event.type === 'span.model_request_end');

  it('snapshots usage with every idle: tokens as the model reported them, active + idle = wall time, sandbox CPU measured', async () => {
    const sessionId = await newSession('scripted/bash-once');
    const created = Date.now();
    await new Promise((resolve) => setTimeout(resolve, 1200));
    // Burns 2 s of CPU inside the sandbox.
    const seen = await sendAndWaitIdle(
      berth.client,
      sessionId,
      message("timeout 2 sh -c 'while :; do :; done'; echo burned"),
    );
    const ended = Date.now();
    const [snapshot] = usageEvents(seen);
    expect(snapshot).toBeDefined();
    expect(seen.at(-2)!.type).toBe('session.usage');

    const reported = modelEnds(seen).map(
      (event) => event.model_usage as { input_tokens: number; output_tokens: number },
    );
    expect(reported).toHaveLength(2);
    expect(snapshot!.usage.input_tokens).toBe(reported.reduce((sum, usage) => sum + usage.input_tokens, 0));
    expect(snapshot!.usage.output_tokens).toBe(reported.reduce((sum, usage) => sum + usage.output_tokens, 0));

    const wall = (ended - created) / 1000;
    expect(Math.abs(snapshot!.usage.active_seconds + snapshot!.berth.idle_seconds - wall)).toBeLessThan(1);
    expect(snapshot!.berth.idle_seconds).toBeGreaterThan(1);
    expect(snapshot!.usage.active_seconds).toBeGreaterThan(1.8);

    expect(snapshot!.berth.sandbox_cpu_seconds).toBeGreaterThan(1.7);
    expect(snapshot!.berth.sandbox_cpu_seconds).toBeLessThan(2.3);
    expect(snapshot!.berth.sandbox_memory_gb_seconds).toBeGreaterThan(0);

    // The session's own usage field shows the same snapshot.
    const session = (await berth.client.beta.sessions.retrieve(sessionId)) as unknown as {
      usage: { input_tokens: number; list_cost: { amount: string }; berth: Usage['berth'] };
    };
    expect(session.usage.input_tokens).toBe(snapshot!.usage.input_tokens);
    expect(session.usage.list_cost).toEqual(snapshot!.usage.list_cost);
    expect(session.usage.berth.sandbox_cpu_seconds).toBe(snapshot!.berth.sandbox_cpu_seconds);
    // One cent per token under the test book.
    expect(Number(snapshot!.usage.list_cost.amount)).toBe(
      snapshot!.usage.input_tokens + snapshot!.usage.output_tokens,
    );
  });

  it('stops with budget_reached before the model call that would pass the budget, and makes no call after', async () => {
    const sessionId = await newSession('scripted/bash-once', 1);
    // The first call (the tool call) spends more than one cent; the reply would be a second call.
    const first = await sendAndWaitIdle(berth.client, sessionId, message('echo hi'));
    expect(first.filter((event) => event.type === 'span.model_request_start')).toHaveLength(1);
    expect(first.some((event) => event.type === 'agent.tool_result')).toBe(true);
    expect(first.at(-1)!.stop_reason).toEqual({ type: 'budget_reached' });
    const [snapshot] = usageEvents(first);
    expect(Number(snapshot!.usage.list_cost.amount)).toBeGreaterThanOrEqual(1);

    // Over budget, a new message gets no model call at all.
    const second = await sendAndWaitIdle(berth.client, sessionId, message('echo again'));
    expect(second.some((event) => event.type === 'span.model_request_start')).toBe(false);
    expect(second.at(-1)!.stop_reason).toEqual({ type: 'budget_reached' });

    // Raising the budget lets it go on.
    await berth.client.beta.sessions.update(sessionId, {
      budget: { type: 'limit', max_list_cost: { amount: '100000', currency: 'USD' } },
    });
    const third = await sendAndWaitIdle(berth.client, sessionId, message('echo more'));
    expect(third.at(-1)!.stop_reason).toEqual({ type: 'end_turn' });
  });

  it('counts the next prompt against the budget: a session whose last prompt alone would pass it stops first', async () => {
    const sessionId = await newSession('scripted/echo');
    const seen = await sendAndWaitIdle(
      berth.client,
      sessionId,
      message('a message long enough to cost some cents'),
    );
    const spent = Number(usageEvents(seen)[0]!.usage.list_cost.amount);
    const lastInput = (modelEnds(seen).at(-1)!.model_usage as { input_tokens: number }).input_tokens;
    // Room for less than the last prompt again: the next call would pass the budget.
    await berth.client.beta.sessions.update(sessionId, {
      budget: { type: 'limit', max_list_cost: { amount: String(spent + lastInput - 1), currency: 'USD' } },
    });
    const next = await sendAndWaitIdle(berth.client, sessionId, message('and another'));
    expect(next.some((event) => event.type === 'span.model_request_start')).toBe(false);
    expect(next.at(-1)!.stop_reason).toEqual({ type: 'budget_reached' });
  });

  it('refuses a budget for a model the price book cannot price (model_not_budgetable)', async () => {
    const agent = await berth.client.beta.agents.create({
      name: 'unpriced',
      model: 'openai-compatible/mystery',
    });
    const before = (await berth.client.beta.sessions.list({ limit: 100 })).data.length;
    const response = await fetch(`${berth.url}/v1/sessions`, {
      method: 'POST',
      headers: { 'x-api-key': berth.apiKey, 'content-type': 'application/json' },
      body: JSON.stringify({
        agent: agent.id,
        environment_id: environmentId,
        budget: { type: 'limit', max_list_cost: { amount: '100', currency: 'USD' } },
      }),
    });
    expect(response.status).toBe(400);
    expect(((await response.json()) as { error: { message: string } }).error.message).toMatch(
      /model_not_budgetable/,
    );
    expect((await berth.client.beta.sessions.list({ limit: 100 })).data.length).toBe(before);
  });

  it('shows a session on a model the price book cannot price as unpriced everywhere, never as free', async () => {
    const agent = await berth.client.beta.agents.create({ name: 'unpriced-run', model: 'scripted/unpriced' });
    const sessionId = (
      await berth.client.beta.sessions.create({ agent: agent.id, environment_id: environmentId })
    ).id;
    const seen = await sendAndWaitIdle(berth.client, sessionId, message('what does this cost?'));
    expect(seen.at(-1)!.stop_reason).toEqual({ type: 'end_turn' });

    // The session.usage event: tokens, but no list cost, and the model named as unpriced.
    const snapshot = usageEvents(seen)[0] as unknown as {
      usage: Record<string, unknown> & { output_tokens: number };
      berth: { unpriced_models: string[] };
    };
    expect(snapshot.usage.output_tokens).toBeGreaterThan(0);
    expect(snapshot.usage).not.toHaveProperty('list_cost');
    expect(snapshot.berth.unpriced_models).toEqual(['scripted/unpriced']);
    // A priced session says it has nothing unpriced.
    const priced = await sendAndWaitIdle(berth.client, await newSession('scripted/echo'), message('hi'));
    expect((usageEvents(priced)[0]!.berth as { unpriced_models?: string[] }).unpriced_models).toEqual([]);

    // The session's usage: list_cost null (the SDK's "no cost tracked"), not "0".
    const session = (await berth.client.beta.sessions.retrieve(sessionId)) as unknown as {
      usage: { list_cost: unknown; berth: { unpriced_models: string[] } };
    };
    expect(session.usage.list_cost).toBeNull();
    expect(session.usage.berth.unpriced_models).toEqual(['scripted/unpriced']);

    // The usage report under the budget book: JSON with no amount, CSV with an empty cell.
    const report = (await (
      await fetch(`${berth.url}/v1/usage?by=session`, { headers: { 'x-api-key': berth.apiKey } })
    ).json()) as {
      rows: { group: string; costs: Record<string, { total: number | null; unpriced_models: string[] }> }[];
      total: { costs: Record<string, { total: number | null }> };
    };
    const row = report.rows.find((candidate) => candidate.group === sessionId)!;
    expect(row.costs.expensive).toMatchObject({ total: null, unpriced_models: ['scripted/unpriced'] });
    expect(report.total.costs.expensive!.total).toBeNull();
    const csv = (
      await (
        await fetch(`${berth.url}/v1/usage?by=session&format=csv`, { headers: { 'x-api-key': berth.apiKey } })
      ).text()
    ).split('\r\n');
    const header = csv[0]!.split(',');
    const fields = csv.find((line) => line.startsWith(`${sessionId},`))!.split(',');
    expect(fields[header.indexOf('expensive_usd')]).toBe('');
    expect(fields[header.indexOf('expensive_unpriced_models')]).toBe('scripted/unpriced');

    // The operator's CLI table over the store, with the same book file.
    const cli = await berthCli([
      'usage',
      '--store',
      '--data-dir',
      berth.dataDir,
      '--by',
      'session',
      '--price-book',
      join(directory, 'expensive.yaml'),
    ]);
    expect(cli.code, cli.stderr).toBe(0);
    const lines = cli.stdout.split('\n');
    expect(lines.find((line) => line.startsWith(sessionId))).toMatch(/ unpriced$/);
    expect(cli.stdout).toContain('expensive: no price for scripted/unpriced');
  });

  it('accepts a budget for a bare claude-* model id, priced as anthropic/claude-*', async () => {
    for (const model of ['claude-sonnet-4-5', 'anthropic/claude-sonnet-4-5']) {
      const agent = await berth.client.beta.agents.create({ name: `bare ${model}`, model });
      const session = await berth.client.beta.sessions.create({
        agent: agent.id,
        environment_id: environmentId,
        budget: { type: 'limit', max_list_cost: { amount: '5', currency: 'USD' } },
      });
      expect(session.budget).toEqual({ type: 'limit', max_list_cost: { amount: '5', currency: 'USD' } });
      // A budget added later is checked the same way.
      const plain = await berth.client.beta.sessions.create({
        agent: agent.id,
        environment_id: environmentId,
      });
      const updated = await berth.client.beta.sessions.update(plain.id, {
        budget: { type: 'limit', max_list_cost: { amount: '5', currency: 'USD' } },
      });
      expect(updated.budget).not.toBeNull();
    }
  });

  it('reports usage per session and per agent over the API (JSON and CSV) and in the CLI, priced side by side', async () => {
    const report = (await (
      await fetch(`${berth.url}/v1/usage?by=agent&price_book=anthropic,cloudflare`, {
        headers: { 'x-api-key': berth.apiKey },
      })
    ).json()) as {
      by: string;
      books: { id: string }[];
      rows: { group: string; sessions: number; usage: { sandbox_cpu_seconds: number } }[];
    };
    expect(report.by).toBe('agent');
    expect(report.books.map((book) => book.id)).toEqual(['anthropic', 'cloudflare']);
    const bashAgent = report.rows.find((row) => row.group === agents['scripted/bash-once']);
    expect(bashAgent?.sessions).toBe(2);
    expect(bashAgent?.usage.sandbox_cpu_seconds).toBeGreaterThan(1.7);

    const csv = await fetch(`${berth.url}/v1/usage?by=session&format=csv`, {
      headers: { 'x-api-key': berth.apiKey },
    });
    expect(csv.headers.get('content-type')).toMatch(/^text\/csv/);
    const lines = (await csv.text()).trim().split(/\r\n/);
    expect(lines[0]).toMatch(/^session,/);
    expect(lines.length).toBeGreaterThanOrEqual(4);

    const bad = await fetch(`${berth.url}/v1/usage?price_book=/etc/passwd`, {
      headers: { 'x-api-key': berth.apiKey },
    });
    expect(bad.status).toBe(400);

    const cli = await berthCli([
      'usage',
      '--by',
      'tenant',
      '--price-book',
      'anthropic,aws-agentcore,google-agent-engine,cloudflare',
      '--url',
      berth.url,
      '--api-key',
      berth.apiKey,
    ]);
    expect(cli.code, cli.stderr).toBe(0);
    expect(cli.stdout).toMatch(/anthropic \$.*aws-agentcore \$.*google-agent-engine \$.*cloudflare \$/);
    expect(cli.stdout).toMatch(/tnt_default/);
  });
});

/**
 * A budget is never enforced against a cost Berth cannot compute: a session whose model the
 * budget book cannot price is refused a budget up front (above), and one already running with a
 * budget when the operator switches to such a book stops before its next model call.
 */
describe('budgets when the price book changes', () => {
  it('stops a budgeted session whose model the new book cannot price before any model call', async () => {
    const directory = await mkdtemp(join(tmpdir(), 'berth-budget-book-'));
    const dataDir = join(directory, 'data');
    const pricing = join(directory, 'expensive.yaml');
    const notPricing = join(directory, 'no-scripted.yaml');
    await writeFile(pricing, EXPENSIVE_BOOK);
    await writeFile(notPricing, NO_SCRIPTED_BOOK);
    let berth = await startTestBerth({ dataDir, environment: { BERTH_BUDGET_PRICE_BOOK: pricing } });
    try {
      const environment = await berth.client.beta.environments.create({ name: 'book-change' });
      const agent = await berth.client.beta.agents.create({ name: 'echo', model: 'scripted/echo' });
      const sessionId = (
        await berth.client.beta.sessions.create({
          agent: agent.id,
          environment_id: environment.id,
          budget: { type: 'limit', max_list_cost: { amount: '100000', currency: 'USD' } },
        })
      ).id;
      await berth.dispose();
      berth = await startTestBerth({ dataDir, environment: { BERTH_BUDGET_PRICE_BOOK: notPricing } });

      const seen = await sendAndWaitIdle(berth.client, sessionId, message('hello'));
      expect(seen.some((event) => event.type === 'span.model_request_start')).toBe(false);
      expect(seen.at(-1)!.stop_reason).toEqual({ type: 'budget_reached' });
      const snapshot = seen.find((event) => event.type === 'session.usage') as unknown as {
        usage: Record<string, unknown>;
      };
      expect(snapshot.usage).not.toHaveProperty('list_cost');
    } finally {
      await berth.dispose();
      await rm(directory, { recursive: true, force: true });
    }
  });
});
