/**
 * The gVisor driver: one long-lived runsc container per session. Its processes run on gVisor's
 * user-space kernel (the Sentry), so a command's system calls never reach the host kernel
 * directly: a kernel bug the command could exploit under bubblewrap is, here, a bug in a
 * sandboxed Go program. Berth writes an OCI bundle into a private directory (read-only root made
 * of host /usr and a few /etc files, /workspace bound read-write, a private /tmp tmpfs, no
 * capabilities, loopback-only network) and starts it with `runsc run --detach`; commands enter
 * it with `runsc exec --process <file>` as uid 1000 with exactly the sandbox environment.
 *
 * The network's one way out is bwrap's: the sandbox's services directory (the session's egress
 * proxy socket and CA) is bound read-only at /run/berth, and the container's init is
 * `berth-agent --bridge 3128 /run/berth/egress.sock`, which relays each connection to
 * 127.0.0.1:3128 inside gVisor's loopback-only netstack to that socket (runsc `--host-uds=open`
 * lets the sandbox connect to host unix sockets in its view, never create them).
 *
 * gVisor's processes are not host processes, so killing the host `runsc exec` does not stop
 * what it started. Every command therefore carries a marker variable (`BERTH_COMMAND_ID`);
 * on timeout, abort or kill a root reaper inside the sandbox SIGKILLs every process whose
 * environment still holds it, setsid'd and orphaned ones included. destroy kills the whole
 * container.
 *
 * Resource limits: CPU and memory through a host cgroup made with `../bwrap/cgroups.ts` (runsc
 * joins a pre-made cgroup), which holds the Sentry and the gofer; processes through
 * RLIMIT_NPROC for uid 1000, which the Sentry enforces itself (fork fails with EAGAIN). The host
 * cgroup's pids cap only backs that up: on the ptrace platform every sandboxed process costs
 * the Sentry several host threads, and a Sentry that cannot make a thread dies.
 *
 * suspend checkpoints the container (`runsc checkpoint`), memory and processes included, and
 * provision `restoreFrom` restores it; a checkpoint that fails or cannot be restored falls
 * back to files only.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import {
  closeSync,
  existsSync,
  lstatSync,
  mkdirSync,
  openSync,
  readdirSync,
  readFileSync,
  readlinkSync,
  rmSync,
  statSync,
  symlinkSync,
  writeFileSync,
} from 'node:fs';
import { rename, rm } from 'node:fs/promises';
import { dirname, join, posix, resolve } from 'node:path';
import { BerthError } from '../../errors.js';
import { newId } from '../../ids.js';
import {
  DEFAULT_AGENT_PATH,
  DEFAULT_EXEC_HELPER_PATH,
  EGRESS_SOCKET_NAME,
  SANDBOX_EGRESS_PORT,
  SANDBOX_SERVICES_INSIDE,
} from '../bwrap/bwrap-driver.js';
import {
  type CgroupDetection,
  type CgroupTree,
  detectHostCgroupLayout,
  openCgroupTree,
  type SandboxCgroup,
  sandboxCgroupName,
  sandboxStats,
} from '../bwrap/cgroups.js';
import { openWorkspaceDisks, type WorkspaceDisk, type WorkspaceDisks } from '../bwrap/workspace-disk.js';
import {
  DEFAULT_SANDBOX_LIMITS,
  type DriverAvailability,
  type EnforcedLimits,
  type ExecOptions,
  type ExecResult,
  type SandboxDriver,
  type SandboxHandle,
  type SandboxProcess,
  type SandboxProcessExit,
  type SandboxSpawnOptions,
  type SandboxSpec,
  type SandboxStats,
} from '../driver.js';
import {
  chownTree,
  execResultOf,
  findExecutable,
  pathInside,
  resolveLimits,
  sandboxFiles,
  validateArgv,
  validateEnvironment,
} from '../driver-support.js';
import {
  DEFAULT_MAX_OUTPUT_BYTES,
  DEFAULT_TIMEOUT_MS,
  killProcessTree,
  type RunProcessResult,
  runProcess,
} from '../exec-process.js';
import { moveTree, restoreWorkspace, SUSPENDED_WORKSPACE } from '../workspace-move.js';

/** Where the session's workdir appears inside every gVisor sandbox. */
export const GVISOR_WORKDIR_INSIDE = '/workspace';

/** A path inside this driver's sandboxes (relative ones from the working directory). */
const inside = (path: string) => pathInside(GVISOR_WORKDIR_INSIDE, path);
/** The uid and gid commands run as, inside the sandbox and on the host's files. */
const SANDBOX_UID = 1000;
const SANDBOX_HOME = '/home/sandbox';
const SANDBOX_PATH = '/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin';
/** The variable that marks every process a command starts, so the reaper can find them all. */
const COMMAND_MARKER = 'BERTH_COMMAND_ID';
/** Inside a suspend directory: the checkpoint image `runsc checkpoint` wrote. */
const SUSPENDED_MEMORY = 'gvisor-checkpoint';
const PROVISION_TIMEOUT_MS = 30_000;
const MANAGEMENT_TIMEOUT_MS = 30_000;
/** How many times the reaper sweeps: a process forked during one sweep dies in the next. */
const REAPER_ROUNDS = 5;
/**
 * Host threads allowed per sandboxed process in the host pids cgroup. On the ptrace platform
 * each sandboxed process costs the Sentry up to about twenty host threads (measured: 20
 * sleeping processes took 420 more), plus a base for the Sentry and gofer themselves.
 */
const HOST_THREADS_PER_PROCESS = 32;
const HOST_THREADS_BASE = 256;
/** Where the egress relay (`berth-agent --bridge`) is bound inside when the host has the agent. */
const BRIDGE_INSIDE = '/run/berth-agent';
/** The line the relay prints once it listens (see `bridge()` in `../agent/berth-agent.c`). */
const BRIDGE_READY_LINE = 'listening';
/** runsc exits 128 when it fails itself (util.Fatalf), not the command it ran. */
const RUNSC_FAILURE_EXIT_CODE = 128;
const RUNSC_CONTAINER_GONE =
  /(?:loading (?:container|sandbox)|cannot execute in container|container .* not found|file does not exist|urpc method .* failed)/;

/** Options for `createGvisorDriver`; every field has a working default. */
export interface GvisorDriverOptions {
  /** Path to runsc (default: looked up on PATH). */
  runscPath?: string;
  /**
   * Directory Berth owns for runsc's state (`runsc/`) and the sandboxes' OCI bundles
   * (`bundles/`); default `/run/berth/gvisor`, which a reboot empties along with the sandboxes.
   */
  stateDirectory?: string;
  /** gVisor platform (default `ptrace`; `kvm` needs a usable /dev/kvm). */
  platform?: 'ptrace' | 'kvm';
  /** Size of the private /tmp and home tmpfs mounts (default 256). */
  tmpfsMb?: number;
  /**
   * Where workspace disk images live (default `/var/lib/berth/disks`, shared with the bwrap
   * driver; images are named after their sandbox). As root, `/workspace` is a loop-mounted ext4
   * image of `diskMb` (see `../bwrap/workspace-disk.ts`), which the gofer serves like any
   * directory; writes past it fail with ENOSPC.
   */
  diskImageDirectory?: string;
  /**
   * Where the cgroup hierarchies are (default: detected from /proc/self/mounts); a
   * `{ ok: false, reason }` runs without resource limits, as on a host without usable cgroups.
   */
  cgroups?: CgroupDetection;
  /**
   * Where each sandbox gets its services directory (default `<stateDirectory>/services`), seen
   * read-only inside at `/run/berth` (see `SandboxHandle.servicesDirectory`): the session's
   * egress proxy listens there, and the container's init relays 127.0.0.1:3128 to it.
   */
  servicesDirectory?: string;
  /**
   * The static `berth-agent` whose `--bridge` mode is the sandbox's one way out (default
   * `/usr/local/lib/berth/berth-agent`, built by `../bwrap/native/build.sh`). Without it the
   * sandbox has no network at all and `checkAvailability` says so.
   */
  agentPath?: string;
}

/** The gVisor driver, plus shutdown the supervisor and tests need. */
export interface GvisorDriver extends SandboxDriver {
  spawn(handle: SandboxHandle, argv: readonly string[], options?: SandboxSpawnOptions): SandboxProcess;
  stats(handle: SandboxHandle): Promise<SandboxStats>;
  reapOrphans(): Promise<number>;
  /** Destroys every sandbox this driver still tracks (for server shutdown). */
  destroyAll(): Promise<void>;
  /** The runsc container id of a live sandbox, for tests and diagnostics. */
  containerId(handle: SandboxHandle): string | undefined;
}

/** Whether sandboxes get cgroups on this host, and if not, why. */
type ResourceControl = { ok: true; tree: CgroupTree } | { ok: false; reason: string };
/** Whether workspaces get a size limit on this host, and if not, why. */
type DiskControl = { ok: true; disks: WorkspaceDisks } | { ok: false; reason: string };

interface LiveSandbox {
  handle: SandboxHandle;
  spec: SandboxSpec;
  /** runsc's name for the container: the sandbox id plus its owner's pid and start time. */
  containerId: string;
  bundle: string;
  limits: EnforcedLimits;
  stopped: boolean;
  /** Host `runsc exec` processes running right now, killed by destroy. */
  running: Set<ChildProcess>;
  cgroup?: SandboxCgroup;
  /** The image mounted over the workdir, when this host enforces the disk limit. */
  disk?: WorkspaceDisk;
  /** Counts exec process files, so concurrent commands never share one. */
  nextProcessFile: number;
  /** True when the init is the egress relay (a new container must wait for it to listen). */
  bridged: boolean;
}

/** One OCI mount entry. */
interface OciMount {
  destination: string;
  type: string;
  source: string;
  options?: string[];
}

/** A process's start time in clock ticks since boot, or undefined when it does not exist. */
function processStartTime(pid: number): string | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // Fields resume after the command name's last ')'; the start time is field 22 of stat(5).
    return stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19];
  } catch {
    return undefined;
  }
}

/**
 * False when a container or bundle name (`<sandbox id>.<owner pid>.<owner start time>`, see
 * `sandboxCgroupName`) names an owner that has exited; true for a live owner or a foreign name.
 */
function ownerIsAlive(name: string): boolean {
  const match = /\.(\d+)\.(\d+)$/.exec(name);
  if (!match) return true;
  return processStartTime(Number(match[1])) === match[2];
}

/** Inside paths a read-only mount may not cover or sit under (the sandbox's own mounts). */
const RESERVED_INSIDE_PATHS = ['/proc', '/dev', '/sys', '/tmp', GVISOR_WORKDIR_INSIDE, SANDBOX_HOME];

/** Rejects read-only mounts that would shadow the sandbox's own mounts or cannot be bound. */
function validateReadOnlyMounts(spec: SandboxSpec): void {
  for (const { hostPath, insidePath: inside } of spec.readOnlyMounts ?? []) {
    for (const path of [hostPath, inside]) {
      if (!path.startsWith('/') || path.includes('\0') || posix.normalize(path) !== path) {
        throw new BerthError('invalid_request', `read-only mount paths must be absolute and normal: ${path}`);
      }
    }
    const reserved = RESERVED_INSIDE_PATHS.some(
      (prefix) => inside === prefix || inside.startsWith(`${prefix}/`) || prefix.startsWith(`${inside}/`),
    );
    if (inside === '/' || reserved) {
      throw new BerthError('invalid_request', `read-only mount cannot be placed at ${inside}`);
    }
    try {
      statSync(hostPath);
    } catch {
      throw new BerthError('invalid_request', `read-only mount source does not exist: ${hostPath}`);
    }
  }
}

/** Environment every command sees; nothing comes from the server's own environment. */
function commandEnvironment(spec: SandboxSpec, extra?: Readonly<Record<string, string>>) {
  return {
    PATH: SANDBOX_PATH,
    HOME: SANDBOX_HOME,
    USER: 'sandbox',
    LOGNAME: 'sandbox',
    SHELL: '/bin/bash',
    LANG: 'C.UTF-8',
    ...spec.env,
    ...extra,
  };
}

const ETC_PASSWD = `root:x:0:0:root:/root:/usr/sbin/nologin\nsandbox:x:${SANDBOX_UID}:${SANDBOX_UID}:sandbox:${SANDBOX_HOME}:/bin/bash\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n`;
const ETC_GROUP = `root:x:0:\nsandbox:x:${SANDBOX_UID}:\nnogroup:x:65534:\n`;
const ETC_HOSTS = '127.0.0.1\tlocalhost sandbox\n::1\tlocalhost ip6-localhost ip6-loopback\n';
/** Host /etc entries shown read-only inside (when the host has them). */
const HOST_ETC_ENTRIES = ['/etc/alternatives', '/etc/ld.so.cache', '/etc/ssl/certs', '/etc/localtime'];

/** No capabilities at all, in every set. */
const NO_CAPABILITIES = { bounding: [], effective: [], inheritable: [], permitted: [], ambient: [] };

/** The OCI `process` for a command of the sandbox user. */
function sandboxUserProcess(
  argv: readonly string[],
  env: Readonly<Record<string, string>>,
  cwd: string,
  limits: EnforcedLimits,
) {
  const processes = Math.floor(limits.pids);
  return {
    terminal: false,
    user: { uid: SANDBOX_UID, gid: SANDBOX_UID, additionalGids: [] },
    args: [...argv],
    env: Object.entries(env).map(([name, value]) => `${name}=${value}`),
    cwd,
    capabilities: NO_CAPABILITIES,
    noNewPrivileges: true,
    // The Sentry counts uid 1000's tasks against this and fails fork with EAGAIN past it.
    rlimits: [{ type: 'RLIMIT_NPROC', hard: processes, soft: processes }],
  };
}

/**
 * The reaper: SIGKILLs every process whose environment holds `BERTH_COMMAND_ID=<id>` ($1),
 * sweeping again while it still finds some. It runs as root inside the sandbox so a command
 * that spent the user's process budget (RLIMIT_NPROC) cannot keep it from starting.
 */
const REAPER_SCRIPT =
  `marker="${COMMAND_MARKER}=$1"; round=0; while [ "$round" -lt ${REAPER_ROUNDS} ]; do ` +
  'pids=$(grep -lzxF -- "$marker" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3); ' +
  '[ -n "$pids" ] || break; kill -9 $pids 2>/dev/null; round=$((round + 1)); done; exit 0';

/** Creates the gVisor driver. Call `checkAvailability()` before provisioning. */
export function createGvisorDriver(options: GvisorDriverOptions = {}): GvisorDriver {
  const runningAsRoot = process.getuid?.() === 0;
  const stateDirectory = resolve(options.stateDirectory ?? '/run/berth/gvisor');
  const runscRoot = join(stateDirectory, 'runsc');
  const bundlesDirectory = join(stateDirectory, 'bundles');
  const platform = options.platform ?? 'ptrace';
  const servicesRoot = resolve(options.servicesDirectory ?? join(stateDirectory, 'services'));
  const agentPath = resolve(options.agentPath ?? DEFAULT_AGENT_PATH);
  const sandboxes = new Map<string, LiveSandbox>();
  let runscPath = options.runscPath;
  let resourceControl: Promise<ResourceControl> | undefined;
  let availability: Promise<DriverAvailability> | undefined;

  const requireRunsc = (): string => {
    runscPath ??= findExecutable('runsc');
    if (!runscPath) {
      throw new BerthError(
        'sandbox_unavailable',
        'gVisor is not installed: install the Debian package runsc (apt-get install runsc)',
      );
    }
    return runscPath;
  };

  /**
   * runsc's global flags: Berth's own state root, the platform, no network but loopback, and
   * leave to connect (never bind) to host unix sockets in the sandbox's view. That view holds
   * read-only system directories, the workspace, the spec's read-only mounts and the services
   * directory; of these Berth puts a socket only in the last (bwrap sees the same host files).
   */
  const globalFlags = () => [
    `--root=${runscRoot}`,
    `--platform=${platform}`,
    '--network=none',
    '--host-uds=open',
  ];

  /** Runs a runsc management command (no container stdio involved) and collects its output. */
  const runsc = (args: readonly string[], timeoutMs = MANAGEMENT_TIMEOUT_MS): Promise<RunProcessResult> =>
    runProcess(requireRunsc(), [...globalFlags(), ...args], {
      spawnOptions: { env: { PATH: '/usr/bin:/bin' } },
      timeoutMs,
      maxOutputBytes: 1024 * 1024,
      killTree: (child) => killProcessTree(child.pid ?? -1),
    });

  /**
   * Runs `runsc run --detach` or `runsc restore --detach`. The container's init inherits
   * runsc's stdio, so it gets /dev/null and a log file rather than pipes that would stay open
   * (in the Sentry) for the container's whole life.
   */
  const startContainer = async (args: readonly string[], logFile: string): Promise<void> => {
    const log = openSync(logFile, 'w', 0o600);
    try {
      const exitCode = await new Promise<number | null>((resolvePromise, reject) => {
        const child = spawn(requireRunsc(), [...globalFlags(), ...args], {
          env: { PATH: '/usr/bin:/bin' },
          stdio: ['ignore', log, log],
          detached: true,
        });
        const timer = setTimeout(() => killProcessTree(child.pid ?? -1), PROVISION_TIMEOUT_MS);
        child.once('error', (error) => {
          clearTimeout(timer);
          reject(error);
        });
        child.once('exit', (code) => {
          clearTimeout(timer);
          resolvePromise(code);
        });
      });
      if (exitCode !== 0) {
        const output = readFileSync(logFile, 'utf8').trim().slice(-2000);
        throw new BerthError(
          'sandbox_failed',
          `runsc could not start the sandbox: ${output || 'timed out'}`,
          {
            retryable: true,
          },
        );
      }
    } finally {
      closeSync(log);
    }
  };

  let diskControl: Promise<DiskControl> | undefined;
  /** Finds out once whether workspaces can get a size limit here (root, loop devices, mkfs). */
  const detectDiskControl = (): Promise<DiskControl> => {
    diskControl ??= (async (): Promise<DiskControl> => {
      if (!runningAsRoot)
        return { ok: false, reason: 'Berth is not running as root, and only root can mount images' };
      const disks = openWorkspaceDisks({
        directory: options.diskImageDirectory ?? '/var/lib/berth/disks',
        // The gofer serves the image's files as they are owned on the host: the sandbox user.
        uid: SANDBOX_UID,
        gid: SANDBOX_UID,
        helperPath: DEFAULT_EXEC_HELPER_PATH,
      });
      const detected = await disks.detect();
      return detected.ok ? { ok: true, disks } : detected;
    })();
    return diskControl;
  };

  /** Finds out once whether sandboxes can get cgroups here (needs root and usable hierarchies). */
  const detectResourceControl = (): Promise<ResourceControl> => {
    resourceControl ??= (async (): Promise<ResourceControl> => {
      const detection = options.cgroups ?? detectHostCgroupLayout();
      if (!detection.ok) return detection;
      const tree = openCgroupTree(detection.layout, { parentName: 'berth-gvisor' });
      try {
        // A throwaway group proves the parent can be made and every limit written.
        const probe = tree.create(newId('sbx'), hostCgroupLimits(DEFAULT_SANDBOX_LIMITS));
        await probe.remove();
      } catch (error) {
        return { ok: false, reason: error instanceof Error ? error.message : String(error) };
      }
      return { ok: true, tree };
    })();
    return resourceControl;
  };

  /** The host cgroup's limits: the Sentry and gofer share them with everything inside. */
  const hostCgroupLimits = (limits: EnforcedLimits) => ({
    cpuCores: limits.cpu,
    memoryBytes: limits.memoryMb * 1024 * 1024,
    pids: Math.floor(limits.pids) * HOST_THREADS_PER_PROCESS + HOST_THREADS_BASE,
  });

  /**
   * Writes the bundle's root directory: symlinks and mount points only, since everything
   * visible inside comes from read-only binds, tmpfs mounts and the workspace.
   */
  const writeRootDirectory = (rootfs: string, spec: SandboxSpec, services?: string): OciMount[] => {
    const readOnlyBind = (source: string, destination: string): OciMount => ({
      destination,
      type: 'bind',
      source,
      options: ['rbind', 'ro', 'nosuid', 'nodev'],
    });
    /** Creates the mount point a bind needs on the read-only root (a file for a file). */
    const mountPoint = (hostPath: string, inside: string) => {
      const target = join(rootfs, inside);
      if (statSync(hostPath).isDirectory()) mkdirSync(target, { recursive: true });
      else {
        mkdirSync(dirname(target), { recursive: true });
        writeFileSync(target, '');
      }
    };
    const mounts: OciMount[] = [];
    for (const directory of ['usr', 'etc', 'proc', 'dev', 'sys', 'tmp', 'workspace', 'home/sandbox']) {
      mkdirSync(join(rootfs, directory), { recursive: true });
    }
    mounts.push(readOnlyBind('/usr', '/usr'));
    for (const name of ['bin', 'sbin', 'lib', 'lib32', 'lib64', 'libx32']) {
      const hostPath = `/${name}`;
      let stats: ReturnType<typeof lstatSync>;
      try {
        stats = lstatSync(hostPath);
      } catch {
        continue;
      }
      if (stats.isSymbolicLink()) symlinkSync(readlinkSync(hostPath), join(rootfs, name));
      else if (stats.isDirectory()) {
        mkdirSync(join(rootfs, name));
        mounts.push(readOnlyBind(hostPath, hostPath));
      }
    }
    writeFileSync(join(rootfs, 'etc/passwd'), ETC_PASSWD);
    writeFileSync(join(rootfs, 'etc/group'), ETC_GROUP);
    writeFileSync(join(rootfs, 'etc/hosts'), ETC_HOSTS);
    writeFileSync(join(rootfs, 'etc/hostname'), 'sandbox\n');
    for (const entry of HOST_ETC_ENTRIES) {
      if (!existsSync(entry)) continue;
      mountPoint(entry, entry);
      mounts.push(readOnlyBind(entry, entry));
    }
    const tmpfsBytes = (options.tmpfsMb ?? 256) * 1024 * 1024;
    const tmpfs = (destination: string, mode: string): OciMount => ({
      destination,
      type: 'tmpfs',
      source: 'tmpfs',
      options: ['nosuid', 'nodev', `mode=${mode}`, `size=${tmpfsBytes}`],
    });
    mounts.push(
      { destination: '/proc', type: 'proc', source: 'proc' },
      { destination: '/dev', type: 'tmpfs', source: 'tmpfs', options: ['nosuid', 'mode=755'] },
      tmpfs('/tmp', '1777'),
      // The user's home, owned by it (gVisor's tmpfs takes the uid and gid options).
      {
        ...tmpfs(SANDBOX_HOME, '700'),
        options: [...tmpfs(SANDBOX_HOME, '700').options!, `uid=${SANDBOX_UID}`, `gid=${SANDBOX_UID}`],
      },
      {
        destination: GVISOR_WORKDIR_INSIDE,
        type: 'bind',
        source: resolve(spec.workdir),
        options: ['rbind', 'rw', 'nosuid', 'nodev'],
      },
    );
    for (const mount of spec.readOnlyMounts ?? []) {
      mountPoint(mount.hostPath, mount.insidePath);
      mounts.push(readOnlyBind(mount.hostPath, mount.insidePath));
    }
    if (services) {
      // The services directory (the egress proxy's socket and CA) and the relay's binary. These
      // are the only host unix sockets in the sandbox's view that Berth puts there.
      mountPoint(services, SANDBOX_SERVICES_INSIDE);
      mounts.push(readOnlyBind(services, SANDBOX_SERVICES_INSIDE));
      mountPoint(agentPath, BRIDGE_INSIDE);
      mounts.push(readOnlyBind(agentPath, BRIDGE_INSIDE));
    }
    return mounts;
  };

  /** Writes `config.json` and the root directory of a sandbox's OCI bundle. */
  const writeBundle = (
    bundle: string,
    spec: SandboxSpec,
    limits: EnforcedLimits,
    cgroup?: SandboxCgroup,
    services?: string,
  ) => {
    mkdirSync(join(bundle, 'exec'), { recursive: true, mode: 0o700 });
    const mounts = writeRootDirectory(join(bundle, 'rootfs'), spec, services);
    const config = {
      ociVersion: '1.0.2',
      // The init keeps the container alive (commands enter with `runsc exec`) and, with a
      // services directory, is the sandbox's one way out: 127.0.0.1:3128 inside gVisor's
      // loopback-only network, relayed per connection to the proxy's socket, which runsc's
      // `--host-uds=open` lets the sandbox connect to.
      process: sandboxUserProcess(
        services
          ? [
              BRIDGE_INSIDE,
              '--bridge',
              String(SANDBOX_EGRESS_PORT),
              `${SANDBOX_SERVICES_INSIDE}/${EGRESS_SOCKET_NAME}`,
            ]
          : ['/bin/sleep', 'infinity'],
        commandEnvironment(spec),
        GVISOR_WORKDIR_INSIDE,
        limits,
      ),
      root: { path: 'rootfs', readonly: true },
      hostname: 'sandbox',
      mounts,
      linux: {
        namespaces: ['pid', 'network', 'ipc', 'uts', 'mount'].map((type) => ({ type })),
        ...(cgroup
          ? {
              // runsc joins the cgroup Berth made (and leaves its limits alone).
              cgroupsPath: `/berth-gvisor/${cgroup.name}`,
              resources: {
                memory: { limit: limits.memoryMb * 1024 * 1024 },
                cpu: { quota: Math.round(limits.cpu * 100_000), period: 100_000 },
              },
            }
          : {}),
      },
    };
    writeFileSync(join(bundle, 'config.json'), JSON.stringify(config), { mode: 0o600 });
  };

  /** Creates the host directory layout and a fresh, empty bundle directory. */
  const newBundleDirectory = (containerId: string): string => {
    mkdirSync(runscRoot, { recursive: true, mode: 0o700 });
    mkdirSync(bundlesDirectory, { recursive: true, mode: 0o711 });
    const bundle = join(bundlesDirectory, containerId);
    rmSync(bundle, { recursive: true, force: true });
    mkdirSync(bundle, { mode: 0o711 });
    return bundle;
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

  /** Writes an exec process file (mode 600: it holds the command's environment). */
  const writeProcessFile = (live: LiveSandbox, processSpec: object): string => {
    const file = join(live.bundle, 'exec', `${live.nextProcessFile++}.json`);
    writeFileSync(file, JSON.stringify(processSpec), { mode: 0o600 });
    return file;
  };

  /**
   * Kills, inside the sandbox, every process a command started (see `REAPER_SCRIPT`). Never
   * rejects: a sandbox that is gone has nothing left to kill.
   */
  const reapCommand = async (live: LiveSandbox, commandId: string): Promise<void> => {
    if (live.stopped) return;
    const processFile = writeProcessFile(live, {
      terminal: false,
      user: { uid: 0, gid: 0 },
      args: ['/bin/sh', '-c', REAPER_SCRIPT, 'reaper', commandId],
      env: [`PATH=${SANDBOX_PATH}`],
      cwd: '/',
      // Root inside gVisor, with just enough to read other users' environments and kill them.
      capabilities: {
        ...NO_CAPABILITIES,
        bounding: ['CAP_KILL', 'CAP_SYS_PTRACE'],
        effective: ['CAP_KILL', 'CAP_SYS_PTRACE'],
        permitted: ['CAP_KILL', 'CAP_SYS_PTRACE'],
      },
      noNewPrivileges: true,
    });
    try {
      await runsc(['exec', `--process=${processFile}`, live.containerId]);
    } catch {
      // runsc could not run: the sandbox is gone or going, and its processes with it.
    } finally {
      await rm(processFile, { force: true });
    }
  };

  /** Starts `runsc exec` for argv as the sandbox user; the shared core of exec and spawn. */
  const prepareCommand = (
    handle: SandboxHandle,
    argv: readonly string[],
    commandOptions: { cwd?: string; env?: Readonly<Record<string, string>> },
  ) => {
    validateArgv(argv);
    validateEnvironment(commandOptions.env, [COMMAND_MARKER]);
    const live = lookup(handle);
    const cwd = inside(commandOptions.cwd ?? GVISOR_WORKDIR_INSIDE);
    const commandId = newId('sbx');
    const env = { ...commandEnvironment(live.spec, commandOptions.env), [COMMAND_MARKER]: commandId };
    const processFile = writeProcessFile(live, sandboxUserProcess(argv, env, cwd, live.limits));
    return {
      live,
      commandId,
      processFile,
      args: [...globalFlags(), 'exec', `--process=${processFile}`, live.containerId],
    };
  };

  /** A runsc failure (not the command's) means the container is gone; says so as sandbox_failed. */
  const checkRunscFailure = (live: LiveSandbox, result: RunProcessResult): void => {
    if (result.exitCode !== RUNSC_FAILURE_EXIT_CODE) return;
    const stderr = result.stderr.toString('utf8');
    if (!RUNSC_CONTAINER_GONE.test(stderr)) return;
    live.stopped = true;
    throw new BerthError(
      'sandbox_failed',
      `sandbox ${live.handle.id} is not running: ${stderr.trim().slice(0, 500)}`,
      {
        retryable: true,
      },
    );
  };

  /** Runs argv inside the sandbox; the shared core of exec, readFile and writeFile. */
  const run = async (
    handle: SandboxHandle,
    argv: readonly string[],
    execOptions: ExecOptions,
  ): Promise<RunProcessResult> => {
    const { live, commandId, processFile, args } = prepareCommand(handle, argv, execOptions);
    let tracked: ChildProcess | undefined;
    let reaping: Promise<void> | undefined;
    try {
      const result = await runProcess(requireRunsc(), args, {
        spawnOptions: { env: { PATH: '/usr/bin:/bin' } },
        stdin: execOptions.stdin,
        timeoutMs: execOptions.timeoutMs ?? DEFAULT_TIMEOUT_MS,
        signal: execOptions.signal,
        maxOutputBytes: execOptions.maxOutputBytes ?? DEFAULT_MAX_OUTPUT_BYTES,
        killTree: (child) => {
          killProcessTree(child.pid ?? -1);
          reaping ??= reapCommand(live, commandId);
        },
        onSpawn: (child) => {
          tracked = child;
          live.running.add(child);
        },
      });
      // The command's processes inside are gone before the caller hears it was stopped.
      await reaping;
      checkRunscFailure(live, result);
      return result;
    } catch (error) {
      if (error instanceof BerthError) throw error;
      throw new BerthError('sandbox_failed', `could not run a command in sandbox ${handle.id}`, {
        retryable: true,
        cause: error,
      });
    } finally {
      if (tracked) live.running.delete(tracked);
      await rm(processFile, { force: true });
    }
  };

  /** Turns a failed file command into a typed error. */
  /** Kills the container (everything in it) and removes its state, bundle and cgroup. */
  const destroyLive = async (live: LiveSandbox): Promise<void> => {
    sandboxes.delete(live.handle.id);
    live.stopped = true;
    // First the host `runsc exec` processes, so their callers see a kill, not a runsc error.
    for (const child of live.running) killProcessTree(child.pid ?? -1);
    try {
      await runsc(['delete', '--force', live.containerId]);
    } finally {
      // The cgroup holds the Sentry and gofer, should runsc have left either behind.
      try {
        await live.cgroup?.remove();
        await rm(live.bundle, { recursive: true, force: true });
        if (live.handle.servicesDirectory)
          await rm(live.handle.servicesDirectory, { recursive: true, force: true });
      } finally {
        // Nothing serves the workspace any more: its files can go back to the plain workdir.
        await live.disk?.detach();
      }
    }
  };

  /** Starts a fresh container, or restores the checkpoint in `restoreFrom` when it has one. */
  const startLive = async (live: LiveSandbox): Promise<void> => {
    const logFile = join(live.bundle, 'runsc.log');
    const checkpoint = live.spec.restoreFrom ? join(live.spec.restoreFrom, SUSPENDED_MEMORY) : undefined;
    if (checkpoint && existsSync(join(checkpoint, 'checkpoint.img'))) {
      // Into the bundle first: the caller deletes restoreFrom once provision returns.
      const image = join(live.bundle, 'checkpoint');
      await rename(checkpoint, image).catch(async () => moveTree(checkpoint, image));
      try {
        await startContainer(
          ['restore', '--detach', `--image-path=${image}`, `--bundle=${live.bundle}`, live.containerId],
          logFile,
        );
        return;
      } catch {
        // The image does not fit this host or spec any more: resume with the files alone.
        await runsc(['delete', '--force', live.containerId]).catch(() => undefined);
      } finally {
        await rm(image, { recursive: true, force: true });
      }
    }
    await startContainer(['run', '--detach', `--bundle=${live.bundle}`, live.containerId], logFile);
    if (live.bridged) await waitForBridge(logFile);
  };

  /**
   * Waits until the init (the egress relay) listens, so a first `curl` never finds the port
   * closed. Its stdout is the container's log file. A restored init was listening already.
   */
  const waitForBridge = async (logFile: string): Promise<void> => {
    const deadline = Date.now() + PROVISION_TIMEOUT_MS;
    for (;;) {
      const log = readFileSync(logFile, 'utf8');
      if (log.split('\n').includes(BRIDGE_READY_LINE)) return;
      const failure = /berth-agent: .*/.exec(log)?.[0];
      if (failure || Date.now() > deadline) {
        throw new BerthError(
          'sandbox_failed',
          `the sandbox's egress relay did not start: ${failure ?? 'timed out'}`,
          { retryable: true },
        );
      }
      await new Promise((resolvePromise) => setTimeout(resolvePromise, 5));
    }
  };

  /** Ids of every container under Berth's runsc root (any server's); none when runsc cannot say. */
  const listContainerIds = async (): Promise<string[]> => {
    const listing = await runsc(['list', '--format=json']);
    try {
      const containers = JSON.parse(listing.stdout.toString('utf8')) as Array<{ id?: unknown }> | null;
      return (containers ?? []).map((container) => container.id).filter((id) => typeof id === 'string');
    } catch {
      return [];
    }
  };

  /** Runs a one-off container once to prove runsc works here, and reports what it saw. */
  const probe = async (): Promise<DriverAvailability> => {
    const workdir = join(stateDirectory, `probe-${process.pid}`);
    const containerId = sandboxCgroupName(newId('sbx'));
    const bundle = newBundleDirectory(containerId);
    try {
      rmSync(workdir, { recursive: true, force: true });
      mkdirSync(workdir, { recursive: true });
      const spec: SandboxSpec = { sessionId: 'probe', workdir };
      writeBundle(bundle, spec, resolveLimits(spec).limits);
      const config = JSON.parse(readFileSync(join(bundle, 'config.json'), 'utf8'));
      // `ls -d /` exercises statx the way coreutils 9 calls it (see `warnings` below).
      config.process.args = [
        '/bin/sh',
        '-c',
        'echo probe-ok; ls -d / >/dev/null 2>&1 || echo statx-rejected',
      ];
      writeFileSync(join(bundle, 'config.json'), JSON.stringify(config));
      const result = await runsc(['run', `--bundle=${bundle}`, containerId], PROVISION_TIMEOUT_MS);
      const stdout = result.stdout.toString('utf8');
      if (!stdout.includes('probe-ok')) {
        const detail = (result.stderr.toString('utf8') + stdout).trim().slice(-1000);
        return {
          ok: false,
          reason: `runsc cannot start a sandbox on this host (platform ${platform}): ${detail || `exit code ${result.exitCode}`}`,
        };
      }
      const warnings: string[] = [];
      if (stdout.includes('statx-rejected')) {
        warnings.push(
          'this runsc rejects statx with AT_NO_AUTOMOUNT (fixed in gVisor releases after early 2023): inside gVisor sandboxes `ls PATH`, `ls -l` and `stat` from coreutils 9 fail with "Invalid argument"',
        );
      }
      return { ok: true, warnings };
    } finally {
      await runsc(['delete', '--force', containerId]).catch(() => undefined);
      rmSync(bundle, { recursive: true, force: true });
      rmSync(workdir, { recursive: true, force: true });
    }
  };

  return {
    name: 'gvisor',

    checkAvailability(): Promise<DriverAvailability> {
      availability ??= (async (): Promise<DriverAvailability> => {
        try {
          requireRunsc();
          if (!runningAsRoot) {
            return {
              ok: false,
              reason:
                'the gvisor driver needs Berth to run as root (runsc sets up namespaces, mounts and cgroups)',
            };
          }
          const probed = await probe();
          if (!probed.ok) return probed;
          const warnings = [...(probed.warnings ?? [])];
          if (!existsSync(agentPath)) {
            warnings.push(
              `gVisor sandboxes have no network at all: the egress relay ${agentPath} is missing (build it with \`sh src/sandbox/bwrap/native/build.sh\`)`,
            );
          }
          const control = await detectResourceControl();
          if (!control.ok) {
            warnings.push(
              `sandbox resource limits (cpu, memory) are not enforced: ${control.reason}; environments that set limits will be refused`,
            );
          }
          return warnings.length > 0 ? { ok: true, warnings } : { ok: true };
        } catch (error) {
          return { ok: false, reason: error instanceof Error ? error.message : String(error) };
        }
      })();
      return availability;
    },

    async provision(spec: SandboxSpec): Promise<SandboxHandle> {
      requireRunsc();
      validateEnvironment(spec.env, [COMMAND_MARKER]);
      validateReadOnlyMounts(spec);
      const { limits, explicit, explicitDisk } = resolveLimits(spec);
      const [control, disk] = await Promise.all([detectResourceControl(), detectDiskControl()]);
      if (!control.ok && explicit) {
        throw new BerthError(
          'sandbox_unavailable',
          `this host cannot enforce the environment's cpu, memory or pids limits (${control.reason}); remove the limits or run Berth as root on a host with cgroups`,
        );
      }
      if (!disk.ok && explicitDisk) {
        throw new BerthError(
          'sandbox_unavailable',
          `this host cannot enforce the environment's disk limit (${disk.reason}); remove disk_mb or run Berth as root on a host with loop devices`,
        );
      }
      const { diskMb, ...processLimits } = limits;
      if (spec.restoreFrom) await restoreWorkspace(spec.restoreFrom, spec.workdir);
      mkdirSync(spec.workdir, { recursive: true });
      if (!statSync(spec.workdir).isDirectory()) {
        throw new BerthError('invalid_request', `sandbox workdir is not a directory: ${spec.workdir}`);
      }
      chownTree(spec.workdir, SANDBOX_UID, SANDBOX_UID);

      const id = newId('sbx');
      const containerId = sandboxCgroupName(id);
      // Without the relay's binary the sandbox has no way out at all (checkAvailability warns).
      const servicesDirectory = existsSync(agentPath) ? join(servicesRoot, containerId) : undefined;
      const handle: SandboxHandle = {
        id,
        sessionId: spec.sessionId,
        driver: 'gvisor',
        workdirInside: GVISOR_WORKDIR_INSIDE,
        ...(control.ok ? { enforcedLimits: disk.ok ? limits : processLimits } : {}),
        ...(servicesDirectory ? { servicesDirectory } : {}),
      };
      const live: LiveSandbox = {
        handle,
        spec,
        containerId,
        bundle: newBundleDirectory(containerId),
        limits,
        stopped: false,
        running: new Set(),
        nextProcessFile: 0,
        bridged: servicesDirectory !== undefined,
      };
      sandboxes.set(handle.id, live);
      try {
        if (servicesDirectory) {
          // Only root writes here (the proxy's socket, the CA); read-only inside.
          mkdirSync(servicesRoot, { recursive: true, mode: 0o755 });
          mkdirSync(servicesDirectory, { mode: 0o755 });
        }
        if (control.ok) live.cgroup = control.tree.create(handle.id, hostCgroupLimits(limits));
        // Before the bundle: runsc binds the workdir, which must already be the image.
        if (disk.ok) live.disk = await disk.disks.attach(handle.id, spec.workdir, diskMb);
        writeBundle(live.bundle, spec, limits, live.cgroup, servicesDirectory);
        await startLive(live);
      } catch (error) {
        await destroyLive(live).catch(() => undefined);
        throw error;
      }
      return handle;
    },

    async exec(handle, argv, execOptions = {}): Promise<ExecResult> {
      const result = await run(handle, argv, execOptions);
      return execResultOf(result);
    },

    spawn(handle, argv, spawnOptions = {}): SandboxProcess {
      const { live, commandId, processFile, args } = prepareCommand(handle, argv, spawnOptions);
      // Its own process group, so kill() reaches runsc and what it forked on the host.
      const child = spawn(requireRunsc(), args, {
        env: { PATH: '/usr/bin:/bin' },
        stdio: ['pipe', 'pipe', 'pipe'],
        detached: true,
      });
      live.running.add(child);
      // Writes to a process that has exited fail with EPIPE; the caller learns of it from `exited`.
      child.stdin!.on('error', () => undefined);
      const exited = new Promise<SandboxProcessExit>((resolvePromise) => {
        child.once('exit', (exitCode, signal) => resolvePromise({ exitCode, signal }));
        child.once('error', () => resolvePromise({ exitCode: null, signal: null }));
      }).finally(() => {
        live.running.delete(child);
        void rm(processFile, { force: true });
      });
      let killed = false;
      return {
        stdin: child.stdin!,
        stdout: child.stdout!,
        stderr: child.stderr!,
        exited,
        kill: () => {
          if (killed) return;
          killed = true;
          if (child.pid !== undefined && child.exitCode === null && child.signalCode === null) {
            killProcessTree(child.pid);
          }
          void reapCommand(live, commandId);
        },
      };
    },

    ...sandboxFiles(run, GVISOR_WORKDIR_INSIDE),

    isAlive(handle) {
      const live = sandboxes.get(handle.id);
      return live !== undefined && !live.stopped;
    },

    async destroy(handle) {
      const live = sandboxes.get(handle.id);
      if (live) await destroyLive(live);
    },

    async suspend(handle, directory) {
      const live = lookup(handle);
      // Commands in flight lose their pipes with the container; end them rather than freeze them.
      for (const child of live.running) killProcessTree(child.pid ?? -1);
      const image = join(directory, SUSPENDED_MEMORY);
      mkdirSync(image, { recursive: true, mode: 0o700 });
      const checkpoint = await runsc(['checkpoint', `--image-path=${image}`, live.containerId]);
      const memory = checkpoint.exitCode === 0;
      if (!memory) await rm(image, { recursive: true, force: true });
      await destroyLive(live);
      await moveTree(live.spec.workdir, join(directory, SUSPENDED_WORKSPACE));
      return { memory };
    },

    async stats(handle) {
      return sandboxStats(handle.id, lookup(handle).cgroup, async () => {
        const control = await detectResourceControl();
        return control.ok ? 'it has no cgroup' : control.reason;
      });
    },

    async reapOrphans() {
      if (!runningAsRoot || !existsSync(runscRoot)) return 0;
      let reaped = 0;
      for (const id of await listContainerIds()) {
        if (ownerIsAlive(id)) continue;
        const deleted = await runsc(['delete', '--force', id]);
        if (deleted.exitCode === 0) reaped++;
      }
      for (const directory of [bundlesDirectory, servicesRoot]) {
        for (const entry of existsSync(directory) ? readdirSync(directory) : []) {
          if (!ownerIsAlive(entry)) await rm(join(directory, entry), { recursive: true, force: true });
        }
      }
      const control = await detectResourceControl();
      // Groups whose Sentry outlived runsc's own state.
      if (control.ok) await control.tree.reapLeftovers();
      // Last: nothing serves the dead servers' workspaces now; their files go back to the workdirs.
      const disk = await detectDiskControl();
      if (disk.ok) reaped += await disk.disks.reapLeftovers();
      return reaped;
    },

    async destroyAll() {
      await Promise.all([...sandboxes.values()].map((live) => destroyLive(live)));
    },

    containerId(handle) {
      return sandboxes.get(handle.id)?.containerId;
    },
  };
}
