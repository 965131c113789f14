import { chown, mkdir, readdir, rm } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { BerthError } from '../errors.js';
import type { SandboxDriver, SandboxHandle, SandboxSpec } from '../sandbox/driver.js';
import type { SnapshotStore } from '../snapshots/snapshot-store.js';
import { type SessionKey, sessionKeyString } from '../store/event-store.js';
import type { SessionRecord, Store } from '../store/resource-store.js';

/** Lazily gives a session its sandbox: provisioned on the first tool call, then reused. */
export interface SandboxAccess {
  get(): Promise<SandboxHandle>;
}

/**
 * A session's sandbox as DESIGN.md §6 names its states: `none` (never provisioned, or
 * destroyed), `provisioning`, `live`, `busy` (a command is running: the idle timer is held),
 * `stopping`, `stopped` (a snapshot is kept; the next tool call resumes from it).
 */
export type SandboxState = 'none' | 'provisioning' | 'live' | 'busy' | 'stopping' | 'stopped';

/** Why a sandbox was stopped. */
export type StopReason = 'idle_timeout' | 'requested' | 'max_lifetime' | 'shutdown';

/** The lifecycle settings of a session's environment (`config.berth.lifecycle`). */
export interface SandboxLifecycle {
  idleTimeoutMs: number;
  maxLifetimeMs: number;
}

/** What the manager tells the rest of Berth about sandboxes coming and going. */
export interface SandboxHooks {
  /** True while the session has a turn in flight: its sandbox is not idle then. */
  active?(session: SessionKey): boolean;
  /** Before a sandbox stops: close what runs inside it (MCP stdio servers). */
  beforeStop?(session: SessionKey): Promise<void>;
  /** After a sandbox stopped with its snapshot stored. */
  stopped?(
    session: SessionKey,
    details: { reason: StopReason; memory: boolean; durationMs: number },
  ): Promise<void>;
  /** After a sandbox resumed from its snapshot. */
  resumed?(session: SessionKey, details: { memory: boolean; durationMs: number }): Promise<void>;
  /** Environment variables every command of the session's sandbox gets (egress settings). */
  environment?(session: SessionRecord): Promise<Record<string, string>>;
  /**
   * After a sandbox is provisioned or resumed, before anything runs in it (the egress proxy
   * starts here). A failure destroys the sandbox and fails the use that wanted it.
   */
  provisioned?(session: SessionRecord, handle: SandboxHandle, environmentConfig: unknown): Promise<void>;
  /** After a session's sandbox stopped or went away (its egress proxy stops here). */
  released?(session: SessionKey): Promise<void>;
}

interface Entry {
  session: SessionKey;
  /** The driver wrapped so that every command holds the idle timer. */
  driver: SandboxDriver;
  handle: Promise<SandboxHandle>;
  meter: Meter;
  lifecycle: SandboxLifecycle;
  /** When the session reaches its max lifetime (ms since the epoch). */
  expiresAt: number;
  provisioned: boolean;
  /** Commands and file operations in flight. */
  busy: number;
  /** When the sandbox was last used or seen in use (ms since the epoch). */
  lastUsedAt: number;
  /** Set once a stop has begun; settles when the snapshot is stored. */
  stopping?: Promise<void>;
}

/** Per-sandbox metering state: CPU and memory integrated from periodic stats samples. */
interface Meter {
  /** The sandbox's CPU seconds at the newest sample. */
  cpuSeconds: number;
  memoryBytes: number;
  sampledAt: number | undefined;
}

/** Sandbox work of a session measured but not yet in a stored `session.usage` snapshot. */
interface Pending {
  cpuSeconds: number;
  memoryGbSeconds: number;
}

/** How often live sandboxes' stats are sampled (memory is integrated between samples). */
const SAMPLE_INTERVAL_MS = 1000;

/** Defaults of an environment's `config.berth.lifecycle` (DESIGN.md §6). */
export const DEFAULT_IDLE_TIMEOUT_S = 900;
export const DEFAULT_MAX_LIFETIME_S = 28_800;

/** How often idle sandboxes are looked for (idle stops land within this of their time). */
const REAP_INTERVAL_MS = 500;

/** True when `directory` exists and holds anything. */
async function hasFiles(directory: string): Promise<boolean> {
  return readdir(directory).then(
    (names) => names.length > 0,
    () => false,
  );
}

/** The lifecycle of an environment's `config.berth.lifecycle`, with the defaults of DESIGN.md §6. */
export function lifecycleOf(config: unknown): SandboxLifecycle {
  const lifecycle = (
    config as { berth?: { lifecycle?: { idle_timeout_s?: number; max_lifetime_s?: number } } }
  )?.berth?.lifecycle;
  return {
    idleTimeoutMs: (lifecycle?.idle_timeout_s ?? DEFAULT_IDLE_TIMEOUT_S) * 1000,
    maxLifetimeMs: (lifecycle?.max_lifetime_s ?? DEFAULT_MAX_LIFETIME_S) * 1000,
  };
}

/**
 * Owns the live sandboxes of this process, one per session (cattle, not pets): provisions
 * on first use from the session's environment (`config.berth.driver`, limits), keeps the
 * working directory under `<dataDir>/sessions/<id>/workspace`, stops sandboxes that sat idle
 * for their environment's `idle_timeout_s` (and all of them at shutdown) into the snapshot
 * store, and resumes a stopped one from its snapshot on the next use.
 */
export class SandboxManager {
  readonly #entries = new Map<string, Entry>();
  readonly #drivers: ReadonlyMap<string, SandboxDriver>;
  readonly #store: Store;
  readonly #dataDir: string;
  readonly #snapshots: SnapshotStore;
  #hooks: SandboxHooks = {};
  /** Measured sandbox work per session (tenant + id) not yet snapshotted. */
  readonly #pending = new Map<string, Pending>();
  /** When each session that had a sandbox here reaches its max lifetime (live or stopped). */
  readonly #expiries = new Map<string, { session: SessionKey; expiresAt: number }>();
  #sampler: NodeJS.Timeout | undefined;
  #reaper: NodeJS.Timeout | undefined;

  constructor(options: {
    drivers: ReadonlyMap<string, SandboxDriver>;
    store: Store;
    dataDir: string;
    snapshots: SnapshotStore;
  }) {
    this.#drivers = options.drivers;
    this.#store = options.store;
    this.#dataDir = options.dataDir;
    this.#snapshots = options.snapshots;
  }

  /** Connects the manager to the rest of Berth (set once, before the first session). */
  setHooks(hooks: SandboxHooks): void {
    this.#hooks = hooks;
  }

  /** The session's working directory on the host. */
  workdirOf(sessionId: string): string {
    return join(this.#dataDir, 'sessions', sessionId, 'workspace');
  }

  /** Access to the session's sandbox; nothing is provisioned until `get()` is called. */
  access(session: SessionRecord, extra?: Pick<SandboxSpec, 'readOnlyMounts'>): SandboxAccess {
    return { get: () => this.#get(session, extra) };
  }

  /** The driver a session's sandbox runs on, once provisioned. */
  driverOf(session: SessionKey): SandboxDriver | undefined {
    return this.#entries.get(sessionKeyString(session))?.driver;
  }

  async #get(session: SessionRecord, extra?: Pick<SandboxSpec, 'readOnlyMounts'>): Promise<SandboxHandle> {
    const key = sessionKeyString(session);
    for (let existing = this.#entries.get(key); existing; existing = this.#entries.get(key)) {
      if (existing.stopping) {
        // A sandbox being stopped is resumed once its snapshot is stored.
        await existing.stopping.catch(() => undefined);
        continue;
      }
      const handle = existing.provisioned ? await existing.handle : undefined;
      if (handle && !existing.driver.isAlive(handle)) {
        await this.#forgetDead(existing, existing.driver, handle);
        continue;
      }
      return existing.handle;
    }
    // The entry is in the map before the first await: concurrent first uses (two MCP servers
    // starting, parallel file uploads) share one sandbox instead of racing to make two.
    const entry: Entry = {
      session: { tenantId: session.tenantId, id: session.id },
      driver: undefined as unknown as SandboxDriver,
      handle: undefined as unknown as Promise<SandboxHandle>,
      meter: { cpuSeconds: 0, memoryBytes: 0, sampledAt: undefined },
      lifecycle: lifecycleOf(undefined),
      expiresAt: Number.POSITIVE_INFINITY,
      provisioned: false,
      busy: 0,
      lastUsedAt: Date.now(),
    };
    entry.handle = this.#prepare(entry, session, extra);
    this.#entries.set(key, entry);
    entry.handle.then(
      () => {
        entry.provisioned = true;
        entry.lastUsedAt = Date.now();
      },
      () => {
        if (this.#entries.get(key) === entry) this.#entries.delete(key);
      },
    );
    this.#startTimers();
    return entry.handle;
  }

  /** Reads the session's environment, picks its driver and provisions (or resumes) the sandbox. */
  async #prepare(
    entry: Entry,
    session: SessionRecord,
    extra?: Pick<SandboxSpec, 'readOnlyMounts'>,
  ): Promise<SandboxHandle> {
    const environment = await this.#store.resources.get(
      'environment',
      session.tenantId,
      session.environmentId,
    );
    const config = environment?.body.config as
      | { berth?: { driver?: string; limits?: Record<string, number> } }
      | undefined;
    const berth = config?.berth;
    const driverName = berth?.driver ?? [...this.#drivers.keys()][0];
    const driver = driverName ? this.#drivers.get(driverName) : undefined;
    if (!driver) {
      throw new BerthError(
        'sandbox_unavailable',
        `sandbox driver "${driverName}" is not available on this host`,
      );
    }
    entry.driver = this.#holding(entry, driver);
    entry.lifecycle = lifecycleOf(config);
    entry.expiresAt = Date.parse(session.createdAt) + entry.lifecycle.maxLifetimeMs;
    this.#expiries.set(sessionKeyString(session), { session: entry.session, expiresAt: entry.expiresAt });
    const env = await this.#hooks.environment?.(session);
    const handle = await this.#provision(entry, driver, session, {
      readOnlyMounts: extra?.readOnlyMounts,
      ...(env ? { env } : {}),
      limits: {
        cpu: berth?.limits?.cpu,
        memoryMb: berth?.limits?.memory_mb,
        pids: berth?.limits?.pids,
        diskMb: berth?.limits?.disk_mb,
      },
    });
    try {
      await this.#hooks.provisioned?.(session, handle, config);
    } catch (error) {
      await driver.destroy(handle).catch(() => undefined);
      await this.#hooks.released?.(entry.session).catch(() => undefined);
      throw error;
    }
    return handle;
  }

  /** Provisions a fresh sandbox, or resumes the session's stopped one from its snapshot. */
  async #provision(
    entry: Entry,
    driver: SandboxDriver,
    session: SessionRecord,
    spec: Pick<SandboxSpec, 'readOnlyMounts' | 'limits' | 'env'>,
  ): Promise<SandboxHandle> {
    const workdir = this.workdirOf(session.id);
    let snapshot = await this.#snapshots.get(session);
    if (snapshot && (await hasFiles(workdir))) {
      // Files on the host are newer than the snapshot (a crash after a resume): keep them.
      await this.#snapshots.delete(session);
      snapshot = undefined;
    }
    if (!snapshot) {
      await mkdir(workdir, { recursive: true, mode: 0o700 });
      // The sandbox user (uid 1000 inside) must own its working directory.
      await chown(workdir, 1000, 1000).catch(() => undefined);
      return driver.provision({ sessionId: session.id, workdir, ...spec });
    }
    if (snapshot.driver !== driver.name) {
      throw new BerthError(
        'sandbox_failed',
        `session ${session.id} was stopped on sandbox driver "${snapshot.driver}" and its environment now uses "${driver.name}"; its snapshot can only resume on "${snapshot.driver}"`,
      );
    }
    const started = performance.now();
    await mkdir(dirname(workdir), { recursive: true, mode: 0o700 });
    const handle = await driver.provision({
      sessionId: session.id,
      workdir,
      ...spec,
      restoreFrom: snapshot.directory,
    });
    await this.#snapshots.delete(session);
    await this.#hooks
      .resumed?.(entry.session, { memory: snapshot.memory, durationMs: performance.now() - started })
      .catch(() => undefined);
    return handle;
  }

  /**
   * `driver` with every command and file operation holding the sandbox's idle timer. A call that
   * finds the sandbox dead (its init or kernel exited: an OOM of a whole gVisor sandbox, a killed
   * init) fails, and the entry is dropped so the next use provisions a new sandbox over the same
   * files instead of failing forever.
   */
  #holding(entry: Entry, driver: SandboxDriver): SandboxDriver {
    const hold = async <T>(handle: SandboxHandle, work: () => Promise<T>): Promise<T> => {
      entry.busy++;
      try {
        return await work();
      } catch (error) {
        if (!entry.stopping && !driver.isAlive(handle)) await this.#forgetDead(entry, driver, handle);
        throw error;
      } finally {
        entry.busy--;
        entry.lastUsedAt = Date.now();
      }
    };
    return {
      ...driver,
      exec: (handle, argv, options) => hold(handle, () => driver.exec(handle, argv, options)),
      readFile: (handle, path, maxBytes) => hold(handle, () => driver.readFile(handle, path, maxBytes)),
      writeFile: (handle, path, data) => hold(handle, () => driver.writeFile(handle, path, data)),
    };
  }

  /** Drops a sandbox that died on its own and releases what is left of it (mounts, cgroups). */
  async #forgetDead(entry: Entry, driver: SandboxDriver, handle: SandboxHandle): Promise<void> {
    const key = sessionKeyString(entry.session);
    if (this.#entries.get(key) !== entry) return;
    this.#entries.delete(key);
    await driver.destroy(handle).catch(() => undefined);
    await this.#hooks.released?.(entry.session).catch(() => undefined);
  }

  /** Whether the session has a sandbox on this node in any state but stopped. */
  isPresent(session: SessionKey): boolean {
    return this.#entries.has(sessionKeyString(session));
  }

  /** The state of a session's sandbox on this node. */
  async stateOf(session: SessionKey): Promise<SandboxState> {
    const entry = this.#entries.get(sessionKeyString(session));
    if (entry) {
      if (entry.stopping) return 'stopping';
      if (!entry.provisioned) return 'provisioning';
      return entry.busy > 0 ? 'busy' : 'live';
    }
    return (await this.#snapshots.get(session)) ? 'stopped' : 'none';
  }

  /**
   * Stops a session's sandbox, keeping its state in the snapshot store; the next use resumes
   * it. A sandbox that is not live is left as it is. With `requireIdle`, a command in flight
   * makes it a `conflict` instead (a client asking to stop must not kill a running command).
   */
  async stop(
    session: SessionKey,
    reason: StopReason,
    options: { requireIdle?: boolean } = {},
  ): Promise<void> {
    const key = sessionKeyString(session);
    const entry = this.#entries.get(key);
    if (!entry) return;
    if (entry.stopping) return entry.stopping;
    if (options.requireIdle && entry.busy > 0) {
      throw new BerthError(
        'conflict',
        `a command is running in the sandbox of session ${session.id}; interrupt the session first`,
      );
    }
    entry.stopping = this.#stop(entry, reason).finally(() => {
      if (this.#entries.get(key) === entry) this.#entries.delete(key);
    });
    return entry.stopping;
  }

  async #stop(entry: Entry, reason: StopReason): Promise<void> {
    const handle = await entry.handle.catch(() => undefined);
    if (!handle) return;
    const started = performance.now();
    await this.#sample(entry);
    await this.#hooks.beforeStop?.(entry.session).catch(() => undefined);
    const staged = await this.#snapshots.stage(entry.session);
    try {
      const { memory } = await entry.driver.suspend(handle, staged);
      await this.#snapshots.commit(entry.session, staged, {
        driver: entry.driver.name,
        memory,
        createdAt: new Date().toISOString(),
      });
      await this.#hooks
        .stopped?.(entry.session, { reason, memory, durationMs: performance.now() - started })
        .catch(() => undefined);
    } catch (error) {
      await rm(staged, { recursive: true, force: true });
      await entry.driver.destroy(handle).catch(() => undefined);
      throw error;
    } finally {
      await this.#hooks.released?.(entry.session).catch(() => undefined);
    }
  }

  /**
   * Sessions that had a sandbox here (live or stopped since) and are past their max lifetime.
   * Call `forgetLifetime` once such a session has ended.
   */
  pastLifetime(now = Date.now()): SessionKey[] {
    return [...this.#expiries.values()]
      .filter((expiry) => now >= expiry.expiresAt)
      .map((expiry) => expiry.session);
  }

  /** Stops watching a session's lifetime (it ended). */
  forgetLifetime(session: SessionKey): void {
    this.#expiries.delete(sessionKeyString(session));
  }

  /** Stops every live sandbox that sat idle for its environment's `idle_timeout_s`. */
  reapIdle(now = Date.now()): void {
    for (const entry of this.#entries.values()) {
      if (!entry.provisioned || entry.stopping) continue;
      if (entry.busy > 0 || this.#hooks.active?.(entry.session)) {
        entry.lastUsedAt = now;
        continue;
      }
      if (now - entry.lastUsedAt >= entry.lifecycle.idleTimeoutMs) {
        void this.stop(entry.session, 'idle_timeout').catch(() => undefined);
      }
    }
  }

  /**
   * The sandbox work of a session measured since its last committed snapshot (a fresh sample
   * of its live sandbox included). Call `commit` once the snapshot holding it is stored; until
   * then the same work is reported again, so a failed append loses nothing.
   */
  async measure(session: SessionKey): Promise<Pending & { commit(): void }> {
    const key = sessionKeyString(session);
    const entry = this.#entries.get(key);
    if (entry) await this.#sample(entry);
    const pending = this.#pending.get(key) ?? { cpuSeconds: 0, memoryGbSeconds: 0 };
    const taken = { ...pending };
    return {
      ...taken,
      commit: () => {
        const current = this.#pending.get(key);
        if (!current) return;
        current.cpuSeconds -= taken.cpuSeconds;
        current.memoryGbSeconds -= taken.memoryGbSeconds;
        if (current.cpuSeconds <= 1e-9 && current.memoryGbSeconds <= 1e-9 && !this.#entries.has(key)) {
          this.#pending.delete(key);
        }
      },
    };
  }

  /** Adds what the sandbox used since the previous sample to its session's pending work. */
  async #sample(entry: Entry): Promise<void> {
    if (!entry.provisioned || !entry.driver.stats) return;
    const handle = await entry.handle.catch(() => undefined);
    if (!handle) return;
    const stats = await entry.driver.stats(handle).catch(() => undefined);
    if (!stats) return;
    const now = Date.now();
    const key = sessionKeyString(entry.session);
    const pending = this.#pending.get(key) ?? { cpuSeconds: 0, memoryGbSeconds: 0 };
    const { meter } = entry;
    pending.cpuSeconds += Math.max(0, stats.cpuSeconds - meter.cpuSeconds);
    if (meter.sampledAt !== undefined) {
      // Trapezoids between samples: GB × seconds.
      pending.memoryGbSeconds +=
        (((meter.memoryBytes + stats.memoryBytes) / 2) * ((now - meter.sampledAt) / 1000)) / 1e9;
    }
    this.#pending.set(key, pending);
    meter.cpuSeconds = stats.cpuSeconds;
    meter.memoryBytes = stats.memoryBytes;
    meter.sampledAt = now;
  }

  #startTimers(): void {
    if (!this.#reaper) {
      this.#reaper = setInterval(() => {
        this.reapIdle();
        if (this.#entries.size === 0 && this.#reaper) {
          clearInterval(this.#reaper);
          this.#reaper = undefined;
        }
      }, REAP_INTERVAL_MS);
      this.#reaper.unref();
    }
    if (this.#sampler) return;
    this.#sampler = setInterval(() => {
      for (const entry of this.#entries.values()) void this.#sample(entry);
      if (this.#entries.size === 0 && this.#sampler) {
        clearInterval(this.#sampler);
        this.#sampler = undefined;
      }
    }, SAMPLE_INTERVAL_MS);
    this.#sampler.unref();
  }

  /** Destroys a session's sandbox (its working directory stays; nothing is snapshotted). */
  async release(session: SessionKey): Promise<void> {
    const key = sessionKeyString(session);
    const entry = this.#entries.get(key);
    if (!entry) return;
    if (entry.stopping) {
      // Already going; a failed stop destroys the sandbox itself.
      await entry.stopping.catch(() => undefined);
      return;
    }
    // The last sample before it goes: its work stays pending until snapshotted.
    await this.#sample(entry);
    this.#entries.delete(key);
    const handle = await entry.handle.catch(() => undefined);
    try {
      if (handle) await entry.driver.destroy(handle);
    } finally {
      await this.#hooks.released?.(entry.session).catch(() => undefined);
    }
  }

  /** Destroys a session's sandbox and deletes its files and snapshot (the session was deleted). */
  async discard(session: SessionKey): Promise<void> {
    await this.release(session);
    await this.#snapshots.delete(session);
    this.#pending.delete(sessionKeyString(session));
    this.#expiries.delete(sessionKeyString(session));
    await rm(join(this.#dataDir, 'sessions', session.id), { recursive: true, force: true });
  }

  /** Live sandboxes per driver name. */
  countByDriver(): Record<string, number> {
    const counts: Record<string, number> = {};
    for (const entry of this.#entries.values()) {
      if (entry.provisioned) counts[entry.driver.name] = (counts[entry.driver.name] ?? 0) + 1;
    }
    return counts;
  }

  /** Number of live sandboxes. */
  get size(): number {
    return this.#entries.size;
  }

  /** Stops every sandbox of this process into the snapshot store (a restart resumes them). */
  async stopAll(): Promise<void> {
    await Promise.all(
      [...this.#entries.values()].map((entry) =>
        this.stop(entry.session, 'shutdown').catch(() => this.release(entry.session)),
      ),
    );
  }
}
