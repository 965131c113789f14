import type { LanguageModelV3, LanguageModelV3StreamPart } from '@ai-sdk/provider';
import {
  type Attributes,
  type Context,
  ROOT_CONTEXT,
  type Span,
  SpanKind,
  SpanStatusCode,
  type Tracer,
  trace,
} from '@opentelemetry/api';
import { W3CTraceContextPropagator } from '@opentelemetry/core';
import { resourceFromAttributes } from '@opentelemetry/resources';
import { BasicTracerProvider, BatchSpanProcessor, type SpanExporter } from '@opentelemetry/sdk-trace-base';
import type { TelemetryConfig } from '../config/config.js';
import type { EgressAuditRecord } from '../egress/proxy.js';
import type { Harness, SessionToolbox, WakeControl } from '../harness/harness.js';
import type { ModelRegistry } from '../models/model-registry.js';
import type { SandboxDriver } from '../sandbox/driver.js';
import { type EventStore, type SessionKey, sessionKeyString } from '../store/event-store.js';
import type { SessionRecord } from '../store/resource-store.js';

/**
 * Tracing, as interceptors around the ports (model registry, toolbox, sandbox driver, event
 * store, harness), never calls sprinkled through the loop. Off (no OTLP endpoint configured)
 * means a no-op tracer and no wrappers at all: it costs nothing. Span names and attributes
 * follow the OpenTelemetry GenAI semantic conventions (`invoke_agent`, `chat`, `execute_tool`).
 * Attributes carry ids, names, sizes and token counts, never message text, tool input or output,
 * nor any credential.
 *
 * Parents are passed explicitly, not through a global AsyncLocalStorage context manager (on
 * Node 20 that slows every promise in the process): the turn span of each session, and the
 * tool span running in it, are kept in `contexts` keyed by tenant and session.
 */
export interface Telemetry {
  readonly enabled: boolean;
  readonly tracer: Tracer;
  readonly contexts: TraceContexts;
  /** Exports what is buffered (tests; shutdown). */
  forceFlush(): Promise<void>;
  shutdown(): Promise<void>;
}

const propagator = new W3CTraceContextPropagator();

/** The span each session's work is under right now: its running tool's, else its turn's. */
export class TraceContexts {
  readonly #turns = new Map<string, Context>();
  readonly #tools = new Map<string, Context>();
  /** Sandbox sessions by id (the driver port knows only the id) to their tenant-scoped key. */
  readonly #sandboxSessions = new Map<string, string>();

  /** The parent for new spans of a session. */
  parentOf(session: SessionKey): Context {
    const key = sessionKeyString(session);
    return this.#tools.get(key) ?? this.#turns.get(key) ?? ROOT_CONTEXT;
  }

  /** The parent for spans of a sandbox, by the session id its spec named. */
  parentOfSandbox(sessionId: string): Context {
    const key = this.#sandboxSessions.get(sessionId);
    return (key && (this.#tools.get(key) ?? this.#turns.get(key))) || ROOT_CONTEXT;
  }

  /** Runs `work` with `context` as the session's turn (or, with `tool`, its tool) context. */
  async within<T>(
    session: SessionKey,
    kind: 'turn' | 'tool',
    context: Context,
    work: () => Promise<T>,
  ): Promise<T> {
    const key = sessionKeyString(session);
    const map = kind === 'turn' ? this.#turns : this.#tools;
    map.set(key, context);
    this.#sandboxSessions.set(session.id, key);
    try {
      return await work();
    } finally {
      map.delete(key);
      if (!this.#turns.has(key) && !this.#tools.has(key)) this.#sandboxSessions.delete(session.id);
    }
  }

  /** The session's current trace context as W3C headers, for calls that leave Berth (MCP). */
  headersOf(session: SessionKey): Record<string, string> {
    const headers: Record<string, string> = {};
    propagator.inject(this.parentOf(session), headers, {
      set: (carrier, key, value) => {
        (carrier as Record<string, string>)[key] = value;
      },
    });
    return headers;
  }
}

/**
 * The official OTLP span exporter for the configured protocol. Each is imported only when
 * chosen, so a server that exports JSON or protobuf over HTTP never loads gRPC.
 */
export async function createSpanExporter(
  config: TelemetryConfig & { tracesEndpoint: string },
): Promise<SpanExporter> {
  type ExporterOptions = NonNullable<
    ConstructorParameters<typeof import('@opentelemetry/exporter-trace-otlp-proto').OTLPTraceExporter>[0]
  >;
  const common = {
    url: config.tracesEndpoint,
    timeoutMillis: config.timeoutMs,
    // The exporters' CompressionAlgorithm is a string enum of these same two values.
    compression: config.compression as ExporterOptions['compression'],
  };
  switch (config.protocol) {
    case 'http/protobuf': {
      const { OTLPTraceExporter } = await import('@opentelemetry/exporter-trace-otlp-proto');
      return new OTLPTraceExporter({ ...common, headers: config.headers });
    }
    case 'http/json': {
      const { OTLPTraceExporter } = await import('@opentelemetry/exporter-trace-otlp-http');
      return new OTLPTraceExporter({ ...common, headers: config.headers });
    }
    case 'grpc': {
      const [{ OTLPTraceExporter }, { Metadata }] = await Promise.all([
        import('@opentelemetry/exporter-trace-otlp-grpc'),
        import('@grpc/grpc-js'),
      ]);
      const metadata = new Metadata();
      for (const [key, value] of Object.entries(config.headers)) metadata.set(key, value);
      // The scheme of the URL says whether to use TLS (`http` means a plaintext channel).
      return new OTLPTraceExporter({ ...common, metadata });
    }
  }
}

/** Starts tracing when an OTLP endpoint is configured; otherwise returns the no-op telemetry. */
export async function createTelemetry(config: TelemetryConfig): Promise<Telemetry> {
  const contexts = new TraceContexts();
  if (!config.tracesEndpoint) {
    return {
      enabled: false,
      tracer: trace.getTracer('berth'),
      contexts,
      forceFlush: async () => undefined,
      shutdown: async () => undefined,
    };
  }
  const exporter = await createSpanExporter({ ...config, tracesEndpoint: config.tracesEndpoint });
  const provider = new BasicTracerProvider({
    resource: resourceFromAttributes({ 'service.name': config.serviceName }),
    spanProcessors: [new BatchSpanProcessor(exporter, { scheduledDelayMillis: config.exportDelayMs })],
  });
  return {
    enabled: true,
    tracer: provider.getTracer('berth'),
    contexts,
    forceFlush: () => provider.forceFlush(),
    shutdown: () => provider.shutdown(),
  };
}

/** The W3C trace context (`traceparent`, `tracestate`) a client sent, if any. */
export function extractTraceContext(headers: (name: string) => string | undefined): Context | undefined {
  if (!headers('traceparent')) return undefined;
  const extracted = propagator.extract(
    ROOT_CONTEXT,
    { traceparent: headers('traceparent'), tracestate: headers('tracestate') },
    {
      get: (carrier, key) => (carrier as Record<string, string | undefined>)[key],
      keys: (carrier) => Object.keys(carrier),
    },
  );
  return trace.getSpanContext(extracted) ? extracted : undefined;
}

/** Runs `work` in a span under `parent` that ends with it, recording a thrown error. */
async function inSpan<T>(
  tracer: Tracer,
  name: string,
  options: { kind?: SpanKind; attributes?: Attributes; parent: Context },
  work: (span: Span, context: Context) => Promise<T>,
): Promise<T> {
  const span = tracer.startSpan(
    name,
    { kind: options.kind ?? SpanKind.INTERNAL, attributes: options.attributes },
    options.parent,
  );
  try {
    return await work(span, trace.setSpan(options.parent, span));
  } catch (error) {
    span.recordException(error as Error);
    span.setStatus({ code: SpanStatusCode.ERROR, message: (error as Error).message });
    throw error;
  } finally {
    span.end();
  }
}

/** Each wake is a turn span (`invoke_agent`), under the client's trace context when it sent one. */
export function tracedHarness(harness: Harness, tracer: Tracer, contexts: TraceContexts): Harness {
  return {
    ...harness,
    wake: (session: Parameters<Harness['wake']>[0], control: WakeControl) =>
      inSpan(
        tracer,
        'invoke_agent',
        {
          parent: control.trace ?? ROOT_CONTEXT,
          attributes: {
            'gen_ai.operation.name': 'invoke_agent',
            ...sessionAttributes(session.id),
            'berth.tenant.id': session.tenantId,
          },
        },
        (_span, turn) => contexts.within(session, 'turn', turn, () => harness.wake(session, control)),
      ),
  };
}

/**
 * The attributes naming a session on every span of its work: the GenAI conventions' conversation
 * id and Berth's own session id, so a backend can find all of a session's spans by either.
 */
export function sessionAttributes(sessionId: string): Attributes {
  return { 'gen_ai.conversation.id': sessionId, 'berth.session.id': sessionId };
}

/** Model calls as `chat <model>` client spans with GenAI request, usage and finish attributes. */
export function tracedModels(models: ModelRegistry, tracer: Tracer, contexts: TraceContexts): ModelRegistry {
  return {
    resolve(modelId, resolveContext) {
      const model = models.resolve(modelId, resolveContext);
      const parent = resolveContext ? contexts.parentOf(resolveContext.session) : ROOT_CONTEXT;
      const traced: LanguageModelV3 = {
        ...model,
        specificationVersion: model.specificationVersion,
        provider: model.provider,
        modelId: model.modelId,
        supportedUrls: model.supportedUrls,
        doGenerate: (options) => model.doGenerate(options),
        async doStream(options) {
          const span = tracer.startSpan(
            `chat ${modelId}`,
            {
              kind: SpanKind.CLIENT,
              attributes: {
                'gen_ai.operation.name': 'chat',
                'gen_ai.provider.name': modelId.split('/')[0] ?? model.provider,
                'gen_ai.request.model': modelId,
                ...(resolveContext ? sessionAttributes(resolveContext.session.id) : {}),
                ...(options.maxOutputTokens === undefined
                  ? {}
                  : { 'gen_ai.request.max_tokens': options.maxOutputTokens }),
              },
            },
            parent,
          );
          let result: Awaited<ReturnType<LanguageModelV3['doStream']>>;
          try {
            result = await model.doStream(options);
          } catch (error) {
            span.recordException(error as Error);
            span.setStatus({ code: SpanStatusCode.ERROR, message: (error as Error).message });
            span.end();
            throw error;
          }
          let ended = false;
          const end = (error?: unknown) => {
            if (ended) return;
            ended = true;
            if (error !== undefined) span.setStatus({ code: SpanStatusCode.ERROR, message: String(error) });
            span.end();
          };
          const observe = (part: LanguageModelV3StreamPart) => {
            if (part.type === 'response-metadata' && part.modelId) {
              span.setAttribute('gen_ai.response.model', part.modelId);
            }
            if (part.type === 'finish') {
              span.setAttributes({
                'gen_ai.response.finish_reasons': [part.finishReason.unified],
                'gen_ai.usage.input_tokens': part.usage.inputTokens.total ?? 0,
                'gen_ai.usage.output_tokens': part.usage.outputTokens.total ?? 0,
              });
            }
            if (part.type === 'error') end(part.error);
          };
          // A plain pull-through stream, so an interrupt (the consumer cancelling) ends the span too.
          const reader = result.stream.getReader();
          const stream = new ReadableStream<LanguageModelV3StreamPart>({
            async pull(controller) {
              try {
                const { done, value } = await reader.read();
                if (done) {
                  end();
                  controller.close();
                  return;
                }
                observe(value);
                controller.enqueue(value);
              } catch (error) {
                end(error);
                controller.error(error);
              }
            },
            cancel(reason) {
              end(reason ?? 'cancelled');
              return reader.cancel(reason);
            },
          });
          return { ...result, stream };
        },
      };
      return traced;
    },
  };
}

/** Tool calls as `execute_tool <name>` spans. */
export function tracedToolbox(
  toolbox: SessionToolbox,
  tracer: Tracer,
  contexts: TraceContexts,
  session: SessionRecord,
): SessionToolbox {
  return {
    ...toolbox,
    listTools: () => toolbox.listTools(),
    failures: toolbox.failures ? () => toolbox.failures!() : undefined,
    instructions: toolbox.instructions ? () => toolbox.instructions!() : undefined,
    async execute(name, input, options) {
      const tool = (await toolbox.listTools()).find((candidate) => candidate.name === name);
      return inSpan(
        tracer,
        `execute_tool ${name}`,
        {
          parent: contexts.parentOf(session),
          attributes: {
            'gen_ai.operation.name': 'execute_tool',
            'gen_ai.tool.name': name,
            'gen_ai.tool.type': tool?.kind === 'custom' ? 'extension' : 'function',
            ...(options.toolUseId ? { 'gen_ai.tool.call.id': options.toolUseId } : {}),
            ...(tool?.mcp ? { 'berth.mcp.server': tool.mcp.serverName } : {}),
            ...sessionAttributes(session.id),
          },
        },
        async (span, tool) => {
          const outcome = await contexts.within(session, 'tool', tool, () =>
            toolbox.execute(name, input, options),
          );
          if (outcome.isError)
            span.setStatus({ code: SpanStatusCode.ERROR, message: 'the tool reported an error' });
          span.setAttribute('berth.tool.output_bytes', Buffer.byteLength(outcome.content));
          return outcome;
        },
      );
    },
  };
}

/** Sandbox provisioning and every exec as spans (driver name, exit code, duration). */
export function tracedDriver(driver: SandboxDriver, tracer: Tracer, contexts: TraceContexts): SandboxDriver {
  const sessionOfHandle = new WeakMap<object, string>();
  const provision: SandboxDriver['provision'] = (spec) =>
    inSpan(
      tracer,
      // Resuming a stopped sandbox from its snapshot is a provision too, traced by its own name.
      spec.restoreFrom ? 'sandbox.resume' : 'sandbox.provision',
      {
        parent: contexts.parentOfSandbox(spec.sessionId),
        attributes: { 'berth.sandbox.driver': driver.name, 'berth.session.id': spec.sessionId },
      },
      async () => {
        const handle = await driver.provision(spec);
        sessionOfHandle.set(handle, spec.sessionId);
        return handle;
      },
    );
  const exec: SandboxDriver['exec'] = (handle, argv, options) =>
    inSpan(
      tracer,
      'sandbox.exec',
      {
        parent: contexts.parentOfSandbox(sessionOfHandle.get(handle) ?? ''),
        attributes: { 'berth.sandbox.driver': driver.name, 'process.executable.name': argv[0] ?? '' },
      },
      async (span) => {
        const result = await driver.exec(handle, argv, options);
        span.setAttribute('process.exit.code', result.exitCode ?? -1);
        return result;
      },
    );
  const suspend: SandboxDriver['suspend'] = (handle, directory) =>
    inSpan(
      tracer,
      'sandbox.stop',
      {
        parent: contexts.parentOfSandbox(sessionOfHandle.get(handle) ?? ''),
        attributes: { 'berth.sandbox.driver': driver.name, 'berth.session.id': handle.sessionId },
      },
      async (span) => {
        const result = await driver.suspend(handle, directory);
        span.setAttribute('berth.sandbox.memory_kept', result.memory);
        return result;
      },
    );
  return new Proxy(driver, {
    get(target, property) {
      if (property === 'provision') return provision;
      if (property === 'exec') return exec;
      if (property === 'suspend') return suspend;
      const value = Reflect.get(target, property, target);
      return typeof value === 'function' ? value.bind(target) : value;
    },
  });
}

/** Appends slower than `thresholdMs` as `store.append` spans (fast ones cost nothing). */
export function tracedEventStore(
  events: EventStore,
  tracer: Tracer,
  contexts: TraceContexts,
  thresholdMs: number,
): EventStore {
  const append: EventStore['append'] = async (session, batch, options) => {
    const started = Date.now();
    const parent = contexts.parentOf(session);
    try {
      return await events.append(session, batch, options);
    } finally {
      const elapsed = Date.now() - started;
      if (elapsed >= thresholdMs) {
        const span = tracer.startSpan(
          'store.append',
          {
            startTime: started,
            attributes: {
              'berth.session.id': session.id,
              'berth.events': batch.length,
              'berth.duration_ms': elapsed,
            },
          },
          parent,
        );
        span.end(started + elapsed);
      }
    }
  };
  return new Proxy(events, {
    get(target, property) {
      if (property === 'append') return append;
      const value = Reflect.get(target, property, target);
      return typeof value === 'function' ? value.bind(target) : value;
    },
  });
}

/** What an egress span is made from: an audit record (`egress/proxy.ts`), ended just now. */
export type EgressSpanRecord = Pick<
  EgressAuditRecord,
  | 'method'
  | 'host'
  | 'port'
  | 'status'
  | 'bytesSent'
  | 'bytesReceived'
  | 'credentials'
  | 'decision'
  | 'reason'
  | 'tls'
  | 'durationMs'
  | 'purpose'
>;

/**
 * Egress requests as client spans `egress <METHOD>`: the sandbox's through its proxy (and its
 * CONNECT tunnels), Berth's own for a session (`web_fetch`, `mcp:<server>`) and the vault's
 * OAuth requests (no session: a root span). Each is reported when it ends, so the span is
 * back-dated by its duration, under the session's current span (its running tool's, else its
 * turn's). Attributes: method, host, port, status, decision, TLS mode, bytes, purpose and how
 * many credentials were used; never the path or query (they can carry tokens), nor a value.
 */
export function egressSpanRecorder(
  tracer: Tracer,
  contexts: TraceContexts,
): (session: SessionKey | undefined, record: EgressSpanRecord) => void {
  return (session, record) => {
    const ended = Date.now();
    const span = tracer.startSpan(
      `egress ${record.method}`,
      {
        kind: SpanKind.CLIENT,
        startTime: ended - record.durationMs,
        attributes: {
          'http.request.method': record.method,
          'server.address': record.host,
          'server.port': record.port,
          ...(record.status === null ? {} : { 'http.response.status_code': record.status }),
          'berth.egress.decision': record.decision,
          'berth.egress.tls': record.tls,
          'berth.egress.purpose': record.purpose ?? 'sandbox',
          'berth.egress.bytes_sent': record.bytesSent,
          'berth.egress.bytes_received': record.bytesReceived,
          'berth.egress.credentials': record.credentials.length,
          ...(session ? { 'berth.session.id': session.id } : {}),
        },
      },
      session ? contexts.parentOf(session) : ROOT_CONTEXT,
    );
    if (record.decision === 'denied' || record.status === null || record.status >= 500) {
      span.setStatus({ code: SpanStatusCode.ERROR, message: record.reason ?? 'no answer' });
    }
    span.end(ended);
  };
}
