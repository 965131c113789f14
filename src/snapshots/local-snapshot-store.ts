import { randomBytes } from 'node:crypto';
import { mkdir, readdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { SessionKey } from '../store/event-store.js';
import type { SnapshotInfo, SnapshotStore, StoredSnapshot } from './snapshot-store.js';

const INFO_FILE = 'snapshot.json';
const STAGING = '.staging';

/** Ids are `[A-Za-z0-9_-]`; anything else must never reach a path. */
function safeSegment(value: string): string {
  if (!/^[A-Za-z0-9_-]{1,128}$/.test(value)) throw new Error(`not a valid id for a path: ${value}`);
  return value;
}

/**
 * Snapshots in a directory on this node (`<dataDir>/snapshots`), on the same filesystem as the
 * sessions' working directories, so staging, committing and restoring are renames: stopping
 * and resuming cost the same whatever the workspace's size.
 *
 * Layout: `<root>/<tenant>/<session>.<stamp>/` holds the driver's files and `snapshot.json`
 * (written last, so a directory without it is incomplete and ignored). A commit renames the
 * staged directory in, then removes older ones; a crash between the two leaves two complete
 * snapshots and `get` takes the newest.
 */
export class LocalSnapshotStore implements SnapshotStore {
  readonly #root: string;

  constructor(root: string) {
    this.#root = root;
  }

  async stage(session: SessionKey): Promise<string> {
    const directory = join(
      this.#root,
      STAGING,
      `${safeSegment(session.id)}.${randomBytes(6).toString('hex')}`,
    );
    await mkdir(directory, { recursive: true, mode: 0o700 });
    return directory;
  }

  async commit(session: SessionKey, staged: string, info: SnapshotInfo): Promise<void> {
    await writeFile(join(staged, INFO_FILE), JSON.stringify(info), { mode: 0o600 });
    const tenantDirectory = join(this.#root, safeSegment(session.tenantId));
    await mkdir(tenantDirectory, { recursive: true, mode: 0o700 });
    // Stamps sort in time order; the random tail keeps two commits in one millisecond apart.
    const stamp = `${Date.now().toString().padStart(15, '0')}${randomBytes(3).toString('hex')}`;
    const name = `${safeSegment(session.id)}.${stamp}`;
    await rename(staged, join(tenantDirectory, name));
    for (const older of await this.#versions(session)) {
      if (older !== name) await rm(join(tenantDirectory, older), { recursive: true, force: true });
    }
  }

  async get(session: SessionKey): Promise<StoredSnapshot | undefined> {
    const tenantDirectory = join(this.#root, safeSegment(session.tenantId));
    for (const name of (await this.#versions(session)).reverse()) {
      const directory = join(tenantDirectory, name);
      const info = await readFile(join(directory, INFO_FILE), 'utf8').then(
        (text) => JSON.parse(text) as SnapshotInfo,
        () => undefined,
      );
      if (info) return { ...info, directory };
    }
    return undefined;
  }

  async delete(session: SessionKey): Promise<void> {
    const tenantDirectory = join(this.#root, safeSegment(session.tenantId));
    for (const name of await this.#versions(session)) {
      await rm(join(tenantDirectory, name), { recursive: true, force: true });
    }
  }

  async removeLeftovers(): Promise<number> {
    const staging = join(this.#root, STAGING);
    const names = await readdir(staging).catch(() => [] as string[]);
    for (const name of names) await rm(join(staging, name), { recursive: true, force: true });
    return names.length;
  }

  /** The session's snapshot directory names, oldest first. */
  async #versions(session: SessionKey): Promise<string[]> {
    const prefix = `${safeSegment(session.id)}.`;
    const names = await readdir(join(this.#root, safeSegment(session.tenantId))).catch(() => [] as string[]);
    return names.filter((name) => name.startsWith(prefix)).sort();
  }
}
