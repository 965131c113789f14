import {
  chmodSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  symlinkSync,
  writeFileSync,
} from 'node:fs';
import { createServer, type Server } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { skipUnlessPresent } from '../../../test/support/required-in-ci.js';
import { isBerthError } from '../../errors.js';
import type { SandboxHandle } from '../driver.js';
import { describeSandboxDriverContract, hostProcessesMatching } from '../driver-contract.test-suite.js';
import { type BwrapDriver, createBwrapDriver } from './bwrap-driver.js';

const runningAsRoot = process.getuid?.() === 0;

describeSandboxDriverContract('bwrap', {
  createDriver: () => createBwrapDriver(),
  cleanup: (driver) => (driver as BwrapDriver).destroyAll(),
});

// The same contract through sandboxes taken from a warm pool (every provision over an empty
// workdir with the default limits takes one; the others start cold).
const poolRoot = mkdtempSync(join(tmpdir(), 'berth-pool-'));
describeSandboxDriverContract('bwrap (warm pool)', {
  createDriver: () => {
    const driver = createBwrapDriver({ warmPool: 2, poolDirectory: poolRoot });
    driver.warmUp();
    return driver;
  },
  cleanup: async (driver) => {
    await (driver as BwrapDriver).close();
    await (driver as BwrapDriver).destroyAll();
    rmSync(poolRoot, { recursive: true, force: true });
  },
});

describeSandboxDriverContract('bwrap (one bwrap per command)', {
  createDriver: () => createBwrapDriver({ mode: 'per-exec' }),
  cleanup: (driver) => (driver as BwrapDriver).destroyAll(),
});

const availability = await createBwrapDriver().checkAvailability();
const unavailableNote = availability.ok ? '' : ` (skipped: ${availability.reason})`;
const driverMissing = skipUnlessPresent(
  'the bwrap sandbox driver',
  availability.ok ? undefined : availability.reason,
);

describe.skipIf(driverMissing)(`bwrap sandbox isolation${unavailableNote}`, () => {
  const canaryName = 'BERTH_TEST_CANARY';
  const canaryValue = `canary-${process.pid}-${Date.now()}`;
  let driver: BwrapDriver;
  let handle: SandboxHandle;
  let scratch: string;
  let hostSecretPath: string;
  let server: Server;
  let port: number;
  let connections = 0;

  beforeAll(async () => {
    process.env[canaryName] = canaryValue;
    scratch = mkdtempSync(join(tmpdir(), 'berth-bwrap-test-'));
    // Stands in for the server's data directory: outside the workdir, must stay unreachable.
    mkdirSync(join(scratch, 'data'));
    hostSecretPath = join(scratch, 'data', 'secret.txt');
    writeFileSync(hostSecretPath, 'host secret\n');
    server = createServer((socket) => {
      connections += 1;
      socket.end('hello from host\n');
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    port = (server.address() as { port: number }).port;
    driver = createBwrapDriver();
    handle = await driver.provision({ sessionId: 'sesn_isolation', workdir: join(scratch, 'workspace') });
  });

  afterAll(async () => {
    delete process.env[canaryName];
    await driver?.destroyAll();
    await new Promise((resolve) => server?.close(resolve));
    rmSync(scratch, { recursive: true, force: true });
  });

  const shell = (command: string) => driver.exec(handle, ['sh', '-c', command], { timeoutMs: 10_000 });

  it('cannot reach a port the host listens on', async () => {
    const python = await shell(
      `python3 -c "import socket; s=socket.create_connection(('127.0.0.1', ${port}), timeout=2); print(s.recv(100))"`,
    );
    expect(python.exitCode).not.toBe(0);
    expect(python.stdout).not.toContain('hello from host');
    const curl = await shell(`curl -sS --max-time 2 http://127.0.0.1:${port}/ || echo failed`);
    expect(curl.stdout).toContain('failed');
    const interfaces = await shell('cat /proc/net/dev');
    expect(interfaces.stdout).not.toMatch(/eth|ens|enp|veth/);
    expect(connections).toBe(0);
  });

  it('does not see any environment variable of the server', async () => {
    const result = await shell('env; cat /proc/*/environ 2>/dev/null | tr "\\0" "\\n"');
    expect(result.stdout).not.toContain(canaryValue);
    expect(result.stdout).not.toContain(canaryName);
  });

  it('cannot read host files outside the workdir', async () => {
    const result = await shell(`cat /etc/shadow; ls /root; cat ${hostSecretPath}; ls ${scratch}; echo done`);
    expect(result.stdout).toBe('done\n');
    expect(result.stdout).not.toContain('host secret');
    expect(result.stderr).toMatch(/No such file or directory/);
  });

  it('runs as uid 1000 with no capabilities and no way to gain privileges', async () => {
    const result = await shell('id -u; id -g; grep -E "^(CapEff|CapPrm|NoNewPrivs)" /proc/self/status');
    expect(result.stdout).toContain('1000\n1000\n');
    expect(result.stdout).toMatch(/CapEff:\s+0000000000000000/);
    expect(result.stdout).toMatch(/CapPrm:\s+0000000000000000/);
    expect(result.stdout).toMatch(/NoNewPrivs:\s+1/);
    const nested = await shell('unshare --user --map-root-user true');
    expect(nested.exitCode).not.toBe(0);
  });

  it('cannot write outside /workspace, /tmp and its home', async () => {
    const result = await shell('touch /usr/x || touch /x || touch /etc/x || echo refused');
    expect(result.stdout).toBe('refused\n');
    await driver.writeFile(handle, '/tmp/scratch.txt', 'ok');
    expect(Buffer.from(await driver.readFile(handle, '/tmp/scratch.txt')).toString()).toBe('ok');
  });

  it('does not follow a symlink to a host file when reading or writing through the driver', async () => {
    await shell(
      `ln -sf /etc/shadow shadow-link; ln -sf ${hostSecretPath} secret-link; ln -sf ${hostSecretPath} written-link`,
    );
    // A link planted from the host side (e.g. by an unpacked archive) is no better.
    symlinkSync(hostSecretPath, join(scratch, 'workspace', 'host-made-link'));
    symlinkSync('/etc/passwd', join(scratch, 'workspace', 'passwd-link'));
    const passwd = Buffer.from(await driver.readFile(handle, 'passwd-link')).toString('utf8');
    expect(passwd).not.toBe(readFileSync('/etc/passwd', 'utf8'));
    for (const link of ['shadow-link', 'secret-link', 'host-made-link']) {
      const failure = await driver.readFile(handle, link).catch((error: unknown) => error);
      expect(isBerthError(failure)).toBe(true);
    }
    await driver.writeFile(handle, 'written-link', 'overwritten').catch(() => undefined);
    await driver.writeFile(handle, 'shadow-link', 'overwritten').catch(() => undefined);
    expect(readFileSync(hostSecretPath, 'utf8')).toBe('host secret\n');
    expect(readFileSync('/etc/passwd', 'utf8')).not.toContain('overwritten');
  });

  it.skipIf(!runningAsRoot)('reports a sandbox whose init was killed as sandbox_failed', async () => {
    const victim = await driver.provision({ sessionId: 'sesn_victim', workdir: join(scratch, 'victim') });
    // A command can kill the sandbox's agent (same uid); this command and the next must fail
    // cleanly, not hang.
    const killing = await driver.exec(victim, ['sh', '-c', 'kill -9 2']).catch((error: unknown) => error);
    expect(isBerthError(killing, 'sandbox_failed')).toBe(true);
    await expect
      .poll(async () => {
        const failure = await driver.exec(victim, ['true']).catch((error: unknown) => error);
        return isBerthError(failure, 'sandbox_failed');
      })
      .toBe(true);
    await driver.destroy(victim);
  });

  it('destroyAll leaves no sandbox process on the host', async () => {
    const other = createBwrapDriver();
    const marker = `sleep 2000.${process.pid}`;
    for (const name of ['a', 'b']) {
      const sandbox = await other.provision({
        sessionId: `sesn_${name}`,
        workdir: join(scratch, `all-${name}`),
      });
      void other.exec(sandbox, ['sh', '-c', marker]);
    }
    await expect.poll(() => hostProcessesMatching(marker).length > 0).toBe(true);
    await other.destroyAll();
    await expect.poll(() => hostProcessesMatching(marker), { timeout: 2000 }).toEqual([]);
  });
});

/** Berth sandbox processes that lost their parent (reparented to pid 1): leaked sandboxes. */
function orphanedSandboxInits(): number[] {
  return hostProcessesMatching('BERTH_SESSION_ID').filter((pid) => {
    try {
      const status = readFileSync(`/proc/${pid}/status`, 'utf8');
      return /^PPid:\s+1$/m.test(status);
    } catch {
      return false;
    }
  });
}

describe.skipIf(driverMissing || !runningAsRoot)('bwrap sandbox lifetime', () => {
  it('dies with the server even when the server is killed in the middle of provisioning', async () => {
    const { spawn } = await import('node:child_process');
    const root = mkdtempSync(join(tmpdir(), 'berth-lifeline-'));
    const before = new Set(orphanedSandboxInits());
    try {
      // Kill points from "before bwrap starts" to "sandbox fully up" (provisioning takes ~15-30 ms).
      for (const delay of [0, 3, 6, 9, 12, 15, 18, 21, 25, 30, 40, 80]) {
        const child = spawn(
          process.execPath,
          ['--import', 'tsx', 'test/support/provision-then-die.ts', join(root, `w${delay}`), String(delay)],
          { stdio: 'ignore' },
        );
        await new Promise((resolve) => child.once('exit', resolve));
      }
      await new Promise((resolve) => setTimeout(resolve, 500));
      // A kill in bwrap's own set-up window can strand its half-made child (bwrap arms
      // --die-with-parent only later): the next start reaps it.
      await createBwrapDriver().reapOrphans();
      await new Promise((resolve) => setTimeout(resolve, 200));
      const leaked = orphanedSandboxInits().filter((pid) => !before.has(pid));
      for (const pid of leaked) process.kill(pid, 'SIGKILL');
      expect(leaked).toEqual([]);
    } finally {
      rmSync(root, { recursive: true, force: true });
    }
  }, 60_000);
});

describe.skipIf(driverMissing)('bwrap spawn and read-only mounts', () => {
  it('refuses spawn in per-exec mode, saying it needs the persistent mode', async () => {
    const perExec = createBwrapDriver({ mode: 'per-exec' });
    const root = mkdtempSync(join(tmpdir(), 'berth-spawn-'));
    try {
      const sandbox = await perExec.provision({ sessionId: 'sesn_spawn', workdir: join(root, 'w') });
      const failure = (() => {
        try {
          perExec.spawn(sandbox, ['cat']);
        } catch (error) {
          return error;
        }
      })();
      expect(isBerthError(failure, 'sandbox_unavailable')).toBe(true);
      expect((failure as Error).message).toMatch(/persistent mode/);
    } finally {
      await perExec.destroyAll();
      rmSync(root, { recursive: true, force: true });
    }
  });

  it.skipIf(!runningAsRoot)(
    'mounts a read-only source that lives under /tmp (where installs often are)',
    async () => {
      const driver = createBwrapDriver();
      const root = mkdtempSync(join(tmpdir(), 'berth-ro-'));
      try {
        // Readable by the sandbox's host user, like a checkout or an npm install.
        chmodSync(root, 0o755);
        mkdirSync(join(root, 'shared'));
        writeFileSync(join(root, 'shared', 'note.txt'), 'visible');
        const handle = await driver.provision({
          sessionId: 'sesn_ro',
          workdir: join(root, 'w'),
          readOnlyMounts: [{ hostPath: join(root, 'shared'), insidePath: '/opt/shared' }],
        });
        const result = await driver.exec(handle, ['cat', '/opt/shared/note.txt']);
        expect(result.stdout).toBe('visible');
      } finally {
        await driver.destroyAll();
        rmSync(root, { recursive: true, force: true });
      }
    },
  );
});

describe.skipIf(driverMissing || !runningAsRoot)('bwrap egress bridge', () => {
  it('relays 127.0.0.1:3128 inside to the socket in the services directory, and nothing else', async () => {
    const driver = createBwrapDriver();
    const root = mkdtempSync(join(tmpdir(), 'berth-bridge-'));
    const handle = await driver.provision({ sessionId: 'sesn_bridge', workdir: join(root, 'w') });
    const services = handle.servicesDirectory!;
    const received: string[] = [];
    const proxy = createServer((socket) => {
      socket.once('data', (chunk) => {
        received.push(chunk.toString('utf8'));
        socket.end('HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello');
      });
    });
    try {
      // Before the server puts a socket there, connections are closed at once.
      const early = await driver.exec(handle, [
        'bash',
        '-c',
        'exec 3<>/dev/tcp/127.0.0.1/3128 && printf "GET / HTTP/1.0\r\n\r\n" >&3 && cat <&3 2>/dev/null; echo closed',
      ]);
      expect(early.stdout).toBe('closed\n');
      await new Promise<void>((resolve) => proxy.listen(join(services, 'egress.sock'), resolve));
      chmodSync(join(services, 'egress.sock'), 0o666);
      const result = await driver.exec(handle, [
        'bash',
        '-c',
        'exec 3<>/dev/tcp/127.0.0.1/3128 && printf "GET http://example.test/ HTTP/1.1\r\nhost: example.test\r\n\r\n" >&3 && cat <&3',
      ]);
      expect(result.stdout).toContain('hello');
      expect(received[0]).toContain('GET http://example.test/ HTTP/1.1');
      // The directory is the sandbox's to read, not to change.
      const write = await driver.exec(handle, ['sh', '-c', 'touch /run/berth/x || echo refused']);
      expect(write.stdout).toContain('refused');
    } finally {
      await driver.destroyAll();
      await new Promise((resolve) => proxy.close(resolve));
      rmSync(root, { recursive: true, force: true });
    }
    expect(existsSync(services)).toBe(false);
  });
});

describe.skipIf(driverMissing || !runningAsRoot)('bwrap warm pool', () => {
  let root: string;
  let poolDirectory: string;
  let driver: BwrapDriver;

  beforeAll(() => {
    root = mkdtempSync(join(tmpdir(), 'berth-warm-'));
    poolDirectory = join(root, 'pool');
    driver = createBwrapDriver({ warmPool: 2, poolDirectory });
    driver.warmUp();
  });

  afterAll(async () => {
    await driver?.close();
    await driver?.destroyAll();
    rmSync(root, { recursive: true, force: true });
  });

  it('gives a new session a started sandbox over its own workdir, and refills the pool', async () => {
    await expect.poll(() => driver.warmCount, { timeout: 10_000 }).toBe(2);
    const workdir = join(root, 'session-a');
    const handle = await driver.provision({ sessionId: 'sesn_warm_a', workdir, env: { GREETING: 'hello' } });
    expect(handle.sessionId).toBe('sesn_warm_a');
    expect(driver.warmCount).toBe(1);
    const result = await driver.exec(handle, ['sh', '-c', 'echo "$GREETING" > note.txt && pwd && id -u']);
    expect(result.stdout).toBe('/workspace\n1000\n');
    // The session's files are in its workdir on the host, not in the pool's directory...
    expect(readFileSync(join(workdir, 'note.txt'), 'utf8')).toBe('hello\n');
    await driver.destroy(handle);
    // ...and stay there after destroy.
    expect(readFileSync(join(workdir, 'note.txt'), 'utf8')).toBe('hello\n');
    await expect.poll(() => driver.warmCount, { timeout: 10_000 }).toBe(2);
  });

  it('resumes a suspended sandbox into a pooled one, with its files', async () => {
    await expect.poll(() => driver.warmCount, { timeout: 10_000 }).toBe(2);
    const workdir = join(root, 'session-r');
    const first = await driver.provision({ sessionId: 'sesn_warm_r', workdir });
    await driver.exec(first, ['sh', '-c', 'mkdir -p src && echo kept > src/a.txt']);
    const saved = mkdtempSync(join(root, 'saved-'));
    await driver.suspend(first, saved);
    await expect.poll(() => driver.warmCount, { timeout: 10_000 }).toBe(2);
    const resumed = await driver.provision({ sessionId: 'sesn_warm_r', workdir, restoreFrom: saved });
    expect(driver.warmCount).toBe(1);
    expect((await driver.exec(resumed, ['cat', 'src/a.txt'])).stdout).toBe('kept\n');
    expect(readFileSync(join(workdir, 'src', 'a.txt'), 'utf8')).toBe('kept\n');
    await driver.destroy(resumed);
    expect(readFileSync(join(workdir, 'src', 'a.txt'), 'utf8')).toBe('kept\n');
  });

  it('starts cold when the session needs something the pool does not have', async () => {
    await expect.poll(() => driver.warmCount, { timeout: 10_000 }).toBe(2);
    const resumed = join(root, 'session-b');
    mkdirSync(resumed);
    writeFileSync(join(resumed, 'kept.txt'), 'from before');
    const withFiles = await driver.provision({ sessionId: 'sesn_warm_b', workdir: resumed });
    const limited = await driver.provision({
      sessionId: 'sesn_warm_c',
      workdir: join(root, 'session-c'),
      limits: { memoryMb: 256 },
    });
    expect(driver.warmCount).toBe(2);
    expect((await driver.exec(withFiles, ['cat', 'kept.txt'])).stdout).toBe('from before');
    expect(limited.enforcedLimits?.memoryMb).toBe(256);
    await driver.destroy(withFiles);
    await driver.destroy(limited);
  });

  it('close() ends the pooled sandboxes and removes their directories', async () => {
    const other = createBwrapDriver({ warmPool: 1, poolDirectory: join(root, 'other-pool') });
    other.warmUp();
    await expect.poll(() => other.warmCount, { timeout: 10_000 }).toBe(1);
    const marker = join(root, 'other-pool');
    expect(hostProcessesMatching(marker).length).toBeGreaterThan(0);
    await other.close();
    expect(other.warmCount).toBe(0);
    await expect.poll(() => hostProcessesMatching(marker), { timeout: 2000 }).toEqual([]);
    expect(readdirSync(marker)).toEqual([]);
  });

  it("reapOrphans removes a dead server's pool directories and keeps live ones", async () => {
    await expect.poll(() => driver.warmCount, { timeout: 10_000 }).toBe(2);
    // A pid that cannot be alive with that start time: the name format of sandboxCgroupName.
    const dead = join(poolDirectory, 'sbx_dead.999999.1');
    mkdirSync(dead);
    writeFileSync(join(dead, 'left.txt'), 'x');
    await driver.reapOrphans();
    expect(readdirSync(poolDirectory)).not.toContain('sbx_dead.999999.1');
    expect(readdirSync(poolDirectory).length).toBe(2);
    expect(driver.warmCount).toBe(2);
  });
});
