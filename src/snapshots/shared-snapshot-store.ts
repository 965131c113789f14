/**
 * Snapshots every node of a cluster can resume from: each committed snapshot is packed (tar +
 * gzip) into PostgreSQL (`sandbox_snapshots`, under row-level security), and a node keeps an
 * unpacked copy in its local store (`local-snapshot-store.ts`) as a cache. PostgreSQL is the
 * truth: `get` unpacks the stored archive when this node's copy is missing or older, and
 * drops a local copy whose snapshot was deleted elsewhere.
 *
 * Why PostgreSQL rather than an S3-compatible store: a cluster already has one, with backups and
 * tenant isolation; no other service to run. Workspaces are capped by the sandbox disk limit
 * (default 10 GiB, usually far less in use); archives above `maxArchiveBytes` (default 256 MiB)
 * stay on their node only, with a warning, rather than loading the database.
 */
import { execFile } from 'node:child_process';
import { mkdir, rm } from 'node:fs/promises';
import { promisify } from 'node:util';
import type { SessionKey } from '../store/event-store.js';
import type { SnapshotArchiveStore } from '../store/resource-store.js';
import { LocalSnapshotStore } from './local-snapshot-store.js';
import type { SnapshotInfo, SnapshotStore, StoredSnapshot } from './snapshot-store.js';

const run = promisify(execFile);
const TAR_ENVIRONMENT = { PATH: '/usr/bin:/bin', LC_ALL: 'C' };

export interface SharedSnapshotStoreOptions {
  /** This node's cache (the usual `<dataDir>/snapshots`). */
  root: string;
  archives: SnapshotArchiveStore;
  maxArchiveBytes?: number;
  /** Told when a snapshot is too large to share. */
  warn?(message: string, fields: Record<string, unknown>): void;
}

export class SharedSnapshotStore implements SnapshotStore {
  readonly #local: LocalSnapshotStore;
  readonly #archives: SnapshotArchiveStore;
  readonly #maxArchiveBytes: number;
  readonly #warn: SharedSnapshotStoreOptions['warn'];

  constructor(options: SharedSnapshotStoreOptions) {
    this.#local = new LocalSnapshotStore(options.root);
    this.#archives = options.archives;
    this.#maxArchiveBytes = options.maxArchiveBytes ?? 256 * 1024 * 1024;
    this.#warn = options.warn;
  }

  stage(session: SessionKey): Promise<string> {
    return this.#local.stage(session);
  }

  async commit(session: SessionKey, staged: string, info: SnapshotInfo): Promise<void> {
    // Packed before the local commit moves the directory (numeric owners and modes kept).
    const { stdout } = await run('tar', ['--numeric-owner', '-czf', '-', '-C', staged, '.'], {
      env: TAR_ENVIRONMENT,
      encoding: 'buffer',
      maxBuffer: this.#maxArchiveBytes + 1,
    }).catch((error: unknown) => {
      if ((error as { code?: unknown }).code === 'ERR_CHILD_PROCESS_STDIO_MAXBUFFER')
        return { stdout: undefined };
      throw error;
    });
    await this.#local.commit(session, staged, info);
    if (stdout === undefined) {
      this.#warn?.('snapshot too large to share between nodes; kept on this node only', {
        session: session.id,
        limitBytes: this.#maxArchiveBytes,
      });
      // Recorded all the same, so other nodes know a newer snapshot exists (and is not theirs).
      await this.#archives.put(session, {
        createdAt: info.createdAt,
        info: { ...info, localOnly: true },
        archive: Buffer.alloc(0),
      });
      return;
    }
    await this.#archives.put(session, { createdAt: info.createdAt, info: { ...info }, archive: stdout });
  }

  async get(session: SessionKey): Promise<StoredSnapshot | undefined> {
    const [local, newest] = await Promise.all([this.#local.get(session), this.#archives.newest(session)]);
    if (newest === undefined) {
      // Restored or deleted (here or on another node): a copy left here is stale.
      if (local) await this.#local.delete(session);
      return undefined;
    }
    if (local && local.createdAt >= newest) return local;
    const stored = await this.#archives.get(session);
    // Kept only on the node that made it (too large to share): nothing to resume from here.
    if (!stored || stored.info.localOnly === true) return undefined;
    const staged = await this.#local.stage(session);
    try {
      await mkdir(staged, { recursive: true });
      await new Promise<void>((resolve, reject) => {
        const child = execFile(
          'tar',
          ['--numeric-owner', '--same-permissions', '-xzf', '-', '-C', staged],
          { env: TAR_ENVIRONMENT },
          (error) => (error ? reject(error) : resolve()),
        );
        child.stdin?.end(stored.archive);
      });
      await this.#local.commit(session, staged, stored.info as unknown as SnapshotInfo);
    } catch (error) {
      await rm(staged, { recursive: true, force: true });
      throw error;
    }
    return this.#local.get(session);
  }

  async delete(session: SessionKey): Promise<void> {
    await this.#archives.delete(session);
    await this.#local.delete(session);
  }

  removeLeftovers(): Promise<number> {
    return this.#local.removeLeftovers();
  }
}
