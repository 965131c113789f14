import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createModelRegistry } from '../src/models/provider-registry.js';
import { startTestBerth, type TestBerth } from './support/berth-instance.js';
import { startOtlpReceiver } from './support/otlp-receiver.js';
import { type StreamEvent, sendAndWaitIdle } from './support/session-stream.js';

const PAGE = `<!doctype html><html><head><title>Berth  field guide</title>
<style>body { color: red }</style><script>window.stealCookies()</script></head>
<body><nav>Home | About</nav><h1>Sessions</h1>
<p>The session, not the request, is the <b>unit of compute</b>.</p>
<ul><li>durable log</li><li>stateless harness</li></ul>
<a href="https://example.org/more">read more</a><img src="x.png" alt="diagram"></body></html>`;

const LEAKED_SECRET = `web-fetch-canary-secret-${process.pid}`;

/** A loopback web site: `/page` (HTML), `/data.json`, `/file.bin`, `/bounce` (redirects to `bounceTo`). */
async function startSite(bounceTo: () => string) {
  const hits: string[] = [];
  const server: Server = createServer((request, response) => {
    hits.push(request.url ?? '');
    if (request.url === '/page') {
      response.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
      response.end(PAGE);
    } else if (request.url === '/leak') {
      // A page that serves back a secret some host stored.
      response.writeHead(200, { 'content-type': 'text/plain', 'x-stored': LEAKED_SECRET });
      response.end(`stored earlier: ${LEAKED_SECRET}`);
    } else if (request.url === '/data.json') {
      response.writeHead(200, { 'content-type': 'application/json' });
      response.end('{"answer":42}');
    } else if (request.url === '/file.bin') {
      response.writeHead(200, { 'content-type': 'application/octet-stream' });
      response.end(Buffer.alloc(64));
    } else if (request.url === '/bounce') {
      response.writeHead(302, { location: bounceTo() });
      response.end();
    } else {
      response.writeHead(404, { 'content-type': 'text/plain' });
      response.end('no such page');
    }
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    port: (server.address() as AddressInfo).port,
    hits,
    close: () => new Promise<void>((resolve) => server.close(() => resolve())),
  };
}

/**
 * `web_fetch` end to end: the model asks for a URL, Berth fetches it from the host under the
 * session's egress rules, and the model gets readable text. Refusals are tool errors that say
 * which rule refused, and the refused site is never contacted.
 */
describe('web_fetch', () => {
  let berth: TestBerth;
  let site: Awaited<ReturnType<typeof startSite>>;
  let hidden: Awaited<ReturnType<typeof startSite>>;
  let openEnvironment: string;
  let receiver: Awaited<ReturnType<typeof startOtlpReceiver>>;
  const urls: string[] = [];

  beforeAll(async () => {
    receiver = await startOtlpReceiver();
    hidden = await startSite(() => 'http://unused.invalid/');
    site = await startSite(() => `http://127.0.0.1:${hidden.port}/page`);
    berth = await startTestBerth({
      environment: {
        // docs.example.test is the loopback site; only its port is an operator exception.
        BERTH_EGRESS_HOSTS: 'docs.example.test=127.0.0.1',
        BERTH_EGRESS_ALLOW_PRIVATE: `127.0.0.1:${site.port}`,
        OTEL_EXPORTER_OTLP_ENDPOINT: receiver.endpoint,
        OTEL_BSP_SCHEDULE_DELAY: '50',
      },
      models: createModelRegistry({
        environment: {},
        scriptedScripts: {
          fetcher: {
            name: 'fetcher',
            steps: [
              {
                toolCalls: [
                  {
                    toolName: 'web_fetch',
                    input: {
                      get url() {
                        return urls.shift();
                      },
                    },
                  },
                ],
              },
              { text: 'Read: {{last_tool_result}}' },
            ],
          },
        },
      }),
    });
    openEnvironment = (await berth.client.beta.environments.create({ name: 'open' })).id;
  });
  afterAll(async () => {
    await berth?.dispose();
    await site?.close();
    await hidden?.close();
    await receiver?.close();
  });

  async function fetchOnce(
    url: string,
    options: { environmentId?: string; webFetchConfig?: Record<string, unknown>; vaultIds?: string[] } = {},
  ): Promise<{ result: StreamEvent; events: StreamEvent[] }> {
    const agent = await berth.client.beta.agents.create({
      name: 'fetcher',
      model: 'scripted/fetcher',
      tools: [
        {
          type: 'agent_toolset_20260401',
          ...(options.webFetchConfig ? { configs: [{ name: 'web_fetch', ...options.webFetchConfig }] } : {}),
        } as never,
      ],
    });
    const session = await berth.client.beta.sessions.create({
      agent: agent.id,
      environment_id: options.environmentId ?? openEnvironment,
      ...(options.vaultIds ? { vault_ids: options.vaultIds } : {}),
    });
    urls.push(url);
    await sendAndWaitIdle(berth.client, session.id, [
      { type: 'user.message', content: [{ type: 'text', text: `fetch ${url}` }] },
    ]);
    const events: StreamEvent[] = [];
    for await (const event of berth.client.beta.sessions.events.list(session.id, { limit: 100 }))
      events.push(event as unknown as StreamEvent);
    const result = events.find((event) => event.type === 'agent.tool_result')!;
    return { result, events };
  }

  const textOf = (result: StreamEvent) =>
    (result.content as { type: string; text: string }[]).map((block) => block.text).join('');

  it('turns an HTML page into readable text, without markup, scripts or styles, and audits it', async () => {
    const { result, events } = await fetchOnce(`http://docs.example.test:${site.port}/page`);
    expect(result.is_error).not.toBe(true);
    const text = textOf(result);
    expect(text).toContain('Title: Berth field guide');
    expect(text).toContain('The session, not the request, is the unit of compute.');
    expect(text).toContain('durable log');
    expect(text).toContain('https://example.org/more');
    expect(text).not.toMatch(/<p>|<b>|stealCookies|color: red|Home \| About/);
    expect(events.filter((event) => event.type === 'berth.egress_request')).toMatchObject([
      { purpose: 'web_fetch', host: 'docs.example.test', status: 200, decision: 'allowed', path: '/page' },
    ]);
    // No sandbox was needed.
    expect(events.some((event) => event.type === 'berth.sandbox_started')).toBe(false);
  });

  it('passes JSON through, and refuses binary content and error pages as tool errors', async () => {
    expect(textOf((await fetchOnce(`http://docs.example.test:${site.port}/data.json`)).result)).toContain(
      '{"answer":42}',
    );
    const binary = (await fetchOnce(`http://docs.example.test:${site.port}/file.bin`)).result;
    expect(binary.is_error).toBe(true);
    expect(textOf(binary)).toMatch(/application\/octet-stream; only text, HTML, JSON and XML/);
    const missing = (await fetchOnce(`http://docs.example.test:${site.port}/nope`)).result;
    expect(missing.is_error).toBe(true);
    expect(textOf(missing)).toMatch(/answered 404/);
  });

  it('refuses a redirect to a private address; the target is never contacted', async () => {
    const before = hidden.hits.length;
    const { result, events } = await fetchOnce(`http://docs.example.test:${site.port}/bounce`);
    expect(result.is_error).toBe(true);
    expect(textOf(result)).toMatch(/private, loopback or link-local/);
    expect(hidden.hits.length).toBe(before);
    expect(
      events.filter((event) => event.type === 'berth.egress_request').map((event) => event.decision),
    ).toEqual(['allowed', 'denied']);
  });

  it('follows the environment networking and the tool config: allowed_hosts, blocked_domains, allowed_domains', async () => {
    const limited = await berth.client.beta.environments.create({
      name: 'limited',
      config: { type: 'cloud', networking: { type: 'limited', allowed_hosts: ['example.com'] } },
    });
    const before = site.hits.length;
    const outside = await fetchOnce(`http://docs.example.test:${site.port}/page`, {
      environmentId: limited.id,
    });
    expect(textOf(outside.result)).toMatch(/not in the environment's allowed_hosts/);
    const blocked = await fetchOnce(`http://docs.example.test:${site.port}/page`, {
      webFetchConfig: { blocked_domains: ['example.test'] },
    });
    expect(textOf(blocked.result)).toMatch(/docs\.example\.test is in this tool's blocked_domains/);
    const notAllowed = await fetchOnce(`http://docs.example.test:${site.port}/page`, {
      webFetchConfig: { allowed_domains: ['example.org'] },
    });
    expect(textOf(notAllowed.result)).toMatch(/not in this tool's allowed_domains/);
    expect(site.hits.length).toBe(before);
  });

  it('cuts the text at max_content_tokens and says so', async () => {
    const { result } = await fetchOnce(`http://docs.example.test:${site.port}/page`, {
      webFetchConfig: { max_content_tokens: 5 },
    });
    const text = textOf(result);
    expect(text).toContain('[content truncated to 20 characters]');
    expect(text).not.toContain('durable log');
  });
  it('traces each request under its tool call and counts refused ones as denials', async () => {
    await fetchOnce(`http://docs.example.test:${site.port}/data.json`);
    await fetchOnce(`http://127.0.0.1:${hidden.port}/secret-path`);
    const spans = () =>
      receiver.spans.filter((span) => span.attributes['berth.egress.purpose'] === 'web_fetch');
    await receiver.waitForSpans(
      () => berth.telemetry.forceFlush(),
      () => spans().some((span) => span.attributes['berth.egress.decision'] === 'denied'),
    );
    // The JSON answer's span (earlier tests fetched other pages of the same site).
    const allowed = spans().find(
      (span) =>
        span.attributes['server.address'] === 'docs.example.test' &&
        span.attributes['berth.egress.bytes_received'] === Buffer.byteLength('{"answer":42}'),
    )!;
    expect(allowed).toMatchObject({ name: 'egress GET', kind: 3 });
    expect(allowed.attributes['http.response.status_code']).toBe(200);
    expect(receiver.spans.find((span) => span.spanId === allowed.parentSpanId)?.name).toBe(
      'execute_tool web_fetch',
    );
    const denied = spans().find((span) => span.attributes['berth.egress.decision'] === 'denied')!;
    expect(denied.status.code).toBe(2);
    expect(JSON.stringify(receiver.spans)).not.toContain('/secret-path');
    const metrics = await (await fetch(`${berth.url}/metrics`)).text();
    const sample = (series: string) =>
      Number(
        metrics
          .split('\n')
          .find((line) => line.startsWith(`${series} `))
          ?.split(' ')[1] ?? Number.NaN,
      );
    expect(
      sample('berth_egress_requests_total{source="web_fetch",decision="allowed"}'),
    ).toBeGreaterThanOrEqual(1);
    expect(sample('berth_egress_denied_total{source="web_fetch",status="403"}')).toBeGreaterThanOrEqual(1);
  });
  it('shows the model a placeholder, never the secret, when a page serves back a vault secret', async () => {
    const vault = await berth.client.beta.vaults.create({ display_name: 'web' });
    await berth.client.beta.vaults.credentials.create(vault.id, {
      auth: {
        type: 'environment_variable',
        secret_name: 'API_TOKEN',
        secret_value: LEAKED_SECRET,
        networking: { type: 'limited', allowed_hosts: ['api.example.test'] },
      },
    });
    const { result, events } = await fetchOnce(`http://docs.example.test:${site.port}/leak`, {
      vaultIds: [vault.id],
    });
    expect(textOf(result)).toMatch(/stored earlier: berth_placeholder_[0-9a-f]+/);
    expect(JSON.stringify(events)).not.toContain(LEAKED_SECRET);
  });
});
