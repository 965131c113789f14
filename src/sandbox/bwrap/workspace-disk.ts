/**
 * Disk quota for a sandbox's working directory: a sparse ext4 image of `diskMb`, loop-mounted
 * over the workdir on the host while the sandbox lives. A write past the size fails with
 * ENOSPC inside that one filesystem; the host disk and other sandboxes never see it. The image
 * costs only the blocks written (online discard gives deleted blocks back).
 *
 * Why not project quotas: they need a filesystem made and mounted for them (ext4 `project`
 * feature + `prjquota`, or XFS `pquota`), which common hosts' root filesystems are not, and
 * this one cannot be changed while mounted. A loop image works on any filesystem that holds
 * sparse files, as root.
 *
 * The workdir stays the source of truth between sandboxes (the driver port promises the files
 * stay on the host after destroy, and suspend moves the plain directory): attach copies what
 * the workdir holds into the image (nothing for a new session) and detach copies it back out,
 * then deletes the image. Both orders keep a full copy on disk at every step, so a crash in
 * between loses nothing: `reapLeftovers` finishes the copy-out of a dead server's images.
 *
 * Mounting is on the hot path of provisioning, so formatting is not: a template image per size
 * is made once (mkfs) and a spare copy is kept ready, renamed into place on attach.
 *
 * Files in `directory`, all named after the sandbox like its cgroup (`<id>.<pid>.<start>`):
 * `<name>.img` the image, `<name>.workdir` the workdir it belongs to (for the reaper),
 * `<name>.mnt/` a mount point used while copying out; `template.<MiB>.<uid>-<gid>.img` and
 * `spare.<MiB>.<uid>-<gid>.<name>.img` are shared, reusable, and owned by no sandbox.
 */
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import {
  chmodSync,
  closeSync,
  existsSync,
  ftruncateSync,
  mkdirSync,
  openSync,
  readdirSync,
  readFileSync,
  realpathSync,
  renameSync,
  rmdirSync,
  rmSync,
  statSync,
  unlinkSync,
  writeFileSync,
} from 'node:fs';
import { basename, dirname, join, resolve } from 'node:path';
import { promisify } from 'node:util';
import { BerthError } from '../../errors.js';
import { ownerIsAlive, sandboxCgroupName } from './cgroups.js';

const run = promisify(execFile);
const COMMAND_ENVIRONMENT = { PATH: '/usr/sbin:/usr/bin:/sbin:/bin', LC_ALL: 'C' };

/**
 * Mount options (the exec helper uses the same): no setuid or device files from an image the sandbox wrote; `noinit_itable`
 * stops ext4 zeroing inode tables in the background (which would write ~16 MiB per GiB and
 * un-sparse the image); `discard` punches deleted blocks out of the image file.
 */
const MOUNT_OPTIONS = 'loop,nosuid,nodev,noatime,noinit_itable,discard';

/** One sandbox's mounted image; `detach` puts the files back in the plain workdir. */
export interface WorkspaceDisk {
  readonly sizeMb: number;
  /** Copies the files out to the workdir, unmounts and deletes the image. */
  detach(): Promise<void>;
  /**
   * Moves the mounted image to another workdir (an empty directory), which becomes the one its
   * files go back to; the old workdir directory is removed. For sandboxes started ahead of need.
   */
  relocate(workdir: string): Promise<void>;
}

/** Loop-mounted workspace images under one directory. */
export interface WorkspaceDisks {
  /** Checks once that images can be made and mounted here (needs root, loop devices, mkfs.ext4). */
  detect(): Promise<{ ok: true } | { ok: false; reason: string }>;
  /** Mounts a `sizeMb` image over `workdir` with the workdir's files in it. */
  attach(sandboxId: string, workdir: string, sizeMb: number): Promise<WorkspaceDisk>;
  /** Copies out, unmounts and deletes the images of dead servers. Returns how many. */
  reapLeftovers(): Promise<number>;
}

async function command(file: string, args: readonly string[]): Promise<string> {
  try {
    const { stdout } = await run(file, args, { env: COMMAND_ENVIRONMENT, maxBuffer: 1024 * 1024 });
    return stdout;
  } catch (error) {
    const stderr = String((error as { stderr?: string }).stderr ?? '').trim();
    throw new BerthError('sandbox_failed', `${file} ${args.join(' ')} failed: ${stderr || String(error)}`, {
      retryable: true,
      cause: error,
    });
  }
}

/** Decodes the octal escapes (`\040`) of /proc/self/mountinfo paths. */
function decodeMountPath(path: string): string {
  return path.replace(/\\([0-7]{3})/g, (_, octal: string) => String.fromCharCode(Number.parseInt(octal, 8)));
}

/** Mount points whose source is a loop device backed by `image`, innermost last. */
function mountPointsOf(imagePath: string): string[] {
  let image = imagePath;
  try {
    // The kernel reports the backing file by its real path.
    image = realpathSync(imagePath);
  } catch {
    // Deleted already: only a mount can still name it, by the path it had.
  }
  const backing = new Map<string, string>();
  const points: string[] = [];
  for (const line of readFileSync('/proc/self/mountinfo', 'utf8').split('\n')) {
    const separator = line.indexOf(' - ');
    if (separator < 0) continue;
    const mountPoint = decodeMountPath(line.slice(0, separator).split(' ')[4] ?? '');
    const source = line.slice(separator + 3).split(' ')[1] ?? '';
    const device = /^\/dev\/(loop\d+)$/.exec(source)?.[1];
    if (!device) continue;
    if (!backing.has(device)) {
      try {
        backing.set(device, readFileSync(`/sys/block/${device}/loop/backing_file`, 'utf8').trim());
      } catch {
        backing.set(device, '');
      }
    }
    // The kernel appends " (deleted)" once the image file is unlinked.
    const file = backing.get(device)!.replace(/ \(deleted\)$/, '');
    if (file === image) points.push(mountPoint);
  }
  return points;
}

/** The image file behind the loop mount on `mountPoint` (the topmost one), if any. */
function imageMountedOn(mountPoint: string): string | undefined {
  let found: string | undefined;
  for (const line of readFileSync('/proc/self/mountinfo', 'utf8').split('\n')) {
    const separator = line.indexOf(' - ');
    if (separator < 0) continue;
    if (decodeMountPath(line.slice(0, separator).split(' ')[4] ?? '') !== mountPoint) continue;
    const device = /^\/dev\/(loop\d+)$/.exec(line.slice(separator + 3).split(' ')[1] ?? '')?.[1];
    if (!device) continue;
    try {
      found = readFileSync(`/sys/block/${device}/loop/backing_file`, 'utf8')
        .trim()
        .replace(/ \(deleted\)$/, '');
    } catch {
      // Detached while we looked.
    }
  }
  return found;
}

/** True when `path` is a mount point (its device differs from its parent's). */
function isMountPoint(path: string): boolean {
  try {
    return statSync(path).dev !== statSync(dirname(path)).dev;
  } catch {
    return false;
  }
}

/** Options for `openWorkspaceDisks`. */
export interface WorkspaceDisksOptions {
  /** Where images live; must be on a disk filesystem that supports sparse files. */
  directory: string;
  /** Owner of the image's root directory (the sandbox's host user). */
  uid: number;
  gid: number;
  /**
   * The exec helper (`native/berth-exec.c`), which mounts with plain system calls in ~3 ms
   * where mount(8) takes ~10; mount(8) and umount(8) are used when it is absent.
   */
  helperPath?: string;
}

/** Opens (creating on first use) the image directory. */
export function openWorkspaceDisks(options: WorkspaceDisksOptions): WorkspaceDisks {
  const directory = resolve(options.directory);
  const templates = new Map<number, Promise<string>>();
  const refills = new Map<number, Promise<void>>();
  let detection: Promise<{ ok: true } | { ok: false; reason: string }> | undefined;
  const helper =
    options.helperPath !== undefined && existsSync(options.helperPath) ? options.helperPath : undefined;
  const mountImage = (image: string, target: string) =>
    helper
      ? command(helper, ['--mount-image', image, target])
      : command('mount', ['-o', MOUNT_OPTIONS, image, target]);
  const bind = (source: string, target: string) =>
    helper ? command(helper, ['--bind', source, target]) : command('mount', ['--bind', source, target]);
  const move = (source: string, target: string) =>
    helper ? command(helper, ['--move', source, target]) : command('mount', ['--move', source, target]);
  const unmount = (target: string) =>
    helper ? command(helper, ['--unmount', target]) : command('umount', [target]);
  /** Templates and spares are per size and per owner of the image's root directory. */
  const owner = `${options.uid}-${options.gid}`;

  /** The formatted template for a size, made once (mkfs) and reused by every copy. */
  const template = (sizeMb: number): Promise<string> => {
    let made = templates.get(sizeMb);
    if (!made) {
      made = (async () => {
        const path = join(directory, `template.${sizeMb}.${owner}.img`);
        if (existsSync(path)) return path;
        const temporary = join(
          directory,
          `template.${sizeMb}.${sandboxCgroupName(`t${randomBytes(4).toString('hex')}`)}.img.tmp`,
        );
        const fd = openSync(temporary, 'w', 0o600);
        try {
          ftruncateSync(fd, sizeMb * 1024 * 1024);
        } finally {
          closeSync(fd);
        }
        try {
          await command('mkfs.ext4', [
            '-q',
            '-F',
            '-m',
            '0',
            '-E',
            `lazy_itable_init=1,lazy_journal_init=1,root_owner=${options.uid}:${options.gid}`,
            temporary,
          ]);
          // An agent's workspace should look like a plain directory.
          await command('debugfs', ['-w', '-R', 'rmdir lost+found', temporary]);
          renameSync(temporary, path);
        } catch (error) {
          rmSync(temporary, { force: true });
          throw error;
        }
        return path;
      })();
      made.catch(() => templates.delete(sizeMb));
      templates.set(sizeMb, made);
    }
    return made;
  };

  /** A fresh copy of the template at `path` (cp keeps the holes: a few MiB, not `sizeMb`). */
  const copyTemplate = async (sizeMb: number, path: string): Promise<void> => {
    const source = await template(sizeMb);
    const temporary = `${path}.tmp`;
    try {
      await command('cp', ['--sparse=always', source, temporary]);
      renameSync(temporary, path);
    } catch (error) {
      rmSync(temporary, { force: true });
      throw error;
    }
  };

  const spareName = (sizeMb: number) => `spare.${sizeMb}.${owner}.`;

  /** Keeps one spare image of `sizeMb` ready in the background. */
  const refill = (sizeMb: number): void => {
    if (refills.has(sizeMb)) return;
    const done = (async () => {
      if (readdirSync(directory).some((name) => name.startsWith(spareName(sizeMb)) && name.endsWith('.img')))
        return;
      await copyTemplate(
        sizeMb,
        join(directory, `${spareName(sizeMb)}${sandboxCgroupName(`s${randomBytes(4).toString('hex')}`)}.img`),
      );
    })()
      .catch(() => undefined)
      .finally(() => refills.delete(sizeMb));
    refills.set(sizeMb, done);
  };

  /** Moves a spare into place, or copies the template when none is ready. */
  const takeImage = async (sizeMb: number, path: string): Promise<void> => {
    for (const name of readdirSync(directory)) {
      if (!name.startsWith(spareName(sizeMb)) || !name.endsWith('.img')) continue;
      try {
        renameSync(join(directory, name), path);
        return;
      } catch {
        // Another provision (or server) took it first.
      }
    }
    await copyTemplate(sizeMb, path);
  };

  /**
   * Records the workdir an image's files belong to. Written to a temporary file and renamed, so
   * a kill mid-write leaves the old record or the new one, never an empty or partial one.
   */
  const writeSidecar = (name: string, workdir: string): void => {
    const temporary = join(directory, `${name}.workdir.tmp`);
    writeFileSync(temporary, workdir);
    renameSync(temporary, join(directory, `${name}.workdir`));
  };

  /**
   * Where a dead sandbox's files go back to: the recorded workdir, or (the record missing, empty,
   * or naming a directory that is gone) the directory the image is still mounted on, other than
   * the staging point. Undefined when no such directory exists: the session's directory was
   * deleted, so there is nothing to return the files to.
   */
  const workdirOf = (name: string): string | undefined => {
    let recorded = '';
    try {
      recorded = readFileSync(join(directory, `${name}.workdir`), 'utf8').trim();
    } catch {
      // No record: the image never held the newest files, or the record was being replaced.
    }
    const image = join(directory, `${name}.img`);
    const staging = join(directory, `${name}.mnt`);
    const mountedOn = existsSync(image) ? mountPointsOf(image).filter((point) => point !== staging) : [];
    // A record older than a move (killed between moving the mount and recording it) names a
    // directory the image has left: the mount is the newer truth.
    if (recorded.startsWith('/') && existsSync(recorded)) {
      if (mountedOn.length === 0 || mountedOn.includes(recorded)) return recorded;
    }
    return mountedOn.at(-1);
  };

  /**
   * Unmounts and deletes an image whose files are not the workspace's newest (a copy-in that
   * failed or was cut short: the workdir still holds the originals).
   */
  const discard = async (name: string): Promise<void> => {
    const image = join(directory, `${name}.img`);
    if (existsSync(image)) {
      for (const point of mountPointsOf(image).reverse()) await unmount(point);
      rmSync(image, { force: true });
    }
    try {
      rmdirSync(join(directory, `${name}.mnt`));
    } catch {
      // Never made.
    }
    rmSync(join(directory, `${name}.workdir`), { force: true });
    rmSync(join(directory, `${name}.workdir.tmp`), { force: true });
  };

  /**
   * Puts the files of the image (mounted anywhere, or not mounted at all) back into
   * `workdir`, then unmounts everything and deletes the image and its side files.
   */
  const copyOutAndRemove = async (name: string, workdir: string): Promise<void> => {
    const image = join(directory, `${name}.img`);
    const staging = join(directory, `${name}.mnt`);
    mkdirSync(staging, { recursive: true, mode: 0o700 });
    const points = existsSync(image) ? mountPointsOf(image) : [];
    if (existsSync(image) && !points.includes(staging)) {
      // Reach the image's files from the staging point, whatever else it is mounted on.
      if (points.length > 0) await bind(points[points.length - 1]!, staging);
      else await mountImage(image, staging);
    }
    // Uncover the plain workdir (the image may be stacked on it more than once after crashes).
    for (
      let round = 0;
      round < 16 && isMountPoint(workdir) && mountPointsOf(image).includes(workdir);
      round++
    ) {
      await unmount(workdir);
    }
    if (existsSync(image)) {
      if (readdirSync(staging).length > 0) {
        // cp -a keeps owners, modes, times, links; existing files (a crash mid-copy) are overwritten.
        await command('cp', ['-a', '--no-target-directory', `${staging}/.`, workdir]);
      }
      const workdirMode = statSync(staging).mode & 0o7777;
      chmodSync(workdir, workdirMode);
      for (const point of mountPointsOf(image).reverse()) await unmount(point);
      unlinkSync(image);
    }
    rmdirSync(staging);
    rmSync(join(directory, `${name}.workdir`), { force: true });
    rmSync(join(directory, `${name}.workdir.tmp`), { force: true });
  };

  /**
   * Returns a dead server's image to its workdir (or discards it when no workdir is left).
   * Only the recorded workdir, or failing that a mount, says whether the image is authoritative:
   * an image with neither holds no files anyone can claim.
   */
  const reapImage = async (name: string): Promise<void> => {
    const hasRecord = existsSync(join(directory, `${name}.workdir`));
    const workdir = workdirOf(name);
    if (workdir !== undefined && (hasRecord || isMountPoint(workdir))) await copyOutAndRemove(name, workdir);
    else await discard(name);
  };

  return {
    detect() {
      detection ??= (async () => {
        if (process.getuid?.() !== 0) return { ok: false, reason: 'mounting images needs root' };
        if (!existsSync('/dev/loop-control'))
          return { ok: false, reason: 'this host has no loop devices (/dev/loop-control)' };
        try {
          mkdirSync(directory, { recursive: true, mode: 0o700 });
          // A small probe: format, mount, write, unmount.
          // Named like a sandbox's files, so the reaper removes it if this process dies here.
          const probe = join(directory, `probe.${sandboxCgroupName(`p${randomBytes(4).toString('hex')}`)}`);
          const image = `${probe}.img`;
          mkdirSync(probe);
          try {
            const fd = openSync(image, 'w', 0o600);
            ftruncateSync(fd, 16 * 1024 * 1024);
            closeSync(fd);
            await command('mkfs.ext4', ['-q', '-F', image]);
            await mountImage(image, probe);
            try {
              writeFileSync(join(probe, 'probe'), 'ok');
            } finally {
              await unmount(probe);
            }
          } finally {
            rmSync(image, { force: true });
            rmdirSync(probe);
          }
        } catch (error) {
          return { ok: false, reason: error instanceof Error ? error.message : String(error) };
        }
        return { ok: true };
      })();
      return detection;
    },

    async attach(sandboxId, workdir, sizeMb) {
      if (!(Number.isInteger(sizeMb) && sizeMb >= 16)) {
        throw new BerthError(
          'invalid_request',
          `sandbox limit diskMb must be a whole number of at least 16, got ${sizeMb}`,
        );
      }
      const absoluteWorkdir = resolve(workdir);
      // A dead server's image still on the workdir (its reaper could not finish): return its
      // files first, which is what the reaper would have done.
      const stale = isMountPoint(absoluteWorkdir) ? imageMountedOn(absoluteWorkdir) : undefined;
      if (stale !== undefined && dirname(stale) === directory && !ownerIsAlive(basename(stale, '.img'))) {
        await reapImage(basename(stale, '.img'));
      }
      if (isMountPoint(absoluteWorkdir)) {
        throw new BerthError(
          'sandbox_failed',
          `${absoluteWorkdir} is still mounted from an earlier sandbox; reap orphans before provisioning`,
          { retryable: true },
        );
      }
      const name = sandboxCgroupName(sandboxId);
      const image = join(directory, `${name}.img`);
      /**
       * Written once the image holds the workspace's newest files: from then on the reaper
       * copies them back to `absoluteWorkdir`; before, it discards the image.
       */
      const markAuthoritative = () => writeSidecar(name, absoluteWorkdir);
      const mode = statSync(absoluteWorkdir).mode & 0o7777;
      let current = absoluteWorkdir;
      const disk: WorkspaceDisk = {
        sizeMb,
        detach: () => copyOutAndRemove(name, current),
        relocate: async (workdir) => {
          const target = resolve(workdir);
          await move(current, target);
          writeSidecar(name, target);
          const previous = current;
          current = target;
          try {
            rmdirSync(previous);
          } catch {
            // Not empty or gone: left for whoever owns that directory.
          }
        },
      };
      let originalsRemoved = false;
      try {
        await takeImage(sizeMb, image);
        const entries = readdirSync(absoluteWorkdir);
        if (entries.length === 0) {
          markAuthoritative();
          originalsRemoved = true;
          await mountImage(image, absoluteWorkdir);
        } else {
          // Copy in through a staging mount point, then delete the originals: a crash leaves
          // either the originals or a full image that the reaper copies back.
          const staging = join(directory, `${name}.mnt`);
          mkdirSync(staging, { recursive: true, mode: 0o700 });
          await mountImage(image, staging);
          try {
            await command('cp', ['-a', '--no-target-directory', `${absoluteWorkdir}/.`, staging]);
          } catch (error) {
            const full = /No space left/.test((error as Error).message);
            throw full
              ? new BerthError(
                  'sandbox_unavailable',
                  `the working directory holds more than the sandbox disk limit of ${sizeMb} MiB`,
                  { cause: error },
                )
              : error;
          }
          markAuthoritative();
          originalsRemoved = true;
          for (const entry of entries) rmSync(join(absoluteWorkdir, entry), { recursive: true, force: true });
          await bind(staging, absoluteWorkdir);
          await unmount(staging);
          rmdirSync(staging);
        }
        chmodSync(absoluteWorkdir, mode);
        // After the mount: spawning the copy blocks the event loop for a few ms.
        refill(sizeMb);
      } catch (error) {
        await (originalsRemoved ? copyOutAndRemove(name, absoluteWorkdir) : discard(name)).catch(
          () => undefined,
        );
        throw error;
      }
      return disk;
    },

    async reapLeftovers() {
      let reaped = 0;
      let names: string[];
      try {
        names = readdirSync(directory);
      } catch {
        return 0;
      }
      for (const file of names) {
        // Interrupted copies of a dead server (`<...>.<pid>.<start>.img.tmp`).
        if (file.endsWith('.img.tmp') && !ownerIsAlive(file.slice(0, -'.img.tmp'.length))) {
          rmSync(join(directory, file), { force: true });
          continue;
        }
        // A dead server's availability probe: nothing in it to keep.
        if (
          file.startsWith('probe.') &&
          file.endsWith('.img') &&
          !ownerIsAlive(file.slice(0, -'.img'.length))
        ) {
          const image = join(directory, file);
          try {
            for (const point of mountPointsOf(image).reverse()) await unmount(point);
            rmSync(image, { force: true });
            rmSync(image.slice(0, -'.img'.length), { recursive: true, force: true });
          } catch {
            // Left for the next start.
          }
          continue;
        }
        // A sandbox's image (spares and templates belong to no one and stay for reuse).
        if (!file.endsWith('.img') || /^(spare|template|probe)\./.test(file)) continue;
        const name = file.slice(0, -'.img'.length);
        if (ownerIsAlive(name)) continue;
        try {
          await reapImage(name);
          reaped++;
        } catch {
          // Left for the next start; one stuck image must not stop the server from starting.
        }
      }
      return reaped;
    },
  };
}
