import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { fileURLToPath } from 'node:url';
import {
  Server as GrpcServer,
  type Metadata,
  ServerCredentials,
  type ServerUnaryCall,
  type ServiceDefinition,
  type sendUnaryData,
} from '@grpc/grpc-js';
import { loadSync } from '@grpc/proto-loader';

/** One span as an OTLP export carries it (ids in hex), flattened for assertions. */
export interface ReceivedSpan {
  traceId: string;
  spanId: string;
  parentSpanId: string | undefined;
  name: string;
  kind: number;
  attributes: Record<string, unknown>;
  status: { code?: number; message?: string };
  serviceName: string | undefined;
}

interface OtlpValue {
  stringValue?: string;
  intValue?: string | number;
  doubleValue?: number;
  boolValue?: boolean;
  arrayValue?: { values?: OtlpValue[] };
}

function otlpValueOf(value: OtlpValue | undefined): unknown {
  if (value === undefined) return undefined;
  if (value.stringValue !== undefined) return value.stringValue;
  if (value.intValue !== undefined) return Number(value.intValue);
  if (value.doubleValue !== undefined) return value.doubleValue;
  if (value.boolValue !== undefined) return value.boolValue;
  if (value.arrayValue !== undefined) return (value.arrayValue.values ?? []).map(otlpValueOf);
  return undefined;
}

function attributesOf(list: { key: string; value: OtlpValue }[] | undefined): Record<string, unknown> {
  return Object.fromEntries((list ?? []).map((attribute) => [attribute.key, otlpValueOf(attribute.value)]));
}

/** The official OTLP definitions (opentelemetry-proto v1.11.0), vendored in `otlp-proto/`. */
const protoDirectory = fileURLToPath(new URL('./otlp-proto/', import.meta.url));
const traceServiceName = 'opentelemetry.proto.collector.trace.v1.TraceService';

/**
 * The trace service as `@grpc/proto-loader` compiles it from the official `.proto` files: its
 * `Export` method decodes an `ExportTraceServiceRequest` from protobuf bytes (the same decoder
 * serves HTTP protobuf bodies and gRPC calls). Field names come out in lowerCamelCase, ids as
 * bytes and 64-bit integers as strings, like the JSON encoding's.
 */
function loadTraceService(): ServiceDefinition {
  const definition = loadSync('opentelemetry/proto/collector/trace/v1/trace_service.proto', {
    includeDirs: [protoDirectory],
    keepCase: false,
    longs: String,
    enums: Number,
    defaults: false,
  });
  return definition[traceServiceName] as ServiceDefinition;
}

type ExportRequest = {
  resourceSpans?: {
    resource?: { attributes?: { key: string; value: OtlpValue }[] };
    scopeSpans?: {
      spans?: {
        traceId: string | Uint8Array;
        spanId: string | Uint8Array;
        parentSpanId?: string | Uint8Array;
        name: string;
        kind: number;
        attributes?: { key: string; value: OtlpValue }[];
        status?: { code?: number; message?: string };
      }[];
    }[];
  }[];
};

/** One export the receiver accepted: how it came, where, and with which headers (or gRPC metadata). */
export interface ReceivedExport {
  protocol: 'http/json' | 'http/protobuf' | 'grpc';
  /** The HTTP path, or the gRPC method's path. */
  path: string;
  headers: Record<string, string>;
}

/**
 * An OpenTelemetry collector stand-in for tests, on loopback: an HTTP server that accepts
 * OTLP/HTTP trace exports in JSON (`@opentelemetry/exporter-trace-otlp-http`) and protobuf
 * (`@opentelemetry/exporter-trace-otlp-proto`) on any path, and with `grpc: true` a gRPC server
 * for the OTLP trace service (`@opentelemetry/exporter-trace-otlp-grpc`). It keeps every span,
 * every export's protocol, path and headers, and the raw bodies (to scan for secrets).
 */
export async function startOtlpReceiver(options: { grpc?: boolean } = {}): Promise<{
  /** The HTTP server's base URL. */
  endpoint: string;
  /** The gRPC server's URL (`http://127.0.0.1:<port>`), when started with `grpc: true`. */
  grpcEndpoint: string | undefined;
  spans: ReceivedSpan[];
  exports: ReceivedExport[];
  rawBodies: string[];
  /**
   * Flushes with `flush` until `done(spans)` holds (or `timeoutMs` passes). An exporter that
   * failed a request under load retries it later, after its flush has returned.
   */
  waitForSpans(
    flush: () => Promise<void>,
    done: (spans: readonly ReceivedSpan[]) => boolean,
    timeoutMs?: number,
  ): Promise<void>;
  close(): Promise<void>;
}> {
  const spans: ReceivedSpan[] = [];
  const exports: ReceivedExport[] = [];
  const rawBodies: string[] = [];
  const traceService = loadTraceService();
  const exportMethod = traceService.Export!;
  const idOf = (id: string | Uint8Array | undefined) =>
    id === undefined ? '' : typeof id === 'string' ? id : Buffer.from(id).toString('hex');
  const keep = (request: ExportRequest) => {
    for (const resourceSpans of request.resourceSpans ?? []) {
      const serviceName = attributesOf(resourceSpans.resource?.attributes)['service.name'] as
        | string
        | undefined;
      for (const scope of resourceSpans.scopeSpans ?? []) {
        for (const span of scope.spans ?? []) {
          spans.push({
            traceId: idOf(span.traceId),
            spanId: idOf(span.spanId),
            parentSpanId: idOf(span.parentSpanId) || undefined,
            name: span.name,
            kind: span.kind,
            attributes: attributesOf(span.attributes),
            status: span.status ?? {},
            serviceName,
          });
        }
      }
    }
  };
  const server: Server = createServer((request, response) => {
    const chunks: Buffer[] = [];
    request.on('data', (chunk: Buffer) => chunks.push(chunk));
    request.on('end', () => {
      const body = Buffer.concat(chunks);
      if (request.method !== 'POST') {
        response.writeHead(405).end();
        return;
      }
      const contentType = String(request.headers['content-type']);
      const protocol = contentType.startsWith('application/json')
        ? 'http/json'
        : contentType.startsWith('application/x-protobuf')
          ? 'http/protobuf'
          : undefined;
      if (protocol === undefined) {
        response.writeHead(415).end('OTLP/HTTP is application/json or application/x-protobuf');
        return;
      }
      const headers = Object.fromEntries(
        Object.entries(request.headers).map(([name, value]) => [name, String(value)]),
      );
      exports.push({ protocol, path: request.url ?? '', headers });
      rawBodies.push(body.toString('utf8'));
      keep(
        protocol === 'http/json'
          ? (JSON.parse(body.toString('utf8')) as ExportRequest)
          : (exportMethod.requestDeserialize(body) as ExportRequest),
      );
      // An empty ExportTraceServiceResponse in the request's encoding.
      if (protocol === 'http/json') response.writeHead(200, { 'content-type': 'application/json' }).end('{}');
      else response.writeHead(200, { 'content-type': 'application/x-protobuf' }).end();
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;

  let grpcServer: GrpcServer | undefined;
  let grpcEndpoint: string | undefined;
  if (options.grpc) {
    grpcServer = new GrpcServer();
    grpcServer.addService(traceService, {
      Export: (call: ServerUnaryCall<ExportRequest, object>, callback: sendUnaryData<object>) => {
        exports.push({ protocol: 'grpc', path: exportMethod.path, headers: metadataOf(call.metadata) });
        rawBodies.push(exportMethod.requestSerialize(call.request).toString('utf8'));
        keep(call.request);
        callback(null, {});
      },
    });
    const grpcPort = await new Promise<number>((resolve, reject) =>
      grpcServer!.bindAsync('127.0.0.1:0', ServerCredentials.createInsecure(), (error, bound) =>
        error ? reject(error) : resolve(bound),
      ),
    );
    grpcEndpoint = `http://127.0.0.1:${grpcPort}`;
  }
  return {
    endpoint: `http://127.0.0.1:${port}`,
    grpcEndpoint,
    spans,
    exports,
    rawBodies,
    async waitForSpans(flush, done, timeoutMs = 10_000) {
      const deadline = Date.now() + timeoutMs;
      for (;;) {
        await flush();
        if (done(spans) || Date.now() > deadline) return;
        await new Promise((resolve) => setTimeout(resolve, 50));
      }
    },
    async close() {
      await new Promise<void>((resolve) => server.close(() => resolve()));
      grpcServer?.forceShutdown();
    },
  };
}

function metadataOf(metadata: Metadata): Record<string, string> {
  return Object.fromEntries(Object.entries(metadata.getMap()).map(([key, value]) => [key, String(value)]));
}
