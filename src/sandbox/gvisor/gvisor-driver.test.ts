import { spawnSync } from 'node:child_process';
import { chmodSync, existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createServer, type Server } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { skipUnlessPresent } from '../../../test/support/required-in-ci.js';
import { sandboxCgroupName } from '../bwrap/cgroups.js';
import type { SandboxHandle } from '../driver.js';
import { describeSandboxDriverContract, gvisorHostView } from '../driver-contract.test-suite.js';
import { createGvisorDriver, type GvisorDriver } from './gvisor-driver.js';

describeSandboxDriverContract('gvisor', {
  createDriver: () => createGvisorDriver(),
  cleanup: (driver) => (driver as GvisorDriver).destroyAll(),
  hostView: gvisorHostView,
});

const availability = await createGvisorDriver().checkAvailability();
const unavailableNote = availability.ok ? '' : ` (skipped: ${availability.reason})`;
const driverMissing = skipUnlessPresent(
  'the gvisor sandbox driver',
  availability.ok ? undefined : availability.reason,
);

describe.skipIf(driverMissing)(`gvisor sandbox isolation${unavailableNote}`, () => {
  const canaryName = 'BERTH_TEST_CANARY';
  const canaryValue = `canary-${process.pid}-${Date.now()}`;
  let driver: GvisorDriver;
  let handle: SandboxHandle;
  let scratch: string;
  let server: Server;
  let port: number;
  let connections = 0;

  /** Runs a shell command in the shared sandbox. */
  const shell = (script: string, options?: Parameters<GvisorDriver['exec']>[2]) =>
    driver.exec(handle, ['sh', '-c', script], options);

  beforeAll(async () => {
    process.env[canaryName] = canaryValue;
    scratch = mkdtempSync(join(tmpdir(), 'berth-gvisor-test-'));
    server = createServer((socket) => {
      connections += 1;
      socket.end('hello from host\n');
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    port = (server.address() as { port: number }).port;
    driver = createGvisorDriver();
    handle = await driver.provision({ sessionId: 'sesn_gvisor', workdir: join(scratch, 'workspace') });
  });

  afterAll(async () => {
    delete process.env[canaryName];
    await driver?.destroyAll();
    await new Promise((resolve) => server?.close(resolve));
    rmSync(scratch, { recursive: true, force: true });
  });

  it("runs commands on gVisor's kernel, not the host's", async () => {
    const result = await shell('dmesg | head -n 1');
    expect(result.stdout).toContain('Starting gVisor');
  });

  it('runs as uid 1000 with no capabilities and without the server environment', async () => {
    const result = await shell(`id -u; grep CapEff /proc/self/status; echo "[$${canaryName}]"`);
    expect(result.stdout).toBe('1000\nCapEff:\t0000000000000000\n[]\n');
  });

  it('has only a loopback network: the host cannot be reached', async () => {
    const interfaces = await shell("tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '");
    expect(interfaces.stdout).toBe('lo\n');
    const connect = await driver.exec(
      handle,
      ['bash', '-c', `(exec 3<>/dev/tcp/127.0.0.1/${port}) 2>/dev/null && echo connected || echo refused`],
      { timeoutMs: 10_000 },
    );
    expect(connect.stdout).toBe('refused\n');
    expect(connections).toBe(0);
  });

  it('cannot write outside the workspace, /tmp and home', async () => {
    const result = await shell(
      'touch /usr/berth-test 2>/dev/null || echo refused; touch /etc/x 2>/dev/null || echo refused',
    );
    expect(result.stdout).toBe('refused\nrefused\n');
  });

  it('stops a fork bomb at the process limit without killing the sandbox', async () => {
    const limited = await driver.provision({
      sessionId: 'sesn_gvisor_pids',
      workdir: join(scratch, 'pids'),
      limits: { pids: 20 },
    });
    try {
      // The bomb's sleeps hold the whole budget until the command's timeout reaps them all.
      const bomb = await driver.exec(
        limited,
        ['sh', '-c', '(n=0; while [ $n -lt 40 ]; do sleep 30 & n=$((n+1)); done); exec sleep 30'],
        { timeoutMs: 3000 },
      );
      expect(bomb.stderr).toMatch(/Resource temporarily unavailable|Cannot fork/);
      expect(bomb.timedOut).toBe(true);
      expect((await driver.exec(limited, ['echo', 'survived'])).stdout).toBe('survived\n');
    } finally {
      await driver.destroy(limited);
    }
  });

  it('kills what a timed-out command left running inside the sandbox', async () => {
    const result = await shell('setsid sleep 1234.5 & sleep 1234.5', { timeoutMs: 500 });
    expect(result.timedOut).toBe(true);
    const view = await shell('ps -eo args | grep -c "^sleep 1234.5" || true');
    expect(view.stdout).toBe('0\n');
  });

  it('kill of a spawned process also ends what it started inside the sandbox', async () => {
    const spawned = driver.spawn(handle, ['sh', '-c', 'sleep 5678 & echo started; exec cat']);
    await new Promise((resolve) => spawned.stdout.once('data', resolve));
    spawned.kill();
    expect((await spawned.exited).exitCode).toBeNull();
    await expect
      .poll(async () => (await shell('ps -eo args | grep -c "^sleep 5678" || true')).stdout, {
        timeout: 5000,
      })
      .toBe('0\n');
  });

  it('keeps background processes between commands until destroy', async () => {
    await shell('sleep 4321 >/dev/null 2>&1 &');
    const view = await shell('ps -eo args | grep -c "^sleep 4321"');
    expect(view.stdout).toBe('1\n');
  });

  it('resolves workspace symlinks inside the sandbox, never to host files', async () => {
    const secret = join(scratch, 'secret.txt');
    writeFileSync(secret, 'host secret\n');
    await shell(`ln -sf ${secret} escape`);
    const failure = await driver.readFile(handle, 'escape').catch((error: unknown) => error);
    expect(failure).toBeInstanceOf(Error);
  });

  it('keeps its one way out, 127.0.0.1:3128 to the egress socket, across suspend and resume', async () => {
    const workdir = join(scratch, 'egress-workspace');
    /** Stands in for the session's egress proxy in a sandbox's services directory. */
    const proxyIn = async (sandbox: SandboxHandle, answer: string) => {
      expect(sandbox.servicesDirectory).toBeDefined();
      const path = join(sandbox.servicesDirectory!, 'egress.sock');
      // It reads what it is sent (an unread socket never sees the client's end, so never closes).
      const proxy = createServer((socket) =>
        socket.resume().end(`HTTP/1.1 200 OK\r\ncontent-length: ${answer.length}\r\n\r\n${answer}`),
      );
      await new Promise<void>((resolve) => proxy.listen(path, resolve));
      chmodSync(path, 0o666);
      return proxy;
    };
    const viaProxy = (sandbox: SandboxHandle) =>
      driver.exec(sandbox, ['curl', '-sS', '--max-time', '10', 'http://example.com/'], {
        env: { http_proxy: 'http://127.0.0.1:3128' },
      });
    const first = await driver.provision({ sessionId: 'sesn_gvisor_egress', workdir });
    const before = await proxyIn(first, 'first proxy');
    expect((await viaProxy(first)).stdout).toBe('first proxy');
    const suspended = join(scratch, 'egress-suspended');
    expect((await driver.suspend(first, suspended)).memory).toBe(true);
    await new Promise((resolve) => before.close(resolve));
    const resumed = await driver.provision({
      sessionId: 'sesn_gvisor_egress',
      workdir,
      restoreFrom: suspended,
    });
    // A restored sandbox has a new services directory; its relay (restored with it) reaches that.
    expect(resumed.servicesDirectory).not.toBe(first.servicesDirectory);
    const after = await proxyIn(resumed, 'second proxy');
    try {
      expect((await viaProxy(resumed)).stdout).toBe('second proxy');
    } finally {
      await driver.destroy(resumed);
      await new Promise((resolve) => after.close(resolve));
    }
  }, 60_000);

  it("reaps a dead server's services directories and leaves a live one's", async () => {
    const stateDirectory = join(scratch, 'reap-state');
    const servicesDirectory = join(scratch, 'reap-services');
    mkdirSync(join(stateDirectory, 'runsc'), { recursive: true });
    // A pid that has exited (its start time cannot match) and this live process.
    const exited = spawnSync('true').pid;
    const dead = join(servicesDirectory, `sbx_dead.${exited}.1`);
    const live = join(servicesDirectory, sandboxCgroupName('sbx_live'));
    for (const directory of [dead, live]) mkdirSync(directory, { recursive: true });
    writeFileSync(join(dead, 'egress-ca.pem'), 'left behind');
    await createGvisorDriver({ stateDirectory, servicesDirectory }).reapOrphans();
    expect(existsSync(dead)).toBe(false);
    expect(existsSync(live)).toBe(true);
  });
});
