import { chown, mkdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { BerthError } from '../errors.js';
import type { SandboxDriver, SandboxHandle, SandboxSpec } from '../sandbox/driver.js';
import { type SessionKey, sessionKeyString } from '../store/event-store.js';
import type { SessionRecord, Store } from '../store/resource-store.js';

/** Lazily gives a session its sandbox: provisioned on the first tool call, then reused. */
export interface SandboxAccess {
  get(): Promise<SandboxHandle>;
}

interface Entry {
  session: SessionKey;
  driver: SandboxDriver;
  handle: Promise<SandboxHandle>;
  meter: Meter;
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

/**
 * Owns the live sandboxes of this process, one per session (cattle, not pets): provisions
 * on first use from the session's environment (`config.berth.driver`, limits), keeps the
 * working directory under `<dataDir>/sessions/<id>/workspace` so files outlive the sandbox,
 * and destroys everything on shutdown.
 */
export class SandboxManager {
  readonly #entries = new Map<string, Entry>();
  readonly #drivers: ReadonlyMap<string, SandboxDriver>;
  readonly #store: Store;
  readonly #dataDir: string;
  /** Measured sandbox work per session (tenant + id) not yet snapshotted. */
  readonly #pending = new Map<string, Pending>();
  #sampler: NodeJS.Timeout | undefined;

  constructor(options: { drivers: ReadonlyMap<string, SandboxDriver>; store: Store; dataDir: string }) {
    this.#drivers = options.drivers;
    this.#store = options.store;
    this.#dataDir = options.dataDir;
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
    const existing = this.#entries.get(key);
    if (existing) return existing.handle;
    const environment = await this.#store.resources.get(
      'environment',
      session.tenantId,
      session.environmentId,
    );
    const berth = (
      environment?.body.config as { berth?: { driver?: string; limits?: Record<string, number> } } | undefined
    )?.berth;
    const driverName = berth?.driver ?? [...this.#drivers.keys()][0];
    const driver = driverName ? this.#drivers.get(driverName) : undefined;
    if (!driver) {
      throw new BerthError(
        'sandbox_unavailable',
        `sandbox driver "${driverName}" is not available on this host`,
      );
    }
    const workdir = this.workdirOf(session.id);
    const handle = (async () => {
      await mkdir(workdir, { recursive: true, mode: 0o700 });
      // The sandbox user (uid 1000 inside) must own its working directory.
      await chown(workdir, 1000, 1000).catch(() => undefined);
      return driver.provision({
        sessionId: session.id,
        workdir,
        readOnlyMounts: extra?.readOnlyMounts,
        limits: {
          cpu: berth?.limits?.cpu,
          memoryMb: berth?.limits?.memory_mb,
          pids: berth?.limits?.pids,
          diskMb: berth?.limits?.disk_mb,
        },
      });
    })();
    this.#entries.set(key, {
      session: { tenantId: session.tenantId, id: session.id },
      driver,
      handle,
      meter: { cpuSeconds: 0, memoryBytes: 0, sampledAt: undefined },
    });
    handle.catch(() => this.#entries.delete(key));
    this.#startSampler();
    return handle;
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
    if (!entry.driver.stats) return;
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

  #startSampler(): void {
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

  /** Destroys a session's sandbox (its working directory stays). */
  async release(session: SessionKey): Promise<void> {
    const key = sessionKeyString(session);
    const entry = this.#entries.get(key);
    if (!entry) return;
    // The last sample before it goes: its work stays pending until snapshotted.
    await this.#sample(entry);
    this.#entries.delete(key);
    const handle = await entry.handle.catch(() => undefined);
    if (handle) await entry.driver.destroy(handle);
  }

  /** Destroys a session's sandbox and deletes its files (the session itself was deleted). */
  async discard(session: SessionKey): Promise<void> {
    await this.release(session);
    this.#pending.delete(sessionKeyString(session));
    await rm(join(this.#dataDir, 'sessions', session.id), { recursive: true, force: true });
  }

  /** Live sandboxes per driver name. */
  countByDriver(): Record<string, number> {
    const counts: Record<string, number> = {};
    for (const entry of this.#entries.values())
      counts[entry.driver.name] = (counts[entry.driver.name] ?? 0) + 1;
    return counts;
  }

  /** Number of live sandboxes. */
  get size(): number {
    return this.#entries.size;
  }

  /** Destroys every sandbox of this process. */
  async releaseAll(): Promise<void> {
    await Promise.all([...this.#entries.values()].map((entry) => this.release(entry.session)));
  }
}
