import { spawn } from 'node:child_process';
import { chmodSync, existsSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { createServer, type Server } from 'node:net';
import { release, tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { skipUnlessPresent } from '../../../test/support/required-in-ci.js';
import { isBerthError } from '../../errors.js';
import type { SandboxHandle } from '../driver.js';
import {
  describeSandboxDriverContract,
  hostProcessesMatching,
  microvmHostView,
} from '../driver-contract.test-suite.js';
import { createMicrovmDriver, type MicrovmDriver, WORKSPACE_DISK } from './microvm-driver.js';
import { MACHINE_NAME_PREFIX } from './qemu-machine.js';

// VMs of this test file keep their sockets here, so the tests can see that destroy removes them.
const runtimeDirectory = mkdtempSync(join(tmpdir(), 'berth-microvm-test-'));
afterAll(() => rmSync(runtimeDirectory, { recursive: true, force: true }));

describeSandboxDriverContract('microvm', {
  createDriver: () => createMicrovmDriver({ runtimeDirectory }),
  cleanup: (driver) => (driver as MicrovmDriver).destroyAll(),
  hostView: microvmHostView,
});

// BERTH_TEST_QEMU_PATH points the check at another QEMU: test/ci-requirements.test.ts names a
// missing one to show that CI fails rather than skips.
const availability = await createMicrovmDriver({
  runtimeDirectory,
  qemuPath: process.env.BERTH_TEST_QEMU_PATH || undefined,
}).checkAvailability();
const unavailableNote = availability.ok ? '' : ` (skipped: ${availability.reason})`;
const driverMissing = skipUnlessPresent(
  'the microvm sandbox driver',
  availability.ok ? undefined : availability.reason,
);

describe.skipIf(driverMissing)(`microvm sandbox isolation${unavailableNote}`, () => {
  let driver: MicrovmDriver;
  let scratch: string;
  let handle: SandboxHandle;

  beforeAll(async () => {
    driver = createMicrovmDriver({ runtimeDirectory });
    scratch = mkdtempSync(join(tmpdir(), 'berth-microvm-isolation-'));
    // A file already in the workdir is copied into the VM's disk and given to the sandbox user.
    writeFileSync(join(scratch, 'seed.txt'), 'from the host\n');
    handle = await driver.provision({ sessionId: 'sesn_isolation', workdir: scratch });
  });

  afterAll(async () => {
    await driver?.destroyAll();
    rmSync(scratch, { recursive: true, force: true });
  });

  it('runs its own kernel with no network device and none of the host files', async () => {
    const view = await driver.exec(handle, [
      'sh',
      '-c',
      `uname -r; ls /sys/class/net; ls ${JSON.stringify(scratch)} 2>&1 || true; cat /proc/1/cmdline | tr "\\0" " "`,
    ]);
    const [kernel, network, hostPath] = view.stdout.split('\n');
    expect(kernel).not.toBe(release());
    expect(network).toBe('lo');
    expect(hostPath).toContain('No such file or directory');
  });

  it('keeps the host workdir as one disk image, with files already there copied in', async () => {
    expect(readdirSync(scratch)).toEqual([WORKSPACE_DISK]);
    const view = await driver.exec(handle, ['sh', '-c', 'cat seed.txt; stat -c %u seed.txt']);
    expect(view.stdout).toBe('from the host\n1000\n');
  });

  it('kills a timed-out command and everything it started inside the VM, setsid children included', async () => {
    const marker = `sleep 47${Date.now() % 1000}.5`;
    const result = await driver.exec(handle, ['sh', '-c', `setsid ${marker} & ${marker} & ${marker}`], {
      timeoutMs: 500,
    });
    expect(result).toMatchObject({ timedOut: true, exitCode: null, signal: 'SIGKILL' });
    const left = await driver.exec(handle, ['sh', '-c', `ps -o args | grep -c "^${marker}" || true`]);
    expect(left.stdout).toBe('0\n');
  });

  it('keeps a background command running after exec returns, as a shell would', async () => {
    const started = Date.now();
    await driver.exec(handle, ['sh', '-c', 'sleep 300 >/dev/null 2>&1 & echo $! > /tmp/background.pid']);
    expect(Date.now() - started).toBeLessThan(5000);
    const alive = await driver.exec(handle, [
      'sh',
      '-c',
      'kill -0 "$(cat /tmp/background.pid)" && echo alive',
    ]);
    expect(alive.stdout).toBe('alive\n');
  });

  it('enforces the memory, process and disk limits inside the VM', async () => {
    const limited = await driver.provision({
      sessionId: 'sesn_limits',
      workdir: join(scratch, '..', `${scratch.split('/').pop()}-limited`),
      limits: { memoryMb: 256, pids: 16, diskMb: 64 },
    });
    try {
      expect(limited.enforcedLimits).toEqual({ cpu: 1, memoryMb: 256, pids: 16, diskMb: 64 });
      const disk = await driver.exec(limited, ['sh', '-c', 'fallocate -l 100M big || echo refused']);
      expect(disk.stdout).toBe('refused\n');
      expect(disk.stderr).toContain('No space left on device');
      const memory = await driver.exec(limited, ['sh', '-c', "free -m | awk '/Mem:/ {print $2}'"]);
      expect(Number(memory.stdout)).toBeLessThanOrEqual(256);
      const forks = await driver.exec(limited, [
        'sh',
        '-c',
        'n=0; for i in $(seq 40); do sleep 30 & n=$((n+1)); done 2>/dev/null; sleep 0.2; ps -o args | grep -c "^sleep 30"',
      ]);
      expect(Number(forks.stdout)).toBeLessThan(16);
    } finally {
      await driver.destroy(limited);
      rmSync(join(scratch, '..', `${scratch.split('/').pop()}-limited`), { recursive: true, force: true });
    }
  });

  it('refuses limits a VM cannot honour and read-only mounts with a typed error', async () => {
    const fractional = await driver
      .provision({ sessionId: 'sesn_cpu', workdir: join(scratch, 'never'), limits: { cpu: 0.5 } })
      .catch((error: unknown) => error);
    expect(isBerthError(fractional, 'sandbox_unavailable')).toBe(true);
    const mounts = await driver
      .provision({
        sessionId: 'sesn_mounts',
        workdir: join(scratch, 'never'),
        readOnlyMounts: [{ hostPath: '/usr', insidePath: '/opt/usr' }],
      })
      .catch((error: unknown) => error);
    expect(isBerthError(mounts, 'sandbox_unavailable')).toBe(true);
  });

  it('destroy leaves no QEMU process, socket or runtime file behind', async () => {
    const extra = await driver.provision({
      sessionId: 'sesn_destroy',
      workdir: join(scratch, '..', 'destroyed'),
    });
    const pid = driver.qemuPid(extra)!;
    expect(hostProcessesMatching(extra.id)).toContain(pid);
    await driver.destroy(extra);
    expect(hostProcessesMatching(extra.id)).toEqual([]);
    expect(readdirSync(runtimeDirectory).filter((name) => name.includes(extra.id))).toEqual([]);
    rmSync(join(scratch, '..', 'destroyed'), { recursive: true, force: true });
  });

  it('reapOrphans kills VMs of a dead server only', async () => {
    // A process whose command line carries the marker of a server that has exited.
    const dead = spawn('true');
    await new Promise((resolve) => dead.once('exit', resolve));
    const name = `${MACHINE_NAME_PREFIX}:owner-${dead.pid}:sbx_orphan${process.pid}`;
    const orphan = spawn(process.execPath, ['-e', 'setTimeout(() => {}, 60000)', '--', '-name', name], {
      stdio: 'ignore',
    });
    const orphanExited = new Promise((resolve) => orphan.once('exit', resolve));
    await expect.poll(() => hostProcessesMatching(name).length).toBe(1);
    mkdtempSync(join(runtimeDirectory, `${dead.pid}-`));
    expect(await driver.reapOrphans()).toBe(1);
    await orphanExited;
    expect(readdirSync(runtimeDirectory).filter((entry) => entry.startsWith(`${dead.pid}-`))).toEqual([]);
    // This server's own VM is untouched.
    expect((await driver.exec(handle, ['echo', 'still up'])).stdout).toBe('still up\n');
  });

  it('a resumed VM keeps its /tmp and runs on the current time, not the saved one', async () => {
    const source = await driver.provision({
      sessionId: 'sesn_clock',
      workdir: join(scratch, '..', 'clock-a'),
    });
    const saved = mkdtempSync(join(tmpdir(), 'berth-microvm-saved-'));
    try {
      await driver.exec(source, ['sh', '-c', 'echo kept > /tmp/kept']);
      await driver.suspend(source, saved);
      expect(existsSync(join(scratch, '..', 'clock-a'))).toBe(false);
      await new Promise((resolve) => setTimeout(resolve, 2000));
      const resumed = await driver.provision({
        sessionId: 'sesn_clock',
        workdir: join(scratch, '..', 'clock-b'),
        restoreFrom: saved,
      });
      const view = await driver.exec(resumed, ['sh', '-c', 'cat /tmp/kept; date +%s']);
      const [kept, seconds] = view.stdout.split('\n');
      expect(kept).toBe('kept');
      expect(Math.abs(Number(seconds) - Date.now() / 1000)).toBeLessThan(5);
      await driver.destroy(resumed);
    } finally {
      rmSync(saved, { recursive: true, force: true });
      rmSync(join(scratch, '..', 'clock-b'), { recursive: true, force: true });
    }
  });

  it('has one way out, 127.0.0.1:3128 to its egress socket, with bounded flow both ways and across resume', async () => {
    const servers: Server[] = [];
    /** Stands in for the session's egress proxy: answers `answer(request bytes)` once the client ends or sends a blank line. */
    const proxyIn = async (sandbox: SandboxHandle, respond: (received: number) => Buffer | string) => {
      expect(sandbox.servicesDirectory).toBeDefined();
      const path = join(sandbox.servicesDirectory!, 'egress.sock');
      const server = createServer((socket) => {
        let received = 0;
        let head = '';
        socket.on('data', (chunk: Buffer) => {
          received += chunk.length;
          if (head.length < 4096) head += chunk.toString('latin1');
          if (head.includes('\r\n\r\n') && head.startsWith('GET')) socket.end(respond(received));
        });
        socket.on('end', () => socket.end(respond(received)));
        socket.on('error', () => undefined);
      });
      await new Promise<void>((resolve) => server.listen(path, resolve));
      chmodSync(path, 0o666);
      servers.push(server);
    };
    const http = (body: Buffer | string) =>
      Buffer.concat([
        Buffer.from(`HTTP/1.1 200 OK\r\ncontent-length: ${body.length}\r\nconnection: close\r\n\r\n`),
        Buffer.from(body),
      ]);
    const shell = (sandbox: SandboxHandle, command: string) =>
      driver.exec(sandbox, ['sh', '-c', command], {
        env: { http_proxy: 'http://127.0.0.1:3128' },
        timeoutMs: 60_000,
      });
    const workdir = join(scratch, '..', 'egress-a');
    const saved = mkdtempSync(join(tmpdir(), 'berth-microvm-egress-'));
    try {
      const first = await driver.provision({ sessionId: 'sesn_egress', workdir });
      // Three megabytes down (more than the guest's credit of 256 KiB), two up (nc ends its side).
      await proxyIn(first, (received) =>
        received > 1000 ? `uploaded ${received}\n` : http(Buffer.alloc(3 << 20, 120)),
      );
      writeFileSync(join(first.servicesDirectory!, 'egress-ca.pem'), 'session CA\n');
      const view = await shell(
        first,
        [
          'wget -q -O - http://example.com/ | wc -c',
          'head -c 2000000 /dev/zero | nc 127.0.0.1 3128',
          'cat /run/berth/egress-ca.pem',
          // Nothing else: no other address, no name resolution, no host files.
          'nc -w 2 10.0.2.2 80 </dev/null 2>&1 || echo no-route',
          'nslookup example.com 2>&1 | tail -n 1',
          // The sandbox user can neither speak on the ports itself nor stop the relay.
          'echo "ports: $(ls /dev/vport* | wc -l)"',
          'for port in /dev/vport*; do echo x 2>/dev/null > "$port" && echo PORT-WRITTEN; done',
          'kill -9 $(pidof berth-agent) 2>/dev/null || echo relay-kept',
        ].join('; '),
      );
      const lines = view.stdout.split('\n');
      expect(lines.slice(0, 3)).toEqual(['3145728', 'uploaded 2000000', 'session CA']);
      expect(view.stdout).toContain('no-route');
      expect(view.stdout).toContain('ports: 2');
      expect(view.stdout).not.toContain('PORT-WRITTEN');
      expect(view.stdout).toContain('relay-kept');
      expect(view.stdout).not.toMatch(/Address: \d/);
      // The way out comes back with a resumed VM, to the new sandbox's own services directory.
      await driver.suspend(first, saved);
      const resumed = await driver.provision({
        sessionId: 'sesn_egress',
        workdir: join(scratch, '..', 'egress-b'),
        restoreFrom: saved,
      });
      expect(resumed.servicesDirectory).not.toBe(first.servicesDirectory);
      await proxyIn(resumed, () => http('second proxy'));
      expect((await shell(resumed, 'wget -q -O - http://example.com/')).stdout).toBe('second proxy');
      await driver.destroy(resumed);
    } finally {
      for (const server of servers) server.close();
      rmSync(saved, { recursive: true, force: true });
      for (const name of ['egress-a', 'egress-b'])
        rmSync(join(scratch, '..', name), { recursive: true, force: true });
    }
  }, 180_000);
});
