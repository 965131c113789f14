import { spawn } from 'node:child_process';
import {
  existsSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  statSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { skipUnlessPresent } from '../../../test/support/required-in-ci.js';
import { isBerthError } from '../../errors.js';
import { type BwrapDriver, createBwrapDriver } from './bwrap-driver.js';

const DISKS = '/var/lib/berth/disks';
const runningAsRoot = process.getuid?.() === 0;
const availability = await createBwrapDriver().checkAvailability();
const diskWarning = availability.ok
  ? availability.warnings?.find((warning) => /disk limits/.test(warning))
  : undefined;
const driverMissing = skipUnlessPresent(
  'the bwrap sandbox driver',
  availability.ok ? undefined : availability.reason,
);
const diskLive = !driverMissing && runningAsRoot && diskWarning === undefined;
const skipNote = diskLive
  ? ''
  : ` (skipped: ${!availability.ok ? availability.reason : (diskWarning ?? 'needs root')})`;

/** True when something is mounted on `path`. */
function isMounted(path: string): boolean {
  return statSync(path).dev !== statSync(dirname(path)).dev;
}

/**
 * Loop-mounted images (by backing file) of this process's sandboxes still attached on the host
 * (images are named `<sandbox>.<server pid>.<start>`; other test files' servers run beside us).
 */
function attachedImages(): string[] {
  return readdirSync('/sys/block')
    .filter((name) => name.startsWith('loop'))
    .map((name) => {
      try {
        return readFileSync(`/sys/block/${name}/loop/backing_file`, 'utf8').trim();
      } catch {
        return '';
      }
    })
    .filter((file) => file.startsWith(DISKS) && file.includes(`.${process.pid}.`));
}

describe.skipIf(!diskLive)(`bwrap workspace disk quota${skipNote}`, () => {
  let driver: BwrapDriver;
  let scratch: string;

  beforeAll(() => {
    driver = createBwrapDriver();
    scratch = mkdtempSync(join(tmpdir(), 'berth-disk-'));
  });

  afterAll(async () => {
    await driver?.destroyAll();
    rmSync(scratch, { recursive: true, force: true });
  });

  it('shows the files on the host while the sandbox lives and keeps them there after destroy', async () => {
    const workdir = join(scratch, 'kept');
    const handle = await driver.provision({ sessionId: 'sesn_disk', workdir, limits: { diskMb: 64 } });
    expect(handle.enforcedLimits?.diskMb).toBe(64);
    await driver.exec(handle, [
      'sh',
      '-c',
      'mkdir -p a/b && echo live > a/b/note.txt && ln -s a/b/note.txt link',
    ]);
    expect(isMounted(workdir)).toBe(true);
    expect(readFileSync(join(workdir, 'a/b/note.txt'), 'utf8')).toBe('live\n');
    const inside = await driver.exec(handle, ['sh', '-c', 'df -m . | tail -1; ls -A']);
    // The sandbox sees a 64 MiB filesystem holding only its own files (no lost+found).
    expect(Number(inside.stdout.split('\n')[0]!.split(/\s+/)[1])).toBeLessThanOrEqual(64);
    expect(inside.stdout).not.toContain('lost+found');
    await driver.destroy(handle);
    expect(isMounted(workdir)).toBe(false);
    expect(readFileSync(join(workdir, 'a/b/note.txt'), 'utf8')).toBe('live\n');
    expect(statSync(join(workdir, 'a/b/note.txt')).uid).toBe(1000);
    expect(attachedImages()).toEqual([]);
  });

  it('brings existing files into the quota and refuses a workspace larger than the limit, losing nothing', async () => {
    const workdir = join(scratch, 'existing');
    mkdirSync(workdir);
    writeFileSync(join(workdir, 'old.txt'), 'from before\n');
    const handle = await driver.provision({ sessionId: 'sesn_disk', workdir, limits: { diskMb: 32 } });
    expect((await driver.exec(handle, ['cat', 'old.txt'])).stdout).toBe('from before\n');
    const fill = await driver.exec(handle, ['sh', '-c', 'head -c 20000000 /dev/urandom > big.bin; echo $?']);
    expect(fill.stdout).toBe('0\n');
    await driver.destroy(handle);
    expect(statSync(join(workdir, 'big.bin')).size).toBe(20_000_000);
    // 20 MB no longer fits in 16 MiB.
    const refused = await driver
      .provision({ sessionId: 'sesn_disk', workdir, limits: { diskMb: 16 } })
      .catch((error: unknown) => error);
    expect(isBerthError(refused, 'sandbox_unavailable')).toBe(true);
    expect((refused as Error).message).toMatch(/more than the sandbox disk limit/);
    expect(readdirSync(workdir).sort()).toEqual(['big.bin', 'old.txt']);
    expect(statSync(join(workdir, 'big.bin')).size).toBe(20_000_000);
    expect(isMounted(workdir)).toBe(false);
    expect(attachedImages()).toEqual([]);
  });

  it('puts the files of a SIGKILLed server back into its workdir when the next server reaps', async () => {
    const workdir = join(scratch, 'killed');
    mkdirSync(workdir);
    writeFileSync(join(workdir, 'before-crash.txt'), 'safe\n');
    const child = spawn(
      process.execPath,
      ['--import', 'tsx', 'test/support/provision-then-die.ts', workdir, '2000'],
      { stdio: 'ignore' },
    );
    await new Promise((resolve) => child.once('exit', resolve));
    const leftovers = readdirSync(DISKS).filter(
      (name) => name.startsWith('sbx_') && name.includes(`.${child.pid}.`) && name.endsWith('.img'),
    );
    expect(leftovers).toHaveLength(1);
    expect(isMounted(workdir)).toBe(true);
    expect(await createBwrapDriver().reapOrphans()).toBeGreaterThanOrEqual(1);
    expect(isMounted(workdir)).toBe(false);
    expect(readFileSync(join(workdir, 'before-crash.txt'), 'utf8')).toBe('safe\n');
    const remaining = readdirSync(DISKS).filter(
      (name) => name.startsWith('sbx_') && name.includes(`.${child.pid}.`),
    );
    expect(remaining).toEqual([]);
    expect(attachedImages()).toEqual([]);
  }, 20_000);

  /** Starts a server that provisions over `workdir` and is SIGKILLed; returns its image's name. */
  const provisionThenDie = async (workdir: string): Promise<string> => {
    const child = spawn(
      process.execPath,
      ['--import', 'tsx', 'test/support/provision-then-die.ts', workdir, '2000'],
      { stdio: 'ignore' },
    );
    await new Promise((resolve) => child.once('exit', resolve));
    const images = readdirSync(DISKS).filter(
      (name) => name.startsWith('sbx_') && name.includes(`.${child.pid}.`) && name.endsWith('.img'),
    );
    expect(images).toHaveLength(1);
    expect(isMounted(workdir)).toBe(true);
    return images[0]!.slice(0, -'.img'.length);
  };

  it('returns the files of a dead server whose workdir record is empty or names a directory the image left', async () => {
    for (const record of ['', '/nonexistent/pool/sbx_gone']) {
      const workdir = join(scratch, `record-${record.length}`);
      mkdirSync(workdir);
      writeFileSync(join(workdir, 'before-crash.txt'), 'safe\n');
      const name = await provisionThenDie(workdir);
      // What a kill between truncating the record and writing it, or between moving the mount
      // and recording the move, leaves behind.
      writeFileSync(join(DISKS, `${name}.workdir`), record);
      expect(await createBwrapDriver().reapOrphans()).toBeGreaterThanOrEqual(1);
      expect(isMounted(workdir)).toBe(false);
      expect(readFileSync(join(workdir, 'before-crash.txt'), 'utf8')).toBe('safe\n');
      expect(readdirSync(DISKS).filter((file) => file.startsWith(`${name}.`))).toEqual([]);
    }
  }, 30_000);

  it('provisions over a workdir a dead server left mounted without waiting for a reap', async () => {
    const workdir = join(scratch, 'unreaped');
    mkdirSync(workdir);
    writeFileSync(join(workdir, 'before-crash.txt'), 'safe\n');
    const name = await provisionThenDie(workdir);
    writeFileSync(join(DISKS, `${name}.workdir`), '');
    const handle = await driver.provision({ sessionId: 'sesn_disk', workdir, limits: { diskMb: 32 } });
    expect((await driver.exec(handle, ['cat', 'before-crash.txt'])).stdout).toBe('safe\n');
    await driver.destroy(handle);
    expect(isMounted(workdir)).toBe(false);
    expect(readFileSync(join(workdir, 'before-crash.txt'), 'utf8')).toBe('safe\n');
    expect(readdirSync(DISKS).filter((file) => file.startsWith(`${name}.`))).toEqual([]);
    // The dead server's sandbox process itself is the reaper's to kill.
    await createBwrapDriver().reapOrphans();
  }, 30_000);

  it('refuses an explicit disk limit on a host where images cannot be mounted', async () => {
    // A directory that cannot exist: its parent is a file.
    writeFileSync(join(scratch, 'not-a-directory'), '');
    const unable = createBwrapDriver({ diskImageDirectory: join(scratch, 'not-a-directory', 'disks') });
    const checked = await unable.checkAvailability();
    expect(checked.ok && checked.warnings?.join(' ')).toMatch(/disk limits are not enforced/);
    const refused = await unable
      .provision({ sessionId: 'sesn_disk', workdir: join(scratch, 'refused'), limits: { diskMb: 100 } })
      .catch((error: unknown) => error);
    expect(isBerthError(refused, 'sandbox_unavailable')).toBe(true);
    const unlimited = await unable.provision({ sessionId: 'sesn_disk', workdir: join(scratch, 'unlimited') });
    expect(unlimited.enforcedLimits?.diskMb).toBeUndefined();
    await unable.destroyAll();
    expect(existsSync(join(scratch, 'unlimited'))).toBe(true);
  });
});
