import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { skipUnlessPresent } from '../../../test/support/required-in-ci.js';
import { isBerthError } from '../../errors.js';
import { DEFAULT_SANDBOX_LIMITS, type SandboxHandle } from '../driver.js';
import { hostProcessesMatching } from '../driver-contract.test-suite.js';
import { type BwrapDriver, createBwrapDriver } from './bwrap-driver.js';
import { detectHostCgroupLayout, sandboxCgroupName } from './cgroups.js';

const runningAsRoot = process.getuid?.() === 0;
const availability = await createBwrapDriver().checkAvailability();
const hostLayout = detectHostCgroupLayout();
const driverMissing = skipUnlessPresent(
  'the bwrap sandbox driver',
  availability.ok ? undefined : availability.reason,
);
const limitsLive = !driverMissing && runningAsRoot && hostLayout.ok;
const skipNote = limitsLive
  ? ''
  : ` (skipped: ${!availability.ok ? availability.reason : !runningAsRoot ? 'limits need root' : !hostLayout.ok ? hostLayout.reason : ''})`;

/** The host directories of a group (one per v1 hierarchy, or the one v2 directory). */
function groupDirectories(groupName: string): string[] {
  if (!hostLayout.ok) return [];
  const layout = hostLayout.layout;
  if (layout.version === 2) return [join(layout.root, 'berth', groupName)];
  return [...new Set(Object.values(layout.roots))].map((root) => join(root, 'berth', groupName));
}

/** A control file of a group (`pids.current`, ...), in whichever hierarchy holds it. */
function groupFile(groupName: string, controller: 'pids' | 'memory', file: string): string {
  if (!hostLayout.ok) throw new Error('no cgroups');
  const layout = hostLayout.layout;
  return layout.version === 2
    ? join(layout.root, 'berth', groupName, file)
    : join(layout.roots[controller], 'berth', groupName, file);
}

/** Names of every group under `berth` on this host. */
function berthGroups(): string[] {
  return [
    ...new Set(groupDirectories('').flatMap((parent) => (existsSync(parent) ? readdirSync(parent) : []))),
  ].filter((name) => name.startsWith('sbx_'));
}

/** True when every hierarchy that limits a sandbox places `pid` in the group. */
function inGroup(pid: number, groupName: string): boolean {
  const lines = readFileSync(`/proc/${pid}/cgroup`, 'utf8').trim().split('\n');
  const paths = new Map<string, string>();
  for (const line of lines) {
    const [, controllers, path] = /^\d+:([^:]*):(.*)$/.exec(line) ?? [];
    for (const controller of (controllers ?? '').split(',')) paths.set(controller, path ?? '');
  }
  const wanted =
    hostLayout.ok && hostLayout.layout.version === 2 ? [''] : ['cpu', 'cpuacct', 'memory', 'pids'];
  return wanted.every((controller) => paths.get(controller) === `/berth/${groupName}`);
}

/** True while a process is still the join wrapper shell (before it execs the command). */
function isJoinWrapper(pid: number): boolean {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, 'utf8').startsWith('/bin/sh\0-c\0count=');
  } catch {
    return false;
  }
}

/** Measures how late a 10 ms timer fires: the server's event loop staying responsive. */
function watchEventLoop() {
  let last = performance.now();
  let worstLagMs = 0;
  const timer = setInterval(() => {
    const now = performance.now();
    worstLagMs = Math.max(worstLagMs, now - last - 10);
    last = now;
  }, 10);
  return {
    stop: () => {
      clearInterval(timer);
      return worstLagMs;
    },
  };
}

const burn = (seconds: number) => ['timeout', String(seconds), 'sh', '-c', 'while :; do :; done'];

describe.skipIf(!limitsLive)(`bwrap resource limits${skipNote}`, () => {
  let driver: BwrapDriver;
  let scratch: string;
  let counter = 0;
  const provision = (limits?: { cpu?: number; memoryMb?: number; pids?: number }) =>
    driver.provision({ sessionId: 'sesn_limits', workdir: join(scratch, `w${counter++}`), limits });

  beforeAll(() => {
    driver = createBwrapDriver();
    scratch = mkdtempSync(join(tmpdir(), 'berth-limits-'));
  });

  afterAll(async () => {
    await driver?.destroyAll();
    rmSync(scratch, { recursive: true, force: true });
  });

  it('runs the init and every command, spawned ones included, inside the sandbox cgroup', async () => {
    const handle = await provision();
    expect(handle.enforcedLimits).toEqual(DEFAULT_SANDBOX_LIMITS);
    const groupName = sandboxCgroupName(handle.id);
    const background = `sleep 1000.${process.pid}1`;
    await driver.exec(handle, ['sh', '-c', `${background} >/dev/null 2>&1 &`]);
    const spawned = driver.spawn(handle, ['sleep', `1000.${process.pid}2`]);
    // The background sleep and the spawned sleep (the sandbox's agent started both).
    await expect
      .poll(() => hostProcessesMatching(`1000.${process.pid}`).filter((pid) => !isJoinWrapper(pid)).length)
      .toBe(2);
    for (const pid of [driver.initPid(handle)!, ...hostProcessesMatching(`1000.${process.pid}`)]) {
      expect(inGroup(pid, groupName), `pid ${pid}`).toBe(true);
    }
    spawned.kill();
    await driver.destroy(handle);
  });

  it('cannot leave its cgroup: sees only its own root and cannot mount a hierarchy', async () => {
    const handle = await provision();
    const result = await driver.exec(handle, [
      'sh',
      '-c',
      'cat /proc/self/cgroup; ls /sys/fs/cgroup 2>/dev/null || echo no-sys; ' +
        'mkdir -p /tmp/cg; mount -t cgroup2 none /tmp/cg 2>/dev/null || echo mount-refused; ' +
        'mount -t cgroup -o pids none /tmp/cg 2>/dev/null || echo v1-mount-refused',
    ]);
    const cgroupLines = result.stdout.split('\n').filter((line) => /^\d+:/.test(line));
    expect(cgroupLines.length).toBeGreaterThan(0);
    // A cgroup namespace rooted at the sandbox's group: nothing above it is visible.
    for (const line of cgroupLines) expect(line).toMatch(/:\/$/);
    expect(result.stdout).toContain('no-sys');
    expect(result.stdout).toContain('mount-refused');
    expect(result.stdout).toContain('v1-mount-refused');
    await driver.destroy(handle);
  });

  it('meters a 2-second CPU burn under a 1-core limit as 2 ± 0.3 CPU-seconds', async () => {
    const handle = await provision({ cpu: 1 });
    await driver.exec(handle, burn(2));
    const stats = await driver.stats(handle);
    expect(stats.cpuSeconds).toBeGreaterThan(1.7);
    expect(stats.cpuSeconds).toBeLessThan(2.3);
    expect(stats.memoryBytes).toBeGreaterThan(0);
    expect(stats.memoryPeakBytes).toBeGreaterThanOrEqual(stats.memoryBytes);
    await driver.destroy(handle);
  });

  it('holds a 2-second burn to about 1 CPU-second under a 0.5-core limit', async () => {
    const handle = await provision({ cpu: 0.5 });
    // Two busy loops: even a program with threads cannot use more than its share.
    const loop = "timeout 2 sh -c 'while :; do :; done'";
    await driver.exec(handle, ['sh', '-c', `${loop} & ${loop}; wait`]);
    const stats = await driver.stats(handle);
    expect(stats.cpuSeconds).toBeGreaterThan(0.8);
    expect(stats.cpuSeconds).toBeLessThan(1.2);
    await driver.destroy(handle);
  });

  it('contains a fork bomb: the server stays responsive and other sandboxes keep working', async () => {
    const bombed = await provision();
    const bystander = await provision();
    const groupName = sandboxCgroupName(bombed.id);
    const pidsCurrent = () => Number(readFileSync(groupFile(groupName, 'pids', 'pids.current'), 'utf8'));
    const eventLoop = watchEventLoop();
    await driver.exec(bombed, ['bash', '-c', 'bomb() { bomb | bomb & }; bomb'], { timeoutMs: 5000 });
    await expect
      .poll(pidsCurrent, { timeout: 10_000, interval: 50 })
      .toBeGreaterThanOrEqual(DEFAULT_SANDBOX_LIMITS.pids - 10);
    const bystanderDurations: number[] = [];
    const bombStarted = performance.now();
    while (performance.now() - bombStarted < 2000) {
      const result = await driver.exec(bystander, ['echo', 'ok']);
      expect(result.stdout).toBe('ok\n');
      bystanderDurations.push(result.durationMs);
      expect(pidsCurrent()).toBeLessThanOrEqual(DEFAULT_SANDBOX_LIMITS.pids);
      await new Promise((resolve) => setTimeout(resolve, 200));
    }
    const worstLagMs = eventLoop.stop();
    expect(worstLagMs).toBeLessThan(250);
    expect(Math.max(...bystanderDurations)).toBeLessThan(1000);
    const destroyStarted = performance.now();
    await driver.destroy(bombed);
    const destroyMs = performance.now() - destroyStarted;
    expect(hostProcessesMatching('bomb() { bomb')).toEqual([]);
    for (const directory of groupDirectories(groupName)) expect(existsSync(directory)).toBe(false);
    expect(destroyMs).toBeLessThan(5000);
    await driver.destroy(bystander);
  }, 30_000);

  it('OOM-kills a memory bomb inside its own sandbox, which keeps working', async () => {
    const limitMb = 128;
    const handle = await provision({ memoryMb: limitMb });
    const eventLoop = watchEventLoop();
    const bomb = await driver.exec(handle, [
      'python3',
      '-c',
      'b = bytearray(1024 * 1024 * 1024); print("survived")',
    ]);
    const worstLagMs = eventLoop.stop();
    expect(bomb.stdout).not.toContain('survived');
    expect(bomb.signal === 'SIGKILL' || bomb.exitCode === 137).toBe(true);
    const after = await driver.exec(handle, ['echo', 'alive']);
    expect(after.stdout).toBe('alive\n');
    const stats = await driver.stats(handle);
    expect(stats.memoryPeakBytes).toBeLessThanOrEqual(limitMb * 1024 * 1024);
    expect(stats.memoryPeakBytes).toBeGreaterThan(limitMb * 0.75 * 1024 * 1024);
    expect(worstLagMs).toBeLessThan(250);
    await driver.destroy(handle);
  });

  it('destroy leaves no process and no cgroup directory, detached processes included', async () => {
    const handle = await provision();
    const groupName = sandboxCgroupName(handle.id);
    const marker = `sleep 1003.${process.pid}`;
    await driver.exec(handle, ['sh', '-c', `setsid sh -c '${marker}' </dev/null >/dev/null 2>&1 &`]);
    await driver.exec(handle, ['sh', '-c', `nohup ${marker} </dev/null >/dev/null 2>&1 &`]);
    await expect.poll(() => hostProcessesMatching(marker).length).toBeGreaterThanOrEqual(2);
    for (const directory of groupDirectories(groupName)) expect(existsSync(directory)).toBe(true);
    await driver.destroy(handle);
    expect(hostProcessesMatching(marker)).toEqual([]);
    for (const directory of groupDirectories(groupName)) expect(existsSync(directory)).toBe(false);
  });

  it('removes the cgroup of a sandbox whose server was SIGKILLed when the next server starts', async () => {
    const workdir = join(scratch, 'killed-server');
    // The child provisions a sandbox (≈0.5 s including start-up) and SIGKILLs itself at 1.5 s.
    const child = spawn(
      process.execPath,
      ['--import', 'tsx', 'test/support/provision-then-die.ts', workdir, '1500'],
      { stdio: 'ignore' },
    );
    await new Promise((resolve) => child.once('exit', resolve));
    const leftovers = berthGroups().filter((name) => name.includes(`.${child.pid}.`));
    expect(leftovers).toHaveLength(1);
    const reaped = await createBwrapDriver().reapOrphans();
    expect(reaped).toBeGreaterThanOrEqual(1);
    for (const directory of groupDirectories(leftovers[0]!)) expect(existsSync(directory)).toBe(false);
  }, 20_000);

  it('limits and meters each command in the one-bwrap-per-command mode too', async () => {
    const perExec = createBwrapDriver({ mode: 'per-exec' });
    const handle = await perExec.provision({
      sessionId: 'sesn_per_exec_limits',
      workdir: join(scratch, 'per-exec'),
      limits: { pids: 24 },
    });
    try {
      const forks = await perExec.exec(handle, ['sh', '-c', 'for i in $(seq 40); do sleep 0.5 & done; wait']);
      expect(forks.stderr).toMatch(/fork/i);
      await perExec.exec(handle, burn(0.5));
      expect((await perExec.stats(handle)).cpuSeconds).toBeGreaterThan(0.4);
    } finally {
      await perExec.destroy(handle);
    }
    for (const directory of groupDirectories(sandboxCgroupName(handle.id))) {
      expect(existsSync(directory)).toBe(false);
    }
  });
});

describe.skipIf(driverMissing)('bwrap on a host without usable cgroups', () => {
  it('warns at start-up, refuses explicit limits, runs without them and does not meter', async () => {
    const driver = createBwrapDriver({ cgroups: { ok: false, reason: 'no cgroup hierarchy in this test' } });
    const scratch = mkdtempSync(join(tmpdir(), 'berth-no-cgroups-'));
    try {
      const checked = await driver.checkAvailability();
      expect(checked.ok).toBe(true);
      expect(checked.ok && checked.warnings?.join(' ')).toMatch(/limits .* are not enforced/);
      const refused = await driver
        .provision({ sessionId: 'sesn_refused', workdir: join(scratch, 'a'), limits: { memoryMb: 256 } })
        .catch((error: unknown) => error);
      expect(isBerthError(refused, 'sandbox_unavailable')).toBe(true);
      expect((refused as Error).message).toMatch(/cannot enforce/);
      const handle: SandboxHandle = await driver.provision({
        sessionId: 'sesn_unlimited',
        workdir: join(scratch, 'b'),
      });
      expect(handle.enforcedLimits).toBeUndefined();
      expect((await driver.exec(handle, ['echo', 'ok'])).stdout).toBe('ok\n');
      const stats = await driver.stats(handle).catch((error: unknown) => error);
      expect(isBerthError(stats, 'sandbox_unavailable')).toBe(true);
    } finally {
      await driver.destroyAll();
      rmSync(scratch, { recursive: true, force: true });
    }
  });
});
