import { resolve } from 'node:path';
import { z } from 'zod';
import { destinationKey } from '../egress/addresses.js';
import { invalidRequest } from '../errors.js';
import { parseVaultKeys, type VaultKeyConfig } from '../vault/keyring.js';

/**
 * Berth's configuration, compiled once from flags and environment variables (flags win)
 * into one validated object that is passed down. Nothing else reads `process.env`.
 */
export interface BerthConfig {
  host: string;
  port: number;
  dataDir: string;
  store:
    | { kind: 'sqlite'; path: string }
    | {
        kind: 'postgres';
        url: string;
        /** Owner role for migrations (`BERTH_DATABASE_MIGRATION_URL`), so `url`'s role is bound by RLS. */
        migrationUrl?: string;
      };
  /** Default limits per tenant and per user (tenants may override theirs). */
  limits: LimitsConfig;
  /** OpenTelemetry export, from the standard `OTEL_*` variables. */
  telemetry: TelemetryConfig;
  /** Serve Prometheus metrics at `/metrics` (`BERTH_METRICS=off` turns it off). */
  metrics: boolean;
  /**
   * The price book that session list costs and budgets use: a preset id or a YAML file
   * (`BERTH_BUDGET_PRICE_BOOK`, default `anthropic`).
   */
  budgetPriceBook: string;
  /** Provider settings (API keys, base URLs) handed to the model registry. */
  modelEnvironment: Readonly<Record<string, string | undefined>>;
  /** Sandbox driver names in order of preference; the first available is the default. */
  sandboxDrivers: readonly string[];
  /**
   * Sandboxes kept started ahead of need, per driver that supports it (bwrap as root), so a new
   * session's first command does not wait for one (`BERTH_SANDBOX_WARM_POOL`, default 2; 0: off).
   */
  sandboxWarmPool: number;
  /** Largest accepted request body, in bytes. */
  maxBodyBytes: number;
  /** Failed model calls in a row before a turn ends with retries_exhausted. */
  maxModelRetries: number;
  retryBaseDelayMs: number;
  /**
   * Lowest idle timeout and max lifetime (seconds) an environment may set; 60 by default
   * (`BERTH_MIN_LIFECYCLE_S`, lower only for tests and demos).
   */
  minLifecycleSeconds: number;
  /**
   * Where the vault's keys come from: `BERTH_VAULT_KEYS` (`id:base64,…`, the first seals) and
   * `BERTH_VAULT_KEY_FILE`; with neither, `<data-dir>/vault.key`, generated on first start.
   */
  vault: VaultKeyConfig;
  /** The egress proxy's operator settings (sandboxes reach the network only through it). */
  egress: EgressConfig;
  /** Several nodes on one PostgreSQL (`berth serve --cluster`); absent for a single node. */
  cluster?: ClusterConfig;
}

/** One node of a cluster (src/control/cluster.ts). */
export interface ClusterConfig {
  /** This node's name in the registry (`BERTH_NODE_ID`; default `<hostname>-<port>`). */
  nodeId?: string;
  /** Where other nodes reach this one (`BERTH_NODE_URL`; default the listening address). */
  advertiseUrl?: string;
  /** How long a lease or heartbeat lasts without renewal (`BERTH_LEASE_MS`, default 3000). */
  leaseMs: number;
  /**
   * A session quiet on its node this long (no turn, no sandbox but a stopped one) has its lease
   * given up (`BERTH_LEASE_IDLE_MS`, default 60000; 0 keeps leases while the node lives).
   */
  idleReleaseMs: number;
}

/** Operator settings of the egress proxy. */
export interface EgressConfig {
  /**
   * Exact `address:port` pairs on private networks sandboxes may still reach
   * (`BERTH_EGRESS_ALLOW_PRIVATE`, comma-separated; default none).
   */
  allowPrivateDestinations: string[];
  /** A PEM file of extra roots the proxy trusts for upstream TLS (`BERTH_EGRESS_CA_FILE`). */
  upstreamCaFile?: string;
  /** Fixed name → address answers (`BERTH_EGRESS_HOSTS`, `name=address,…`), like /etc/hosts. */
  hosts: Record<string, string>;
}

/** One level's limits; 0 means unlimited. */
export interface LimitSettings {
  /** Sessions with a turn in flight at once. */
  liveSessions: number;
  /** Sessions created per minute. */
  sessionsPerMinute: number;
  /** Client events sent per minute. */
  eventsPerMinute: number;
}

export interface LimitsConfig {
  tenant: LimitSettings;
  user: LimitSettings;
}

/** The OTLP transports the OpenTelemetry specification names (`OTEL_EXPORTER_OTLP_PROTOCOL`). */
export const otlpProtocols = ['http/protobuf', 'http/json', 'grpc'] as const;

/** One OTLP transport: protobuf or JSON over HTTP, or gRPC. */
export type OtlpProtocol = (typeof otlpProtocols)[number];

/** Where traces go; no endpoint means tracing is off (and costs nothing). */
export interface TelemetryConfig {
  /**
   * The traces endpoint, or undefined when tracing is off: for HTTP the full URL
   * (`…/v1/traces`), for gRPC the collector's `http(s)://host:port` (`http` means no TLS).
   */
  tracesEndpoint: string | undefined;
  /** How spans travel (`OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL`, default `http/protobuf`). */
  protocol: OtlpProtocol;
  /** HTTP headers, or gRPC metadata, sent with every export. */
  headers: Record<string, string>;
  /** How long one export may take, in ms (`OTEL_EXPORTER_OTLP_[TRACES_]TIMEOUT`, default 10000). */
  timeoutMs: number;
  /** Export payload compression (`OTEL_EXPORTER_OTLP_[TRACES_]COMPRESSION`, default none). */
  compression: 'gzip' | 'none';
  serviceName: string;
  /** Batch export delay in ms (`OTEL_BSP_SCHEDULE_DELAY`, default 5000). */
  exportDelayMs: number;
  /** Appends slower than this become `store.append` spans (`BERTH_TRACE_SLOW_APPEND_MS`, default 100). */
  slowAppendMs: number;
}

/**
 * The standard OpenTelemetry variables Berth honours, as the specification defines them
 * (an empty value counts as unset; a signal-specific `OTEL_EXPORTER_OTLP_TRACES_*` variable
 * wins over its generic `OTEL_EXPORTER_OTLP_*` one): `OTEL_SDK_DISABLED`,
 * `OTEL_TRACES_EXPORTER` (`otlp` or `none`), `OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL`
 * (`http/protobuf`, the default, `http/json` or `grpc`), `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`
 * (used as is) or `OTEL_EXPORTER_OTLP_ENDPOINT` (for HTTP, `v1/traces` is appended to its
 * path; for gRPC it is used as is), `OTEL_EXPORTER_OTLP_[TRACES_]INSECURE` (gRPC endpoints
 * without a scheme), `OTEL_EXPORTER_OTLP_[TRACES_]HEADERS` (`k=v,k2=v2`, URL-encoded; the
 * signal's headers win key by key), `OTEL_EXPORTER_OTLP_[TRACES_]TIMEOUT`,
 * `OTEL_EXPORTER_OTLP_[TRACES_]COMPRESSION`, `OTEL_SERVICE_NAME`, `OTEL_BSP_SCHEDULE_DELAY`.
 * A value Berth cannot use stops start-up with an error naming the variable.
 */
function telemetryConfig(environment: Readonly<Record<string, string | undefined>>): TelemetryConfig {
  // The specification: an empty value is the same as an unset one.
  const read = (name: string): string | undefined => {
    const value = environment[name]?.trim();
    return value === undefined || value === '' ? undefined : value;
  };
  /** The signal-specific variable if set, else the generic one: `[value, the variable's name]`. */
  const readTraces = (suffix: string): [string | undefined, string] => {
    const specific = `OTEL_EXPORTER_OTLP_TRACES_${suffix}`;
    const generic = `OTEL_EXPORTER_OTLP_${suffix}`;
    const value = read(specific);
    return value !== undefined ? [value, specific] : [read(generic), generic];
  };
  const disabled =
    read('OTEL_SDK_DISABLED')?.toLowerCase() === 'true' ||
    (read('OTEL_TRACES_EXPORTER') ?? 'otlp')
      .split(',')
      .map((exporter) => exporter.trim())
      .includes('none');

  const [protocolValue, protocolVariable] = readTraces('PROTOCOL');
  const protocol = (protocolValue ?? 'http/protobuf') as OtlpProtocol;
  if (!otlpProtocols.includes(protocol)) {
    throw invalidRequest(
      `${protocolVariable} must be one of ${otlpProtocols.join(', ')}, got "${protocolValue}"`,
    );
  }

  const specificEndpoint = read('OTEL_EXPORTER_OTLP_TRACES_ENDPOINT');
  const baseEndpoint = read('OTEL_EXPORTER_OTLP_ENDPOINT');
  let endpoint: string | undefined;
  let endpointVariable = 'OTEL_EXPORTER_OTLP_TRACES_ENDPOINT';
  if (specificEndpoint !== undefined) endpoint = specificEndpoint;
  else if (baseEndpoint !== undefined) {
    endpointVariable = 'OTEL_EXPORTER_OTLP_ENDPOINT';
    // For HTTP the generic endpoint is a base URL: `v1/traces` goes after its path.
    endpoint = protocol === 'grpc' ? baseEndpoint : `${baseEndpoint.replace(/\/+$/, '')}/v1/traces`;
  }
  if (endpoint !== undefined && protocol === 'grpc' && !/^[a-z][a-z0-9+.-]*:\/\//i.test(endpoint)) {
    // A gRPC endpoint without a scheme: TLS unless the INSECURE variable says otherwise.
    const [insecure] = readTraces('INSECURE');
    endpoint = `${insecure?.toLowerCase() === 'true' ? 'http' : 'https'}://${endpoint}`;
  }
  if (endpoint !== undefined && !/^https?:\/\/[^/]/i.test(endpoint)) {
    throw invalidRequest(`${endpointVariable} must be an http(s) URL, got "${endpoint}"`);
  }

  // Generic headers first, then the signal's, key by key (as the official exporters merge them).
  const headers: Record<string, string> = {};
  for (const variable of ['OTEL_EXPORTER_OTLP_HEADERS', 'OTEL_EXPORTER_OTLP_TRACES_HEADERS']) {
    for (const pair of (read(variable) ?? '').split(',').filter((entry) => entry.includes('='))) {
      const index = pair.indexOf('=');
      headers[decodeURIComponent(pair.slice(0, index).trim())] = decodeURIComponent(
        pair.slice(index + 1).trim(),
      );
    }
  }

  const [timeoutValue, timeoutVariable] = readTraces('TIMEOUT');
  const timeoutMs = Number(timeoutValue ?? 10_000);
  if (!Number.isInteger(timeoutMs) || timeoutMs <= 0) {
    throw invalidRequest(
      `${timeoutVariable} must be a positive number of milliseconds, got "${timeoutValue}"`,
    );
  }
  const [compressionValue, compressionVariable] = readTraces('COMPRESSION');
  const compression = compressionValue ?? 'none';
  if (compression !== 'gzip' && compression !== 'none') {
    throw invalidRequest(`${compressionVariable} must be gzip or none, got "${compressionValue}"`);
  }

  const delay = Number(environment.OTEL_BSP_SCHEDULE_DELAY ?? 5000);
  const slow = Number(environment.BERTH_TRACE_SLOW_APPEND_MS ?? 100);
  return {
    tracesEndpoint: disabled ? undefined : endpoint,
    protocol,
    headers,
    timeoutMs,
    compression,
    serviceName: read('OTEL_SERVICE_NAME') ?? 'berth',
    exportDelayMs: Number.isFinite(delay) && delay >= 0 ? delay : 5000,
    slowAppendMs: Number.isFinite(slow) && slow >= 0 ? slow : 100,
  };
}

/** Raw inputs: CLI flags (already parsed) and the process environment. */
export interface ConfigSources {
  flags?: { host?: string; port?: string | number; dataDir?: string; database?: string; cluster?: string };
  environment: Readonly<Record<string, string | undefined>>;
}

const modelVariables = [
  'ANTHROPIC_API_KEY',
  'ANTHROPIC_BASE_URL',
  'OPENAI_API_KEY',
  'OPENAI_BASE_URL',
  'OPENAI_COMPATIBLE_BASE_URL',
  'OPENAI_COMPATIBLE_API_KEY',
] as const;

const portSchema = z.coerce.number().int().min(0).max(65_535);

/** Compiles the configuration; throws `invalid_request` naming the bad setting. */
export function loadConfig(sources: ConfigSources): BerthConfig {
  const { flags = {}, environment } = sources;
  const portInput = flags.port ?? environment.BERTH_PORT ?? 8080;
  const port = portSchema.safeParse(portInput);
  if (!port.success) throw invalidRequest(`port must be a number from 0 to 65535, got "${portInput}"`);
  const dataDir = resolve(flags.dataDir ?? environment.BERTH_DATA_DIR ?? '.berth');
  const clusterUrl = flags.cluster ?? environment.BERTH_CLUSTER_URL;
  if (clusterUrl && flags.database && flags.database !== clusterUrl) {
    throw invalidRequest('--cluster names the database; do not also give --database');
  }
  // BERTH_DATABASE_URL is not used with --cluster; one naming another database (an operator
  // who put the app role there and the owner in --cluster) must not be silently ignored.
  if (clusterUrl && environment.BERTH_DATABASE_URL && environment.BERTH_DATABASE_URL !== clusterUrl) {
    throw invalidRequest(
      'with --cluster, the cluster URL is the database (connect as the app role there; the owner goes in BERTH_DATABASE_MIGRATION_URL): unset BERTH_DATABASE_URL or give it the same URL',
    );
  }
  if (clusterUrl && !/^postgres(ql)?:\/\//.test(clusterUrl)) {
    throw invalidRequest('--cluster takes the postgres:// URL every node shares');
  }
  const database = clusterUrl || (flags.database ?? environment.BERTH_DATABASE_URL);
  let store: BerthConfig['store'];
  if (database === undefined || database === '' || database.startsWith('sqlite:')) {
    const path = database?.startsWith('sqlite:') ? database.slice('sqlite:'.length) : '';
    store = { kind: 'sqlite', path: path ? resolve(path) : resolve(dataDir, 'berth.db') };
  } else if (/^postgres(ql)?:\/\//.test(database)) {
    const migrationUrl = environment.BERTH_DATABASE_MIGRATION_URL;
    if (migrationUrl !== undefined && migrationUrl !== '' && !/^postgres(ql)?:\/\//.test(migrationUrl)) {
      throw invalidRequest('BERTH_DATABASE_MIGRATION_URL must be a postgres:// URL');
    }
    store = { kind: 'postgres', url: database, ...(migrationUrl ? { migrationUrl } : {}) };
  } else {
    throw invalidRequest('database must be a postgres:// URL or sqlite:<path>');
  }
  const modelEnvironment: Record<string, string | undefined> = {};
  for (const name of modelVariables) modelEnvironment[name] = environment[name];
  const number = (name: string, fallback: number) => {
    const value = environment[name];
    if (value === undefined || value === '') return fallback;
    const parsed = Number(value);
    if (!Number.isFinite(parsed) || parsed < 0) throw invalidRequest(`${name} must be a non-negative number`);
    return parsed;
  };
  return {
    host: flags.host ?? environment.BERTH_HOST ?? '127.0.0.1',
    port: port.data,
    dataDir,
    store,
    modelEnvironment,
    sandboxDrivers: (environment.BERTH_SANDBOX_DRIVERS ?? 'bwrap')
      .split(',')
      .map((name) => name.trim())
      .filter(Boolean),
    sandboxWarmPool: Math.floor(number('BERTH_SANDBOX_WARM_POOL', 2)),
    maxBodyBytes: number('BERTH_MAX_BODY_BYTES', 1024 * 1024),
    telemetry: telemetryConfig(environment),
    metrics: environment.BERTH_METRICS !== 'off',
    budgetPriceBook: environment.BERTH_BUDGET_PRICE_BOOK || 'anthropic',
    limits: {
      tenant: {
        liveSessions: number('BERTH_TENANT_LIVE_SESSIONS', 200),
        sessionsPerMinute: number('BERTH_TENANT_SESSIONS_PER_MINUTE', 1200),
        eventsPerMinute: number('BERTH_TENANT_EVENTS_PER_MINUTE', 60_000),
      },
      user: {
        liveSessions: number('BERTH_USER_LIVE_SESSIONS', 50),
        sessionsPerMinute: number('BERTH_USER_SESSIONS_PER_MINUTE', 300),
        eventsPerMinute: number('BERTH_USER_EVENTS_PER_MINUTE', 12_000),
      },
    },
    maxModelRetries: number('BERTH_MAX_MODEL_RETRIES', 3),
    retryBaseDelayMs: number('BERTH_RETRY_BASE_DELAY_MS', 500),
    minLifecycleSeconds: number('BERTH_MIN_LIFECYCLE_S', 60),
    ...(clusterUrl
      ? {
          cluster: {
            ...(environment.BERTH_NODE_ID ? { nodeId: environment.BERTH_NODE_ID } : {}),
            ...(environment.BERTH_NODE_URL ? { advertiseUrl: environment.BERTH_NODE_URL } : {}),
            leaseMs: Math.max(500, number('BERTH_LEASE_MS', 3000)),
            idleReleaseMs: Math.max(0, number('BERTH_LEASE_IDLE_MS', 60_000)),
          },
        }
      : {}),
    egress: {
      allowPrivateDestinations: (environment.BERTH_EGRESS_ALLOW_PRIVATE ?? '')
        .split(',')
        .map((entry) => entry.trim())
        .filter(Boolean)
        .map((entry) => {
          const key = destinationKey(entry);
          if (!key) {
            throw invalidRequest(
              `BERTH_EGRESS_ALLOW_PRIVATE entries are address:port ([v6]:port for IPv6), got "${entry}"`,
            );
          }
          return key;
        }),
      ...(environment.BERTH_EGRESS_CA_FILE
        ? { upstreamCaFile: resolve(environment.BERTH_EGRESS_CA_FILE) }
        : {}),
      hosts: Object.fromEntries(
        (environment.BERTH_EGRESS_HOSTS ?? '')
          .split(',')
          .map((entry) => entry.trim())
          .filter(Boolean)
          .map((entry) => {
            const [name, address] = entry.split('=');
            if (!name || !address)
              throw invalidRequest(`BERTH_EGRESS_HOSTS entries are name=address, got "${entry}"`);
            return [name.trim().toLowerCase(), address.trim()];
          }),
      ),
    },
    vault: {
      keys: environment.BERTH_VAULT_KEYS
        ? parseVaultKeys(environment.BERTH_VAULT_KEYS, 'BERTH_VAULT_KEYS')
        : [],
      keyFile: environment.BERTH_VAULT_KEY_FILE ? resolve(environment.BERTH_VAULT_KEY_FILE) : undefined,
      defaultKeyFile: resolve(dataDir, 'vault.key'),
    },
  };
}
