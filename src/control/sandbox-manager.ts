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
}

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
    this.#entries.set(key, { session: { tenantId: session.tenantId, id: session.id }, driver, handle });
    handle.catch(() => this.#entries.delete(key));
    return handle;
  }

  /** Destroys a session's sandbox (its working directory stays). */
  async release(session: SessionKey): Promise<void> {
    const key = sessionKeyString(session);
    const entry = this.#entries.get(key);
    if (!entry) return;
    this.#entries.delete(key);
    const handle = await entry.handle.catch(() => undefined);
    if (handle) await entry.driver.destroy(handle);
  }

  /** Destroys a session's sandbox and deletes its files (the session itself was deleted). */
  async discard(session: SessionKey): Promise<void> {
    await this.release(session);
    await rm(join(this.#dataDir, 'sessions', session.id), { recursive: true, force: true });
  }

  /** Live sandboxes per driver name. */
  countByDriver(): Record<string, number> {
    const counts: Record<string, number> = {};
    for (const entry of this.#entries.values()) counts[entry.driver.name] = (counts[entry.driver.name] ?? 0) + 1;
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
