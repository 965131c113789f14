/**
 * Attacks every sandbox driver must withstand. A driver's test file calls
 * `describeSandboxAdversarial(...)`; each test tries to do harm from inside a sandbox and
 * asserts that it fails AND that the host and a neighbouring sandbox stay healthy: the
 * neighbour answers `echo` within a bound while the attack runs, and the server's event loop
 * keeps ticking. Tests that need a limit the driver does not enforce on this host skip, naming
 * it. Real kernels only: nothing here is mocked.
 */
import {
  chmodSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  rmSync,
  statfsSync,
  statSync,
  writeFileSync,
} from 'node:fs';
import { createServer, type Server, type Socket } from 'node:net';
import { networkInterfaces, tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it, type TestContext } from 'vitest';
import { skipUnlessPresent } from '../../test/support/required-in-ci.js';
import { isBerthError } from '../errors.js';
import type { SandboxDriver, SandboxHandle, SandboxLimits } from './driver.js';
import { hostProcessView, type SandboxHostView, stillRunning } from './driver-contract.test-suite.js';
import { BLOCKED_SYSCALLS, hostSeccompArchitecture } from './seccomp.js';

/** How a driver's test file plugs into the adversarial suite. */
export interface SandboxAdversarialOptions {
  /** Creates a fresh driver; called once per suite. */
  createDriver: () => SandboxDriver;
  /** Called after the suite, e.g. to shut the driver down. */
  cleanup?: (driver: SandboxDriver) => Promise<void>;
  /**
   * The sandbox runs its own kernel (gVisor's Sentry, a VM's): system calls never reach the host
   * kernel, so the test is not that they fail but that succeeding changes nothing outside the
   * sandbox; and a memory limit covers that kernel too, so an OOM ends the whole sandbox (the
   * session's next use provisions a new one over the same files).
   */
  ownKernel?: boolean;
  /** How this driver's sandbox shows on the host (default: its processes do, as bwrap's). */
  hostView?: SandboxHostView;
}

/** The neighbour must answer within this while an attack runs (generous: CI hosts are loaded). */
const NEIGHBOUR_BOUND_MS = 2000;
/** The server's event loop may stall at most this long. */
const EVENT_LOOP_BOUND_MS = 500;

/** Measures how late a 10 ms timer fires: the server's event loop staying responsive. */
function watchEventLoop(): { stop(): number } {
  let last = performance.now();
  let worst = 0;
  const timer = setInterval(() => {
    const now = performance.now();
    worst = Math.max(worst, now - last - 10);
    last = now;
  }, 10);
  return {
    stop() {
      clearInterval(timer);
      return worst;
    },
  };
}

/** Python that makes raw system calls and prints `name=errno` (0 when the call succeeded). */
function syscallProbe(
  calls: ReadonlyArray<{ name: string; nr: number; args: readonly (number | string)[] }>,
): string {
  const lines = calls.map(
    ({ name, nr, args }) =>
      `r = libc.syscall(${nr}, ${args.map((argument) => (typeof argument === 'string' ? argument : String(argument))).join(', ')}); print("${name}=" + str(0 if r >= 0 else ctypes.get_errno()), flush=True)`,
  );
  return ['import ctypes', 'libc = ctypes.CDLL(None, use_errno=True)', ...lines].join('\n');
}

function syscallNumber(name: string): number | undefined {
  const architecture = hostSeccompArchitecture();
  if (!architecture) return undefined;
  return BLOCKED_SYSCALLS.find((syscall) => syscall.name === name)?.[architecture];
}

/** Registers the adversarial tests under `describe(name)`. */
export function describeSandboxAdversarial(name: string, options: SandboxAdversarialOptions): void {
  describe(`${name}: adversarial`, () => {
    const hostView = options.hostView ?? hostProcessView;
    const canaryName = 'BERTH_ADVERSARIAL_CANARY';
    const canaryValue = `canary-${process.pid}-${Date.now()}`;
    const secretText = `host-secret-${process.pid}`;
    let driver: SandboxDriver;
    let unavailableReason: string | undefined;
    let scratch: string;
    let secretPath: string;
    let server: Server;
    let hostPort = 0;
    let hostConnections = 0;
    let neighbour: SandboxHandle;
    let neighbourWorkdir: string;
    const handles: SandboxHandle[] = [];
    let counter = 0;

    const provision = async (context: TestContext, limits?: SandboxLimits) => {
      if (unavailableReason !== undefined) context.skip(`driver unavailable: ${unavailableReason}`);
      const handle = await driver.provision({
        sessionId: `sesn_adversarial_${counter}`,
        workdir: join(scratch, `workspace-${counter++}`),
        limits,
      });
      handles.push(handle);
      return handle;
    };
    const shell = (handle: SandboxHandle, command: string, timeoutMs = 10_000) =>
      driver.exec(handle, ['sh', '-c', command], { timeoutMs });

    /**
     * Runs `attack` while checking, every 100 ms, that the neighbour answers `echo` in time and
     * the event loop keeps up; returns the attack's result.
     */
    const whileHealthy = async <T>(attack: Promise<T>): Promise<T> => {
      const loop = watchEventLoop();
      let done = false;
      const settled = attack.finally(() => {
        done = true;
      });
      const durations: number[] = [];
      do {
        const started = performance.now();
        const answer = await driver.exec(neighbour, ['echo', 'alive'], { timeoutMs: 10_000 });
        durations.push(performance.now() - started);
        expect(answer.stdout).toBe('alive\n');
        await Promise.race([
          settled.catch(() => undefined),
          new Promise((resolve) => setTimeout(resolve, 100)),
        ]);
      } while (!done);
      expect(Math.max(...durations), 'neighbour echo (ms)').toBeLessThan(NEIGHBOUR_BOUND_MS);
      expect(loop.stop(), 'event loop lag (ms)').toBeLessThan(EVENT_LOOP_BOUND_MS);
      return settled;
    };

    beforeAll(async () => {
      // Set before any sandbox exists: nothing of the server's environment may leak in.
      process.env[canaryName] = canaryValue;
      scratch = mkdtempSync(join(tmpdir(), 'berth-adversarial-'));
      // Stands in for the server's data directory: world-readable, so only isolation hides it.
      mkdirSync(join(scratch, 'data'), { mode: 0o755 });
      secretPath = join(scratch, 'data', 'secret.txt');
      writeFileSync(secretPath, `${secretText}\n`, { mode: 0o644 });
      server = createServer((socket) => {
        hostConnections += 1;
        socket.end('hello from host\n');
      });
      await new Promise<void>((resolve) => server.listen(0, '0.0.0.0', resolve));
      hostPort = (server.address() as { port: number }).port;
      driver = options.createDriver();
      const availability = await driver.checkAvailability();
      // Outside CI a missing driver skips every case; in CI it fails the suite, naming why.
      if (!availability.ok && skipUnlessPresent(`the ${name} sandbox driver`, availability.reason)) {
        unavailableReason = availability.reason;
        return;
      }
      neighbourWorkdir = join(scratch, 'neighbour');
      neighbour = await driver.provision({ sessionId: 'sesn_neighbour', workdir: neighbourWorkdir });
      handles.push(neighbour);
    });

    afterAll(async () => {
      delete process.env[canaryName];
      for (const handle of handles) await driver?.destroy(handle).catch(() => undefined);
      await options.cleanup?.(driver);
      await new Promise((resolve) => server?.close(resolve));
      if (scratch) rmSync(scratch, { recursive: true, force: true });
    });

    it('contains a fork bomb: the neighbour and the server stay responsive', async (context) => {
      const attacker = await provision(context);
      if (!attacker.enforcedLimits) context.skip('the driver enforces no pids limit on this host');
      const hostSide = hostView.track(driver, attacker);
      const bomb = shell(attacker, 'bomb() { bomb | bomb & }; bomb; sleep 3', 4000);
      await whileHealthy(bomb);
      await driver.destroy(attacker);
      await expect
        .poll(() => stillRunning(driver, attacker, 'bomb() { bomb', hostSide), { timeout: 5000 })
        .toEqual([]);
      // Not a bound on the bomb: when the 4 s timeout fires, gVisor's reaper is a new task in a
      // Sentry the bomb keeps busy, and on a loaded 2-core host it took 13-17 s to start.
    }, 60_000);

    it('OOM-kills a memory bomb inside its own sandbox, which keeps working', async (context) => {
      const attacker = await provision(context, { memoryMb: 128 });
      if (!attacker.enforcedLimits) context.skip('the driver enforces no memory limit on this host');
      const bomb = await whileHealthy(
        driver
          .exec(attacker, ['python3', '-c', 'b = bytearray(4 * 1024 ** 3); print("survived")'])
          .catch((error: unknown) => {
            // Its own kernel ran out of memory with it: the sandbox is gone, nothing else is.
            if (options.ownKernel && isBerthError(error, 'sandbox_failed')) return undefined;
            throw error;
          }),
      );
      if (bomb === undefined) {
        const fresh = await provision(context);
        expect((await driver.exec(fresh, ['echo', 'fresh'])).stdout).toBe('fresh\n');
        return;
      }
      expect(bomb.stdout).not.toContain('survived');
      expect(bomb.exitCode).not.toBe(0);
      expect((await driver.exec(attacker, ['echo', 'still here'])).stdout).toBe('still here\n');
    });

    it('stops a disk fill at the quota with ENOSPC; the neighbour and the host disk are fine', async (context) => {
      const attacker = await provision(context, { diskMb: 64 });
      if (attacker.enforcedLimits?.diskMb === undefined)
        context.skip('the driver enforces no disk limit on this host');
      const hostFreeBefore = statfsSync(scratch).bavail * statfsSync(scratch).bsize;
      const fill = await whileHealthy(
        shell(attacker, 'dd if=/dev/zero of=big bs=1M count=256 2>&1; echo "exit=$?"'),
      );
      expect(fill.stdout).toMatch(/No space left on device/);
      expect(fill.stdout).not.toContain('exit=0');
      const used = Number((await shell(attacker, 'du -sm big | cut -f1')).stdout.trim());
      expect(used).toBeLessThanOrEqual(64);
      const hostFreeAfter = statfsSync(scratch).bavail * statfsSync(scratch).bsize;
      expect(hostFreeBefore - hostFreeAfter).toBeLessThan(128 * 1024 * 1024);
      // The neighbour still writes; the attacker writes again once it deletes its file.
      expect((await shell(neighbour, 'echo ok > mine.txt && cat mine.txt')).stdout).toBe('ok\n');
      expect((await shell(attacker, 'rm big && echo ok > small.txt && cat small.txt')).stdout).toBe('ok\n');
    }, 20_000);

    it('bounds /tmp: a 2 GiB write there fails without hurting anyone', async (context) => {
      const attacker = await provision(context);
      const fill = await whileHealthy(
        shell(attacker, 'dd if=/dev/zero of=/tmp/big bs=1M count=2048 2>&1; echo "exit=$?"', 20_000),
      );
      expect(fill.stdout).not.toContain('exit=0');
      expect((await driver.exec(attacker, ['echo', 'up'])).stdout).toBe('up\n');
    }, 30_000);

    it('caps a stdout flood; the server keeps only the cap in memory', async (context) => {
      const attacker = await provision(context);
      const before = process.memoryUsage().arrayBuffers;
      const flood = await whileHealthy(
        driver.exec(attacker, ['sh', '-c', 'head -c 200000000 /dev/zero'], { maxOutputBytes: 64 * 1024 }),
      );
      expect(flood.truncated).toBe(true);
      expect(flood.stdout.length).toBe(64 * 1024);
      // Dropped chunks wait for the garbage collector, so allow some; keeping the 200 MB would not fit.
      expect(process.memoryUsage().arrayBuffers - before).toBeLessThan(100 * 1024 * 1024);
    }, 20_000);

    it("cannot read another session's files, /tmp, processes or loopback ports", async (context) => {
      const attacker = await provision(context);
      const marker = `neighbour-listener-${process.pid}`;
      await shell(neighbour, `echo ${secretText}-ws > secret.txt; echo ${secretText}-tmp > /tmp/secret.txt`);
      // A listener on the neighbour's loopback, named so it shows in ps.
      const listener = `import socket,time\ns=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("127.0.0.1", 47000)); s.listen(); print("listening", flush=True); time.sleep(30) # ${marker}`;
      await shell(neighbour, `python3 -c '${listener}' > listener.log 2>&1 &`);
      await expect
        .poll(async () => (await shell(neighbour, 'cat listener.log')).stdout)
        .toContain('listening');
      const view = await shell(
        attacker,
        [
          'cat secret.txt /tmp/secret.txt 2>&1',
          `ls ${neighbourWorkdir} 2>&1`,
          `cat ${neighbourWorkdir}/secret.txt 2>&1`,
          'ps -eo args 2>&1',
          'cat /proc/[0-9]*/cmdline 2>/dev/null | tr "\\0" " "',
          `python3 -c 'import socket; socket.create_connection(("127.0.0.1", 47000), timeout=2); print("port" + "-reached")' 2>&1`,
        ].join('; '),
      );
      expect(view.stdout).not.toContain(secretText);
      expect(view.stdout).not.toContain(marker);
      expect(view.stdout).not.toContain('port-reached');
      // The neighbour itself does reach its own listener (so the port really was open).
      const own = await shell(
        neighbour,
        `python3 -c 'import socket; socket.create_connection(("127.0.0.1", 47000), timeout=2); print("port" + "-reached")'`,
      );
      expect(own.stdout).toBe('port-reached\n');
    });

    it('reaches no network address: host loopback, host IPs, the metadata service, DNS', async (context) => {
      const attacker = await provision(context);
      const hostAddresses = Object.values(networkInterfaces())
        .flat()
        .filter((address) => address && address.family === 'IPv4' && !address.internal)
        .map((address) => address!.address);
      const targets = ['127.0.0.1', ...hostAddresses].map((address) => [address, hostPort] as const);
      targets.push(['169.254.169.254', 80], ['1.1.1.1', 443], ['8.8.8.8', 53]);
      const script = [
        'import socket',
        `for host, port in ${JSON.stringify(targets)}:`,
        '    try:',
        '        s = socket.create_connection((host, port), timeout=2); print("REACHED", host, s.recv(100))',
        '    except Exception as error: print("blocked", host, type(error).__name__)',
        'try:',
        '    print("RESOLVED", socket.getaddrinfo("example.com", 443))',
        'except Exception as error: print("no dns", type(error).__name__)',
      ].join('\n');
      const result = await whileHealthy(
        driver.exec(attacker, ['python3', '-c', script], { timeoutMs: 30_000 }),
      );
      expect(result.stdout).not.toMatch(/REACHED|RESOLVED|hello from host/);
      expect(result.stdout.match(/^blocked /gm)?.length).toBe(targets.length);
      expect(result.stdout).toContain('no dns');
      expect(hostConnections).toBe(0);
    }, 40_000);

    it('has one way out, its own egress socket: no other host unix socket, abstract or by symlink', async (context) => {
      const attacker = await provision(context);
      if (!attacker.servicesDirectory)
        context.skip('the driver gives sandboxes no services directory (no network at all)');
      const servicesDirectory = attacker.servicesDirectory!;
      /** A host unix socket server (world-connectable, as the egress proxy's is) counting who came. */
      const listening: Server[] = [];
      const accepted = new Set<Socket>();
      const counts: Record<string, number> = {};
      const listen = async (label: string, path: string, answer: string) => {
        const server = createServer((socket) => {
          counts[label] = (counts[label] ?? 0) + 1;
          accepted.add(socket);
          socket.on('error', () => undefined);
          socket.resume().end(answer);
        });
        await new Promise<void>((resolve) => server.listen(path, resolve));
        if (!path.startsWith('\0')) chmodSync(path, 0o666);
        listening.push(server);
      };
      try {
        // Stands in for the session's egress proxy.
        await listen('own', join(servicesDirectory, 'egress.sock'), 'HTTP/1.1 200 OK\r\n\r\nproxy-answered');
        // What an attacker would rather reach: another socket of the server, the neighbour's
        // proxy, and one in the abstract namespace (no file at all).
        const other = join(scratch, 'data', 'server.sock');
        await listen('other', other, 'other-reached');
        const targets = [other];
        if (neighbour.servicesDirectory) {
          const neighbours = join(neighbour.servicesDirectory, 'egress.sock');
          await listen('neighbour', neighbours, 'neighbour-reached');
          targets.push(
            neighbours,
            `/run/berth/../${neighbour.servicesDirectory.split('/').at(-1)}/egress.sock`,
          );
        }
        const abstract = `\0berth-adversarial-${process.pid}`;
        await listen('abstract', abstract, 'abstract-reached');
        targets.push(abstract);
        const script = [
          'import os, socket',
          `for index, path in enumerate(${JSON.stringify(targets)}):`,
          '    for target in [path] if path.startswith("\\0") else [path, "link-%d.sock" % index]:',
          '        try:',
          '            if target != path: os.symlink(path, target)',
          '            s = socket.socket(socket.AF_UNIX); s.settimeout(2); s.connect(target)',
          '            print("REACHED", repr(target), s.recv(100))',
          '        except Exception as error: print("blocked", repr(target), type(error).__name__)',
          's = socket.create_connection(("127.0.0.1", 3128), timeout=5)',
          's.sendall(b"GET http://example.com/ HTTP/1.1\\r\\nhost: example.com\\r\\n\\r\\n")',
          'print("via bridge:", s.recv(100))',
        ].join('\n');
        const result = await driver.exec(attacker, ['python3', '-c', script], { timeoutMs: 30_000 });
        expect(result.stdout, result.stderr).toContain('proxy-answered');
        expect(result.stdout).not.toMatch(/REACHED|other-reached|neighbour-reached|abstract-reached/);
        expect(result.stdout.match(/^blocked /gm)?.length).toBe(targets.length * 2 - 1);
        expect(counts).toEqual({ own: 1 });
      } finally {
        for (const socket of accepted) socket.destroy();
        for (const server of listening) await new Promise((resolve) => server.close(resolve));
      }
    }, 40_000);

    it("sees none of the server's environment or files", async (context) => {
      const attacker = await provision(context);
      const result = await shell(
        attacker,
        [
          'env',
          'cat /proc/*/environ 2>/dev/null | tr "\\0" "\\n"',
          'cat /proc/1/environ 2>&1 | tr "\\0" "\\n"',
          `cat ${secretPath} 2>&1`,
          `ls ${scratch} 2>&1`,
          'ls -a /root 2>&1',
          'cat /etc/shadow 2>&1',
          'head -c 200 /proc/1/root/etc/shadow 2>&1',
        ].join('; '),
      );
      expect(result.stdout).not.toContain(canaryValue);
      expect(result.stdout).not.toContain(canaryName);
      expect(result.stdout).not.toContain(secretText);
      expect(result.stdout).not.toMatch(/^root:[^:]*:\d+:/m);
    });

    it('has no capabilities, and setuid binaries give none back', async (context) => {
      const attacker = await provision(context);
      const status = await shell(
        attacker,
        'grep -E "^(CapEff|CapPrm|CapAmb|NoNewPrivs)" /proc/self/status; id -u',
      );
      expect(status.stdout).toMatch(/^CapEff:\s+0+$/m);
      expect(status.stdout).toMatch(/^CapPrm:\s+0+$/m);
      expect(status.stdout).not.toMatch(/^id -u\n0$/m);
      expect(status.stdout.trim().split('\n').at(-1)).not.toBe('0');
      // mount and su are setuid root on the host; here they must not make anyone root.
      const setuid = await shell(
        attacker,
        'mkdir -p /tmp/m; mount -t tmpfs none /tmp/m 2>&1 && echo MOUNTED; su -c "id -u" root </dev/null 2>&1; echo done',
      );
      expect(setuid.stdout).not.toContain('MOUNTED');
      expect(setuid.stdout).not.toMatch(/^0$/m);
    });

    it('refuses dangerous system calls: new user namespaces, mount, ptrace, keyctl, bpf', async (context) => {
      const attacker = await provision(context);
      const hostMounts = readFileSync('/proc/self/mountinfo', 'utf8');
      const unshare = await shell(
        attacker,
        'unshare -U -r -m sh -c "mount -t tmpfs none /tmp && id -u" 2>&1; echo "exit=$?"',
      );
      if (!options.ownKernel) expect(unshare.stdout).not.toContain('exit=0');
      const calls = [
        { name: 'unshare', args: ['0x10000000'] }, // CLONE_NEWUSER
        { name: 'mount', args: ['b"none"', 'b"/tmp"', 'b"tmpfs"', '0', '0'] },
        { name: 'ptrace', args: ['16', 'child', '0', '0'] }, // PTRACE_ATTACH to a sibling
        { name: 'keyctl', args: ['0', '-3', '0'] }, // KEYCTL_GET_KEYRING_ID of the session keyring
        { name: 'bpf', args: ['0', '0', '0'] },
        { name: 'userfaultfd', args: ['0'] },
        { name: 'setns', args: ['0', '0'] },
        { name: 'io_uring_setup', args: ['1', '0'] },
      ]
        .map((call) => ({ ...call, nr: syscallNumber(call.name) }))
        .filter((call): call is { name: string; args: string[]; nr: number } => call.nr !== undefined);
      if (calls.length === 0) context.skip(`no syscall numbers for ${process.arch}`);
      const script = [
        'import subprocess',
        'child = subprocess.Popen(["sleep", "30"]).pid',
        syscallProbe(calls),
      ].join('\n');
      const result = await driver.exec(attacker, ['python3', '-c', script]);
      if (options.ownKernel) {
        // Whatever its own kernel allowed stayed inside it: the host's mount table did not move.
        expect(readFileSync('/proc/self/mountinfo', 'utf8')).toBe(hostMounts);
        return;
      }
      for (const call of calls) {
        const errno = Number(new RegExp(`^${call.name}=(\\d+)$`, 'm').exec(result.stdout)?.[1]);
        // EPERM from a seccomp filter, or ENOSYS from a kernel that does not offer the call.
        expect([1, 38], `${call.name}: ${result.stdout}${result.stderr}`).toContain(errno);
      }
    });

    it.runIf(process.arch === 'x64')(
      'never serves a system call made through the i386 ABI (a classic filter bypass)',
      async (context) => {
        const attacker = await provision(context);
        // mov eax, 20 (getpid on i386); int 0x80; ret: run from an executable page.
        const script = [
          'import ctypes, mmap',
          'code = bytes([0xb8, 20, 0, 0, 0, 0xcd, 0x80, 0xc3])',
          'page = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)',
          'page.write(code)',
          'address = ctypes.addressof(ctypes.c_char.from_buffer(page))',
          'result = ctypes.CFUNCTYPE(ctypes.c_int)(address)()',
          'print("survived", result)',
        ].join('\n');
        const result = await driver.exec(attacker, ['python3', '-c', script]);
        if (options.ownKernel) {
          // Its kernel may refuse the call instead of killing the caller; it must not serve it.
          expect(result.stdout).toMatch(/^(survived -\d+\n)?$/);
          return;
        }
        expect(result.stdout).not.toContain('survived');
        expect(result.exitCode).not.toBe(0);
      },
    );

    it('leaves nothing running after destroy, not even a double-forked setsid daemon', async (context) => {
      const attacker = await provision(context);
      const marker = `daemon-${process.pid}-${Date.now() % 100000}`;
      await shell(
        attacker,
        `(setsid sh -c 'while :; do date +%s%N >> ticks.txt; sleep 0.05; done # ${marker}' </dev/null >/dev/null 2>&1 &) &`,
      );
      const workdir = join(scratch, `workspace-${counter - 1}`);
      // Running: it has written ticks (before the file exists `wc` prints nothing, which is not
      // "0" either, so the count itself must be positive).
      await expect
        .poll(async () => Number((await shell(attacker, 'wc -l < ticks.txt')).stdout.trim() || 0), {
          timeout: 5000,
        })
        .toBeGreaterThan(0);
      const hostSide = hostView.track(driver, attacker);
      expect(await stillRunning(driver, attacker, marker, hostSide)).not.toEqual([]);
      await driver.destroy(attacker);
      await expect
        .poll(() => stillRunning(driver, attacker, marker, hostSide), { timeout: 3000 })
        .toEqual([]);
      // Nothing keeps writing into the workspace either.
      const size = statSync(join(workdir, 'ticks.txt')).size;
      await new Promise((resolve) => setTimeout(resolve, 300));
      expect(statSync(join(workdir, 'ticks.txt')).size).toBe(size);
      expect(readFileSync(join(workdir, 'ticks.txt'), 'utf8').length).toBeGreaterThan(0);
    });
  });
}
