/**
 * One control group per sandbox, on cgroup v1 or v2 behind one interface: limits (CPU quota,
 * memory without swap, process count), usage (CPU seconds, memory now and at peak), kill
 * everything inside, remove. Groups live under a fixed `berth` parent at the top of each
 * hierarchy (`/sys/fs/cgroup/<controller>/berth/<group>` on v1, `/sys/fs/cgroup/berth/<group>` on
 * v2), like Docker's cgroupfs driver, so the next Berth process finds what a dead one left
 * whichever cgroup it runs in itself. A group's name carries its owner's pid and start time, so
 * servers sharing a host never reap each other's groups.
 *
 * Only root can manage these groups; the driver decides what to do when it cannot.
 */
import { existsSync, mkdirSync, readdirSync, readFileSync, rmdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { BerthError } from '../../errors.js';

/** Which cgroup interface a host offers. */
export type CgroupVersion = 1 | 2;

/** The controllers a sandbox needs; cpuacct is v1's separate CPU usage counter. */
const V2_CONTROLLERS = ['cpu', 'memory', 'pids'] as const;
const V1_CONTROLLERS = ['cpu', 'cpuacct', 'memory', 'pids'] as const;
type V1Controller = (typeof V1_CONTROLLERS)[number];

/** Scheduler period for the CPU quota (the kernel default, 100 ms). */
const CPU_PERIOD_MICROSECONDS = 100_000;
/** The smallest quota the kernel accepts (1 ms per period). */
const MINIMUM_CPU_QUOTA_MICROSECONDS = 1_000;
/** How long `kill` keeps signalling before it gives up on a group that will not empty. */
const KILL_TIMEOUT_MS = 5_000;
/** How long `remove` retries a group the kernel still calls busy (tasks finishing their exit). */
const REMOVE_TIMEOUT_MS = 2_000;
const POLL_INTERVAL_MS = 5;
/** What the join wrapper prints when it cannot enter the group (see `joinCgroupCommand`). */
export const CGROUP_JOIN_FAILURE = 'berth: cannot join the sandbox cgroup';

/** Limits for one group; an absent field stays unlimited. */
export interface CgroupLimits {
  /** CPU cores (fractional allowed), enforced as a quota per scheduler period. */
  cpuCores?: number;
  /** Memory ceiling in bytes, swap included (the group cannot swap). */
  memoryBytes?: number;
  /** Most processes and threads alive at once. */
  pids?: number;
}

/** Usage of one group since it was created. */
export interface CgroupStats {
  cpuSeconds: number;
  memoryBytes: number;
  /** Highest memory use seen, or null when the kernel does not track it (v2 before Linux 5.19). */
  memoryPeakBytes: number | null;
}

/** A cgroup filesystem mount, as `/proc/self/mounts` lists it. */
export interface CgroupMount {
  type: 'cgroup' | 'cgroup2';
  path: string;
  /** Mount options (for v1, the controllers bound to that hierarchy are among them). */
  options: readonly string[];
}

/** Where the hierarchies are: one v2 directory, or one directory per v1 controller. */
export type CgroupLayout =
  | { version: 2; root: string; controllers: readonly string[] }
  | { version: 1; roots: Readonly<Record<V1Controller, string>> };

/** The result of looking for usable hierarchies. */
export type CgroupDetection = { ok: true; layout: CgroupLayout } | { ok: false; reason: string };

/** Decodes the octal escapes (`\040` for a space) `/proc/mounts` uses in paths. */
function decodeMountPath(path: string): string {
  return path.replace(/\\([0-7]{3})/g, (_, octal: string) => String.fromCharCode(Number.parseInt(octal, 8)));
}

/** The cgroup and cgroup2 mounts in a `/proc/self/mounts` text. */
export function parseCgroupMounts(mountsText: string): CgroupMount[] {
  const mounts: CgroupMount[] = [];
  for (const line of mountsText.split('\n')) {
    const [, path, type, options] = line.split(' ');
    if ((type === 'cgroup' || type === 'cgroup2') && path !== undefined) {
      mounts.push({ type, path: decodeMountPath(path), options: (options ?? '').split(',') });
    }
  }
  return mounts;
}

function readControllers(directory: string): string[] {
  try {
    return readFileSync(join(directory, 'cgroup.controllers'), 'utf8').trim().split(/\s+/).filter(Boolean);
  } catch {
    return [];
  }
}

/**
 * Picks the hierarchies to use: v2 when one cgroup2 mount has cpu, memory and pids (preferring
 * /sys/fs/cgroup), else v1 when cpu, cpuacct, memory and pids each have a hierarchy. A hybrid
 * host (v1 controllers plus an empty v2 mount, as systemd sets up) therefore uses v1.
 */
export function detectCgroupLayout(mounts: readonly CgroupMount[]): CgroupDetection {
  const v2Mounts = mounts
    .filter((mount) => mount.type === 'cgroup2')
    .sort((a, b) => Number(b.path === '/sys/fs/cgroup') - Number(a.path === '/sys/fs/cgroup'));
  const v2Findings: string[] = [];
  for (const mount of v2Mounts) {
    const controllers = readControllers(mount.path);
    if (V2_CONTROLLERS.every((name) => controllers.includes(name))) {
      return { ok: true, layout: { version: 2, root: mount.path, controllers: V2_CONTROLLERS } };
    }
    v2Findings.push(
      `${mount.path} offers ${controllers.length > 0 ? controllers.join(' ') : 'no controllers'}`,
    );
  }
  const v1Roots: Partial<Record<V1Controller, string>> = {};
  for (const mount of mounts) {
    if (mount.type !== 'cgroup') continue;
    for (const controller of V1_CONTROLLERS) {
      if (mount.options.includes(controller)) v1Roots[controller] ??= mount.path;
    }
  }
  const missing = V1_CONTROLLERS.filter((controller) => v1Roots[controller] === undefined);
  if (missing.length === 0) {
    return { ok: true, layout: { version: 1, roots: v1Roots as Record<V1Controller, string> } };
  }
  const v2Summary =
    v2Findings.length > 0 ? `cgroup v2: ${v2Findings.join('; ')}` : 'no cgroup v2 hierarchy is mounted';
  return {
    ok: false,
    reason: `no usable cgroups (${v2Summary}; cgroup v1 has no hierarchy for ${missing.join(', ')}); limits need cpu, memory and pids`,
  };
}

/** Detects the layout of this host from `/proc/self/mounts`. */
export function detectHostCgroupLayout(): CgroupDetection {
  let mountsText: string;
  try {
    mountsText = readFileSync('/proc/self/mounts', 'utf8');
  } catch (error) {
    return { ok: false, reason: `cannot read /proc/self/mounts: ${(error as Error).message}` };
  }
  return detectCgroupLayout(parseCgroupMounts(mountsText));
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

/** `<pid>.<start time>` of this process: names its groups and tells when it is gone. */
const ownerToken = `${process.pid}.${processStartTime(process.pid) ?? '0'}`;

/** The group name a sandbox of this process gets: `<sandbox id>.<owner pid>.<owner start time>`. */
export function sandboxCgroupName(sandboxId: string): string {
  if (!/^[A-Za-z0-9_-]+$/.test(sandboxId)) {
    throw new BerthError('invalid_request', `invalid sandbox id for a cgroup name: ${sandboxId}`);
  }
  return `${sandboxId}.${ownerToken}`;
}

/**
 * True when the owner named in a group name (or any name built by `sandboxCgroupName`, such as
 * a workspace disk image's) is still running; false for a dead owner.
 */
export function ownerIsAlive(groupName: string): boolean {
  const match = /\.(\d+)\.(\d+)$/.exec(groupName);
  if (!match) return true;
  return processStartTime(Number(match[1])) === match[2];
}

const sleep = (milliseconds: number) => new Promise((resolve) => setTimeout(resolve, milliseconds));

function readNumber(path: string): number {
  return Number(readFileSync(path, 'utf8').trim());
}

function readProcesses(directory: string): number[] {
  try {
    return readFileSync(join(directory, 'cgroup.procs'), 'utf8').split('\n').filter(Boolean).map(Number);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw error;
  }
}

/** One sandbox's group (one directory per hierarchy on v1, one directory on v2). */
export interface SandboxCgroup {
  readonly name: string;
  readonly version: CgroupVersion;
  /** The `cgroup.procs` files a process writes its pid to, all of them, to join the group. */
  readonly processFiles: readonly string[];
  /** Moves a running process (and its future children) into the group. */
  addProcess(pid: number): void;
  /** Pids of the processes in the group right now. */
  processes(): number[];
  stats(): CgroupStats;
  /** SIGKILLs everything in the group and resolves once it is empty. */
  kill(): Promise<void>;
  /** Kills what is left and deletes the group; a group already gone is fine. */
  remove(): Promise<void>;
}

/** The `berth` parent group and the sandbox groups under it. */
export interface CgroupTree {
  readonly version: CgroupVersion;
  /** Creates the parent and turns on the controllers it needs; throws when not permitted. */
  prepare(): void;
  /** Creates a group for a sandbox of this process with these limits. */
  create(sandboxId: string, limits: CgroupLimits): SandboxCgroup;
  /** Names of every group under the parent, this process's and others'. */
  groupNames(): string[];
  /**
   * Kills and removes the groups whose owning process has died. Returns the group names removed
   * and the pids killed in them.
   */
  reapLeftovers(): Promise<{ groups: string[]; killedPids: number[] }>;
}

/** Turns a file-system error on a cgroup file into a `sandbox_unavailable` error naming the file. */
function cgroupError(action: string, path: string, error: unknown): BerthError {
  const code = (error as NodeJS.ErrnoException).code ?? 'error';
  return new BerthError(
    'sandbox_unavailable',
    `cannot ${action} ${path} (${code}); Berth needs root and writable cgroups to enforce sandbox limits`,
    {
      cause: error,
    },
  );
}

function writeControlFile(path: string, value: string): void {
  try {
    writeFileSync(path, value);
  } catch (error) {
    throw cgroupError('write', path, error);
  }
}

function makeDirectory(path: string): void {
  try {
    mkdirSync(path, { recursive: true });
  } catch (error) {
    throw cgroupError('create', path, error);
  }
}

/** Controllers named in a `cgroup.subtree_control` file. */
function enabledControllers(directory: string): string[] {
  try {
    return readFileSync(join(directory, 'cgroup.subtree_control'), 'utf8')
      .trim()
      .split(/\s+/)
      .filter(Boolean);
  } catch {
    return [];
  }
}

/**
 * Kills what is in a group's directories and removes them. A process that joins between the
 * kill and the removal (a launcher already on its way in) makes the removal fail with EBUSY,
 * so kill and removal repeat until both hold.
 */
async function removeDirectories(directories: readonly string[], kill: () => Promise<void>): Promise<void> {
  const deadline = Date.now() + REMOVE_TIMEOUT_MS;
  for (;;) {
    await kill();
    try {
      for (const directory of directories) {
        try {
          rmdirSync(directory);
        } catch (error) {
          if ((error as NodeJS.ErrnoException).code !== 'ENOENT') throw error;
        }
      }
      return;
    } catch (error) {
      const code = (error as NodeJS.ErrnoException).code;
      if (code !== 'EBUSY' || Date.now() > deadline) throw cgroupError('remove', directories[0]!, error);
      await sleep(POLL_INTERVAL_MS);
    }
  }
}

/** SIGKILLs every process listed until the lists stay empty (no atomic kill on v1 or old v2). */
async function killListed(directories: readonly string[], useKillFile: boolean): Promise<void> {
  const deadline = Date.now() + KILL_TIMEOUT_MS;
  for (;;) {
    const pids = [...new Set(directories.flatMap(readProcesses))];
    if (pids.length === 0) return;
    if (Date.now() > deadline) {
      throw new BerthError(
        'sandbox_failed',
        `processes ${pids.slice(0, 10).join(', ')} survived SIGKILL in ${directories[0]}`,
      );
    }
    if (useKillFile) {
      // cgroup.kill (Linux 5.14+) kills the whole group at once, forks in flight included.
      for (const directory of directories) writeControlFile(join(directory, 'cgroup.kill'), '1');
    } else {
      for (const pid of pids) {
        try {
          process.kill(pid, 'SIGKILL');
        } catch {
          // Exited meanwhile.
        }
      }
    }
    await sleep(POLL_INTERVAL_MS);
  }
}

/** Opens the `berth` parent (or `parentName`) in a layout; call `prepare()` before `create`. */
export function openCgroupTree(layout: CgroupLayout, options: { parentName?: string } = {}): CgroupTree {
  const parentName = options.parentName ?? 'berth';
  return layout.version === 2 ? openV2Tree(layout, parentName) : openV1Tree(layout, parentName);
}

function openV2Tree(layout: Extract<CgroupLayout, { version: 2 }>, parentName: string): CgroupTree {
  const parent = join(layout.root, parentName);

  /** Turns on our controllers for the children of `directory` (only the missing ones). */
  const enableControllers = (directory: string) => {
    const enabled = enabledControllers(directory);
    const missing = layout.controllers.filter((name) => !enabled.includes(name));
    // A non-root group with processes in it cannot enable controllers (EBUSY): that happens in a
    // container whose cgroup namespace root holds its own processes.
    if (missing.length > 0) {
      writeControlFile(
        join(directory, 'cgroup.subtree_control'),
        missing.map((name) => `+${name}`).join(' '),
      );
    }
  };

  const prepare = () => {
    enableControllers(layout.root);
    makeDirectory(parent);
    enableControllers(parent);
  };

  const group = (name: string): SandboxCgroup => {
    const directory = join(parent, name);
    const file = (control: string) => join(directory, control);
    const kill = () => killListed([directory], existsSync(file('cgroup.kill')));
    return {
      name,
      version: 2,
      processFiles: [file('cgroup.procs')],
      addProcess(pid) {
        writeControlFile(file('cgroup.procs'), String(pid));
      },
      processes: () => readProcesses(directory),
      stats() {
        const usage = /^usage_usec (\d+)$/m.exec(readFileSync(file('cpu.stat'), 'utf8'));
        return {
          cpuSeconds: Number(usage?.[1] ?? 0) / 1e6,
          memoryBytes: readNumber(file('memory.current')),
          memoryPeakBytes: existsSync(file('memory.peak')) ? readNumber(file('memory.peak')) : null,
        };
      },
      kill,
      async remove() {
        if (existsSync(directory)) await removeDirectories([directory], kill);
      },
    };
  };

  return {
    version: 2,
    prepare,
    create(sandboxId, limits) {
      const name = sandboxCgroupName(sandboxId);
      prepare();
      const directory = join(parent, name);
      makeDirectory(directory);
      const requireController = (controller: string) => {
        if (!layout.controllers.includes(controller)) {
          throw new BerthError(
            'sandbox_unavailable',
            `cgroup v2 at ${layout.root} has no ${controller} controller`,
          );
        }
      };
      try {
        if (limits.cpuCores !== undefined) {
          requireController('cpu');
          writeControlFile(
            join(directory, 'cpu.max'),
            `${cpuQuota(limits.cpuCores)} ${CPU_PERIOD_MICROSECONDS}`,
          );
        }
        if (limits.memoryBytes !== undefined) {
          requireController('memory');
          writeControlFile(join(directory, 'memory.max'), String(Math.floor(limits.memoryBytes)));
          // Absent when the kernel accounts no swap; then there is none to limit.
          if (existsSync(join(directory, 'memory.swap.max'))) {
            writeControlFile(join(directory, 'memory.swap.max'), '0');
          }
        }
        if (limits.pids !== undefined) {
          requireController('pids');
          writeControlFile(join(directory, 'pids.max'), String(Math.floor(limits.pids)));
        }
      } catch (error) {
        void removeDirectories([directory], async () => undefined).catch(() => undefined);
        throw error;
      }
      return group(name);
    },
    groupNames: () => listGroups(parent),
    reapLeftovers: () => reapLeftovers(listGroups(parent), group),
  };
}

function openV1Tree(layout: Extract<CgroupLayout, { version: 1 }>, parentName: string): CgroupTree {
  const parents = Object.fromEntries(
    V1_CONTROLLERS.map((controller) => [controller, join(layout.roots[controller], parentName)]),
  ) as Record<V1Controller, string>;
  // cpu and cpuacct are often mounted together (`cpu,cpuacct`): one directory serves both.
  const uniqueParents = [...new Set(Object.values(parents))];

  const prepare = () => {
    for (const parent of uniqueParents) makeDirectory(parent);
  };

  const group = (name: string): SandboxCgroup => {
    const directories = uniqueParents.map((parent) => join(parent, name));
    const file = (controller: V1Controller, control: string) => join(parents[controller], name, control);
    const kill = () => killListed(directories, false);
    return {
      name,
      version: 1,
      processFiles: directories.map((directory) => join(directory, 'cgroup.procs')),
      addProcess(pid) {
        for (const directory of directories) writeControlFile(join(directory, 'cgroup.procs'), String(pid));
      },
      processes: () => [...new Set(directories.flatMap(readProcesses))],
      stats() {
        const peakFile = file('memory', 'memory.max_usage_in_bytes');
        return {
          cpuSeconds: readNumber(file('cpuacct', 'cpuacct.usage')) / 1e9,
          memoryBytes: readNumber(file('memory', 'memory.usage_in_bytes')),
          memoryPeakBytes: existsSync(peakFile) ? readNumber(peakFile) : null,
        };
      },
      kill,
      async remove() {
        if (directories.some((directory) => existsSync(directory)))
          await removeDirectories(directories, kill);
      },
    };
  };

  return {
    version: 1,
    prepare,
    create(sandboxId, limits) {
      const name = sandboxCgroupName(sandboxId);
      prepare();
      const directories = uniqueParents.map((parent) => join(parent, name));
      for (const directory of directories) makeDirectory(directory);
      const file = (controller: V1Controller, control: string) => join(parents[controller], name, control);
      try {
        if (limits.cpuCores !== undefined) {
          writeControlFile(file('cpu', 'cpu.cfs_period_us'), String(CPU_PERIOD_MICROSECONDS));
          writeControlFile(file('cpu', 'cpu.cfs_quota_us'), String(cpuQuota(limits.cpuCores)));
        }
        if (limits.memoryBytes !== undefined) {
          const bytes = String(Math.floor(limits.memoryBytes));
          writeControlFile(file('memory', 'memory.limit_in_bytes'), bytes);
          // memsw (memory + swap) exists when swap accounting is on; equal to the memory limit
          // it leaves no room to swap. It must be set after memory.limit_in_bytes.
          const memoryAndSwap = file('memory', 'memory.memsw.limit_in_bytes');
          if (existsSync(memoryAndSwap)) writeControlFile(memoryAndSwap, bytes);
        }
        if (limits.pids !== undefined) {
          writeControlFile(file('pids', 'pids.max'), String(Math.floor(limits.pids)));
        }
      } catch (error) {
        void removeDirectories(directories, async () => undefined).catch(() => undefined);
        throw error;
      }
      return group(name);
    },
    groupNames: () => [...new Set(uniqueParents.flatMap(listGroups))],
    reapLeftovers: () => reapLeftovers([...new Set(uniqueParents.flatMap(listGroups))], group),
  };
}

function cpuQuota(cores: number): number {
  if (!(cores > 0)) throw new BerthError('invalid_request', `cpu limit must be positive, got ${cores}`);
  return Math.max(MINIMUM_CPU_QUOTA_MICROSECONDS, Math.round(cores * CPU_PERIOD_MICROSECONDS));
}

function listGroups(parent: string): string[] {
  try {
    return readdirSync(parent, { withFileTypes: true })
      .filter((entry) => entry.isDirectory())
      .map((entry) => entry.name);
  } catch {
    return [];
  }
}

async function reapLeftovers(
  names: readonly string[],
  group: (name: string) => SandboxCgroup,
): Promise<{ groups: string[]; killedPids: number[] }> {
  const groups: string[] = [];
  const killedPids: number[] = [];
  for (const name of names) {
    if (ownerIsAlive(name)) continue;
    const leftover = group(name);
    try {
      killedPids.push(...leftover.processes());
      await leftover.remove();
      groups.push(name);
    } catch {
      // Left for the next start; one stuck group must not stop the server from starting.
    }
  }
  return { groups, killedPids };
}

/**
 * Wraps `[command, ...args]` so the process joins the group before it runs anything: a shell
 * writes its own pid to every `cgroup.procs` file, then execs the command in place (same pid,
 * already inside). The command therefore never runs an instruction outside the group, and
 * neither does anything it starts. Exits 125 printing `CGROUP_JOIN_FAILURE` when a join fails.
 */
export function joinCgroupCommand(
  cgroup: Pick<SandboxCgroup, 'processFiles'>,
  command: string,
  args: readonly string[],
): [string, string[]] {
  const script =
    'count=$1; shift; while [ "$count" -gt 0 ]; do ' +
    `echo $$ 2>/dev/null >"$1" || { echo "${CGROUP_JOIN_FAILURE}: $1" >&2; exit 125; }; ` +
    'count=$((count - 1)); shift; done; exec "$@"';
  return [
    '/bin/sh',
    ['-c', script, 'sh', String(cgroup.processFiles.length), ...cgroup.processFiles, command, ...args],
  ];
}

/**
 * What a sandbox used, read from its cgroup; a sandbox without one (no usable cgroups on this
 * host) is `sandbox_unavailable` with `whyNot()` saying why, an unreadable group `sandbox_failed`.
 */
export async function sandboxStats(
  sandboxId: string,
  cgroup: SandboxCgroup | undefined,
  whyNot: () => Promise<string>,
): Promise<CgroupStats> {
  if (!cgroup) {
    throw new BerthError('sandbox_unavailable', `sandbox ${sandboxId} is not metered: ${await whyNot()}`);
  }
  try {
    return cgroup.stats();
  } catch (error) {
    throw new BerthError('sandbox_failed', `cannot read the usage of sandbox ${sandboxId}`, {
      retryable: true,
      cause: error,
    });
  }
}
