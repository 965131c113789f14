/**
 * The bubblewrap driver: one long-lived bwrap per session (user, pid, mount, net, ipc, uts and
 * cgroup namespaces; uid 1000 inside; read-only /usr; loopback-only network; private /tmp) whose
 * command is the sandbox agent (`../agent/berth-agent.c`, `--stdio`). Berth talks to the agent
 * over its stdin and stdout: running a command is a frame, and the agent forks it inside the
 * sandbox, where it inherits the agent's user, namespaces, cgroup and seccomp filter
 * (`../seccomp.ts`). No host process has to enter the sandbox, so an exec costs well under a
 * millisecond of process work. The agent's stdin is also a lifeline: only Berth holds its write
 * end, so the agent exits when Berth does. Killing a pid namespace's init kills everything in it,
 * so destroy leaves nothing.
 *
 * The sandbox is launched by the static helper (`native/berth-exec.c --launch-sandbox`): it dies
 * with Berth (checked after it arms), joins the cgroup, makes the private mount namespace that
 * exposes the workdir to bwrap, and starts bwrap as the unprivileged host user and as the init of
 * a pid namespace that dies with the launcher, in one process instead of a chain of shells.
 * bwrap's own --die-with-parent is armed only part-way through its set-up: a Berth killed in that
 * window used to leave a half-made sandbox behind (its child waiting forever for its monitor);
 * now the kernel ends the outer pid namespace, and everything in it, whatever the moment.
 *
 * When Berth does not run as root, or the helpers are not built, each command gets its own bwrap
 * over the same workdir (≈5-10 ms; /tmp and background processes do not outlive a command).
 *
 * Resource limits: as root, each sandbox gets its own cgroup (v1 or v2, see `cgroups.ts`) with a
 * CPU quota, a memory ceiling without swap and a process cap; the launcher joins it before bwrap
 * runs, so the agent and every command are in it. Without root or usable cgroups, sandboxes still run but nothing is
 * limited: `checkAvailability` warns, handles carry no `enforcedLimits`, `stats` throws
 * `sandbox_unavailable`, and a spec that asks for limits explicitly is refused rather than run
 * unlimited.
 *
 * Disk: as root, the workdir is a loop-mounted ext4 image of `diskMb` while the sandbox lives
 * (see `workspace-disk.ts`); /tmp and the home directory are tmpfs of `tmpfsMb`.
 */
import type { ChildProcess } from 'node:child_process';
import { execFile, spawn } from 'node:child_process';
import {
  chmodSync,
  existsSync,
  lstatSync,
  mkdirSync,
  readdirSync,
  readFileSync,
  readlinkSync,
  renameSync,
  rmdirSync,
  rmSync,
  statSync,
} from 'node:fs';
import { dirname, join, posix, resolve } from 'node:path';
import { BerthError } from '../../errors.js';
import { newId } from '../../ids.js';
import { type AgentCommandResult, runOnAgent, spawnOnAgent } from '../agent/agent-commands.js';
import { AgentConnection } from '../agent/agent-connection.js';
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
import { buildSeccompFilter, hostSeccompArchitecture } from '../seccomp.js';
import { moveTree, restoreWorkspace, SUSPENDED_WORKSPACE } from '../workspace-move.js';
import {
  CGROUP_JOIN_FAILURE,
  type CgroupDetection,
  type CgroupTree,
  detectHostCgroupLayout,
  joinCgroupCommand,
  openCgroupTree,
  ownerIsAlive,
  type SandboxCgroup,
  sandboxCgroupName,
  sandboxStats,
} from './cgroups.js';
import { openWorkspaceDisks, type WorkspaceDisk, type WorkspaceDisks } from './workspace-disk.js';

/** Where the session's workdir appears inside every bwrap sandbox. */
export const BWRAP_WORKDIR_INSIDE = '/workspace';

/** A path inside this driver's sandboxes (relative ones from the working directory). */
const inside = (path: string) => pathInside(BWRAP_WORKDIR_INSIDE, path);
/** The uid and gid commands run as inside the sandbox. */
export const SANDBOX_UID = 1000;
const SANDBOX_HOME = '/home/sandbox';
const SANDBOX_PATH = '/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin';
const PROVISION_TIMEOUT_MS = 10_000;

/** Options for `createBwrapDriver`; every field has a working default. */
export interface BwrapDriverOptions {
  /** Path to bwrap (default: looked up on PATH). */
  bwrapPath?: string;
  /**
   * Path to the launch and mount helper (`native/berth-exec.c`, built by `native/build.sh`;
   * default `/usr/local/lib/berth/berth-exec`). Persistent mode and workspace disks need it.
   */
  execHelperPath?: string;
  /**
   * Path to the sandbox agent (`../agent/berth-agent.c`, built by `native/build.sh`; default
   * `/usr/local/lib/berth/berth-agent`), which must be under a directory the sandbox sees
   * (`/usr`). Persistent mode needs it. Without the helpers the driver runs one bwrap per
   * command and says so in `checkAvailability`.
   */
  agentPath?: string;
  /**
   * Where workspace disk images live (default `/var/lib/berth/disks`): a disk filesystem with
   * sparse files, as root. See `workspace-disk.ts`.
   */
  diskImageDirectory?: string;
  /**
   * Host uid/gid the sandbox's processes run as when Berth runs as root (default 1000), so a
   * process that escaped the namespaces would still be an unprivileged host user. The workdir
   * is chowned to it.
   */
  hostUid?: number;
  hostGid?: number;
  /**
   * Size of the private /tmp and home tmpfs mounts (default 256). Their pages count against
   * the sandbox's memory limit too.
   */
  tmpfsMb?: number;
  /** Force a lifecycle (default: `persistent` as root, else `per-exec`). */
  mode?: BwrapMode;
  /**
   * How many sandboxes to keep started ahead of need (default 0: none). A new session with the
   * default limits and no read-only mounts takes one instead of starting its own, which skips
   * the cgroup join (≈11 ms on cgroup v1), the disk image mount and bwrap's start. Persistent
   * mode only. Call `warmUp()` to start filling and `close()` to release them.
   */
  warmPool?: number;
  /**
   * Where pooled sandboxes' directories live until a session takes one (default
   * `/var/lib/berth/pool`). Without workspace disks they are renamed onto the session's workdir,
   * so they should be on the same filesystem (otherwise each claim falls back to a cold start).
   */
  poolDirectory?: string;
  /**
   * Where each persistent sandbox gets its services directory (default `/run/berth/services`),
   * seen read-only inside at `/run/berth` (see `SandboxHandle.servicesDirectory`).
   */
  servicesDirectory?: string;
  /**
   * Where the cgroup hierarchies are (default: detected from /proc/self/mounts); a
   * `{ ok: false, reason }` runs without resource limits, as on a host without usable cgroups.
   */
  cgroups?: CgroupDetection;
}

/**
 * `persistent`: one bwrap per sandbox, commands enter it with the exec helper (needs root).
 * `per-exec`: one bwrap per command over the same workdir (works unprivileged).
 */
export type BwrapMode = 'persistent' | 'per-exec';

/** The bwrap driver, plus shutdown and introspection the supervisor needs. */
export interface BwrapDriver extends SandboxDriver {
  readonly mode: BwrapMode;
  /** Always present; throws `sandbox_unavailable` in per-exec mode (no live sandbox to enter). */
  spawn(handle: SandboxHandle, argv: readonly string[], options?: SandboxSpawnOptions): SandboxProcess;
  /** Destroys every sandbox this driver still tracks, pooled ones included (for server shutdown). */
  destroyAll(): Promise<void>;
  /** Starts keeping `warmPool` sandboxes ready (a no-op without a pool). */
  warmUp(): void;
  /** Stops the pool and destroys the sandboxes in it. */
  close(): Promise<void>;
  /** Pooled sandboxes ready right now (for tests and diagnostics). */
  readonly warmCount: number;
  /** Host pid of a persistent sandbox's namespace init, for tests and diagnostics. */
  initPid(handle: SandboxHandle): number | undefined;
  /** Always present; throws `sandbox_unavailable` when this host enforces no limits. */
  stats(handle: SandboxHandle): Promise<SandboxStats>;
  reapOrphans(): Promise<number>;
}

/** Whether sandboxes get cgroups on this host, and if not, why. */
type ResourceControl = { ok: true; tree: CgroupTree } | { ok: false; reason: string };
/** Whether workspaces get a size limit on this host, and if not, why. */
type DiskControl = { ok: true; disks: WorkspaceDisks } | { ok: false; reason: string };

/** Where `native/build.sh` installs the helpers (under /usr, so every sandbox sees them). */
export const DEFAULT_EXEC_HELPER_PATH = '/usr/local/lib/berth/berth-exec';
export const DEFAULT_AGENT_PATH = '/usr/local/lib/berth/berth-agent';
const DEFAULT_DISK_IMAGE_DIRECTORY = '/var/lib/berth/disks';
const DEFAULT_POOL_DIRECTORY = '/var/lib/berth/pool';
/** How long after a claim the pool starts replacing what was taken. */
const REFILL_DELAY_MS = 50;
const DEFAULT_SERVICES_DIRECTORY = '/run/berth/services';
/** Where a sandbox sees its services directory (the egress proxy's socket, its CA). */
export const SANDBOX_SERVICES_INSIDE = '/run/berth';
/** The egress proxy's socket in the services directory, and the port it is relayed to inside. */
export const EGRESS_SOCKET_NAME = 'egress.sock';
export const SANDBOX_EGRESS_PORT = 3128;
const BUILD_HELPER_HINT = 'build them with `sh src/sandbox/bwrap/native/build.sh` (needs gcc and libc6-dev)';

interface LiveSandbox {
  handle: SandboxHandle;
  spec: SandboxSpec;
  /** The outer bwrap process (persistent mode only). */
  bwrap?: ChildProcess;
  /** The connection to the sandbox's agent (persistent mode only). */
  agent?: AgentConnection;
  /** Host pid of the first process inside the namespaces (persistent mode only). */
  initPid?: number;
  exited?: Promise<void>;
  stopped: boolean;
  /** Set by destroy: commands cut short by it were killed on purpose, not lost. */
  destroying?: boolean;
  /** Commands and spawned processes running right now (host processes), killed by destroy. */
  running: Set<ChildProcess>;
  /** The sandbox's cgroup, when this host enforces limits. */
  cgroup?: SandboxCgroup;
  /** The image mounted over the workdir, when this host enforces the disk limit. */
  disk?: WorkspaceDisk;
}

/** Copies the contents of `from` into the existing directory `to` (modes, owners, links, times). */
async function copyTree(from: string, to: string): Promise<void> {
  await new Promise<void>((resolve, reject) => {
    execFile(
      'cp',
      ['-a', '--no-target-directory', `${from}/.`, to],
      { env: { PATH: '/usr/bin:/bin', LC_ALL: 'C' } },
      (error, _stdout, stderr) =>
        error ? reject(new Error(`cp: ${stderr.trim() || error.message}`)) : resolve(),
    );
  });
}

/** True when `path` is a mount point (its device differs from its parent's). */
function isMountPoint(path: string): boolean {
  try {
    return statSync(path).dev !== statSync(dirname(path)).dev;
  } catch {
    return false;
  }
}

/** True when `path` does not exist or is an empty directory that nothing is mounted on. */
function isEmptyDirectory(path: string): boolean {
  try {
    return readdirSync(path).length === 0 && !isMountPoint(path);
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === 'ENOENT';
  }
}

/** `--symlink` or `--ro-bind` arguments for the top-level /bin, /lib... of this host. */
function rootDirectoryArguments(): string[] {
  const result: string[] = [];
  for (const name of ['bin', 'sbin', 'lib', 'lib32', 'lib64', 'libx32']) {
    const hostPath = `/${name}`;
    let stats: ReturnType<typeof lstatSync>;
    try {
      stats = lstatSync(hostPath);
    } catch {
      continue;
    }
    if (stats.isSymbolicLink()) result.push('--symlink', readlinkSync(hostPath), hostPath);
    else if (stats.isDirectory()) result.push('--ro-bind', hostPath, hostPath);
  }
  return result;
}

/** Inside paths a read-only mount may not cover or sit under (the sandbox's own mounts). */
const RESERVED_INSIDE_PATHS = ['/proc', '/dev', '/tmp', BWRAP_WORKDIR_INSIDE, SANDBOX_HOME];

/** Rejects read-only mounts that would shadow the sandbox's own mounts or cannot be bound. */
function validateReadOnlyMounts(spec: SandboxSpec, runningAsRoot: boolean): void {
  for (const mount of spec.readOnlyMounts ?? []) {
    const { hostPath, insidePath: inside } = mount;
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
    // As root, bwrap starts after the launcher has bound the workdir over /tmp (see
    // ROOT_LAUNCHER_SCRIPT), so a host path under it would resolve into the workdir.
    if (runningAsRoot && (hostPath === LAUNCHER_WORKDIR || hostPath.startsWith(`${LAUNCHER_WORKDIR}/`))) {
      throw new BerthError(
        'invalid_request',
        `read-only mount source ${hostPath} is under ${LAUNCHER_WORKDIR}, which the root launcher hides; move it elsewhere`,
      );
    }
    try {
      statSync(hostPath);
    } catch {
      throw new BerthError('invalid_request', `read-only mount source does not exist: ${hostPath}`);
    }
  }
}

/** The same limits in the units cgroups take. */
function cgroupLimits(limits: EnforcedLimits) {
  return { cpuCores: limits.cpu, memoryBytes: limits.memoryMb * 1024 * 1024, pids: limits.pids };
}

const ETC_PASSWD = `root:x:0:0:root:/root:/usr/sbin/nologin\nsandbox:x:${SANDBOX_UID}:${SANDBOX_UID}:sandbox:${SANDBOX_HOME}:/bin/bash\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n`;
const ETC_GROUP = `root:x:0:\nsandbox:x:${SANDBOX_UID}:\nnogroup:x:65534:\n`;
const ETC_HOSTS = '127.0.0.1\tlocalhost sandbox\n::1\tlocalhost ip6-localhost ip6-loopback\n';

/**
 * Fixed fd numbers the bwrap command line refers to (see `feedData`), and the launch gate (a
 * socket: Berth sends the go, the launcher answers with the sandbox's init pid). Fd 3 is unused.
 */
const FD = { unused: 3, passwd: 4, group: 5, hosts: 6, seccomp: 7, gate: 8 } as const;
/** Extra stdio for fds 3..7: an unused slot, the three generated /etc files and the seccomp filter. */
const EXTRA_STDIO: Array<'pipe'> = ['pipe', 'pipe', 'pipe', 'pipe', 'pipe'];

/**
 * As root, bwrap runs as the unprivileged host user, which usually cannot reach the workdir
 * (data directories are mode 700, and bwrap resolves bind sources by path, even `--bind-fd`).
 * So a private mount namespace binds the workdir over /tmp first, then drops to the host user
 * and execs bwrap. The bind is invisible to the host and goes away with the sandbox.
 */
const ROOT_LAUNCHER_SCRIPT =
  'mount --bind "$0" /run/berth/workdir && uid=$1 gid=$2 bwrap=$3 && shift 3 && ' +
  'exec setpriv --reuid="$uid" --regid="$gid" --clear-groups -- "$bwrap" "$@"';
/**
 * Where the root launcher binds the session's workdir (in its private mount namespace) so
 * bwrap, running as the unprivileged host user, can reach it. A dedicated, otherwise empty
 * directory: whatever it hides on the host cannot be a mount source anyone needs.
 */
const LAUNCHER_WORKDIR = '/run/berth/workdir';

/** Environment variable set in every sandbox init; names the session and marks the process as ours. */
const ORPHAN_MARKER = 'BERTH_SESSION_ID';

/** Creates the bubblewrap driver. Call `checkAvailability()` before provisioning. */
export function createBwrapDriver(options: BwrapDriverOptions = {}): BwrapDriver {
  const runningAsRoot = process.getuid?.() === 0;
  const execHelperPath = options.execHelperPath ?? DEFAULT_EXEC_HELPER_PATH;
  const agentPath = options.agentPath ?? DEFAULT_AGENT_PATH;
  const execHelperBuilt = existsSync(execHelperPath) && existsSync(agentPath);
  // Without the helpers, one bwrap per command (which applies the filter) is slower but as tight.
  const mode: BwrapMode = options.mode ?? (runningAsRoot && execHelperBuilt ? 'persistent' : 'per-exec');
  const warmPoolSize = mode === 'persistent' ? Math.max(0, Math.floor(options.warmPool ?? 0)) : 0;
  const poolDirectory = resolve(options.poolDirectory ?? DEFAULT_POOL_DIRECTORY);
  const servicesRoot = resolve(options.servicesDirectory ?? DEFAULT_SERVICES_DIRECTORY);
  /** Sandboxes between `startSandbox` and being tracked (destroyAll must reach them too). */
  const starting = new Set<LiveSandbox>();
  const hostUid = options.hostUid ?? 1000;
  const hostGid = options.hostGid ?? 1000;
  const sandboxes = new Map<string, LiveSandbox>();
  const seccompArchitecture = hostSeccompArchitecture();
  const seccompFilter = seccompArchitecture ? buildSeccompFilter(seccompArchitecture) : undefined;
  let bwrapPath = options.bwrapPath;
  let unsharePath: string | undefined;
  let resourceControl: Promise<ResourceControl> | undefined;
  let diskControl: Promise<DiskControl> | undefined;

  /** Finds out once whether workspaces can get a size limit here (root, loop devices, mkfs). */
  const detectDiskControl = (): Promise<DiskControl> => {
    diskControl ??= (async (): Promise<DiskControl> => {
      if (!runningAsRoot)
        return { ok: false, reason: 'Berth is not running as root, and only root can mount images' };
      const disks = openWorkspaceDisks({
        directory: options.diskImageDirectory ?? DEFAULT_DISK_IMAGE_DIRECTORY,
        uid: hostUid,
        gid: hostGid,
        helperPath: execHelperPath,
      });
      const detected = await disks.detect();
      return detected.ok ? { ok: true, disks } : detected;
    })();
    return diskControl;
  };

  /** Finds out once whether sandboxes can get cgroups here (needs root and usable hierarchies). */
  const detectResourceControl = (): Promise<ResourceControl> => {
    resourceControl ??= (async (): Promise<ResourceControl> => {
      if (!runningAsRoot) {
        return {
          ok: false,
          reason: 'Berth is not running as root, and only root can give sandboxes cgroups',
        };
      }
      const detection = options.cgroups ?? detectHostCgroupLayout();
      if (!detection.ok) return detection;
      const tree = openCgroupTree(detection.layout);
      try {
        // A throwaway group proves the parent can be made and every limit written.
        const probe = tree.create(newId('sbx'), cgroupLimits(DEFAULT_SANDBOX_LIMITS));
        await probe.remove();
      } catch (error) {
        return { ok: false, reason: error instanceof Error ? error.message : String(error) };
      }
      return { ok: true, tree };
    })();
    return resourceControl;
  };

  /** `[command, args]` changed to join the sandbox's cgroup before running, when it has one. */
  const inCgroup = (live: LiveSandbox, [command, args]: [string, string[]]): [string, string[]] =>
    live.cgroup ? joinCgroupCommand(live.cgroup, command, args) : [command, args];

  const requireBinaries = (): { bwrap: string } => {
    bwrapPath ??= findExecutable('bwrap');
    unsharePath ??= findExecutable('unshare');
    if (!bwrapPath) {
      throw new BerthError(
        'sandbox_unavailable',
        'bubblewrap (bwrap) is not installed; install it with `apt-get install bubblewrap`',
      );
    }
    if (runningAsRoot && !unsharePath) {
      throw new BerthError(
        'sandbox_unavailable',
        'unshare is not installed; install it with `apt-get install util-linux`',
      );
    }
    if (mode === 'persistent' && !execHelperBuilt) {
      throw new BerthError(
        'sandbox_unavailable',
        `the bwrap sandbox helpers are not built (${execHelperPath}, ${agentPath}); ${BUILD_HELPER_HINT}`,
      );
    }
    if (!seccompFilter) {
      throw new BerthError(
        'sandbox_unavailable',
        `the sandbox seccomp filter knows no syscall numbers for ${process.arch} (only x64 and arm64)`,
      );
    }
    return { bwrap: bwrapPath };
  };

  const bwrapArguments = (spec: SandboxSpec, servicesDirectory?: string): string[] => {
    const tmpfsBytes = String((options.tmpfsMb ?? 256) * 1024 * 1024);
    return [
      // The filter (see seccomp.ts) for the init, or for the command in per-exec mode.
      '--seccomp',
      String(FD.seccomp),
      '--unshare-all',
      '--unshare-user',
      '--disable-userns',
      '--uid',
      String(SANDBOX_UID),
      '--gid',
      String(SANDBOX_UID),
      '--die-with-parent',
      '--new-session',
      '--clearenv',
      // Marks the process as a Berth sandbox, so `reapOrphans` can find one whose server died.
      '--setenv',
      ORPHAN_MARKER,
      spec.sessionId,
      '--hostname',
      'sandbox',
      '--ro-bind',
      '/usr',
      '/usr',
      ...rootDirectoryArguments(),
      '--ro-bind-try',
      '/etc/alternatives',
      '/etc/alternatives',
      '--ro-bind-try',
      '/etc/ld.so.cache',
      '/etc/ld.so.cache',
      '--ro-bind-try',
      '/etc/ssl/certs',
      '/etc/ssl/certs',
      '--ro-bind-try',
      '/etc/localtime',
      '/etc/localtime',
      '--ro-bind-data',
      String(FD.passwd),
      '/etc/passwd',
      '--ro-bind-data',
      String(FD.group),
      '/etc/group',
      '--ro-bind-data',
      String(FD.hosts),
      '/etc/hosts',
      '--proc',
      '/proc',
      '--dev',
      '/dev',
      '--size',
      tmpfsBytes,
      '--tmpfs',
      '/tmp',
      '--size',
      tmpfsBytes,
      '--tmpfs',
      SANDBOX_HOME,
      '--bind',
      runningAsRoot ? LAUNCHER_WORKDIR : spec.workdir,
      BWRAP_WORKDIR_INSIDE,
      ...(spec.readOnlyMounts ?? []).flatMap((mount) => ['--ro-bind', mount.hostPath, mount.insidePath]),
      ...(servicesDirectory ? ['--ro-bind', servicesDirectory, SANDBOX_SERVICES_INSIDE] : []),
      // The root tmpfs is memory; nothing may write to it.
      '--remount-ro',
      '/',
    ];
  };

  /** Environment every command sees; nothing comes from the server's own environment. */
  const commandEnvironment = (spec: SandboxSpec, extra?: Readonly<Record<string, string>>) => ({
    PATH: SANDBOX_PATH,
    HOME: SANDBOX_HOME,
    USER: 'sandbox',
    LOGNAME: 'sandbox',
    SHELL: '/bin/bash',
    LANG: 'C.UTF-8',
    ...spec.env,
    ...extra,
  });

  /** Writes the generated /etc files into their pipes (bwrap reads them during setup). */
  const feedData = (child: ChildProcess) => {
    const write = (fd: number, text: string) => {
      const stream = child.stdio[fd] as (NodeJS.WritableStream & NodeJS.EventEmitter) | null | undefined;
      if (!stream) return;
      stream.on('error', () => {});
      stream.end(text);
    };
    write(FD.passwd, ETC_PASSWD);
    write(FD.group, ETC_GROUP);
    write(FD.hosts, ETC_HOSTS);
    const seccomp = (child.stdio as unknown[])[FD.seccomp] as
      | (NodeJS.WritableStream & NodeJS.EventEmitter)
      | null
      | undefined;
    seccomp?.on('error', () => {});
    seccomp?.end(seccompFilter!);
  };

  /** The command and arguments that start bwrap with `bwrapArgs` for this sandbox. */
  const launch = (spec: SandboxSpec, bwrap: string, bwrapArgs: string[]): [string, string[]] => {
    if (!runningAsRoot) return [bwrap, bwrapArgs];
    return [
      unsharePath!,
      [
        '--mount',
        // Slave, not private: when the host unmounts another session's workspace image, the
        // copy this namespace took at creation goes too, so the image's loop device is freed.
        '--propagation',
        'slave',
        '--',
        'sh',
        '-c',
        ROOT_LAUNCHER_SCRIPT,
        resolve(spec.workdir),
        String(hostUid),
        String(hostGid),
        bwrap,
        ...bwrapArgs,
      ],
    ];
  };

  const prepareWorkdir = (spec: SandboxSpec) => {
    mkdirSync(spec.workdir, { recursive: true });
    if (runningAsRoot) {
      mkdirSync(LAUNCHER_WORKDIR, { recursive: true, mode: 0o755 });
      chmodSync(dirname(LAUNCHER_WORKDIR), 0o755);
    }
    if (!statSync(spec.workdir).isDirectory()) {
      throw new BerthError('invalid_request', `sandbox workdir is not a directory: ${spec.workdir}`);
    }
    if (runningAsRoot) chownTree(spec.workdir, hostUid, hostGid);
  };

  /**
   * Starts the sandbox's bwrap and agent. The launcher joins the cgroup at once (on cgroup v1
   * that alone waits ~10 ms) and waits for `workspaceReady` before it builds the mount namespace,
   * so the workspace disk is mounted meanwhile.
   */
  const startPersistent = async (
    live: LiveSandbox,
    bwrap: string,
    workspaceReady: Promise<unknown>,
  ): Promise<void> => {
    const cgroupFiles = live.cgroup?.processFiles ?? [];
    // As root (persistent mode needs it): the helper ties its life to this process, joins the
    // cgroup, binds the workdir where the unprivileged bwrap can reach it, and starts bwrap (whose
    // command is the agent) as the init of a pid namespace of its own, as the host user: killed
    // at any moment, this process takes the whole sandbox with it. The agent says READY once it
    // runs: no command can reach a half-built sandbox.
    const child = spawn(
      execHelperPath,
      [
        '--launch-sandbox',
        String(process.pid),
        String(FD.gate),
        String(cgroupFiles.length),
        ...cgroupFiles,
        resolve(live.spec.workdir),
        String(hostUid),
        String(hostGid),
        bwrap,
        ...bwrapArguments(live.spec, live.handle.servicesDirectory),
        agentPath,
        '--stdio',
      ],
      { env: { PATH: '/usr/bin:/bin' }, stdio: ['pipe', 'pipe', 'pipe', ...EXTRA_STDIO, 'pipe'] },
    );
    feedData(child);
    live.bwrap = child;
    const gate = (child.stdio as unknown[])[FD.gate] as NodeJS.ReadWriteStream & NodeJS.EventEmitter;
    gate.on('error', () => undefined);
    // Closing the gate without a byte makes the launcher give up.
    workspaceReady.then(
      () => gate.end('g'),
      () => gate.end(),
    );
    live.exited = new Promise((resolve) => {
      const ended = () => {
        live.stopped = true;
        resolve();
      };
      child.once('exit', ended);
      child.once('error', ended);
    });
    let stderr = '';
    child.stderr?.on('data', (chunk: Buffer) => {
      if (stderr.length < 4096) stderr += chunk.toString('utf8');
    });
    // The lifeline: the agent's stdin. Only this process holds its write end; when it closes,
    // however Berth ended, the agent exits and the kernel ends the sandbox.
    live.agent = AgentConnection.overPipes(child.stdout!, child.stdin!);
    // The launcher answers through the gate with the host pid of the sandbox's pid namespace init.
    const initPid = new Promise<number>((resolve, reject) => {
      let text = '';
      gate.on('data', (chunk: Buffer) => {
        text += chunk.toString('utf8');
      });
      gate.on('error', reject);
      gate.on('close', () => {
        const pid = /^(\d+)\n/.exec(text)?.[1];
        if (pid === undefined) reject(new Error('the sandbox launcher exited'));
        else resolve(Number(pid));
      });
    });
    try {
      [, live.initPid] = await Promise.all([live.agent.ready(PROVISION_TIMEOUT_MS), initPid]);
      // The sandbox's one way out: 127.0.0.1:EGRESS_PORT relays to the socket the server puts in
      // the services directory (the session's egress proxy). Until then, connections just close.
      const relay = spawnOnAgent(live.agent, {
        argv: [
          agentPath,
          '--bridge',
          String(SANDBOX_EGRESS_PORT),
          `${SANDBOX_SERVICES_INSIDE}/${EGRESS_SOCKET_NAME}`,
        ],
        env: {},
        cwd: '/',
      });
      // Listening before any command runs, so a first `curl` never finds the port closed.
      await new Promise<void>((resolve, reject) => {
        const timer = setTimeout(
          () => reject(new Error('the egress relay did not start')),
          PROVISION_TIMEOUT_MS,
        );
        relay.stdout.once('data', () => {
          clearTimeout(timer);
          resolve();
        });
        void relay.exited.then(({ exitCode }) => {
          clearTimeout(timer);
          reject(new Error(`the egress relay exited (${exitCode})`));
        });
      });
    } catch (error) {
      // Give bwrap a moment to exit, so its stderr (the real reason) is complete.
      await Promise.race([live.exited, new Promise((resolve) => setTimeout(resolve, 1000))]);
      const reason = stderr.trim() || (error instanceof Error ? error.message : String(error));
      throw new BerthError('sandbox_failed', `bwrap could not start the sandbox: ${reason}`, {
        retryable: true,
        details: { stderr: stderr.trim() },
      });
    }
  };

  /** Creates the cgroup and the workspace disk and starts the sandbox over `spec.workdir`. */
  const startSandbox = async (
    spec: SandboxSpec,
    limits: Required<EnforcedLimits>,
    control: ResourceControl,
    disk: DiskControl,
    bwrap: string,
  ): Promise<LiveSandbox> => {
    const { diskMb, ...processLimits } = limits;
    const id = newId('sbx');
    const servicesDirectory = mode === 'persistent' ? join(servicesRoot, sandboxCgroupName(id)) : undefined;
    const handle: SandboxHandle = {
      id,
      sessionId: spec.sessionId,
      driver: 'bwrap',
      workdirInside: BWRAP_WORKDIR_INSIDE,
      ...(control.ok ? { enforcedLimits: disk.ok ? limits : processLimits } : {}),
      ...(servicesDirectory ? { servicesDirectory } : {}),
    };
    const live: LiveSandbox = { handle, spec, stopped: false, running: new Set() };
    starting.add(live);
    try {
      if (servicesDirectory) {
        // Reachable by the unprivileged host user bwrap runs as; read-only inside.
        mkdirSync(servicesRoot, { recursive: true, mode: 0o755 });
        mkdirSync(servicesDirectory, { mode: 0o755 });
      }
      if (control.ok) live.cgroup = control.tree.create(handle.id, cgroupLimits(limits));
      const attached = disk.ok
        ? disk.disks.attach(handle.id, spec.workdir, diskMb).then((mounted) => {
            live.disk = mounted;
          })
        : Promise.resolve();
      // Both settle before anything is cleaned up, so a disk mounted late is never left behind.
      const outcomes = await Promise.allSettled([
        attached,
        mode === 'persistent' ? startPersistent(live, bwrap, attached) : undefined,
      ]);
      const failure = outcomes.find((outcome) => outcome.status === 'rejected');
      if (failure) throw failure.reason;
    } catch (error) {
      await destroyLive(live);
      throw error;
    } finally {
      starting.delete(live);
    }
    return live;
  };

  /**
   * The warm pool (`warmPool`): sandboxes started ahead of need over a directory of their own
   * under `poolDirectory`, with the default limits and no read-only mounts. A provision that
   * asks for exactly that and whose workdir is empty (a new session) takes one: its workspace
   * (the mounted disk image, or the directory itself without one) is moved onto the session's
   * workdir, which the sandbox sees at once because its /workspace is bound to the same tree.
   * What is taken is replaced in the background, one sandbox at a time.
   */
  const pool: LiveSandbox[] = [];
  let pooling = false;
  let filling: Promise<void> | undefined;
  const defaultLimits = resolveLimits({ sessionId: 'pool', workdir: '/' }).limits;

  const fillPool = (): void => {
    if (!pooling || filling || pool.length >= warmPoolSize) return;
    filling = (async () => {
      try {
        while (pooling && pool.length < warmPoolSize) {
          const [control, disk] = await Promise.all([detectResourceControl(), detectDiskControl()]);
          const id = newId('sbx');
          // Named like cgroups (`<id>.<pid>.<start>`), so `reapOrphans` knows a dead server's.
          // The pool in place of a session id marks a sandbox as pooled (and whose) in `ps`.
          const spec: SandboxSpec = {
            sessionId: `pool:${poolDirectory}`,
            workdir: join(poolDirectory, sandboxCgroupName(id)),
          };
          prepareWorkdir(spec);
          const live = await startSandbox(spec, defaultLimits, control, disk, requireBinaries().bwrap).catch(
            (error: unknown) => {
              rmSync(spec.workdir, { recursive: true, force: true });
              throw error;
            },
          );
          if (!pooling) {
            await discardWarm(live);
            break;
          }
          pool.push(live);
        }
      } catch {
        // Provisioning still works without the pool; the next claim tries to refill it.
      } finally {
        filling = undefined;
      }
    })();
  };

  /** Destroys a pooled sandbox that no session took, and its directory. */
  const discardWarm = async (live: LiveSandbox): Promise<void> => {
    await destroyLive(live).catch(() => undefined);
    rmSync(live.spec.workdir, { recursive: true, force: true });
  };

  /** A pooled sandbox turned into `spec`'s, or undefined when none fits (then start one cold). */
  const claimWarm = async (
    spec: SandboxSpec,
    limits: Required<EnforcedLimits>,
  ): Promise<LiveSandbox | undefined> => {
    if (!pooling) return undefined;
    const saved = spec.restoreFrom === undefined ? undefined : join(spec.restoreFrom, SUSPENDED_WORKSPACE);
    const fits =
      (saved === undefined || existsSync(saved)) &&
      (spec.readOnlyMounts ?? []).length === 0 &&
      (Object.keys(defaultLimits) as (keyof EnforcedLimits)[]).every(
        (key) => limits[key] === defaultLimits[key],
      );
    if (!fits || !isEmptyDirectory(spec.workdir)) return undefined;
    for (let live = pool.shift(); live !== undefined; live = pool.shift()) {
      if (live.stopped) {
        void discardWarm(live);
        continue;
      }
      try {
        // A resume copies the saved files into the pooled workspace (the snapshot stays intact
        // until the caller deletes it, so a crash here loses nothing).
        if (saved !== undefined) await copyTree(saved, live.spec.workdir);
        const target = resolve(spec.workdir);
        mkdirSync(target, { recursive: true });
        if (live.disk) {
          await live.disk.relocate(target);
        } else {
          rmdirSync(target);
          renameSync(live.spec.workdir, target);
        }
        chmodSync(target, 0o755);
      } catch {
        // e.g. the workdir is on another filesystem than the pool (rename), or the saved files
        // exceed the pooled disk: start one cold (which reports a real problem properly).
        void discardWarm(live);
        return undefined;
      } finally {
        // A little later: starting a sandbox spawns processes, and Node's spawn blocks the event
        // loop for milliseconds, which the new session's first command would otherwise wait out.
        setTimeout(fillPool, REFILL_DELAY_MS).unref();
      }
      live.spec = spec;
      live.handle = { ...live.handle, sessionId: spec.sessionId };
      sandboxes.set(live.handle.id, live);
      return live;
    }
    fillPool();
    return undefined;
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

  /** Runs argv inside the sandbox; the shared core of exec, readFile and writeFile. */
  const run = async (
    handle: SandboxHandle,
    argv: readonly string[],
    execOptions: ExecOptions,
  ): Promise<AgentCommandResult | RunProcessResult> => {
    validateArgv(argv);
    validateEnvironment(execOptions.env);
    const live = lookup(handle);
    const binaries = requireBinaries();
    const cwd = inside(execOptions.cwd ?? BWRAP_WORKDIR_INSIDE);
    const env = commandEnvironment(live.spec, execOptions.env);
    const common = {
      stdin: execOptions.stdin,
      timeoutMs: execOptions.timeoutMs ?? DEFAULT_TIMEOUT_MS,
      signal: execOptions.signal,
      maxOutputBytes: execOptions.maxOutputBytes ?? DEFAULT_MAX_OUTPUT_BYTES,
    };
    if (mode === 'persistent') {
      const result = await runOnAgent(live.agent!, { ...common, argv, env, cwd });
      if (result.lost && !live.destroying) {
        throw new BerthError('sandbox_failed', `sandbox ${handle.id} ended while a command ran in it`, {
          retryable: true,
        });
      }
      return result;
    }
    let tracked: ChildProcess | undefined;
    try {
      let result: RunProcessResult;
      {
        const setenv = Object.entries(env).flatMap(([name, value]) => ['--setenv', name, value]);
        const [command, args] = inCgroup(
          live,
          launch(live.spec, binaries.bwrap, [
            ...bwrapArguments(live.spec),
            ...setenv,
            '--chdir',
            cwd,
            '--',
            ...argv,
          ]),
        );
        result = await runProcess(command, args, {
          ...common,
          killTree: (child: ChildProcess) => killProcessTree(child.pid ?? -1),
          spawnOptions: { env: { PATH: '/usr/bin:/bin' } },
          extraStdio: ['ignore', 'pipe', 'pipe', 'pipe', 'pipe'],
          onSpawn: (child) => {
            tracked = child;
            live.running.add(child);
            feedData(child);
          },
        });
      }
      if (live.cgroup && result.exitCode === 125 && result.stderr.includes(CGROUP_JOIN_FAILURE)) {
        // The command never ran: it could not be put under the sandbox's limits.
        throw new BerthError('sandbox_failed', `sandbox ${handle.id} has lost its cgroup`, {
          retryable: true,
          details: { stderr: result.stderr.toString('utf8').trim() },
        });
      }
      return result;
    } catch (error) {
      if (error instanceof BerthError) throw error;
      throw new BerthError('sandbox_failed', `could not run a command in sandbox ${handle.id}`, {
        retryable: true,
        cause: error,
      });
    } finally {
      if (tracked) live.running.delete(tracked);
    }
  };

  /** Turns a failed file command into a typed error. */
  const destroyLive = async (live: LiveSandbox): Promise<void> => {
    sandboxes.delete(live.handle.id);
    live.stopped = true;
    live.destroying = true;
    // Closing the lifeline alone ends the sandbox; the kills below make it immediate.
    live.agent?.close();
    if (live.initPid !== undefined) {
      // SIGKILL to a pid namespace's init makes the kernel kill every process in it.
      try {
        process.kill(live.initPid, 'SIGKILL');
      } catch {
        // Already gone.
      }
    }
    if (live.bwrap?.pid !== undefined && live.bwrap.exitCode === null && live.bwrap.signalCode === null) {
      killProcessTree(live.bwrap.pid);
    }
    for (const child of live.running) killProcessTree(child.pid ?? -1);
    try {
      // The cgroup holds everything the sandbox ran, including what left its process tree.
      await live.cgroup?.kill();
    } finally {
      await live.exited;
    }
    try {
      await live.cgroup?.remove();
    } finally {
      // Nothing runs in the sandbox any more: its files can go back to the plain workdir.
      await live.disk?.detach();
      if (live.handle.servicesDirectory)
        rmSync(live.handle.servicesDirectory, { recursive: true, force: true });
    }
  };

  return {
    name: 'bwrap',
    mode,

    async checkAvailability(): Promise<DriverAvailability> {
      try {
        const binaries = requireBinaries();
        // A trivial sandbox proves user namespaces work on this kernel.
        const probe = await new Promise<{ code: number | null; stderr: string }>((resolve) => {
          const child = spawn(
            binaries.bwrap,
            [
              '--unshare-all',
              '--unshare-user',
              '--ro-bind',
              '/usr',
              '/usr',
              ...rootDirectoryArguments(),
              'true',
            ],
            { env: {}, stdio: ['ignore', 'ignore', 'pipe'] },
          );
          let stderr = '';
          child.stderr?.on('data', (chunk: Buffer) => {
            stderr += chunk.toString('utf8');
          });
          child.on('error', (error) => resolve({ code: -1, stderr: error.message }));
          child.on('close', (code) => resolve({ code, stderr }));
        });
        if (probe.code !== 0) {
          return {
            ok: false,
            reason: `bwrap cannot create namespaces here (${probe.stderr.trim()}); user namespaces may be disabled (sysctl kernel.unprivileged_userns_clone / user.max_user_namespaces)`,
          };
        }
        const warnings: string[] = [];
        if (runningAsRoot && !execHelperBuilt) {
          warnings.push(
            `the bwrap sandbox helpers are not built (${execHelperPath}, ${agentPath}), so every command starts its own bwrap (slower, no background processes or spawn); ${BUILD_HELPER_HINT}`,
          );
        }
        const control = await detectResourceControl();
        if (!control.ok) {
          warnings.push(
            `sandbox resource limits (cpu, memory, pids) are not enforced: ${control.reason}; environments that set limits will be refused`,
          );
        }
        const disk = await detectDiskControl();
        if (!disk.ok) {
          warnings.push(
            `sandbox disk limits are not enforced: ${disk.reason}; environments that set disk_mb will be refused`,
          );
        }
        return warnings.length > 0 ? { ok: true, warnings } : { ok: true };
      } catch (error) {
        return { ok: false, reason: error instanceof Error ? error.message : String(error) };
      }
    },

    async provision(spec: SandboxSpec): Promise<SandboxHandle> {
      const binaries = requireBinaries();
      validateEnvironment(spec.env);
      validateReadOnlyMounts(spec, runningAsRoot);
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
      const warm = await claimWarm(spec, limits);
      if (warm) return warm.handle;
      if (spec.restoreFrom) await restoreWorkspace(spec.restoreFrom, spec.workdir);
      prepareWorkdir(spec);
      const live = await startSandbox(spec, limits, control, disk, binaries.bwrap);
      sandboxes.set(live.handle.id, live);
      if (live.stopped) {
        // Destroyed (destroyAll) while it started.
        throw new BerthError('sandbox_failed', `sandbox ${live.handle.id} was destroyed while it started`, {
          retryable: true,
        });
      }
      return live.handle;
    },

    async exec(handle, argv, execOptions = {}): Promise<ExecResult> {
      const result = await run(handle, argv, execOptions);
      return execResultOf(result);
    },

    spawn(handle, argv, spawnOptions = {}): SandboxProcess {
      if (mode !== 'persistent') {
        throw new BerthError(
          'sandbox_unavailable',
          'the bwrap driver keeps processes inside a live sandbox only in persistent mode, which needs Berth to run as root',
        );
      }
      validateArgv(argv);
      validateEnvironment(spawnOptions.env);
      const live = lookup(handle);
      return spawnOnAgent(live.agent!, {
        argv,
        env: commandEnvironment(live.spec, spawnOptions.env),
        cwd: inside(spawnOptions.cwd ?? BWRAP_WORKDIR_INSIDE),
      });
    },

    ...sandboxFiles(run, BWRAP_WORKDIR_INSIDE),

    isAlive(handle) {
      const live = sandboxes.get(handle.id);
      return live !== undefined && !live.stopped;
    },

    async destroy(handle) {
      const live = sandboxes.get(handle.id);
      if (live) await destroyLive(live);
    },

    async suspend(handle, directory) {
      // Only files survive: bwrap keeps no process or memory state across a stop.
      const live = lookup(handle);
      await destroyLive(live);
      await moveTree(live.spec.workdir, join(directory, SUSPENDED_WORKSPACE));
      return { memory: false };
    },

    async stats(handle) {
      return sandboxStats(handle.id, lookup(handle).cgroup, async () => {
        const control = await detectResourceControl();
        return control.ok ? 'it has no cgroup' : control.reason;
      });
    },

    async reapOrphans() {
      let reaped = 0;
      const alreadyKilled = new Set<number>();
      const control = await detectResourceControl();
      if (control.ok) {
        // Groups of dead servers: their processes (if any survived) die with them.
        const leftovers = await control.tree.reapLeftovers();
        reaped += leftovers.groups.length;
        for (const pid of leftovers.killedPids) alreadyKilled.add(pid);
      }
      for (const entry of readdirSync('/proc')) {
        if (!/^\d+$/.test(entry) || alreadyKilled.has(Number(entry))) continue;
        try {
          const status = readFileSync(`/proc/${entry}/status`, 'utf8');
          // Only sandboxes whose parent is gone: a live server's sandboxes have a live parent.
          if (!/^PPid:\s+1$/m.test(status)) continue;
          const uid = Number(/^Uid:\s+(\d+)/m.exec(status)?.[1]);
          if (runningAsRoot ? uid !== hostUid : uid !== process.getuid?.()) continue;
          const commandLine = readFileSync(`/proc/${entry}/cmdline`, 'utf8').split('\0');
          if (!commandLine[0]?.endsWith('bwrap') || !commandLine.includes(ORPHAN_MARKER)) continue;
          process.kill(Number(entry), 'SIGKILL');
          reaped++;
        } catch {
          // Exited while we looked, or not ours to read.
        }
      }
      // Last: the dead servers' sandboxes are gone, so their workspace images can be copied
      // back into the plain workdirs and unmounted.
      const disk = await detectDiskControl();
      if (disk.ok) reaped += await disk.disks.reapLeftovers();
      // Pooled sandboxes' directories of dead servers (their images are unmounted by now), and
      // their sandboxes' services directories.
      for (const directory of [poolDirectory, servicesRoot]) {
        let names: string[] = [];
        try {
          names = readdirSync(directory);
        } catch {
          // Never made here.
        }
        for (const name of names) {
          const path = join(directory, name);
          if (ownerIsAlive(name) || isMountPoint(path)) continue;
          rmSync(path, { recursive: true, force: true });
          if (directory === poolDirectory) reaped++;
        }
      }
      return reaped;
    },

    async destroyAll() {
      const warm = pool.splice(0);
      await Promise.all([
        ...[...sandboxes.values(), ...starting].map((live) => destroyLive(live)),
        ...warm.map((live) => discardWarm(live)),
      ]);
    },

    warmUp() {
      if (warmPoolSize === 0) return;
      pooling = true;
      fillPool();
    },

    async close() {
      pooling = false;
      await filling;
      await Promise.all(pool.splice(0).map((live) => discardWarm(live)));
    },

    get warmCount() {
      return pool.length;
    },

    initPid(handle) {
      return sandboxes.get(handle.id)?.initPid;
    },
  };
}
