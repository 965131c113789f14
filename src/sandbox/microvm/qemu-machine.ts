/**
 * One QEMU `microvm` process: a fixed device set (one vCPU per core of the limit, RAM, the
 * workspace disk on virtio-blk, the agent's virtio-serial port, the egress port (connections to
 * the session's egress proxy, see `egress-relay.ts`), a serial console to a log file, and no
 * network device at all), booted from a kernel or resumed from a migration file, and
 * saved to one with QMP `migrate`. The device set and its order never vary with anything but
 * `MachineConfig`, because a migration file only loads into an identical machine.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { BerthError } from '../../errors.js';
import type { GuestImage } from './guest-image.js';
import { connectQmp, type QmpClient } from './qmp-client.js';

/** Everything that must match between a saved VM and the QEMU that loads it. */
export interface MachineConfig {
  accelerator: 'kvm' | 'tcg';
  memoryMb: number;
  cpus: number;
  diskMb: number;
  /** The guest image build (`GuestImage.key`). */
  imageKey: string;
}

/**
 * Marks a QEMU command line as Berth's (`-name berth-microvm:owner-<server pid>:<sandbox id>`);
 * the owner pid lets `reapOrphans` find a dead server's VMs.
 */
export const MACHINE_NAME_PREFIX = 'berth-microvm';

export interface StartMachineOptions {
  qemuPath: string;
  /** `setpriv`, to give QEMU a parent-death signal (absent: QEMU outlives a killed server until reaped). */
  setprivPath?: string;
  image: GuestImage;
  config: MachineConfig;
  /** Holds the QMP and agent sockets and the console log (short path: unix sockets max 108 bytes). */
  runtimeDirectory: string;
  diskPath: string;
  /** Sandbox id, written into the command line with the owning server's pid. */
  sandboxId: string;
  /** A migration file to resume from instead of booting. */
  incomingPath?: string;
  /** Kernel command line additions (e.g. the TSC rate under TCG). */
  kernelArguments?: readonly string[];
}

/** Escapes a value for QEMU's `key=value,...` option syntax (a comma is written twice). */
function optionValue(text: string): string {
  return text.replaceAll(',', ',,');
}

/** Quotes a path for the /bin/sh that QEMU runs `exec:` migration commands with. */
function shellQuote(text: string): string {
  return `'${text.replaceAll("'", `'\\''`)}'`;
}

/** The TSC rate of this host in kHz, from /proc/cpuinfo (TCG guests cannot calibrate it reliably). */
export function hostTscKhz(): number | undefined {
  try {
    const megahertz = /^cpu MHz\s*:\s*([\d.]+)/m.exec(readFileSync('/proc/cpuinfo', 'utf8'))?.[1];
    return megahertz ? Math.round(Number(megahertz) * 1000) : undefined;
  } catch {
    return undefined;
  }
}

/** A running (or resuming) QEMU. */
export class QemuMachine {
  readonly agentSocketPath: string;
  /** QEMU's socket for the guest's egress port (`egress-relay.ts` connects to it). */
  readonly egressSocketPath: string;
  readonly #process: ChildProcess;
  readonly exited: Promise<void>;
  #qmp: QmpClient | undefined;
  #stderr = '';
  #gone = false;

  private constructor(child: ChildProcess, agentSocketPath: string, egressSocketPath: string) {
    this.#process = child;
    this.agentSocketPath = agentSocketPath;
    this.egressSocketPath = egressSocketPath;
    child.stderr?.setEncoding('utf8');
    child.stderr?.on('data', (chunk: string) => {
      if (this.#stderr.length < 8192) this.#stderr += chunk;
    });
    this.exited = new Promise<void>((resolve) => {
      child.once('exit', () => {
        this.#gone = true;
        this.#qmp?.close();
        resolve();
      });
      child.once('error', (error) => {
        this.#stderr += error.message;
        this.#gone = true;
        resolve();
      });
    });
  }

  /** Host pid of the QEMU process (what `stats` reads). */
  get pid(): number | undefined {
    return this.#process.pid;
  }

  get running(): boolean {
    return !this.#gone;
  }

  /** What QEMU wrote to stderr (its error messages). */
  get stderr(): string {
    return this.#stderr.trim();
  }

  /**
   * Starts QEMU. Resolves once QMP answers and, when resuming, once the migration file is
   * loaded and the guest runs again (so the caller may delete the file).
   */
  static async start(options: StartMachineOptions): Promise<QemuMachine> {
    const { config, runtimeDirectory } = options;
    const qmpPath = join(runtimeDirectory, 'qmp.sock');
    const agentPath = join(runtimeDirectory, 'agent.sock');
    const egressPath = join(runtimeDirectory, 'egress-port.sock');
    const kernelArguments = [
      'console=ttyS0',
      'quiet',
      'panic=-1',
      'rdinit=/init',
      // Freed pages (the unpacked initramfs archive, boot-time buffers) are zeroed, and zero pages
      // cost nothing in a saved VM: the template file shrinks and restores faster.
      'init_on_free=1',
      ...(options.kernelArguments ?? []),
    ];
    const qemuArguments = [
      '-name',
      `${MACHINE_NAME_PREFIX}:owner-${process.pid}:${options.sandboxId}`,
      '-M',
      'microvm',
      '-accel',
      // TCG's translation cache defaults to 1 GiB per VM; bound it (it grows only as code runs).
      config.accelerator === 'tcg' ? 'tcg,tb-size=256' : 'kvm',
      ...(config.accelerator === 'kvm' ? ['-cpu', 'host'] : []),
      '-m',
      String(config.memoryMb),
      '-smp',
      String(config.cpus),
      '-nodefaults',
      '-no-user-config',
      '-display',
      'none',
      '-no-reboot',
      // Seccomp: no obsolete syscalls, no privilege changes, no host resource control. Spawning
      // stays allowed because `exec:` migration runs `cat`.
      '-sandbox',
      'on,obsolete=deny,elevateprivileges=deny,resourcecontrol=deny',
      '-serial',
      `file:${optionValue(join(runtimeDirectory, 'console.log'))}`,
      '-kernel',
      options.image.kernelPath,
      '-initrd',
      options.image.initramfsPath,
      '-append',
      kernelArguments.join(' '),
      '-drive',
      `id=workspace,file=${optionValue(options.diskPath)},format=raw,if=none,cache=writeback,discard=unmap`,
      '-device',
      'virtio-blk-device,drive=workspace',
      '-device',
      'virtio-serial-device,max_ports=3',
      '-chardev',
      `socket,id=agent,path=${optionValue(agentPath)},server=on,wait=off`,
      '-device',
      'virtserialport,chardev=agent,name=berth.agent',
      '-chardev',
      `socket,id=egress,path=${optionValue(egressPath)},server=on,wait=off`,
      '-device',
      'virtserialport,chardev=egress,name=berth.egress',
      '-qmp',
      `unix:${optionValue(qmpPath)},server=on,wait=off`,
      ...(options.incomingPath ? ['-incoming', `exec:cat ${shellQuote(options.incomingPath)}`] : []),
    ];
    const [command, args] = options.setprivPath
      ? [options.setprivPath, ['--pdeathsig', 'SIGKILL', '--', options.qemuPath, ...qemuArguments]]
      : [options.qemuPath, qemuArguments];
    const child = spawn(command, args, {
      stdio: ['ignore', 'ignore', 'pipe'],
      env: { PATH: '/usr/bin:/bin' },
    });
    const machine = new QemuMachine(child, agentPath, egressPath);
    try {
      machine.#qmp = await machine.#connectQmp(qmpPath, 10_000);
      if (options.incomingPath) {
        // A VM saved paused (as `saveTo` does) loads paused; then it must be continued.
        const status = await machine.#waitForStatus(['running', 'paused', 'postmigrate'], 60_000);
        if (status !== 'running') await machine.#qmp.execute('cont');
      }
    } catch (error) {
      await machine.kill();
      throw new BerthError(
        'sandbox_failed',
        `QEMU could not ${options.incomingPath ? 'resume' : 'start'} the VM: ${machine.stderr || (error as Error).message}`,
        { retryable: true, cause: error },
      );
    }
    return machine;
  }

  async #connectQmp(path: string, timeoutMs: number): Promise<QmpClient> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      if (this.#gone) throw new Error('QEMU exited');
      try {
        return await connectQmp(path);
      } catch (error) {
        if (Date.now() > deadline) throw error;
        await new Promise((resolve) => setTimeout(resolve, 10));
      }
    }
  }

  /** Polls until the VM's run state is one of `wanted` (after an incoming migration: never 'inmigrate'). */
  async #waitForStatus(wanted: readonly string[], timeoutMs: number): Promise<string> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      if (this.#gone) throw new Error('QEMU exited');
      const { status } = await this.#qmp!.execute<{ status: string }>('query-status');
      if (wanted.includes(status)) return status;
      if (status === 'shutdown' || status === 'internal-error' || status === 'guest-panicked') {
        throw new Error(`the VM is in state ${status}`);
      }
      if (Date.now() > deadline) throw new Error(`the VM did not resume (it is ${status})`);
      await new Promise((resolve) => setTimeout(resolve, 5));
    }
  }

  /**
   * Pauses the VM and writes its whole state (CPU, devices, RAM) to `path`, then ends QEMU.
   * The disk image is flushed first, so image and memory file form one consistent pair.
   */
  async saveTo(path: string): Promise<void> {
    const qmp = this.#qmp;
    if (!qmp || this.#gone)
      throw new BerthError('sandbox_failed', 'the VM is not running', { retryable: true });
    try {
      await qmp.execute('stop');
      // The default (32 MiB/s) is for live migration over a network; this is a local file.
      await qmp.execute('migrate-set-parameters', { 'max-bandwidth': 64 * 1024 * 1024 * 1024 });
      await qmp.execute('migrate', { uri: `exec:cat > ${shellQuote(path)}` });
      for (;;) {
        const state = await qmp.execute<{ status?: string; 'error-desc'?: string }>('query-migrate');
        if (state.status === 'completed') break;
        if (state.status === 'failed' || state.status === 'cancelled') {
          throw new Error(state['error-desc'] ?? `migration ${state.status}`);
        }
        await new Promise((resolve) => setTimeout(resolve, 5));
      }
    } catch (error) {
      await this.kill();
      throw new BerthError('sandbox_failed', `could not save the VM: ${(error as Error).message}`, {
        retryable: true,
        cause: error,
      });
    }
    await this.kill();
  }

  /** Ends QEMU (SIGKILL: nothing inside needs a clean shutdown) and waits until it is gone. */
  async kill(): Promise<void> {
    if (!this.#gone) {
      try {
        this.#process.kill('SIGKILL');
      } catch {
        // Already gone.
      }
    }
    this.#qmp?.close();
    await this.exited;
  }
}
