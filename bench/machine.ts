import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { cpus, loadavg, release, totalmem } from 'node:os';

/** What the numbers were measured on, as one line per fact. */
export interface MachineDescription {
  date: string;
  cpu: string;
  cores: number;
  memory: string;
  kernel: string;
  node: string;
  disk: string;
  /** 1, 5 and 15 minute load averages when the run started: other work on the host skews numbers. */
  load: string;
}

/** CPU model from /proc/cpuinfo, cores, memory, kernel, Node version and the temp dir's file system. */
export function describeMachine(tempDirectory: string): MachineDescription {
  return {
    date: new Date().toISOString(),
    cpu: cpuModel(),
    cores: cpus().length,
    memory: `${(totalmem() / 1024 ** 3).toFixed(1)} GiB`,
    kernel: release(),
    node: process.version,
    disk: fileSystemOf(tempDirectory),
    load: loadavg()
      .map((value) => value.toFixed(2))
      .join(' '),
  };
}

function cpuModel(): string {
  try {
    const match = /^model name\s*:\s*(.+)$/m.exec(readFileSync('/proc/cpuinfo', 'utf8'));
    if (match) return match[1]!.trim();
  } catch {
    // not Linux; fall back to what Node reports
  }
  return cpus()[0]?.model ?? 'unknown';
}

function fileSystemOf(directory: string): string {
  try {
    // `df --output` gives the device and file system type of the directory's mount.
    const lines = execFileSync('df', ['--output=source,fstype,target', directory], { encoding: 'utf8' })
      .trim()
      .split('\n');
    const [source, type, target] = (lines[1] ?? '').trim().split(/\s+/);
    return `${type} (${source} on ${target}, holding ${directory})`;
  } catch {
    return 'unknown';
  }
}

/** The description as a Markdown bullet list. */
export function formatMachine(machine: MachineDescription): string {
  return [
    `- Date: ${machine.date}`,
    `- CPU: ${machine.cpu}, ${machine.cores} cores`,
    `- Memory: ${machine.memory}`,
    `- Kernel: ${machine.kernel}`,
    `- Node: ${machine.node}`,
    `- Disk: ${machine.disk}`,
    `- Load average at start: ${machine.load}`,
  ].join('\n');
}
