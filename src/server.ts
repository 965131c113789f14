import { readFileSync } from 'node:fs';
import { mkdir } from 'node:fs/promises';
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { hostname } from 'node:os';
import { join, resolve } from 'node:path';
import { serve } from '@hono/node-server';
import pg from 'pg';
import { createApp, DEFAULT_MAX_BODY_BYTES } from './api/app.js';
import { clusterRequestListener } from './api/forwarding.js';
import type { BerthConfig } from './config/config.js';
import { Cluster } from './control/cluster.js';
import { ClusterLeases } from './control/leases.js';
import { LifetimeReaper } from './control/lifecycle.js';
import { SandboxManager } from './control/sandbox-manager.js';
import { type Logger, Supervisor } from './control/supervisor.js';
import { Toolboxes } from './control/toolbox.js';
import { observedFetch } from './egress/host-fetch.js';
import type { EgressAuditRecord } from './egress/proxy.js';
import { SessionEgress } from './egress/session-egress.js';
import { invalidRequest } from './errors.js';
import { DeltaBus } from './harness/delta-bus.js';
import { createHarness } from './harness/harness.js';
import { type AdminKeyStatus, Authenticator, ensureAdminKey } from './identity/api-keys.js';
import { Limits } from './identity/limits.js';
import { loadPriceBook } from './metering/price-books.js';
import type { ModelRegistry } from './models/model-registry.js';
import { createModelRegistry } from './models/provider-registry.js';
import { createBwrapDriver } from './sandbox/bwrap/bwrap-driver.js';
import type { SandboxDriver } from './sandbox/driver.js';
import { createGvisorDriver } from './sandbox/gvisor/gvisor-driver.js';
import { createMicrovmDriver } from './sandbox/microvm/microvm-driver.js';
import { LocalSnapshotStore } from './snapshots/local-snapshot-store.js';
import { SharedSnapshotStore } from './snapshots/shared-snapshot-store.js';
import type { SnapshotStore } from './snapshots/snapshot-store.js';
import type { NewEvent, SessionKey, WriterToken } from './store/event-store.js';
import { openStore } from './store/open-store.js';
import { quoteSchemaName } from './store/postgres/schema.js';
import type { SessionRecord, Store } from './store/resource-store.js';
import { Metrics } from './telemetry/metrics.js';
import {
  createTelemetry,
  egressSpanRecorder,
  type Telemetry,
  tracedDriver,
  tracedEventStore,
  tracedHarness,
  tracedModels,
  tracedToolbox,
} from './telemetry/tracing.js';
import { loadVaultKeyring } from './vault/keyring.js';
import { VaultService } from './vault/vault-service.js';

/** A running Berth: its URL, its parts (for tests and the CLI), and a clean stop. */
export interface RunningBerth {
  url: string;
  /** This node's name in the cluster registry (cluster mode only). */
  nodeId: string | undefined;
  store: Store;
  supervisor: Supervisor;
  sandboxes: SandboxManager;
  /** Path of the admin key file when this start created it. */
  adminKeyFile: string | undefined;
  /** The admin key as the first-start bootstrap left it: here, created by another node, or unknown. */
  adminKey: AdminKeyStatus;
  /** Tracing (a no-op when no OTLP endpoint is configured). */
  telemetry: Telemetry;
  /** The vault: credentials of sessions (for the egress proxy and MCP clients), key rotation. */
  vault: VaultService;
  /** Every API route (method and path pattern), for tests that must cover each one. */
  routes: readonly { method: string; path: string }[];
  close(): Promise<void>;
}

/** Known sandbox drivers by name. Later drivers (isolate) register here. */
const driverFactories: Record<string, (config: BerthConfig) => SandboxDriver> = {
  bwrap: (config) =>
    createBwrapDriver({
      warmPool: config.sandboxWarmPool,
      poolDirectory: join(config.dataDir, 'sandbox-pool'),
    }),
  gvisor: () => createGvisorDriver(),
  microvm: () => createMicrovmDriver(),
};

/** A logger that writes one JSON line per message to stderr. */
export const jsonLogger: Logger = {
  info: (message, fields) => console.error(JSON.stringify({ level: 'info', message, ...fields })),
  warn: (message, fields) => console.error(JSON.stringify({ level: 'warn', message, ...fields })),
  error: (message, fields) => console.error(JSON.stringify({ level: 'error', message, ...fields })),
};

/**
 * Starts Berth: opens the store, checks which sandbox drivers this host can run, creates
 * the admin key on first start, resumes sessions a dead process left mid-turn, and serves
 * the API. Extra options replace parts for tests (a model registry with test scripts).
 */
export async function startBerth(
  config: BerthConfig,
  options: { logger?: Logger; models?: ModelRegistry } = {},
): Promise<RunningBerth> {
  const logger = options.logger ?? jsonLogger;
  await mkdir(config.dataDir, { recursive: true, mode: 0o700 });
  // Keys first: a bad key configuration stops the start before anything is opened.
  const keys = await loadVaultKeyring(config.vault);
  if (keys.createdKeyFile) logger.info('created the vault key', { file: keys.createdKeyFile });
  for (const warning of keys.warnings) logger.warn('vault key file', { warning });
  if (config.store.kind === 'postgres' && keys.source === config.vault.defaultKeyFile) {
    logger.warn("the vault key lives in this node's data directory; give every node the same keys", {
      file: keys.source,
      hint: 'set BERTH_VAULT_KEYS or BERTH_VAULT_KEY_FILE',
    });
  }
  const rawStore = await openStore(config.store);
  if (!rawStore.rowLevelSecurity.enforced && rawStore.kind === 'postgres') {
    logger.warn('PostgreSQL row-level security is not a second wall for this connection', {
      reason: rawStore.rowLevelSecurity.reason,
    });
  }

  const drivers = new Map<string, SandboxDriver>();
  const unavailableDrivers: Record<string, string> = {};
  for (const name of config.sandboxDrivers) {
    const factory = driverFactories[name];
    if (!factory) {
      unavailableDrivers[name] = `unknown driver; Berth knows ${Object.keys(driverFactories).join(', ')}`;
      continue;
    }
    const driver = factory(config);
    const availability = await driver.checkAvailability();
    if (availability.ok) {
      drivers.set(name, driver);
      for (const warning of availability.warnings ?? [])
        logger.warn('sandbox driver', { driver: name, warning });
      const reaped = (await driver.reapOrphans?.()) ?? 0;
      if (reaped > 0)
        logger.warn('killed sandboxes left behind by a dead process', { driver: name, count: reaped });
      driver.warmUp?.();
    } else {
      unavailableDrivers[name] = availability.reason;
      logger.warn('sandbox driver unavailable', { driver: name, reason: availability.reason });
    }
  }

  // Tracing wraps the ports (models, toolboxes, drivers, event store, harness) when it is on;
  // when off, nothing is wrapped.
  const telemetry = await createTelemetry(config.telemetry);
  const tracer = telemetry.tracer;
  // Metrics read sandbox counts from the manager, made just below.
  let sandboxes: SandboxManager | undefined;
  const metrics = config.metrics
    ? new Metrics({
        sessionsByStatus: () => rawStore.resources.countSessionsByStatus(),
        sandboxesByDriver: () => sandboxes?.countByDriver() ?? {},
      })
    : undefined;
  // Every layer sees the same instrumented store: appends are counted (and traced when slow).
  let events = rawStore.events;
  if (telemetry.enabled)
    events = tracedEventStore(events, tracer, telemetry.contexts, config.telemetry.slowAppendMs);
  if (metrics) events = metrics.eventStore(events);
  const store: Store =
    events === rawStore.events
      ? rawStore
      : {
          kind: rawStore.kind,
          rowLevelSecurity: rawStore.rowLevelSecurity,
          resources: rawStore.resources,
          skills: rawStore.skills,
          vaults: rawStore.vaults,
          events,
          close: () => rawStore.close(),
        };
  const instrumentDriver = (driver: SandboxDriver) => {
    let instrumented = driver;
    if (telemetry.enabled) instrumented = tracedDriver(instrumented, tracer, telemetry.contexts);
    if (metrics) instrumented = metrics.driver(instrumented);
    return instrumented;
  };
  const models = options.models ?? createModelRegistry({ environment: config.modelEnvironment });
  const deltas = new DeltaBus();
  // In a cluster, snapshots are packed into PostgreSQL so a session resumes on any node.
  const snapshots: SnapshotStore =
    config.cluster && rawStore.snapshotArchives
      ? new SharedSnapshotStore({
          root: join(config.dataDir, 'snapshots'),
          archives: rawStore.snapshotArchives,
          warn: (message, fields) => logger.warn(message, fields),
        })
      : new LocalSnapshotStore(join(config.dataDir, 'snapshots'));
  const leftovers = await snapshots.removeLeftovers();
  if (leftovers > 0)
    logger.warn('removed unfinished sandbox snapshots left by a dead process', { count: leftovers });
  sandboxes = new SandboxManager({
    drivers: new Map([...drivers].map(([name, driver]) => [name, instrumentDriver(driver)])),
    store,
    dataDir: config.dataDir,
    snapshots,
  });
  // Sandbox stops and resumes are facts of the session: they go in its log.
  const logSandboxEvent = async (session: SessionKey, event: NewEvent) => {
    await store.events.append(session, [event]).catch((error: unknown) =>
      logger.warn('could not log a sandbox event', {
        session: session.id,
        type: event.type,
        error: error instanceof Error ? error.message : String(error),
      }),
    );
  };
  // Egress requests of every kind (the sandboxes', Berth's own for sessions, the vault's OAuth
  // requests) become spans and metrics when those are on.
  const egressSpan = telemetry.enabled ? egressSpanRecorder(tracer, telemetry.contexts) : undefined;
  const observeEgress = (session: SessionKey | undefined, record: EgressAuditRecord) => {
    egressSpan?.(session, record);
    metrics?.egress(record);
  };
  const vault = new VaultService({
    store,
    keyring: keys.keyring,
    ...(egressSpan || metrics
      ? { fetch: observedFetch(fetch, 'oauth', (record) => observeEgress(undefined, record)) }
      : {}),
  });
  // The sandboxes' only way out: a proxy per session with its environment's networking and its
  // vaults' credentials; every request is logged on the session.
  const egress = new SessionEgress({
    vault,
    allowPrivateDestinations: config.egress.allowPrivateDestinations,
    upstreamCaCertificates: config.egress.upstreamCaFile
      ? [readFileSync(config.egress.upstreamCaFile, 'utf8')]
      : undefined,
    hosts: config.egress.hosts,
    onRequest: (session, record) => {
      observeEgress(session, record);
      void logSandboxEvent(session, {
        type: 'berth.egress_request',
        method: record.method,
        host: record.host,
        port: record.port,
        path: record.path,
        status: record.status,
        decision: record.decision,
        ...(record.reason ? { reason: record.reason } : {}),
        ...(record.purpose ? { purpose: record.purpose } : {}),
        tls: record.tls,
        bytes_sent: record.bytesSent,
        bytes_received: record.bytesReceived,
        credentials: record.credentials,
        duration_ms: Math.round(record.durationMs),
      });
    },
  });
  const toolboxes = new Toolboxes({
    sandboxes,
    projectRoot: resolve(import.meta.dirname, '..'),
    traceHeaders: telemetry.enabled ? (session) => telemetry.contexts.headersOf(session) : undefined,
    hostFetchFor: async (session) => {
      const environment = await store.resources.get('environment', session.tenantId, session.environmentId);
      return egress.hostFetch(session, environment?.body.config);
    },
    credentialsFor: (session) => vault.credentialsForSession(session),
    skills: store.skills,
  });
  const toolboxFor = (session: SessionRecord) => {
    let toolbox = toolboxes.for(session);
    if (telemetry.enabled) toolbox = tracedToolbox(toolbox, tracer, telemetry.contexts, session);
    if (metrics) toolbox = metrics.toolbox(toolbox);
    return toolbox;
  };
  const budgetBook = loadPriceBook(config.budgetPriceBook);
  // Several nodes on one PostgreSQL: leases say which node runs each session.
  let leases: ClusterLeases | undefined;
  let clusterPool: pg.Pool | undefined;
  let heartbeatPool: pg.Pool | undefined;
  if (config.cluster) {
    if (config.store.kind !== 'postgres' || !rawStore.listenAcrossNodes) {
      throw invalidRequest('cluster mode needs a PostgreSQL database (--cluster postgres://…)');
    }
    clusterPool = new pg.Pool({ connectionString: config.store.url, max: 4 });
    clusterPool.on('error', () => undefined);
    // Heartbeats on a connection of their own: requests queued on the pool never delay them.
    heartbeatPool = new pg.Pool({ connectionString: config.store.url, max: 1 });
    heartbeatPool.on('error', () => undefined);
    leases = new ClusterLeases({
      pool: clusterPool,
      heartbeatPool,
      schema: quoteSchemaName('berth'),
      nodeId: config.cluster.nodeId ?? `${hostname()}-${config.port}-${process.pid}`,
      leaseMs: config.cluster.leaseMs,
      acquireWriter: (session) => store.events.acquireWriter(session),
    });
  }
  const clusterLeases = leases;
  let harness = createHarness({
    store,
    metering: { book: budgetBook, measureSandbox: (session) => sandboxes.measure(session) },
    models: telemetry.enabled ? tracedModels(models, tracer, telemetry.contexts) : models,
    deltas,
    toolboxFor,
    maxModelRetries: config.maxModelRetries,
    retryBaseDelayMs: config.retryBaseDelayMs,
    // In a cluster a wake appends with its lease's token: claiming a lease fences other nodes,
    // never this node's own wakes.
    ...(clusterLeases
      ? {
          writers: {
            acquire: (session: SessionKey) => clusterLeases.writerFor(session),
            lost: (session: SessionKey, writer: WriterToken) => clusterLeases.lost(session, writer),
          },
        }
      : {}),
  });
  if (telemetry.enabled) harness = tracedHarness(harness, tracer, telemetry.contexts);
  if (metrics) harness = metrics.harness(harness);
  let cluster: Cluster | undefined;
  if (clusterLeases && clusterPool) {
    const schema = quoteSchemaName('berth');
    const leases = clusterLeases;
    cluster = new Cluster({
      leases,
      pool: clusterPool,
      schema,
      logger,
      wake: (session): void => supervisor.notify(session),
      isLive: (session): boolean => supervisor.isLive(session),
      hasSandbox: (session): boolean => sandboxes.isPresent(session),
      idleReleaseMs: config.cluster!.idleReleaseMs,
    });
    await rawStore.listenAcrossNodes?.();
  }
  const supervisor = new Supervisor({
    harness,
    store,
    logger,
    ...(cluster ? { mayWake: (session: SessionKey) => cluster.mayWake(session) } : {}),
  });
  sandboxes.setHooks({
    environment: (session) => egress.environment(session),
    provisioned: (session, handle, environmentConfig) => egress.attach(session, handle, environmentConfig),
    released: (session) => egress.detach(session),
    active: (session) => supervisor.isLive(session),
    beforeStop: (session) => toolboxes.release(session),
    stopped: (session, { reason, memory, durationMs }) =>
      logSandboxEvent(session, {
        type: 'berth.sandbox_stopped',
        reason,
        memory,
        duration_ms: Math.round(durationMs),
      }),
    resumed: (session, { memory, durationMs }) =>
      logSandboxEvent(session, {
        type: 'berth.sandbox_resumed',
        memory,
        duration_ms: Math.round(durationMs),
      }),
  });
  const lifetimes = new LifetimeReaper({
    store,
    supervisor,
    sandboxes,
    logger,
    releaseTools: (session) => toolboxes.release(session),
  });
  const limits = new Limits({
    defaults: config.limits,
    resources: store.resources,
    liveSessions: (tenantId, userId) => supervisor.liveCount(tenantId, userId),
  });
  const authenticator = new Authenticator(store.resources);
  // Several nodes: revocations, role changes and removals made anywhere apply here at once, and
  // one made here is answered once the other live nodes said they applied it.
  if (cluster && clusterLeases && rawStore.watchPrincipals && rawStore.principalAcknowledgements) {
    const source = rawStore as Required<Pick<Store, 'watchPrincipals' | 'principalAcknowledgements'>>;
    authenticator.listen({
      watch: (listener) => source.watchPrincipals(listener),
      acknowledgements: (change) => source.principalAcknowledgements(change),
      otherNodes: async () => {
        const nodes = await clusterLeases.liveNodes();
        return nodes.filter((node) => node.nodeId !== clusterLeases.nodeId).length;
      },
    });
  }
  const adminKey = await ensureAdminKey(store.resources, config.dataDir, {
    label: `admin.key in ${config.dataDir} on ${hostname()}${cluster ? ` (node ${cluster.nodeId})` : ''}`,
  });
  const adminKeyFile = adminKey.created ? adminKey.file : undefined;
  if (adminKeyFile) logger.info('created the admin API key', { file: adminKeyFile });
  else if (adminKey.unknownFile) {
    logger.warn('admin.key in the data directory holds a key this database does not know', {
      file: adminKey.unknownFile,
    });
  } else if (!adminKey.file) {
    logger.info('the admin API key was created by another start', {
      where: adminKey.createdElsewhere ?? 'unknown',
    });
  }

  const app = createApp({
    store,
    vault,
    supervisor,
    forgetSession: async (session) => {
      await toolboxes.release(session);
      await sandboxes.discard(session);
    },
    limits,
    authenticator,
    deltas,
    sandboxDrivers: [...drivers.keys()],
    unavailableDrivers,
    maxBodyBytes: config.maxBodyBytes,
    metrics,
    budgetBook,
    sandboxes,
    minLifecycleSeconds: config.minLifecycleSeconds,
    ...(cluster ? { cluster } : {}),
  });
  // In a cluster, requests for sessions other nodes hold go there before the app parses them.
  const server = cluster
    ? createServer(
        clusterRequestListener({
          cluster,
          app,
          authenticator,
          maxBodyBytes: config.maxBodyBytes ?? DEFAULT_MAX_BODY_BYTES,
        }),
      ).listen(config.port, config.host)
    : serve({ fetch: app.fetch, hostname: config.host, port: config.port });
  await new Promise<void>((resolve, reject) => {
    server.once('listening', resolve);
    server.once('error', reject);
  });
  const address = server.address() as AddressInfo;
  const host = address.family === 'IPv6' ? `[${address.address}]` : address.address;
  const url = `http://${host}:${address.port}`;
  if (cluster) {
    await cluster.start(config.cluster?.advertiseUrl ?? url);
    logger.info('joined the cluster', { node: cluster.nodeId });
  }
  await supervisor.recover();
  lifetimes.start();
  logger.info('berth is listening', { url, store: config.store.kind, drivers: [...drivers.keys()] });

  let closing: Promise<void> | undefined;
  return {
    url,
    nodeId: cluster?.nodeId,
    store,
    supervisor,
    sandboxes,
    adminKeyFile,
    adminKey,
    telemetry,
    vault,
    // Middleware registrations show up as method ALL; only handlers are routes.
    routes: [
      ...new Map(
        app.routes
          .filter((route) => route.method !== 'ALL')
          .map((route) => [`${route.method} ${route.path}`, { method: route.method, path: route.path }]),
      ).values(),
    ],
    close() {
      closing ??= (async () => {
        await new Promise<void>((resolve) => {
          server.close(() => resolve());
          // Open SSE streams would keep close() waiting forever.
          (server as unknown as { closeAllConnections?: () => void }).closeAllConnections?.();
        });
        lifetimes.stop();
        // Graceful drain: no new sessions are placed here while this node stops.
        await cluster?.drain().catch(() => undefined);
        await supervisor.shutdown();
        await toolboxes.releaseAll();
        // Stopped with snapshots: the next process resumes each sandbox where it was.
        await sandboxes.stopAll();
        await egress.closeAll();
        // Only now (sandboxes stopped, turns cancelled) may other nodes take the sessions.
        await cluster?.leave().catch(() => undefined);
        await clusterPool?.end().catch(() => undefined);
        await heartbeatPool?.end().catch(() => undefined);
        await Promise.all([...drivers.values()].map((driver) => driver.close?.()));
        await telemetry.shutdown().catch(() => undefined);
        await store.close();
      })();
      return closing;
    },
  };
}
