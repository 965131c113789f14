import { describe, expect, it } from 'vitest';
import { isBerthError } from '../errors.js';
import { loadConfig } from './config.js';

describe('config: egress settings', () => {
  it('reads BERTH_EGRESS_ALLOW_PRIVATE as exact address:port pairs', () => {
    const config = loadConfig({
      environment: { BERTH_EGRESS_ALLOW_PRIVATE: '127.0.0.1:8080, [0:0::1]:8443' },
    });
    expect(config.egress.allowPrivateDestinations).toEqual(['127.0.0.1:8080', '[::1]:8443']);
  });

  it('refuses an allow-list entry that is not an address and a port, naming it', () => {
    for (const entry of ['localhost:8080', '10.0.0.0/8', '127.0.0.1']) {
      let thrown: unknown;
      try {
        loadConfig({ environment: { BERTH_EGRESS_ALLOW_PRIVATE: entry } });
      } catch (error) {
        thrown = error;
      }
      expect(isBerthError(thrown, 'invalid_request'), entry).toBe(true);
      expect((thrown as Error).message).toContain(entry);
    }
  });
});

describe('config: OpenTelemetry export', () => {
  const telemetryOf = (environment: Record<string, string>) => loadConfig({ environment }).telemetry;

  it('defaults to the specification: http/protobuf to the generic endpoint plus /v1/traces', () => {
    expect(telemetryOf({ OTEL_EXPORTER_OTLP_ENDPOINT: 'http://collector:4318' })).toMatchObject({
      protocol: 'http/protobuf',
      tracesEndpoint: 'http://collector:4318/v1/traces',
      timeoutMs: 10_000,
      compression: 'none',
    });
  });

  it('lets the traces-specific variables win and treats empty values as unset', () => {
    expect(
      telemetryOf({
        OTEL_EXPORTER_OTLP_PROTOCOL: 'grpc',
        OTEL_EXPORTER_OTLP_TRACES_PROTOCOL: 'http/json',
        OTEL_EXPORTER_OTLP_ENDPOINT: 'http://collector:4318/base/',
        OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: '',
        OTEL_EXPORTER_OTLP_TIMEOUT: '3000',
        OTEL_EXPORTER_OTLP_TRACES_COMPRESSION: 'gzip',
      }),
    ).toMatchObject({
      protocol: 'http/json',
      tracesEndpoint: 'http://collector:4318/base/v1/traces',
      timeoutMs: 3000,
      compression: 'gzip',
    });
  });

  it('uses a gRPC endpoint as is; without a scheme it is TLS unless INSECURE is true', () => {
    const grpc = { OTEL_EXPORTER_OTLP_PROTOCOL: 'grpc' };
    expect(
      telemetryOf({ ...grpc, OTEL_EXPORTER_OTLP_ENDPOINT: 'http://collector:4317' }).tracesEndpoint,
    ).toBe('http://collector:4317');
    expect(telemetryOf({ ...grpc, OTEL_EXPORTER_OTLP_ENDPOINT: 'collector:4317' }).tracesEndpoint).toBe(
      'https://collector:4317',
    );
    expect(
      telemetryOf({
        ...grpc,
        OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: 'collector:4317',
        OTEL_EXPORTER_OTLP_TRACES_INSECURE: 'true',
      }).tracesEndpoint,
    ).toBe('http://collector:4317');
  });

  it('refuses an unknown protocol, timeout or compression at start-up, naming the variable', () => {
    const cases: [Record<string, string>, string][] = [
      [{ OTEL_EXPORTER_OTLP_PROTOCOL: 'http/xml' }, 'OTEL_EXPORTER_OTLP_PROTOCOL must be one of'],
      [{ OTEL_EXPORTER_OTLP_TRACES_PROTOCOL: 'GRPC' }, 'OTEL_EXPORTER_OTLP_TRACES_PROTOCOL must be one of'],
      [{ OTEL_EXPORTER_OTLP_TRACES_TIMEOUT: 'soon' }, 'OTEL_EXPORTER_OTLP_TRACES_TIMEOUT must be'],
      [{ OTEL_EXPORTER_OTLP_COMPRESSION: 'brotli' }, 'OTEL_EXPORTER_OTLP_COMPRESSION must be gzip or none'],
    ];
    for (const [environment, message] of cases) {
      let thrown: unknown;
      try {
        telemetryOf({ OTEL_EXPORTER_OTLP_ENDPOINT: 'http://collector:4318', ...environment });
      } catch (error) {
        thrown = error;
      }
      expect(isBerthError(thrown, 'invalid_request'), message).toBe(true);
      expect((thrown as Error).message).toContain(message);
    }
  });
});

describe('config: cluster database', () => {
  it('refuses a BERTH_DATABASE_URL that --cluster would silently ignore, saying where each role goes', () => {
    const environment = { BERTH_DATABASE_URL: 'postgres://berth_app@db/berth' };
    let thrown: unknown;
    try {
      loadConfig({ flags: { cluster: 'postgres://berth_owner@db/berth' }, environment });
    } catch (error) {
      thrown = error;
    }
    expect(isBerthError(thrown, 'invalid_request')).toBe(true);
    expect((thrown as Error).message).toMatch(/BERTH_DATABASE_MIGRATION_URL/);
    // The same URL in both is fine.
    const config = loadConfig({ flags: { cluster: 'postgres://berth_app@db/berth' }, environment });
    expect(config.store).toMatchObject({ kind: 'postgres', url: 'postgres://berth_app@db/berth' });
  });
});
