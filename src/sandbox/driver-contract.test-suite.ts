/**
 * The contract every sandbox driver passes. A driver's test file calls
 * `describeSandboxDriverContract(...)` with a factory; the suite skips itself (naming the reason)
 * when the driver is unavailable on this host.
 */
import { chmodSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it, type TestContext } from 'vitest';
import { skipUnlessPresent } from '../../test/support/required-in-ci.js';
import { isBerthError } from '../errors.js';
import type {
  ReadOnlyMount,
  SandboxDriver,
  SandboxHandle,
  SandboxProcess,
  SandboxSpawnOptions,
} from './driver.js';

/** How a driver's test file plugs into the contract suite. */
export interface SandboxDriverContractOptions {
  /** Creates a fresh driver; called once per suite. */
  createDriver: () => SandboxDriver;
  /** Called after the suite, e.g. to shut the driver down. */
  cleanup?: (driver: SandboxDriver) => Promise<void>;
  /** How this driver's sandbox shows on the host (default: its processes do, as bwrap's). */
  hostView?: SandboxHostView;
}

/**
 * What of a sandbox the host can see, set up while it lives (`track`): the returned function
 * lists host command lines of what still runs of it that contain `marker` or that are the sandbox
 * itself. The host's /proc shows bwrap's processes, but none of those gVisor's Sentry or a VM's
 * kernel runs: for those drivers a process inside outlives destroy only with the sandbox's own
 * host processes (runsc's sandbox and gofer, QEMU), which is what their views list.
 */
export interface SandboxHostView {
  track(driver: SandboxDriver, handle: SandboxHandle): (marker: string) => string[];
}

/** The default view: the sandbox's processes are host processes (bwrap). */
export const hostProcessView: SandboxHostView = {
  track: () => (marker) => hostCommandLinesMatching(marker),
};

/** gVisor's view: runsc's sandbox (the Sentry) and gofer processes name the container. */
export const gvisorHostView: SandboxHostView = {
  track: (driver, handle) => {
    const container = (
      driver as unknown as { containerId(handle: SandboxHandle): string | undefined }
    ).containerId(handle);
    if (container === undefined) throw new Error(`no container for ${handle.id}`);
    return (marker) => [...hostCommandLinesMatching(marker), ...hostCommandLinesMatching(container)];
  },
};

/** The microvm's view: the VM's QEMU process, named after the sandbox. */
export const microvmHostView: SandboxHostView = {
  track: (driver, handle) => {
    const qemu = (driver as unknown as { qemuPid(handle: SandboxHandle): number | undefined }).qemuPid(
      handle,
    );
    if (qemu === undefined) throw new Error(`no QEMU for ${handle.id}`);
    return (marker) => [
      ...hostCommandLinesMatching(marker),
      ...hostCommandLinesMatching(handle.id).filter((line) => line.includes('qemu')),
    ];
  },
};

/** Host command lines (arguments joined by spaces) that contain `needle`, this process's aside. */
export function hostCommandLinesMatching(needle: string): string[] {
  return hostProcessesMatching(needle).flatMap((pid) => {
    try {
      return [readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').join(' ').trim()];
    } catch {
      return [];
    }
  });
}

/**
 * Command lines of the processes running in a live sandbox, read from its own /proc by a command
 * run through the driver (for microvm the agent inside answers; for gVisor the Sentry's /proc);
 * undefined when the sandbox cannot run one (destroyed). In bwrap's per-exec mode each command
 * has a /proc of its own, which is why callers ask the host too.
 */
export async function processesInside(
  driver: SandboxDriver,
  handle: SandboxHandle,
): Promise<string[] | undefined> {
  const own = 'for p in /proc/[0-9]*';
  const listing = await driver
    .exec(handle, ['sh', '-c', `${own}; do tr "\\0" " " < "$p/cmdline"; echo; done 2>/dev/null`])
    .catch(() => undefined);
  if (listing === undefined) return undefined;
  return listing.stdout
    .split('\n')
    .map((line) => line.trim())
    .filter((line) => line !== '' && !line.includes(own));
}

/**
 * What still runs of `handle`'s sandbox that names `marker`: while it lives, its processes inside
 * and host processes naming the marker; once it is gone, what `hostSide` (its driver's host view,
 * tracked while it lived) still finds of it.
 */
export async function stillRunning(
  driver: SandboxDriver,
  handle: SandboxHandle,
  marker: string,
  hostSide: (marker: string) => string[],
): Promise<string[]> {
  const inside = await processesInside(driver, handle);
  if (inside === undefined) return hostSide(marker).map((line) => `host: ${line}`);
  return [
    ...inside.filter((line) => line.includes(marker)).map((line) => `inside: ${line}`),
    ...hostCommandLinesMatching(marker).map((line) => `host: ${line}`),
  ];
}

/** Host pids whose command line contains `needle` (arguments joined by spaces). */
export function hostProcessesMatching(needle: string): number[] {
  const matches: number[] = [];
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const commandLine = readFileSync(`/proc/${entry}/cmdline`, 'utf8').split('\0').join(' ');
      if (commandLine.includes(needle)) matches.push(Number(entry));
    } catch {
      // The process exited while we looked.
    }
  }
  return matches.filter((pid) => pid !== process.pid);
}

/** Resolves with the next `count` lines a process writes to stdout (rejects after 10 s). */
function readLines(process: SandboxProcess, count: number): Promise<string[]> {
  return new Promise((resolve, reject) => {
    let buffered = '';
    const timer = setTimeout(() => {
      process.stdout.off('data', onData);
      reject(new Error(`timed out waiting for ${count} lines; got ${JSON.stringify(buffered)}`));
    }, 10_000);
    const onData = (chunk: Buffer) => {
      buffered += chunk.toString('utf8');
      const lines = buffered.split('\n');
      if (lines.length > count) {
        clearTimeout(timer);
        process.stdout.off('data', onData);
        resolve(lines.slice(0, count));
      }
    };
    process.stdout.on('data', onData);
  });
}

/** Registers the shared sandbox driver contract tests under `describe(name)`. */
export function describeSandboxDriverContract(name: string, options: SandboxDriverContractOptions): void {
  describe(`${name}: sandbox driver contract`, () => {
    const hostView = options.hostView ?? hostProcessView;
    let driver: SandboxDriver;
    let unavailableReason: string | undefined;
    const workdirs: string[] = [];
    const handles: SandboxHandle[] = [];

    const newWorkdir = () => {
      const directory = mkdtempSync(join(tmpdir(), 'berth-contract-'));
      workdirs.push(directory);
      return directory;
    };
    const provision = async (
      context: TestContext,
      env?: Record<string, string>,
      readOnlyMounts?: ReadOnlyMount[],
    ) => {
      if (unavailableReason !== undefined) context.skip(`driver unavailable: ${unavailableReason}`);
      const handle = await driver
        .provision({
          sessionId: 'sesn_contract',
          workdir: newWorkdir(),
          env,
          readOnlyMounts,
        })
        .catch((error: unknown) => {
          // A driver without the read-only mount capability refuses such a spec with a typed error.
          if (readOnlyMounts?.length && isBerthError(error, 'sandbox_unavailable'))
            return context.skip(`read-only mounts unavailable: ${error.message}`);
          throw error;
        });
      handles.push(handle);
      return handle;
    };
    /** Spawns, or skips the test naming why the driver cannot. */
    const spawnOrSkip = (
      context: TestContext,
      handle: SandboxHandle,
      argv: string[],
      spawnOptions?: SandboxSpawnOptions,
    ): SandboxProcess => {
      if (!driver.spawn) return context.skip('driver has no spawn capability');
      try {
        return driver.spawn(handle, argv, spawnOptions);
      } catch (error) {
        if (isBerthError(error, 'sandbox_unavailable'))
          return context.skip(`spawn unavailable: ${error.message}`);
        throw error;
      }
    };

    beforeAll(async () => {
      driver = options.createDriver();
      const availability = await driver.checkAvailability();
      // Outside CI a missing driver skips every case; in CI it fails the suite, naming why.
      if (!availability.ok && skipUnlessPresent(`the ${name} sandbox driver`, availability.reason))
        unavailableReason = availability.reason;
    });

    afterAll(async () => {
      for (const handle of handles) await driver.destroy(handle);
      await options.cleanup?.(driver);
      for (const directory of workdirs) rmSync(directory, { recursive: true, force: true });
    });

    it('returns stdout, stderr and the exit code of a command', async (context) => {
      const handle = await provision(context);
      const result = await driver.exec(handle, ['sh', '-c', 'echo out; echo err >&2; exit 3']);
      expect(result).toMatchObject({ stdout: 'out\n', stderr: 'err\n', exitCode: 3, signal: null });
      expect(result.timedOut).toBe(false);
      expect(result.truncated).toBe(false);
      expect(result.durationMs).toBeGreaterThan(0);
    });

    it('feeds stdin to the command', async (context) => {
      const handle = await provision(context);
      const result = await driver.exec(handle, ['cat'], { stdin: 'from stdin\n' });
      expect(result.stdout).toBe('from stdin\n');
      const empty = await driver.exec(handle, ['cat']);
      expect(empty).toMatchObject({ stdout: '', exitCode: 0 });
    });

    it('passes sandbox-wide and per-command environment variables', async (context) => {
      const handle = await provision(context, { FROM_SPEC: 'spec-value' });
      const result = await driver.exec(handle, ['sh', '-c', 'echo "$FROM_SPEC $FROM_EXEC"'], {
        env: { FROM_EXEC: 'exec-value' },
      });
      expect(result.stdout).toBe('spec-value exec-value\n');
    });

    it('runs in the working directory by default and in the given cwd when asked', async (context) => {
      const handle = await provision(context);
      expect((await driver.exec(handle, ['pwd'])).stdout.trim()).toBe(handle.workdirInside);
      await driver.exec(handle, ['mkdir', '-p', 'sub/dir']);
      expect((await driver.exec(handle, ['pwd'], { cwd: 'sub/dir' })).stdout.trim()).toBe(
        `${handle.workdirInside}/sub/dir`,
      );
      expect((await driver.exec(handle, ['pwd'], { cwd: '/tmp' })).stdout.trim()).toBe('/tmp');
    });

    it('keeps only the first maxOutputBytes of a flood and still finishes', async (context) => {
      const handle = await provision(context);
      const result = await driver.exec(handle, ['sh', '-c', 'head -c 50000000 /dev/zero | tr "\\0" a'], {
        maxOutputBytes: 1000,
      });
      expect(result.stdout).toBe('a'.repeat(1000));
      expect(result.truncated).toBe(true);
      expect(result.exitCode).toBe(0);
    });

    it('kills a command that runs past its timeout and says so', async (context) => {
      const handle = await provision(context);
      const started = Date.now();
      const result = await driver.exec(handle, ['sleep', '30'], { timeoutMs: 500 });
      expect(Date.now() - started).toBeLessThan(5000);
      expect(result.timedOut).toBe(true);
      expect(result.exitCode).toBeNull();
    });

    it('kills a whole pipeline on timeout, including children in their own session', async (context) => {
      const handle = await provision(context);
      const marker = `sleep 3${Date.now() % 1000}.25`;
      const hostSide = hostView.track(driver, handle);
      const result = await driver.exec(handle, ['sh', '-c', `setsid ${marker} & ${marker}`], {
        timeoutMs: 500,
      });
      expect(result.timedOut).toBe(true);
      await expect.poll(() => stillRunning(driver, handle, marker, hostSide), { timeout: 2000 }).toEqual([]);
    });

    it('stops a command when its abort signal fires', async (context) => {
      const handle = await provision(context);
      const controller = new AbortController();
      setTimeout(() => controller.abort(), 300);
      const started = Date.now();
      const result = await driver.exec(handle, ['sleep', '30'], { signal: controller.signal });
      expect(Date.now() - started).toBeLessThan(5000);
      expect(result.exitCode).toBeNull();
      expect(result.timedOut).toBe(false);
    });

    it('writes a file and reads the same bytes back, creating parent directories', async (context) => {
      const handle = await provision(context);
      const bytes = new Uint8Array([0, 1, 2, 255, 10, 13, 0x80]);
      await driver.writeFile(handle, 'deep/nested/data.bin', bytes);
      expect(Buffer.from(await driver.readFile(handle, 'deep/nested/data.bin'))).toEqual(Buffer.from(bytes));
      await driver.writeFile(handle, `${handle.workdirInside}/text.txt`, 'héllo\n');
      expect(Buffer.from(await driver.readFile(handle, 'text.txt')).toString('utf8')).toBe('héllo\n');
      expect((await driver.exec(handle, ['cat', 'text.txt'])).stdout).toBe('héllo\n');
    });

    it('reads at most maxBytes of a file', async (context) => {
      const handle = await provision(context);
      await driver.writeFile(handle, 'big.txt', 'x'.repeat(10_000));
      expect((await driver.readFile(handle, 'big.txt', 100)).byteLength).toBe(100);
    });

    it('reports a missing file as not_found', async (context) => {
      const handle = await provision(context);
      const failure = await driver.readFile(handle, 'missing.txt').catch((error: unknown) => error);
      expect(isBerthError(failure, 'not_found')).toBe(true);
    });

    it('keeps files between commands in the same sandbox', async (context) => {
      const handle = await provision(context);
      await driver.exec(handle, ['sh', '-c', 'echo kept > note.txt']);
      expect((await driver.exec(handle, ['cat', 'note.txt'])).stdout).toBe('kept\n');
    });

    it('keeps sandboxes apart: neither sees the other files nor /tmp', async (context) => {
      const first = await provision(context);
      const second = await provision(context);
      await driver.exec(first, ['sh', '-c', 'echo one > mine.txt; echo one > /tmp/mine.txt']);
      const view = await driver.exec(second, ['sh', '-c', 'ls; ls /tmp; cat /tmp/mine.txt']);
      expect(view.stdout).not.toContain('mine.txt');
      expect(view.exitCode).not.toBe(0);
    });

    it('spawns a long-lived process and talks to it line by line over stdin and stdout', async (context) => {
      const handle = await provision(context);
      const cat = spawnOrSkip(context, handle, ['cat']);
      const first = readLines(cat, 1);
      cat.stdin.write('first line\n');
      expect(await first).toEqual(['first line']);
      const next = readLines(cat, 2);
      cat.stdin.write('second\nthird\n');
      expect(await next).toEqual(['second', 'third']);
      cat.stdin.end();
      expect(await cat.exited).toEqual({ exitCode: 0, signal: null });
    });

    it('runs a spawned process as the sandbox user with only the sandbox environment', async (context) => {
      const handle = await provision(context, { FROM_SPEC: 'spec-value' });
      process.env.BERTH_CONTRACT_CANARY = 'host-only';
      try {
        const shell = spawnOrSkip(
          context,
          handle,
          ['sh', '-c', 'id -u; pwd; echo "$FROM_SPEC $FROM_SPAWN [$BERTH_CONTRACT_CANARY]"; echo err >&2'],
          { cwd: '/tmp', env: { FROM_SPAWN: 'spawn-value' } },
        );
        let stderr = '';
        shell.stderr.on('data', (chunk: Buffer) => {
          stderr += chunk.toString('utf8');
        });
        const lines = readLines(shell, 3);
        expect(await lines).toEqual(['1000', '/tmp', 'spec-value spawn-value []']);
        expect(await shell.exited).toEqual({ exitCode: 0, signal: null });
        expect(stderr).toBe('err\n');
      } finally {
        delete process.env.BERTH_CONTRACT_CANARY;
      }
    });

    it('kill stops a spawned process and everything it started', async (context) => {
      const handle = await provision(context);
      const marker = `sleep 1001.${process.pid}${Date.now() % 1000}`;
      const shell = spawnOrSkip(context, handle, ['sh', '-c', `${marker} & echo started; exec cat`]);
      expect(await readLines(shell, 1)).toEqual(['started']);
      const hostSide = hostView.track(driver, handle);
      // The check below sees what it checks: the background sleep, before the kill.
      expect(await stillRunning(driver, handle, marker, hostSide)).not.toEqual([]);
      const started = Date.now();
      shell.kill();
      const exit = await shell.exited;
      expect(Date.now() - started).toBeLessThan(5000);
      expect(exit.exitCode).toBeNull();
      await expect.poll(() => stillRunning(driver, handle, marker, hostSide), { timeout: 2000 }).toEqual([]);
      shell.kill();
      expect((await driver.exec(handle, ['echo', 'still up'])).stdout).toBe('still up\n');
    });

    it('destroy kills spawned processes', async (context) => {
      const handle = await provision(context);
      const marker = `sleep 1002.${process.pid}${Date.now() % 1000}`;
      const shell = spawnOrSkip(context, handle, ['sh', '-c', `${marker} & echo started; exec cat`]);
      expect(await readLines(shell, 1)).toEqual(['started']);
      const hostSide = hostView.track(driver, handle);
      expect(await stillRunning(driver, handle, marker, hostSide)).not.toEqual([]);
      await driver.destroy(handle);
      expect((await shell.exited).exitCode).toBeNull();
      await expect.poll(() => stillRunning(driver, handle, marker, hostSide), { timeout: 2000 }).toEqual([]);
      const failure = (() => {
        try {
          driver.spawn!(handle, ['cat']);
        } catch (error) {
          return error;
        }
      })();
      expect(isBerthError(failure, 'sandbox_failed')).toBe(true);
    });

    it('shows a read-only mount that commands can read but not change', async (context) => {
      // A path the sandbox's host user can read.
      const source = mkdtempSync('/var/tmp/berth-contract-ro-');
      workdirs.push(source);
      writeFileSync(join(source, 'shared.txt'), 'shared content\n');
      chmodSync(source, 0o755);
      chmodSync(join(source, 'shared.txt'), 0o644);
      const handle = await provision(context, undefined, [{ hostPath: source, insidePath: '/opt/shared' }]);
      expect((await driver.exec(handle, ['cat', '/opt/shared/shared.txt'])).stdout).toBe('shared content\n');
      const write = await driver.exec(handle, [
        'sh',
        '-c',
        'echo changed > /opt/shared/shared.txt || touch /opt/shared/new.txt || echo refused',
      ]);
      expect(write.stdout).toBe('refused\n');
      expect(readFileSync(join(source, 'shared.txt'), 'utf8')).toBe('shared content\n');
      expect(readdirSync(source)).toEqual(['shared.txt']);
    });

    it('refuses a read-only mount over the sandbox own directories', async (context) => {
      if (unavailableReason !== undefined) context.skip(`driver unavailable: ${unavailableReason}`);
      for (const insidePath of ['/', '/workspace', '/workspace/x', '/proc', '/tmp/x', 'relative']) {
        const failure = await driver
          .provision({
            sessionId: 'sesn_contract',
            workdir: newWorkdir(),
            readOnlyMounts: [{ hostPath: '/usr', insidePath }],
          })
          .catch((error: unknown) => error);
        expect(isBerthError(failure, 'invalid_request'), insidePath).toBe(true);
      }
    });

    it('leaves no process behind after destroy, background ones included', async (context) => {
      const handle = await provision(context);
      const marker = `sleep 1000.${process.pid}${Date.now() % 1000}`;
      await driver.exec(handle, [
        'sh',
        '-c',
        `${marker} >/dev/null 2>&1 & setsid ${marker} >/dev/null 2>&1 &`,
      ]);
      const hostSide = hostView.track(driver, handle);
      await driver.destroy(handle);
      await expect.poll(() => stillRunning(driver, handle, marker, hostSide), { timeout: 2000 }).toEqual([]);
      const failure = await driver.exec(handle, ['true']).catch((error: unknown) => error);
      expect(isBerthError(failure, 'sandbox_failed')).toBe(true);
    });

    it('suspends to a directory and resumes in a new sandbox with the same files', async (context) => {
      const handle = await provision(context);
      await driver.exec(handle, [
        'sh',
        '-c',
        'mkdir -p src/deep && echo kept > src/deep/note.txt && printf "#!/bin/sh\\necho ran\\n" > run.sh && chmod 755 run.sh && ln -s src/deep/note.txt link',
      ]);
      await driver.writeFile(handle, 'data.bin', new Uint8Array([0, 255, 1]));
      const saved = newWorkdir();
      const suspended = await driver.suspend(handle, saved);
      expect(typeof suspended.memory).toBe('boolean');
      // The old sandbox is gone.
      const failure = await driver.exec(handle, ['true']).catch((error: unknown) => error);
      expect(isBerthError(failure, 'sandbox_failed')).toBe(true);

      const resumed = await driver.provision({
        sessionId: 'sesn_contract',
        workdir: join(newWorkdir(), 'resumed'),
        restoreFrom: saved,
      });
      handles.push(resumed);
      const view = await driver.exec(resumed, ['sh', '-c', 'cat src/deep/note.txt; ./run.sh; cat link']);
      expect(view).toMatchObject({ stdout: 'kept\nran\nkept\n', exitCode: 0 });
      expect(Buffer.from(await driver.readFile(resumed, 'data.bin'))).toEqual(Buffer.from([0, 255, 1]));
      // Still the sandbox user's files: it can change them.
      expect(
        (await driver.exec(resumed, ['sh', '-c', 'echo more >> src/deep/note.txt && echo ok'])).stdout,
      ).toBe('ok\n');
    });

    it('resumes processes and memory when the driver keeps them', async (context) => {
      const handle = await provision(context);
      await driver.exec(handle, ['sh', '-c', 'echo in-memory > /tmp/state.txt']);
      const counter = `sleep 1003.${process.pid}${Date.now() % 1000}`;
      await driver.exec(handle, ['sh', '-c', `${counter} >/dev/null 2>&1 &`]);
      const saved = newWorkdir();
      const suspended = await driver.suspend(handle, saved);
      if (!suspended.memory) return context.skip(`${driver.name} keeps files only across suspend`);
      const resumed = await driver.provision({
        sessionId: 'sesn_contract',
        workdir: join(newWorkdir(), 'resumed'),
        restoreFrom: saved,
      });
      handles.push(resumed);
      const view = await driver.exec(resumed, [
        'sh',
        '-c',
        `cat /tmp/state.txt; ps -eo args | grep -c "^${counter}"`,
      ]);
      expect(view.stdout).toBe('in-memory\n1\n');
    });

    it('counts the CPU time and memory commands use, or says it cannot meter', async (context) => {
      const handle = await provision(context);
      if (!driver.stats) return context.skip('driver has no stats capability');
      const before = await driver.stats(handle).catch((error: unknown) => error);
      if (isBerthError(before, 'sandbox_unavailable')) {
        // A driver that cannot meter must not claim enforced limits either.
        expect(handle.enforcedLimits).toBeUndefined();
        return context.skip(`stats unavailable: ${before.message}`);
      }
      await driver.exec(handle, ['timeout', '0.5', 'sh', '-c', 'while :; do :; done']);
      const after = await driver.stats(handle);
      expect(after.cpuSeconds - (before as { cpuSeconds: number }).cpuSeconds).toBeGreaterThan(0.2);
      expect(after.memoryBytes).toBeGreaterThan(0);
      if (after.memoryPeakBytes !== null)
        expect(after.memoryPeakBytes).toBeGreaterThanOrEqual(after.memoryBytes);
    });
  });
}
