/**
 * The snapshot store port: where a stopped sandbox's state waits until its session needs it
 * again. A snapshot is a directory that a driver's `suspend` wrote (the working directory's files,
 * and memory for drivers that keep it); a session has at most one, its newest. Adapters: a local
 * directory (`local-snapshot-store.ts`, one node); a store every node can read is issue 8's.
 */
import type { SessionKey } from '../store/event-store.js';

/** What is known of a stored snapshot. */
export interface SnapshotInfo {
  /** The sandbox driver that wrote it (a snapshot resumes on the same driver). */
  driver: string;
  /** True when processes and memory were saved, not only files. */
  memory: boolean;
  /** When the sandbox was stopped (ISO 8601). */
  createdAt: string;
}

/** A snapshot ready to resume from: `directory` is what `provision({ restoreFrom })` takes. */
export interface StoredSnapshot extends SnapshotInfo {
  directory: string;
}

export interface SnapshotStore {
  /**
   * A fresh empty directory for a driver to suspend a sandbox into; `commit` makes it the
   * session's snapshot. Staged directories that are never committed (a crash) are removed by
   * `removeLeftovers`.
   */
  stage(session: SessionKey): Promise<string>;
  /** Makes `staged` the session's snapshot, replacing the previous one only once it is complete. */
  commit(session: SessionKey, staged: string, info: SnapshotInfo): Promise<void>;
  /** The session's snapshot, or undefined when it has none. */
  get(session: SessionKey): Promise<StoredSnapshot | undefined>;
  /** Deletes the session's snapshot (restored, or the session was deleted). Idempotent. */
  delete(session: SessionKey): Promise<void>;
  /** Removes staged directories a dead process left; returns how many. */
  removeLeftovers(): Promise<number>;
}
