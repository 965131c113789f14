import { spawn } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import {
  CGROUP_JOIN_FAILURE,
  type CgroupLayout,
  detectCgroupLayout,
  detectHostCgroupLayout,
  joinCgroupCommand,
  openCgroupTree,
  parseCgroupMounts,
  sandboxCgroupName,
} from './cgroups.js';

const runningAsRoot = process.getuid?.() === 0;
const hostLayout = detectHostCgroupLayout();
/** A parent of our own, so these tests never touch the groups of a running Berth. */
const testParent = `berth-test-${process.pid}`;

const scratchDirectories: string[] = [];
const scratch = () => {
  const directory = mkdtempSync(join(tmpdir(), 'berth-cgroups-'));
  scratchDirectories.push(directory);
  return directory;
};

afterAll(() => {
  for (const directory of scratchDirectories) rmSync(directory, { recursive: true, force: true });
});

/** Runs `sh -c script` joined to a group through the same wrapper the driver uses; resolves on exit. */
function runJoined(processFiles: readonly string[], script: string) {
  const [command, args] = joinCgroupCommand({ processFiles }, '/bin/sh', ['-c', script]);
  const child = spawn(command, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (chunk: Buffer) => {
    stderr += chunk.toString('utf8');
  });
  const exited = new Promise<{ code: number | null; stderr: string }>((resolve) =>
    child.once('close', (code) => resolve({ code, stderr })),
  );
  return { child, exited };
}

/** A temporary tree with the files a kernel would show for a v2 hierarchy. */
function fakeV2Root(controllers: string): string {
  const root = scratch();
  writeFileSync(join(root, 'cgroup.controllers'), `${controllers}\n`);
  writeFileSync(join(root, 'cgroup.subtree_control'), '');
  return root;
}

describe('finding the cgroup hierarchies of a host', () => {
  it('reads cgroup mounts from /proc/mounts text, spaces in paths included', () => {
    const mounts = parseCgroupMounts(
      [
        'tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0',
        'cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,nosuid,cpu,cpuacct 0 0',
        'cgroup2 /mnt/my\\040cgroups cgroup2 rw,relatime 0 0',
      ].join('\n'),
    );
    expect(mounts).toEqual([
      { type: 'cgroup', path: '/sys/fs/cgroup/cpu,cpuacct', options: ['rw', 'nosuid', 'cpu', 'cpuacct'] },
      { type: 'cgroup2', path: '/mnt/my cgroups', options: ['rw', 'relatime'] },
    ]);
  });

  it('uses cgroup v2 when a v2 mount offers cpu, memory and pids', () => {
    const root = fakeV2Root('cpuset cpu io memory hugetlb pids rdma misc');
    const detection = detectCgroupLayout([{ type: 'cgroup2', path: root, options: ['rw'] }]);
    expect(detection).toEqual({
      ok: true,
      layout: { version: 2, root, controllers: ['cpu', 'memory', 'pids'] },
    });
  });

  it('uses cgroup v1 on a hybrid host whose v2 mount has no controllers (like this VM)', () => {
    const unified = fakeV2Root('');
    const detection = detectCgroupLayout([
      { type: 'cgroup', path: '/cg/cpu,cpuacct', options: ['rw', 'cpu', 'cpuacct'] },
      { type: 'cgroup', path: '/cg/memory', options: ['rw', 'memory'] },
      { type: 'cgroup', path: '/cg/pids', options: ['rw', 'pids'] },
      { type: 'cgroup2', path: unified, options: ['rw'] },
    ]);
    expect(detection).toEqual({
      ok: true,
      layout: {
        version: 1,
        roots: { cpu: '/cg/cpu,cpuacct', cpuacct: '/cg/cpu,cpuacct', memory: '/cg/memory', pids: '/cg/pids' },
      },
    });
  });

  it('explains what is missing when neither version has every controller', () => {
    const root = fakeV2Root('cpu memory');
    const detection = detectCgroupLayout([
      { type: 'cgroup2', path: root, options: ['rw'] },
      { type: 'cgroup', path: '/cg/memory', options: ['rw', 'memory'] },
    ]);
    expect(detection.ok).toBe(false);
    expect(!detection.ok && detection.reason).toMatch(
      /offers cpu memory.*no hierarchy for cpu, cpuacct, pids/,
    );
  });

  it('finds this host usable as root', ({ skip }) => {
    if (!runningAsRoot) skip('not running as root');
    expect(hostLayout.ok, hostLayout.ok ? '' : hostLayout.reason).toBe(true);
  });
});

describe('cgroup v2 files (a temporary tree standing in for /sys/fs/cgroup)', () => {
  it('turns on cpu, memory and pids for the parent and writes every limit', () => {
    const root = fakeV2Root('cpu memory pids io');
    writeFileSync(join(root, 'cgroup.subtree_control'), 'memory');
    const tree = openCgroupTree({ version: 2, root, controllers: ['cpu', 'memory', 'pids'] });
    const group = tree.create('sbx_fake', { cpuCores: 1.5, memoryBytes: 256 * 1024 * 1024, pids: 64 });
    // Only the missing controllers are asked for (the kernel would then list all three).
    expect(readFileSync(join(root, 'cgroup.subtree_control'), 'utf8')).toBe('+cpu +pids');
    expect(readFileSync(join(root, 'berth', 'cgroup.subtree_control'), 'utf8')).toBe('+cpu +memory +pids');
    const directory = join(root, 'berth', sandboxCgroupName('sbx_fake'));
    expect(group.processFiles).toEqual([join(directory, 'cgroup.procs')]);
    expect(readFileSync(join(directory, 'cpu.max'), 'utf8')).toBe('150000 100000');
    expect(readFileSync(join(directory, 'memory.max'), 'utf8')).toBe(String(256 * 1024 * 1024));
    expect(readFileSync(join(directory, 'pids.max'), 'utf8')).toBe('64');
    // No memory.swap.max means the kernel keeps no swap accounts: nothing to turn off.
    expect(existsSync(join(directory, 'memory.swap.max'))).toBe(false);
  });

  it('turns swap off where the kernel accounts for it', () => {
    const root = fakeV2Root('cpu memory pids');
    const directory = join(root, 'berth', sandboxCgroupName('sbx_swap'));
    mkdirSync(directory, { recursive: true });
    writeFileSync(join(directory, 'memory.swap.max'), 'max');
    openCgroupTree({ version: 2, root, controllers: ['cpu', 'memory', 'pids'] }).create('sbx_swap', {
      memoryBytes: 1 << 30,
    });
    expect(readFileSync(join(directory, 'memory.swap.max'), 'utf8')).toBe('0');
  });

  it('never gives a tiny CPU limit a quota below the 1 ms the kernel accepts', () => {
    const root = fakeV2Root('cpu memory pids');
    openCgroupTree({ version: 2, root, controllers: ['cpu', 'memory', 'pids'] }).create('sbx_tiny', {
      cpuCores: 0.001,
    });
    const directory = join(root, 'berth', sandboxCgroupName('sbx_tiny'));
    expect(readFileSync(join(directory, 'cpu.max'), 'utf8')).toBe('1000 100000');
  });

  it('reads CPU seconds from cpu.stat and memory from memory.current and memory.peak', () => {
    const root = fakeV2Root('cpu memory pids');
    const group = openCgroupTree({ version: 2, root, controllers: ['cpu', 'memory', 'pids'] }).create(
      'sbx_stats',
      {},
    );
    const directory = join(root, 'berth', group.name);
    writeFileSync(join(directory, 'cpu.stat'), 'usage_usec 2017345\nuser_usec 2000000\nsystem_usec 17345\n');
    writeFileSync(join(directory, 'memory.current'), '52428800\n');
    expect(group.stats()).toEqual({ cpuSeconds: 2.017345, memoryBytes: 52428800, memoryPeakBytes: null });
    writeFileSync(join(directory, 'memory.peak'), '134217728\n');
    expect(group.stats().memoryPeakBytes).toBe(134217728);
  });

  it('refuses a limit whose controller the hierarchy lacks instead of skipping it', () => {
    const root = fakeV2Root('cpu memory');
    const tree = openCgroupTree({ version: 2, root, controllers: ['cpu', 'memory'] });
    expect(() => tree.create('sbx_nopids', { pids: 10 })).toThrow(/no pids controller/);
  });
});

describe('cgroup v1 files (temporary trees standing in for /sys/fs/cgroup/<controller>)', () => {
  const fakeV1 = () => {
    const base = scratch();
    const roots = {
      cpu: join(base, 'cpu,cpuacct'),
      cpuacct: join(base, 'cpu,cpuacct'),
      memory: join(base, 'memory'),
      pids: join(base, 'pids'),
    };
    for (const root of Object.values(roots)) mkdirSync(root, { recursive: true });
    return { base, layout: { version: 1, roots } satisfies CgroupLayout };
  };

  it('writes the CPU quota, memory (and memory+swap) ceiling and process cap', () => {
    const { base, layout } = fakeV1();
    const name = sandboxCgroupName('sbx_v1');
    mkdirSync(join(base, 'memory', 'berth', name), { recursive: true });
    writeFileSync(join(base, 'memory', 'berth', name, 'memory.memsw.limit_in_bytes'), '-1');
    const group = openCgroupTree(layout).create('sbx_v1', {
      cpuCores: 0.5,
      memoryBytes: 128 * 1024 * 1024,
      pids: 100,
    });
    const read = (controller: string, file: string) =>
      readFileSync(join(base, controller, 'berth', name, file), 'utf8');
    expect(read('cpu,cpuacct', 'cpu.cfs_period_us')).toBe('100000');
    expect(read('cpu,cpuacct', 'cpu.cfs_quota_us')).toBe('50000');
    expect(read('memory', 'memory.limit_in_bytes')).toBe(String(128 * 1024 * 1024));
    expect(read('memory', 'memory.memsw.limit_in_bytes')).toBe(String(128 * 1024 * 1024));
    expect(read('pids', 'pids.max')).toBe('100');
    // cpu and cpuacct share one hierarchy here, so a process joins three directories, not four.
    expect(group.processFiles).toHaveLength(3);
  });

  it('reads CPU seconds from cpuacct.usage (nanoseconds) and memory usage and peak', () => {
    const { base, layout } = fakeV1();
    const group = openCgroupTree(layout).create('sbx_v1_stats', {});
    writeFileSync(join(base, 'cpu,cpuacct', 'berth', group.name, 'cpuacct.usage'), '1987654321\n');
    writeFileSync(join(base, 'memory', 'berth', group.name, 'memory.usage_in_bytes'), '4096\n');
    writeFileSync(join(base, 'memory', 'berth', group.name, 'memory.max_usage_in_bytes'), '8192\n');
    expect(group.stats()).toEqual({ cpuSeconds: 1.987654321, memoryBytes: 4096, memoryPeakBytes: 8192 });
  });
});

describe('joining a group before running', () => {
  it('does not run the command at all when it cannot join the group', async () => {
    const directory = scratch();
    const marker = join(directory, 'ran');
    const { exited } = runJoined([join(directory, 'missing', 'cgroup.procs')], `touch ${marker}`);
    const { code, stderr } = await exited;
    expect(code).toBe(125);
    expect(stderr).toContain(CGROUP_JOIN_FAILURE);
    expect(existsSync(marker)).toBe(false);
  });

  it('writes the pid that then runs the command, so nothing runs outside', async () => {
    const directory = scratch();
    const files = [join(directory, 'a.procs'), join(directory, 'b.procs')];
    const output = join(directory, 'pid');
    const { exited } = runJoined(files, `echo $$ > ${output}`);
    expect((await exited).code).toBe(0);
    const pid = readFileSync(output, 'utf8').trim();
    for (const file of files) expect(readFileSync(file, 'utf8').trim()).toBe(pid);
  });
});

const v1Live = runningAsRoot && hostLayout.ok && hostLayout.layout.version === 1;
const v1Note = v1Live ? '' : ' (skipped: needs root on a host using cgroup v1)';

describe.skipIf(!v1Live)(`cgroup v1 on this kernel${v1Note}`, () => {
  const layout = (hostLayout.ok ? hostLayout.layout : undefined) as Extract<CgroupLayout, { version: 1 }>;
  const tree = openCgroupTree(layout, { parentName: testParent });
  const parentDirectories = () =>
    [...new Set(Object.values(layout.roots))].map((root) => join(root, testParent));

  afterAll(async () => {
    await tree.reapLeftovers();
    for (const name of tree.groupNames()) {
      for (const parent of parentDirectories())
        if (existsSync(join(parent, name))) rmdirSync(join(parent, name));
    }
    for (const parent of parentDirectories()) if (existsSync(parent)) rmdirSync(parent);
  });

  it('caps the processes of a group, then kills them all and leaves no directory', async () => {
    const group = tree.create('sbx_live_pids', { pids: 16 });
    const { exited } = runJoined(group.processFiles, 'for i in $(seq 40); do sleep 30 & done; wait');
    await expect.poll(() => group.processes().length, { timeout: 5000 }).toBeGreaterThanOrEqual(15);
    const pidsFile = join(layout.roots.pids, testParent, group.name, 'pids.current');
    expect(Number(readFileSync(pidsFile, 'utf8'))).toBeLessThanOrEqual(16);
    // The kernel's own count of forks the cap refused (the shell's "fork: retry" message may not
    // be written yet when the group is killed, on a loaded machine).
    const eventsFile = join(layout.roots.pids, testParent, group.name, 'pids.events');
    const refused = () => Number(/max (\d+)/.exec(readFileSync(eventsFile, 'utf8'))?.[1] ?? 0);
    await expect.poll(refused, { timeout: 10_000 }).toBeGreaterThan(0);
    expect(Number(readFileSync(pidsFile, 'utf8'))).toBeLessThanOrEqual(16);
    await group.remove();
    await exited;
    for (const parent of parentDirectories()) expect(existsSync(join(parent, group.name))).toBe(false);
  });

  it('reaps the groups of a dead owner, processes included, and spares a live owner', async () => {
    const ours = tree.create('sbx_live_ours', {});
    // A pid above the kernel's maximum never names a live process: this owner is dead.
    const deadName = 'sbx_live_dead.4194999.1';
    for (const parent of parentDirectories()) mkdirSync(join(parent, deadName), { recursive: true });
    const deadFiles = parentDirectories().map((parent) => join(parent, deadName, 'cgroup.procs'));
    const { exited } = runJoined(deadFiles, 'exec sleep 600');
    await expect
      .poll(() => readFileSync(deadFiles[0]!, 'utf8').trim().length > 0, { timeout: 5000 })
      .toBe(true);
    const reaped = await tree.reapLeftovers();
    expect(reaped.groups).toEqual([deadName]);
    expect(reaped.killedPids).toHaveLength(1);
    expect((await exited).code).toBeNull();
    expect(tree.groupNames()).toEqual([ours.name]);
    await ours.remove();
  });
});

/**
 * This host's v2 mount when cpu, memory and pids live in v1 instead (a hybrid host's `unified`):
 * groups there still join, count CPU, kill and remove like any v2 group.
 */
const hybridV2Mount = parseCgroupMounts(readFileSync('/proc/self/mounts', 'utf8')).find(
  (mount) =>
    mount.type === 'cgroup2' &&
    !/\b(cpu|memory|pids)\b/.test(readFileSync(join(mount.path, 'cgroup.controllers'), 'utf8')),
);
const v2MechanicsLive = runningAsRoot && hybridV2Mount !== undefined;

describe.skipIf(!v2MechanicsLive)(
  `cgroup v2 join, kill and remove on this kernel's hybrid v2 mount${v2MechanicsLive ? '' : ' (skipped: needs root and a cgroup2 mount beside v1 controllers)'}`,
  () => {
    it('kills a forking process tree at once with cgroup.kill and removes the group', async () => {
      const root = hybridV2Mount!.path;
      const tree = openCgroupTree({ version: 2, root, controllers: [] }, { parentName: testParent });
      try {
        const group = tree.create('sbx_live_v2', {});
        const { exited } = runJoined(group.processFiles, 'while :; do sleep 30 & sleep 0.01; done');
        await expect.poll(() => group.processes().length, { timeout: 5000 }).toBeGreaterThan(5);
        expect(existsSync(join(root, testParent, group.name, 'cgroup.kill'))).toBe(true);
        await group.remove();
        expect((await exited).code).toBeNull();
        expect(existsSync(join(root, testParent, group.name))).toBe(false);
      } finally {
        if (existsSync(join(root, testParent))) rmdirSync(join(root, testParent));
      }
    });
  },
);

const v2Live = runningAsRoot && hostLayout.ok && hostLayout.layout.version === 2;
const v2SkipReason = !runningAsRoot
  ? 'not running as root'
  : !hostLayout.ok
    ? hostLayout.reason
    : 'this host binds cpu, memory and pids to cgroup v1 hierarchies, and a controller serves one hierarchy at a time (freeing them means unmounting v1 hierarchies that hold live groups)';

describe.skipIf(!v2Live)(
  `cgroup v2 limits on this kernel${v2Live ? '' : ` (skipped: ${v2SkipReason})`}`,
  () => {
    it('limits, meters and kills a group', async () => {
      const layout = (hostLayout.ok ? hostLayout.layout : undefined) as Extract<CgroupLayout, { version: 2 }>;
      const tree = openCgroupTree(layout, { parentName: testParent });
      try {
        const group = tree.create('sbx_live_v2_limits', { cpuCores: 0.5, memoryBytes: 64 << 20, pids: 16 });
        const directory = join(layout.root, testParent, group.name);
        expect(readFileSync(join(directory, 'cpu.max'), 'utf8').trim()).toBe('50000 100000');
        expect(readFileSync(join(directory, 'pids.max'), 'utf8').trim()).toBe('16');
        const { exited } = runJoined(group.processFiles, 'timeout 1 sh -c "while :; do :; done"');
        await exited;
        const stats = group.stats();
        expect(stats.cpuSeconds).toBeGreaterThan(0.3);
        expect(stats.cpuSeconds).toBeLessThan(0.7);
        await group.remove();
        expect(existsSync(directory)).toBe(false);
      } finally {
        if (existsSync(join(layout.root, testParent))) rmdirSync(join(layout.root, testParent));
      }
    });
  },
);
