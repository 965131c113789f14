import { cp, mkdir, readdir, rename, rm, rmdir, stat } from 'node:fs/promises';
import { dirname } from 'node:path';
import { BerthError } from '../errors.js';

/** The name of the working directory's copy inside a suspend directory. */
export const SUSPENDED_WORKSPACE = 'workspace';

async function exists(path: string): Promise<boolean> {
  return stat(path).then(
    () => true,
    () => false,
  );
}

/**
 * Moves a directory tree to `to` (which must not exist): a rename when both are on one
 * filesystem (instant, whatever the size), else a copy keeping modes, owners, links and times,
 * then removal of the source.
 */
export async function moveTree(from: string, to: string): Promise<void> {
  await mkdir(dirname(to), { recursive: true });
  try {
    await rename(from, to);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== 'EXDEV') throw error;
    await cp(from, to, { recursive: true, preserveTimestamps: true, verbatimSymlinks: true, force: false });
    await rm(from, { recursive: true, force: true });
  }
}

/**
 * Puts a suspended working directory back at `workdir`. A workdir that exists must be empty
 * (a fresh one the caller made); anything in it means the snapshot is not the newest state, and
 * resuming over it would lose files, so that is refused.
 */
export async function restoreWorkspace(restoreFrom: string, workdir: string): Promise<void> {
  const saved = `${restoreFrom}/${SUSPENDED_WORKSPACE}`;
  if (!(await exists(saved))) {
    throw new BerthError('sandbox_failed', `the snapshot in ${restoreFrom} has no working directory`);
  }
  if (await exists(workdir)) {
    if ((await readdir(workdir)).length > 0) {
      throw new BerthError(
        'sandbox_failed',
        `cannot resume into ${workdir}: it already holds files (newer than the snapshot?)`,
      );
    }
    await rmdir(workdir);
  }
  await moveTree(saved, workdir);
}
