import { randomUUID } from 'node:crypto';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { McpServer } from '@modelcontextprotocol/sdk/server/mcp.js';
import { StreamableHTTPServerTransport } from '@modelcontextprotocol/sdk/server/streamableHttp.js';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { z } from 'zod';
import { loadConfig } from '../src/config/config.js';
import { createModelRegistry } from '../src/models/provider-registry.js';
import { createTelemetry } from '../src/telemetry/tracing.js';
import { startTestBerth, type TestBerth } from './support/berth-instance.js';
import { type ReceivedSpan, startOtlpReceiver } from './support/otlp-receiver.js';
import { sendAndWaitIdle } from './support/session-stream.js';

/** A remote MCP server that records the trace context each tool call arrived with. */
async function startProbeMcpServer() {
  const calls: { traceparentHeader: string | undefined; metaTraceparent: unknown }[] = [];
  const server: Server = createServer(async (request, response) => {
    // Stateless: a fresh MCP server and transport per HTTP request.
    const mcp = new McpServer({ name: 'probe', version: '1.0.0' });
    mcp.registerTool(
      'echo',
      { description: 'Echoes its message', inputSchema: { message: z.string() } },
      async ({ message }, extra) => {
        const header = extra.requestInfo?.headers.traceparent;
        calls.push({
          traceparentHeader: Array.isArray(header) ? header[0] : header,
          metaTraceparent: (extra._meta as Record<string, unknown> | undefined)?.traceparent,
        });
        return { content: [{ type: 'text', text: `echo: ${message}` }] };
      },
    );
    const transport = new StreamableHTTPServerTransport({ sessionIdGenerator: undefined });
    response.on('close', () => {
      void transport.close();
      void mcp.close();
    });
    await mcp.connect(transport);
    await transport.handleRequest(request, response);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    url: `http://127.0.0.1:${(server.address() as AddressInfo).port}/mcp`,
    calls,
    close: () => new Promise<void>((resolve) => server.close(() => resolve())),
  };
}

const CANARY_KEY = `sk-canary-${randomUUID()}`;
const SECRET_TEXT = `the launch code is ${randomUUID()}`;

/**
 * A tool-using turn exports one trace: the turn (`invoke_agent`) under the client's
 * `traceparent`, model requests (`chat …`, GenAI attributes), tool calls (`execute_tool …`)
 * with their sandbox work below, and the trace context reaches the MCP server. Nothing secret
 * (keys from the server's environment, message text) is in any attribute.
 */
describe('OpenTelemetry traces', () => {
  let berth: TestBerth;
  let receiver: Awaited<ReturnType<typeof startOtlpReceiver>>;
  let probe: Awaited<ReturnType<typeof startProbeMcpServer>>;

  beforeAll(async () => {
    receiver = await startOtlpReceiver();
    probe = await startProbeMcpServer();
    berth = await startTestBerth({
      environment: {
        // The probe MCP server is on loopback, which Berth reaches only as an operator exception.
        BERTH_EGRESS_ALLOW_PRIVATE: new URL(probe.url).host,
        OTEL_EXPORTER_OTLP_ENDPOINT: receiver.endpoint,
        OTEL_SERVICE_NAME: 'berth-under-test',
        OTEL_BSP_SCHEDULE_DELAY: '50',
        OPENAI_COMPATIBLE_API_KEY: CANARY_KEY,
        ANTHROPIC_API_KEY: CANARY_KEY,
      },
      models: createModelRegistry({
        environment: {},
        scriptedScripts: {
          traced: {
            name: 'traced',
            steps: [
              {
                toolCalls: [
                  { toolName: 'bash', input: { command: 'echo traced > traced.txt && cat traced.txt' } },
                  { toolName: 'probe__echo', input: { message: 'hello probe' } },
                ],
              },
              { text: 'Done: {{last_tool_result}}' },
            ],
          },
        },
      }),
    });
  });
  afterAll(async () => {
    await berth?.dispose();
    await probe?.close();
    await receiver?.close();
  });

  it('exports the span tree of a tool-using turn under the client trace, with GenAI attributes and no secrets', async () => {
    const agent = await berth.client.beta.agents.create({
      name: 'traced',
      model: 'scripted/traced',
      tools: [
        { type: 'agent_toolset_20260401' },
        {
          type: 'mcp_toolset',
          mcp_server_name: 'probe',
          default_config: { permission_policy: { type: 'always_allow' } },
        },
      ],
      mcp_servers: [{ name: 'probe', type: 'url', url: probe.url }],
    });
    const environment = await berth.client.beta.environments.create({ name: 'traced' });
    const session = await berth.client.beta.sessions.create({
      agent: agent.id,
      environment_id: environment.id,
    });

    const clientTraceId = '4bf92f3577b34da6a3ce929d0e0e4736';
    const clientSpanId = '00f067aa0ba902b7';
    const seen = await sendAndWaitIdle(
      berth.client,
      session.id,
      [{ type: 'user.message', content: [{ type: 'text', text: SECRET_TEXT }] }],
      { headers: { traceparent: `00-${clientTraceId}-${clientSpanId}-01` } },
    );
    expect(seen[seen.length - 1]!.stop_reason).toEqual({ type: 'end_turn' });
    // The turn span ends when the wake returns, just after the idle event the client saw.
    await berth.supervisor.settled(berth.keyOf(session.id));
    await receiver.waitForSpans(
      () => berth.telemetry.forceFlush(),
      (all) => all.some((span) => span.traceId === clientTraceId && span.name === 'invoke_agent'),
    );

    const spans = receiver.spans.filter((span) => span.traceId === clientTraceId);
    const byName = (name: string) => spans.filter((span) => span.name === name);
    const parentOf = (span: ReceivedSpan) =>
      spans.find((candidate) => candidate.spanId === span.parentSpanId);

    // The turn hangs under the client's span.
    const turns = byName('invoke_agent');
    expect(turns).toHaveLength(1);
    const turn = turns[0]!;
    expect(turn.parentSpanId).toBe(clientSpanId);
    expect(turn.serviceName).toBe('berth-under-test');
    expect(turn.attributes).toMatchObject({
      'gen_ai.operation.name': 'invoke_agent',
      'gen_ai.conversation.id': session.id,
    });

    // Two model requests (tool calls, then the answer), children of the turn.
    const chats = byName('chat scripted/traced');
    expect(chats).toHaveLength(2);
    for (const chat of chats) {
      expect(parentOf(chat)).toBe(turn);
      expect(chat.kind).toBe(3); // CLIENT
      expect(chat.attributes).toMatchObject({
        'gen_ai.operation.name': 'chat',
        'gen_ai.provider.name': 'scripted',
        'gen_ai.request.model': 'scripted/traced',
        // A model request names its session like the turn and tool spans do.
        'gen_ai.conversation.id': session.id,
        'berth.session.id': session.id,
      });
      expect(chat.attributes['gen_ai.usage.input_tokens']).toBeGreaterThan(0);
      expect(chat.attributes['gen_ai.usage.output_tokens']).toBeGreaterThan(0);
    }
    expect(chats.map((chat) => chat.attributes['gen_ai.response.finish_reasons'])).toEqual([
      ['tool-calls'],
      ['stop'],
    ]);
    // Token counts equal what the log recorded for each model request.
    const ends = seen.filter((event) => event.type === 'span.model_request_end');
    expect(chats.map((chat) => chat.attributes['gen_ai.usage.input_tokens'])).toEqual(
      ends.map((event) => (event.model_usage as { input_tokens: number }).input_tokens),
    );

    // Tool calls under the turn; the bash call's sandbox work under the tool call.
    const bash = byName('execute_tool bash');
    expect(bash).toHaveLength(1);
    expect(parentOf(bash[0]!)).toBe(turn);
    const toolUses = seen.filter((event) => event.type === 'agent.tool_use');
    expect(bash[0]!.attributes).toMatchObject({
      'gen_ai.operation.name': 'execute_tool',
      'gen_ai.conversation.id': session.id,
      'berth.session.id': session.id,
      'gen_ai.tool.name': 'bash',
      'gen_ai.tool.call.id': toolUses[0]!.id,
    });
    const execs = byName('sandbox.exec').filter((span) => parentOf(span) === bash[0]);
    expect(execs.length).toBeGreaterThanOrEqual(1);
    expect(execs[0]!.attributes).toMatchObject({ 'berth.sandbox.driver': 'bwrap', 'process.exit.code': 0 });
    const provisions = byName('sandbox.provision');
    expect(provisions).toHaveLength(1);
    expect(provisions[0]!.traceId).toBe(clientTraceId);

    // The MCP call carries the turn's trace to the server, as a header and in _meta.
    const mcp = byName('execute_tool probe__echo');
    expect(mcp).toHaveLength(1);
    expect(parentOf(mcp[0]!)).toBe(turn);
    expect(mcp[0]!.attributes['berth.mcp.server']).toBe('probe');
    const call = probe.calls.at(-1)!;
    expect(call.traceparentHeader).toMatch(new RegExp(`^00-${clientTraceId}-${mcp[0]!.spanId}-01$`));
    expect(call.metaTraceparent).toBe(call.traceparentHeader);

    // The default transport is the specification's: protobuf over HTTP, to <endpoint>/v1/traces.
    expect(receiver.exports.length).toBeGreaterThan(0);
    for (const received of receiver.exports) {
      expect(received).toMatchObject({ protocol: 'http/protobuf', path: '/v1/traces' });
    }

    // Nothing secret anywhere in what was exported.
    const exported = receiver.rawBodies.join('\n');
    expect(exported).not.toContain(CANARY_KEY);
    expect(exported).not.toContain(SECRET_TEXT);
    expect(exported).not.toContain('launch code');
  });

  it('traces a sandbox stopped on request and resumed by the next tool call', async () => {
    const agent = await berth.client.beta.agents.create({
      name: 'stop-resume',
      model: 'scripted/bash-once',
      tools: [{ type: 'agent_toolset_20260401' }],
    });
    const environment = await berth.client.beta.environments.create({ name: 'stop-resume' });
    const session = await berth.client.beta.sessions.create({
      agent: agent.id,
      environment_id: environment.id,
    });
    const say = (text: string) =>
      sendAndWaitIdle(berth.client, session.id, [
        { type: 'user.message', content: [{ type: 'text', text }] },
      ]);
    await say('echo one > one.txt');
    const stopped = await fetch(`${berth.url}/v1/sessions/${session.id}/stop`, {
      method: 'POST',
      headers: { 'x-api-key': berth.apiKey },
    });
    expect(stopped.status).toBe(200);
    await say('cat one.txt');
    await berth.supervisor.settled(berth.keyOf(session.id));
    // The second turn's spans may still be open or in flight after the idle: wait for its turn span.
    const turnOf = (all: readonly ReceivedSpan[], traceId: string) =>
      all.some(
        (span) =>
          span.traceId === traceId &&
          span.name === 'invoke_agent' &&
          span.attributes['gen_ai.conversation.id'] === session.id,
      );
    await receiver.waitForSpans(
      () => berth.telemetry.forceFlush(),
      (all) =>
        all.some(
          (span) =>
            span.name === 'sandbox.resume' &&
            span.attributes['berth.session.id'] === session.id &&
            turnOf(all, span.traceId),
        ),
    );
    const ofSession = receiver.spans.filter((span) => span.attributes['berth.session.id'] === session.id);
    const stop = ofSession.filter((span) => span.name === 'sandbox.stop');
    const resume = ofSession.filter((span) => span.name === 'sandbox.resume');
    expect(stop).toHaveLength(1);
    expect(stop[0]!.attributes).toMatchObject({
      'berth.sandbox.driver': 'bwrap',
      'berth.sandbox.memory_kept': false,
    });
    expect(resume).toHaveLength(1);
    // The resume happened for the second turn's tool call: it hangs in that turn's trace.
    const turnTraces = new Set(
      receiver.spans
        .filter(
          (span) => span.name === 'invoke_agent' && span.attributes['gen_ai.conversation.id'] === session.id,
        )
        .map((span) => span.traceId),
    );
    expect(turnTraces.has(resume[0]!.traceId)).toBe(true);
  });

  it('starts a new trace per turn when the client sends no trace context', async () => {
    const agent = await berth.client.beta.agents.create({ name: 'plain', model: 'scripted/echo' });
    const environment = await berth.client.beta.environments.create({ name: 'plain' });
    const session = await berth.client.beta.sessions.create({
      agent: agent.id,
      environment_id: environment.id,
    });
    const say = (text: string) =>
      sendAndWaitIdle(berth.client, session.id, [
        { type: 'user.message', content: [{ type: 'text', text }] },
      ]);
    await say('one');
    await say('two');
    await berth.supervisor.settled(berth.keyOf(session.id));
    await receiver.waitForSpans(
      () => berth.telemetry.forceFlush(),
      (all) =>
        all.filter(
          (span) => span.name === 'invoke_agent' && span.attributes['gen_ai.conversation.id'] === session.id,
        ).length >= 2,
    );
    const turns = receiver.spans.filter(
      (span) => span.name === 'invoke_agent' && span.attributes['gen_ai.conversation.id'] === session.id,
    );
    expect(turns).toHaveLength(2);
    expect(turns.every((span) => span.parentSpanId === undefined)).toBe(true);
    expect(new Set(turns.map((span) => span.traceId)).size).toBe(2);
  });
});

/**
 * The standard `OTEL_EXPORTER_OTLP_*` variables choose the transport, the URL and the headers
 * of trace exports, as the OpenTelemetry specification defines them; each case sends one span
 * through the exporter Berth builds from its configuration and reads what the collector got.
 */
describe('OTLP export settings', () => {
  let receiver: Awaited<ReturnType<typeof startOtlpReceiver>>;
  beforeAll(async () => {
    receiver = await startOtlpReceiver({ grpc: true });
  });
  afterAll(async () => {
    await receiver?.close();
  });

  /** Exports one span named `name` with the configuration `environment` gives; returns its export. */
  const exportOneSpan = async (environment: Record<string, string>) => {
    const name = `probe-${randomUUID()}`;
    const telemetry = await createTelemetry(loadConfig({ environment }).telemetry);
    expect(telemetry.enabled).toBe(true);
    const before = receiver.exports.length;
    telemetry.tracer.startSpan(name, { attributes: { 'probe.value': 42 } }).end();
    await receiver.waitForSpans(
      () => telemetry.forceFlush(),
      (all) => all.some((span) => span.name === name),
    );
    await telemetry.shutdown();
    const span = receiver.spans.find((candidate) => candidate.name === name);
    expect(span?.attributes['probe.value']).toBe(42);
    expect(span?.traceId).toMatch(/^[0-9a-f]{32}$/);
    return receiver.exports.slice(before).at(-1)!;
  };

  it('sends protobuf over HTTP by default, to the generic endpoint plus /v1/traces, with merged headers', async () => {
    const received = await exportOneSpan({
      OTEL_EXPORTER_OTLP_ENDPOINT: `${receiver.endpoint}/collector/`,
      OTEL_EXPORTER_OTLP_HEADERS: 'x-tenant=acme,x-shared=generic',
      OTEL_EXPORTER_OTLP_TRACES_HEADERS: 'x-shared=traces%20only',
    });
    expect(received.protocol).toBe('http/protobuf');
    expect(received.path).toBe('/collector/v1/traces');
    expect(received.headers).toMatchObject({ 'x-tenant': 'acme', 'x-shared': 'traces only' });
  });

  it('sends JSON when OTEL_EXPORTER_OTLP_PROTOCOL is http/json', async () => {
    const received = await exportOneSpan({
      OTEL_EXPORTER_OTLP_ENDPOINT: receiver.endpoint,
      OTEL_EXPORTER_OTLP_PROTOCOL: 'http/json',
    });
    expect(received).toMatchObject({ protocol: 'http/json', path: '/v1/traces' });
  });

  it('lets the traces-specific protocol and endpoint win, using that endpoint as is', async () => {
    const received = await exportOneSpan({
      OTEL_EXPORTER_OTLP_ENDPOINT: receiver.grpcEndpoint!,
      OTEL_EXPORTER_OTLP_PROTOCOL: 'grpc',
      OTEL_EXPORTER_OTLP_TRACES_PROTOCOL: 'http/json',
      OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: `${receiver.endpoint}/exactly/here`,
    });
    expect(received).toMatchObject({ protocol: 'http/json', path: '/exactly/here' });
  });

  it('exports over gRPC when the protocol is grpc, the generic endpoint used as is and headers as metadata', async () => {
    const received = await exportOneSpan({
      OTEL_EXPORTER_OTLP_ENDPOINT: receiver.grpcEndpoint!,
      OTEL_EXPORTER_OTLP_PROTOCOL: 'grpc',
      OTEL_EXPORTER_OTLP_HEADERS: 'x-tenant=acme',
    });
    expect(received.protocol).toBe('grpc');
    expect(received.path).toBe('/opentelemetry.proto.collector.trace.v1.TraceService/Export');
    expect(received.headers['x-tenant']).toBe('acme');
  });
});
