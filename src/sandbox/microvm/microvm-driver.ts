/**
 * The microvm driver: each sandbox is its own QEMU `microvm` virtual machine with its own
 * kernel. The guest holds nothing of the host: a busybox userland in an initramfs, the
 * workspace on a virtio-blk ext4 image (the only thing kept on the host, as
 * `<workdir>/workspace.ext4`), a tmpfs /tmp, no network device. A static agent inside
 * (`../agent/berth-agent.c`) runs commands as uid 1000 and speaks a small framed protocol over a
 * virtio-serial port that QEMU exposes as a unix socket.
 *
 * Cold start is a restore, not a boot: per machine shape (accelerator, RAM, vCPUs, disk size,
 * guest build) the driver boots one template VM once, saves it with QMP `migrate`, and starts
 * every new sandbox by loading that file (`-incoming`); the agent then gets a fresh clock and
 * entropy and mounts the sandbox's own disk. `suspend` saves a live VM the same way next to its
 * disk image, so processes, /tmp and memory survive a stop.
 *
 * KVM is used when it can actually boot the guest (probed once and remembered); otherwise QEMU
 * emulates the CPU (TCG), which still isolates by a separate kernel and an emulated machine but
 * is several times slower, and `checkAvailability` warns.
 */
import { execFile } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { constants, existsSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { access, mkdir, open, readdir, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import { release, tmpdir } from 'node:os';
import { basename, dirname, join, posix } from 'node:path';
import { promisify } from 'node:util';
import { BerthError } from '../../errors.js';
import { newId } from '../../ids.js';
import { type AgentCommandResult, runOnAgent, spawnOnAgent } from '../agent/agent-commands.js';
import { AgentConnection } from '../agent/agent-connection.js';
import { EGRESS_SOCKET_NAME, SANDBOX_SERVICES_INSIDE } from '../bwrap/bwrap-driver.js';
import {
  DEFAULT_SANDBOX_LIMITS,
  type DriverAvailability,
  type EnforcedLimits,
  type ExecOptions,
  type ExecResult,
  type SandboxDriver,
  type SandboxHandle,
  type SandboxProcess,
  type SandboxSpawnOptions,
  type SandboxSpec,
  type SandboxStats,
} from '../driver.js';
import {
  execResultOf,
  findExecutable,
  pathInside,
  sandboxFiles,
  validateArgv,
  validateEnvironment,
} from '../driver-support.js';
import { moveTree, restoreWorkspace, SUSPENDED_WORKSPACE } from '../workspace-move.js';
import { EgressRelay } from './egress-relay.js';
import {
  defaultMicrovmCacheDirectory,
  ensureGuestImage,
  GUEST_HOME,
  GUEST_PATH,
  GUEST_SANDBOX_UID,
  type GuestImage,
} from './guest-image.js';
import { hostTscKhz, MACHINE_NAME_PREFIX, type MachineConfig, QemuMachine } from './qemu-machine.js';

const run = promisify(execFile);

/** Where the workspace appears inside every microvm sandbox. */
export const MICROVM_WORKDIR_INSIDE = '/workspace';

/** A path inside this driver's sandboxes (relative ones from the working directory). */
const inside = (path: string) => pathInside(MICROVM_WORKDIR_INSIDE, path);
/** The workspace disk image inside the session's host workdir. */
export const WORKSPACE_DISK = 'workspace.ext4';
/** In a suspend directory: the saved VM and the machine it needs. */
const MEMORY_FILE = 'memory.state';
const MACHINE_FILE = 'microvm.json';
const MINIMUM_MEMORY_MB = 128;
/** A KVM guest boots in about a second; one that has not answered by now never will. */
const KVM_PROBE_TIMEOUT_MS = 15_000;
const TCG_BOOT_TIMEOUT_MS = 120_000;
/** After a restore, how long the agent may take to answer (mounting the disk included). */
const AGENT_READY_TIMEOUT_MS = 30_000;

/** Options for `createMicrovmDriver`; every field has a working default. */
export interface MicrovmDriverOptions {
  /** Path to qemu-system-x86_64 (default: looked up on PATH). */
  qemuPath?: string;
  /** Kernels, guest images, templates (default `~/.cache/berth/microvm`). */
  cacheDirectory?: string;
  /** Per-VM sockets and console logs (default `<tmpdir>/berth-microvm`). */
  runtimeDirectory?: string;
  /** `auto` (default) uses KVM when it boots the guest here, else TCG. */
  accelerator?: 'auto' | 'kvm' | 'tcg';
  /** Workspace disk size when the spec sets no `diskMb` (default `DEFAULT_SANDBOX_LIMITS.diskMb`; sparse on the host). */
  diskMb?: number;
  /** Progress of the one-time guest build and template boots. */
  onProgress?: (message: string) => void;
}

/** The microvm driver, plus shutdown the supervisor and tests need. */
export interface MicrovmDriver extends SandboxDriver {
  spawn(handle: SandboxHandle, argv: readonly string[], options?: SandboxSpawnOptions): SandboxProcess;
  stats(handle: SandboxHandle): Promise<SandboxStats>;
  reapOrphans(): Promise<number>;
  /** Destroys every sandbox this driver still runs (for server shutdown). */
  destroyAll(): Promise<void>;
  /** Host pid of a sandbox's QEMU, for tests and diagnostics. */
  qemuPid(handle: SandboxHandle): number | undefined;
}

/** What the driver found out about the host once (binaries, guest image, accelerator). */
interface Host {
  qemuPath: string;
  setprivPath: string | undefined;
  image: GuestImage;
  accelerator: 'kvm' | 'tcg';
  /** Why not KVM, when TCG. */
  acceleratorNote?: string;
  kernelArguments: string[];
}

interface LiveSandbox {
  handle: SandboxHandle;
  spec: SandboxSpec;
  config: MachineConfig;
  pids: number;
  machine: QemuMachine;
  agent: AgentConnection;
  /** Relays the guest's egress port to the services directory's proxy socket. */
  egress: EgressRelay;
  runtimeDirectory: string;
  stopped: boolean;
  /** The services directory's files as last copied into the guest (name → size and mtime). */
  servicesCopied: Map<string, string>;
  /** The copy in progress, so concurrent commands wait for one copy. */
  servicesCopy?: Promise<void>;
}

/** What `suspend` writes beside the memory file, so a restore starts an identical machine. */
interface SavedMachine {
  version: 1;
  config: MachineConfig;
  pids: number;
}

/** Inside paths a read-only mount may not cover or sit under (the sandbox's own mounts). */
const RESERVED_INSIDE_PATHS = ['/proc', '/dev', '/sys', '/tmp', MICROVM_WORKDIR_INSIDE, GUEST_HOME];

/**
 * Rejects malformed read-only mounts as bwrap does, then refuses valid ones: a 9p share would
 * block migration (suspend and the template restore), so this driver has none.
 */
function refuseReadOnlyMounts(spec: SandboxSpec): void {
  const mounts = spec.readOnlyMounts ?? [];
  for (const { hostPath, insidePath: inside } of mounts) {
    for (const path of [hostPath, inside]) {
      if (!path.startsWith('/') || path.includes('\0') || posix.normalize(path) !== path) {
        throw new BerthError('invalid_request', `read-only mount paths must be absolute and normal: ${path}`);
      }
    }
    const reserved = RESERVED_INSIDE_PATHS.find(
      (prefix) => inside === prefix || inside.startsWith(`${prefix}/`) || prefix.startsWith(`${inside}/`),
    );
    if (inside === '/' || reserved !== undefined) {
      throw new BerthError('invalid_request', `read-only mount cannot be placed at ${inside}`);
    }
  }
  if (mounts.length > 0) {
    throw new BerthError(
      'sandbox_unavailable',
      'the microvm driver cannot show host directories read-only inside a VM (a shared filesystem would prevent suspending it); use the bwrap or gvisor driver for environments with read-only mounts',
    );
  }
}

/** The limits a spec asks for with defaults filled in; refuses what a VM cannot enforce. */
function resolveLimits(spec: SandboxSpec, defaultDiskMb: number): Required<EnforcedLimits> {
  const requested = spec.limits ?? {};
  for (const [name, value] of Object.entries(requested)) {
    if (value !== undefined && !(Number.isFinite(value) && value > 0)) {
      throw new BerthError(
        'invalid_request',
        `sandbox limit ${name} must be a positive number, got ${value}`,
      );
    }
  }
  const cpu = requested.cpu ?? DEFAULT_SANDBOX_LIMITS.cpu;
  if (!Number.isInteger(cpu)) {
    throw new BerthError(
      'sandbox_unavailable',
      `the microvm driver gives a sandbox whole virtual CPUs and cannot enforce cpu ${cpu}; use a whole number`,
    );
  }
  const memoryMb = Math.ceil(requested.memoryMb ?? DEFAULT_SANDBOX_LIMITS.memoryMb);
  if (memoryMb < MINIMUM_MEMORY_MB) {
    throw new BerthError(
      'invalid_request',
      `a microvm sandbox needs at least ${MINIMUM_MEMORY_MB} MB of memory`,
    );
  }
  return {
    cpu,
    memoryMb,
    pids: Math.floor(requested.pids ?? DEFAULT_SANDBOX_LIMITS.pids),
    diskMb: Math.ceil(requested.diskMb ?? defaultDiskMb),
  };
}

function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** A short stable name for a machine shape (templates are stored under it). */
function templateName(config: MachineConfig): string {
  return `${config.accelerator}-${config.memoryMb}m-${config.cpus}c-${config.diskMb}d-${config.imageKey}`;
}

/** Creates the microvm driver. `checkAvailability()` builds the guest and boots the first template. */
export function createMicrovmDriver(options: MicrovmDriverOptions = {}): MicrovmDriver {
  const cacheDirectory = options.cacheDirectory ?? defaultMicrovmCacheDirectory();
  const runtimeRoot = options.runtimeDirectory ?? join(tmpdir(), 'berth-microvm');
  const defaultDiskMb = options.diskMb ?? DEFAULT_SANDBOX_LIMITS.diskMb;
  const progress = options.onProgress ?? (() => undefined);
  const sandboxes = new Map<string, LiveSandbox>();
  const templates = new Map<string, Promise<string>>();
  let host: Promise<Host> | undefined;

  /** Creates a sparse ext4 image; `seedFrom` copies a directory's files onto it. */
  const createDisk = async (path: string, diskMb: number, seedFrom?: string): Promise<void> => {
    const file = await open(path, 'w', 0o600);
    await file.truncate(diskMb * 1024 * 1024);
    await file.close();
    // Found where the availability check found it (also in /usr/sbin when PATH lacks it).
    await run(findExecutable('mkfs.ext4') ?? 'mkfs.ext4', [
      '-q',
      '-F',
      '-L',
      'workspace',
      '-m',
      '0',
      '-E',
      `root_owner=${GUEST_SANDBOX_UID}:${GUEST_SANDBOX_UID},lazy_itable_init=1,lazy_journal_init=1`,
      ...(seedFrom ? ['-d', seedFrom] : []),
      path,
    ]).catch((error: unknown) => {
      throw new BerthError('sandbox_failed', `cannot create the workspace disk: ${String(error)}`, {
        cause: error,
      });
    });
  };

  /** A fresh runtime directory for one VM, named after the owning server so orphans are found. */
  const newRuntimeDirectory = async (sandboxId: string): Promise<string> => {
    await mkdir(runtimeRoot, { recursive: true, mode: 0o700 });
    const directory = join(runtimeRoot, `${process.pid}-${sandboxId}`);
    await mkdir(directory, { mode: 0o700 });
    return directory;
  };

  /**
   * Boots a VM from the kernel, waits for its agent, saves it and returns the file. With
   * `timeoutMs` short it doubles as the KVM probe (a guest that cannot boot never answers).
   */
  const bootAndSave = async (
    found: Omit<Host, 'accelerator'>,
    config: MachineConfig,
    destination: string,
    timeoutMs: number,
  ): Promise<void> => {
    const id = newId('sbx');
    const runtimeDirectory = await newRuntimeDirectory(id);
    const diskPath = join(runtimeDirectory, 'template.ext4');
    let machine: QemuMachine | undefined;
    let agent: AgentConnection | undefined;
    try {
      // The template's disk is never mounted; only its size must match the sandboxes' disks.
      await createDisk(diskPath, config.diskMb);
      machine = await QemuMachine.start({
        qemuPath: found.qemuPath,
        setprivPath: found.setprivPath,
        image: found.image,
        config,
        runtimeDirectory,
        diskPath,
        sandboxId: id,
        kernelArguments: config.accelerator === 'tcg' ? found.kernelArguments : [],
      });
      agent = await AgentConnection.connect(machine.agentSocketPath, 10_000);
      const booted = machine;
      await Promise.race([
        agent.init({ pids: 0, mountWorkspace: false, chownWorkspace: false }, randomBytes(32), timeoutMs),
        booted.exited.then(() => {
          throw new Error(`QEMU exited while booting: ${booted.stderr}`);
        }),
      ]);
      const temporary = `${destination}.${process.pid}.tmp`;
      await machine.saveTo(temporary);
      await rename(temporary, destination);
    } finally {
      agent?.close();
      await machine?.kill();
      await rm(runtimeDirectory, { recursive: true, force: true });
    }
  };

  /** The saved template for a machine shape, booting it once if there is none yet. */
  const ensureTemplate = (found: Omit<Host, 'accelerator'>, config: MachineConfig): Promise<string> => {
    const name = templateName(config);
    let pending = templates.get(name);
    if (!pending) {
      pending = (async () => {
        const directory = join(cacheDirectory, 'templates', name);
        const memoryPath = join(directory, MEMORY_FILE);
        if (existsSync(memoryPath)) return memoryPath;
        await mkdir(directory, { recursive: true });
        const failed = (error: unknown) =>
          rm(directory, { recursive: true, force: true }).then(() => Promise.reject(error));
        progress(
          `booting a ${config.accelerator} template VM (${name}); new sandboxes of this shape restore from it`,
        );
        const started = performance.now();
        await bootAndSave(
          found,
          config,
          memoryPath,
          config.accelerator === 'kvm' ? KVM_PROBE_TIMEOUT_MS : TCG_BOOT_TIMEOUT_MS,
        ).catch(failed);
        progress(`template ${name} ready in ${Math.round(performance.now() - started)} ms`);
        return memoryPath;
      })();
      templates.set(name, pending);
      pending.catch(() => templates.delete(name));
    }
    return pending;
  };

  const defaultConfig = (found: Omit<Host, 'accelerator'>, accelerator: 'kvm' | 'tcg'): MachineConfig => ({
    accelerator,
    memoryMb: DEFAULT_SANDBOX_LIMITS.memoryMb,
    cpus: DEFAULT_SANDBOX_LIMITS.cpu,
    diskMb: defaultDiskMb,
    imageKey: found.image.key,
  });

  /**
   * Decides between KVM and TCG. KVM counts only if a guest really boots under it: on nested
   * hypervisors /dev/kvm may open fine and still hang every stock kernel. The verdict is kept in
   * the cache, keyed by host kernel, QEMU and guest build, so the probe runs once per host.
   */
  const chooseAccelerator = async (
    found: Omit<Host, 'accelerator'>,
    qemuVersion: string,
  ): Promise<{ accelerator: 'kvm' | 'tcg'; note?: string }> => {
    if (options.accelerator === 'kvm' || options.accelerator === 'tcg') {
      return {
        accelerator: options.accelerator,
        note: options.accelerator === 'tcg' ? 'TCG was chosen in the driver options' : undefined,
      };
    }
    try {
      await access('/dev/kvm', constants.R_OK | constants.W_OK);
    } catch {
      return { accelerator: 'tcg', note: '/dev/kvm is missing or not accessible to this user' };
    }
    const verdictPath = join(cacheDirectory, 'accelerator.json');
    const key = `${release()}|${qemuVersion}|${found.image.key}`;
    try {
      const verdict = JSON.parse(await readFile(verdictPath, 'utf8')) as {
        key: string;
        accelerator: 'kvm' | 'tcg';
        note?: string;
      };
      if (verdict.key === key) return verdict;
    } catch {
      // No verdict yet.
    }
    progress('probing KVM: booting the guest under KVM');
    let verdict: { key: string; accelerator: 'kvm' | 'tcg'; note?: string };
    try {
      await ensureTemplate(found, defaultConfig(found, 'kvm'));
      verdict = { key, accelerator: 'kvm' };
    } catch (error) {
      const message = (error as Error).message;
      verdict = {
        key,
        accelerator: 'tcg',
        note: `/dev/kvm is present but the guest did not boot under it (${message.slice(0, 300)}); nested virtualization that stock kernels cannot run on?`,
      };
      // Remember only a guest that never answered; any other failure may be passing.
      if (!/did not answer|kvm/i.test(message)) return verdict;
    }
    await writeFile(verdictPath, JSON.stringify(verdict));
    return verdict;
  };

  /** Finds binaries, builds the guest and picks the accelerator, once per driver. */
  const prepareHost = (): Promise<Host> => {
    host ??= (async (): Promise<Host> => {
      const qemuPath = options.qemuPath ?? findExecutable('qemu-system-x86_64');
      if (!qemuPath) {
        throw new BerthError(
          'sandbox_unavailable',
          'QEMU is not installed; install it with `apt-get install qemu-system-x86 busybox-static e2fsprogs gcc libc6-dev`',
        );
      }
      if (!findExecutable('mkfs.ext4')) {
        throw new BerthError(
          'sandbox_unavailable',
          'mkfs.ext4 is missing; install it with `apt-get install e2fsprogs`',
        );
      }
      const version = await run(qemuPath, ['--version']).catch((error: unknown) => {
        throw new BerthError('sandbox_unavailable', `cannot run ${qemuPath}: ${String(error)}`, {
          cause: error,
        });
      });
      const image = await ensureGuestImage({ cacheDirectory, onProgress: progress });
      const tscKhz = hostTscKhz();
      // Under TCG the guest cannot calibrate its TSC against the emulated PIT reliably (and then
      // hangs); the emulated TSC runs at the host's rate, so tell the guest that rate.
      const kernelArguments = tscKhz ? [`tsc_early_khz=${tscKhz}`, 'tsc=reliable', 'no_timer_check'] : [];
      const found = {
        qemuPath,
        setprivPath: findExecutable('setpriv'),
        // Templates depend on the kernel command line too.
        image: {
          ...image,
          key: createHash('sha256')
            .update(`${image.key}|${kernelArguments.join(' ')}`)
            .digest('hex')
            .slice(0, 16),
        },
        kernelArguments,
      };
      // Templates of older guest builds can never be used again.
      const templatesDirectory = join(cacheDirectory, 'templates');
      for (const name of await readdir(templatesDirectory).catch(() => [] as string[])) {
        if (!name.endsWith(`-${found.image.key}`))
          await rm(join(templatesDirectory, name), { recursive: true, force: true });
      }
      const { accelerator, note } = await chooseAccelerator(found, version.stdout.split('\n')[0] ?? '');
      return { ...found, accelerator, acceleratorNote: note };
    })();
    host.catch(() => {
      host = undefined;
    });
    return host;
  };

  /**
   * Makes sure `<workdir>/workspace.ext4` exists and returns its size. A workdir with other
   * files (and no image yet) has them copied onto a new image, then removed from the host, so
   * there is one copy of the workspace.
   */
  const prepareWorkspaceDisk = async (
    workdir: string,
    diskMb: number,
  ): Promise<{ diskMb: number; imported: boolean }> => {
    await mkdir(workdir, { recursive: true });
    if (!(await stat(workdir)).isDirectory()) {
      throw new BerthError('invalid_request', `sandbox workdir is not a directory: ${workdir}`);
    }
    const diskPath = join(workdir, WORKSPACE_DISK);
    const existing = await stat(diskPath).catch(() => undefined);
    if (existing) return { diskMb: Math.round(existing.size / (1024 * 1024)), imported: false };
    const entries = await readdir(workdir);
    if (entries.length === 0) {
      await createDisk(diskPath, diskMb);
      return { diskMb, imported: false };
    }
    const staging = join(dirname(workdir), `.${basename(workdir)}.${process.pid}.ext4`);
    try {
      await createDisk(staging, diskMb, workdir);
      for (const entry of entries) await rm(join(workdir, entry), { recursive: true, force: true });
      await rename(staging, diskPath);
    } finally {
      await rm(staging, { force: true });
    }
    return { diskMb, imported: true };
  };

  const lookup = (handle: SandboxHandle): LiveSandbox => {
    const live = sandboxes.get(handle.id);
    if (!live || live.stopped) {
      throw new BerthError('sandbox_failed', `sandbox ${handle.id} is not running (destroyed or crashed)`, {
        retryable: true,
      });
    }
    return live;
  };

  /** Environment every command sees; nothing comes from the server's own environment. */
  const commandEnvironment = (spec: SandboxSpec, extra?: Readonly<Record<string, string>>) => ({
    PATH: GUEST_PATH,
    HOME: GUEST_HOME,
    USER: 'sandbox',
    LOGNAME: 'sandbox',
    SHELL: '/bin/sh',
    LANG: 'C.UTF-8',
    ...spec.env,
    ...extra,
  });

  /** Runs argv in the guest; the shared core of exec, readFile and writeFile. */
  const runCommand = (
    handle: SandboxHandle,
    argv: readonly string[],
    execOptions: ExecOptions,
  ): Promise<AgentCommandResult> => {
    validateArgv(argv);
    validateEnvironment(execOptions.env);
    const live = lookup(handle);
    return copyServices(live).then(() =>
      runOnAgent(live.agent, {
        ...execOptions,
        argv,
        env: commandEnvironment(live.spec, execOptions.env),
        cwd: inside(execOptions.cwd ?? MICROVM_WORKDIR_INSIDE),
      }),
    );
  };

  /**
   * Copies the services directory's files (the egress proxy's CA and trust bundle, written when
   * the session's proxy starts) into the guest's /run/berth before a command runs, so its trust
   * files are there as they are under bwrap. The guest cannot see host files; this is a stat per
   * file per command and a copy only when one changed.
   */
  const copyServices = (live: LiveSandbox): Promise<void> => {
    const directory = live.handle.servicesDirectory;
    if (!directory) return Promise.resolve();
    const changed = readdirSync(directory).flatMap((name) => {
      if (name === EGRESS_SOCKET_NAME || name.includes('/')) return [];
      try {
        const stats = statSync(join(directory, name));
        const version = `${stats.size}:${stats.mtimeMs}`;
        return stats.isFile() && live.servicesCopied.get(name) !== version ? [{ name, version }] : [];
      } catch {
        return [];
      }
    });
    if (changed.length === 0) return (live.servicesCopy ?? Promise.resolve()).catch(() => undefined);
    // A failed copy fails its command only; the next command tries again.
    const previous = (live.servicesCopy ?? Promise.resolve()).catch(() => undefined);
    live.servicesCopy = previous.then(async () => {
      for (const { name, version } of changed) {
        const result = await runOnAgent(live.agent, {
          argv: [
            '/bin/sh',
            '-c',
            'cat > "$1.tmp" && mv -f "$1.tmp" "$1"',
            'sh',
            `${SANDBOX_SERVICES_INSIDE}/${name}`,
          ],
          env: commandEnvironment(live.spec),
          cwd: '/',
          stdin: readFileSync(join(directory, name)),
          timeoutMs: 30_000,
        });
        if (result.exitCode !== 0) {
          throw new BerthError('sandbox_failed', `could not copy ${name} into the microvm sandbox`, {
            retryable: true,
          });
        }
        live.servicesCopied.set(name, version);
      }
    });
    return live.servicesCopy;
  };

  /** Stops a sandbox's VM and removes its sockets; commands still running report a kill. */
  const stopLive = async (live: LiveSandbox): Promise<void> => {
    sandboxes.delete(live.handle.id);
    live.stopped = true;
    live.agent.close();
    live.egress.close();
    await live.machine.kill();
    await rm(live.runtimeDirectory, { recursive: true, force: true });
  };

  /** Starts QEMU from a saved VM, connects to its agent and tells it to get going. */
  const startSandbox = async (
    spec: SandboxSpec,
    found: Host,
    config: MachineConfig,
    incomingPath: string,
    init: { pids: number; mountWorkspace: boolean; chownWorkspace: boolean },
  ): Promise<SandboxHandle> => {
    const id = newId('sbx');
    const runtimeDirectory = await newRuntimeDirectory(id);
    // The session's egress proxy listens here (see SandboxHandle.servicesDirectory).
    const servicesDirectory = join(runtimeDirectory, 'services');
    await mkdir(servicesDirectory, { mode: 0o700 });
    const handle: SandboxHandle = {
      id,
      sessionId: spec.sessionId,
      driver: 'microvm',
      workdirInside: MICROVM_WORKDIR_INSIDE,
      // The disk image's size is a hard ceiling: writes past it fail with ENOSPC in the guest.
      enforcedLimits: { cpu: config.cpus, memoryMb: config.memoryMb, pids: init.pids, diskMb: config.diskMb },
      servicesDirectory,
    };
    let machine: QemuMachine | undefined;
    let agent: AgentConnection | undefined;
    let egress: EgressRelay | undefined;
    try {
      machine = await QemuMachine.start({
        qemuPath: found.qemuPath,
        setprivPath: found.setprivPath,
        image: found.image,
        config,
        runtimeDirectory,
        diskPath: join(spec.workdir, WORKSPACE_DISK),
        sandboxId: handle.id,
        incomingPath,
      });
      agent = await AgentConnection.connect(machine.agentSocketPath, 10_000);
      egress = await EgressRelay.connect(
        machine.egressSocketPath,
        join(servicesDirectory, EGRESS_SOCKET_NAME),
        10_000,
      );
      await agent.init(init, randomBytes(32), AGENT_READY_TIMEOUT_MS);
    } catch (error) {
      agent?.close();
      egress?.close();
      await machine?.kill();
      await rm(runtimeDirectory, { recursive: true, force: true });
      if (error instanceof BerthError) throw error;
      throw new BerthError(
        'sandbox_failed',
        `the microvm sandbox did not start: ${(error as Error).message}`,
        {
          retryable: true,
          cause: error,
        },
      );
    }
    const live: LiveSandbox = {
      handle,
      spec,
      config,
      pids: init.pids,
      machine,
      agent,
      egress,
      runtimeDirectory,
      stopped: false,
      servicesCopied: new Map(),
    };
    sandboxes.set(handle.id, live);
    // A VM that dies on its own (guest panic, QEMU crash) fails every later call.
    void machine.exited.then(() => {
      if (live.stopped) return;
      live.stopped = true;
      live.agent.close();
      live.egress.close();
      sandboxes.delete(handle.id);
      void rm(runtimeDirectory, { recursive: true, force: true });
    });
    return handle;
  };

  return {
    name: 'microvm',

    async checkAvailability(): Promise<DriverAvailability> {
      try {
        const found = await prepareHost();
        // Booting the default template proves a VM runs here and makes the first sandbox fast.
        await ensureTemplate(found, defaultConfig(found, found.accelerator));
        const warnings: string[] = [];
        if (found.accelerator === 'tcg') {
          warnings.push(
            `microvm runs without KVM (${found.acceleratorNote}): QEMU emulates the CPU (TCG), so a template boot takes seconds and commands run several times slower; each sandbox is still its own VM and kernel, but the boundary is QEMU's emulator rather than hardware virtualization`,
          );
        }
        if (!found.setprivPath) {
          warnings.push(
            'setpriv (util-linux) is missing: VMs outlive a killed server until the next start reaps them',
          );
        }
        warnings.push(
          'read-only mounts are not supported by the microvm driver; environments that need them are refused',
        );
        return { ok: true, warnings };
      } catch (error) {
        return { ok: false, reason: error instanceof Error ? error.message : String(error) };
      }
    },

    async provision(spec: SandboxSpec): Promise<SandboxHandle> {
      validateEnvironment(spec.env);
      refuseReadOnlyMounts(spec);
      const limits = resolveLimits(spec, defaultDiskMb);
      const found = await prepareHost();
      if (spec.restoreFrom) {
        const saved = JSON.parse(
          await readFile(join(spec.restoreFrom, MACHINE_FILE), 'utf8'),
        ) as SavedMachine;
        if (saved.config.accelerator !== found.accelerator) {
          throw new BerthError(
            'sandbox_failed',
            `this sandbox was suspended under ${saved.config.accelerator} and this host runs ${found.accelerator}; it cannot resume here`,
          );
        }
        await restoreWorkspace(spec.restoreFrom, spec.workdir);
        return startSandbox(spec, found, saved.config, join(spec.restoreFrom, MEMORY_FILE), {
          pids: saved.pids,
          mountWorkspace: false,
          chownWorkspace: false,
        });
      }
      const disk = await prepareWorkspaceDisk(spec.workdir, limits.diskMb);
      const config: MachineConfig = {
        accelerator: found.accelerator,
        memoryMb: limits.memoryMb,
        cpus: limits.cpu,
        diskMb: disk.diskMb,
        imageKey: found.image.key,
      };
      const template = await ensureTemplate(found, config);
      return startSandbox(spec, found, config, template, {
        pids: limits.pids,
        mountWorkspace: true,
        chownWorkspace: disk.imported,
      });
    },

    async exec(handle, argv, execOptions = {}): Promise<ExecResult> {
      const result = await runCommand(handle, argv, execOptions);
      return execResultOf(result);
    },

    spawn(handle, argv, spawnOptions = {}): SandboxProcess {
      validateArgv(argv);
      validateEnvironment(spawnOptions.env);
      const live = lookup(handle);
      return spawnOnAgent(live.agent, {
        argv,
        env: commandEnvironment(live.spec, spawnOptions.env),
        cwd: inside(spawnOptions.cwd ?? MICROVM_WORKDIR_INSIDE),
      });
    },

    ...sandboxFiles(runCommand, MICROVM_WORKDIR_INSIDE),

    isAlive(handle) {
      const live = sandboxes.get(handle.id);
      return live !== undefined && !live.stopped;
    },

    async destroy(handle) {
      const live = sandboxes.get(handle.id);
      if (live) await stopLive(live);
    },

    async suspend(handle, directory) {
      const live = lookup(handle);
      sandboxes.delete(handle.id);
      live.stopped = true;
      try {
        await live.machine.saveTo(join(directory, MEMORY_FILE));
      } finally {
        live.agent.close();
        await live.machine.kill();
        await rm(live.runtimeDirectory, { recursive: true, force: true });
      }
      const saved: SavedMachine = { version: 1, config: live.config, pids: live.pids };
      await writeFile(join(directory, MACHINE_FILE), JSON.stringify(saved));
      await moveTree(live.spec.workdir, join(directory, SUSPENDED_WORKSPACE));
      return { memory: true };
    },

    async stats(handle) {
      const live = lookup(handle);
      const pid = live.machine.pid;
      try {
        // The VM is one host process: its CPU time and resident memory are what the sandbox costs.
        const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
        const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
        // utime and stime (fields 14 and 15) in USER_HZ, which is 100 on Linux/x86.
        const cpuSeconds = (Number(fields[11]) + Number(fields[12])) / 100;
        const status = readFileSync(`/proc/${pid}/status`, 'utf8');
        const kilobytes = (name: string) =>
          Number(new RegExp(`^${name}:\\s+(\\d+) kB`, 'm').exec(status)?.[1] ?? 0);
        return {
          cpuSeconds,
          memoryBytes: kilobytes('VmRSS') * 1024,
          memoryPeakBytes: kilobytes('VmHWM') * 1024 || null,
        };
      } catch (error) {
        throw new BerthError('sandbox_failed', `cannot read the usage of sandbox ${handle.id}`, {
          retryable: true,
          cause: error,
        });
      }
    },

    async reapOrphans() {
      let reaped = 0;
      const marker = new RegExp(`^${MACHINE_NAME_PREFIX}:owner-(\\d+):`);
      for (const entry of readdirSync('/proc')) {
        if (!/^\d+$/.test(entry)) continue;
        try {
          const commandLine = readFileSync(`/proc/${entry}/cmdline`, 'utf8').split('\0');
          const name = commandLine[commandLine.indexOf('-name') + 1];
          const owner = Number(name === undefined ? Number.NaN : marker.exec(name)?.[1]);
          if (!commandLine.includes('-name') || !Number.isInteger(owner)) continue;
          // Only VMs whose server is gone: a live server (this one included) owns its VMs.
          if (owner === process.pid || isAlive(owner)) continue;
          process.kill(Number(entry), 'SIGKILL');
          reaped++;
        } catch {
          // Exited while we looked, or not ours to read.
        }
      }
      const directories = await readdir(runtimeRoot).catch(() => [] as string[]);
      for (const name of directories) {
        const owner = Number(/^(\d+)-/.exec(name)?.[1]);
        if (Number.isInteger(owner) && owner !== process.pid && !isAlive(owner)) {
          await rm(join(runtimeRoot, name), { recursive: true, force: true });
        }
      }
      return reaped;
    },

    async destroyAll() {
      await Promise.all([...sandboxes.values()].map((live) => stopLive(live)));
    },

    qemuPid(handle) {
      return sandboxes.get(handle.id)?.machine.pid;
    },
  };
}
