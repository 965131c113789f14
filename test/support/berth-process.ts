import { type ChildProcess, spawn } from 'node:child_process';
import { existsSync, readdirSync, readFileSync, readlinkSync } from 'node:fs';
import { createServer } from 'node:net';
import { resolve } from 'node:path';

const BERTH_BIN = resolve(import.meta.dirname, '../../bin/berth.js');
/** Loading the CLI through tsx alone took 7 s on a 2-core machine at load 17; a start has 60. */
const HEALTH_TIMEOUT_MS = 60_000;

/** A Berth server running as a real child process (`berth serve`), so a test can `kill -9` it. */
export interface BerthProcess {
  url: string;
  apiKey: string;
  child: ChildProcess;
  /** When the process was spawned (ms since the epoch). */
  startedAt: number;
  /** SIGKILLs the server and resolves once it has exited. */
  kill(): Promise<void>;
  /** SIGTERMs the server (a clean stop) and resolves once it has exited. */
  stop(): Promise<void>;
  /** The last few kilobytes the server wrote to stderr, for failure messages. */
  stderr(): string;
  /** Everything the server wrote to stdout and stderr, in arrival order (for scans). */
  output(): string;
}

/** A TCP port nothing listens on right now. */
export async function findFreePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((done) => server.listen(0, '127.0.0.1', done));
  const address = server.address();
  await new Promise<void>((done) => server.close(() => done()));
  if (address === null || typeof address === 'string') throw new Error('no port');
  return address.port;
}

/**
 * Spawns `node bin/berth.js serve` on a free loopback port over `dataDir` (SQLite) and waits
 * until `GET /health` answers 200. The admin key is read from `<dataDir>/admin.key`.
 */
export async function startBerthProcess(options: {
  dataDir: string;
  environment?: Record<string, string>;
  /** More `berth serve` arguments (e.g. `--cluster <url>`). */
  args?: string[];
  /** The admin key, when another process created it (cluster nodes after the first). */
  apiKey?: string;
  /** Listen on this port (default: a free one). */
  port?: number;
  /** Listen on this address (default 127.0.0.1). */
  host?: string;
  /** A command the server runs under (e.g. `ip netns exec <name>`). */
  prefix?: string[];
  /** How long to wait for `/health` (default 20 s; more for several servers starting at once). */
  healthTimeoutMs?: number;
}): Promise<BerthProcess> {
  const port = options.port ?? (await findFreePort());
  const host = options.host ?? '127.0.0.1';
  const startedAt = Date.now();
  const serveArgs = [
    BERTH_BIN,
    'serve',
    '--port',
    String(port),
    '--host',
    host,
    '--data-dir',
    options.dataDir,
    ...(options.args ?? []),
  ];
  const prefix = options.prefix ?? [];
  const child = spawn(
    prefix[0] ?? process.execPath,
    prefix.length > 0 ? [...prefix.slice(1), process.execPath, ...serveArgs] : serveArgs,
    {
      env: { ...process.env, ...options.environment },
      stdio: ['ignore', 'pipe', 'pipe'],
    },
  );
  let stderr = '';
  const output: string[] = [];
  child.stderr?.on('data', (chunk: Buffer) => {
    stderr = (stderr + chunk.toString('utf8')).slice(-8192);
    output.push(chunk.toString('utf8'));
  });
  child.stdout?.on('data', (chunk: Buffer) => output.push(chunk.toString('utf8')));
  const exited = new Promise<void>((done) => {
    if (child.exitCode !== null || child.signalCode !== null) done();
    else child.once('exit', () => done());
  });
  const url = `http://${host}:${port}`;
  const healthTimeoutMs = options.healthTimeoutMs ?? HEALTH_TIMEOUT_MS;
  const deadline = Date.now() + healthTimeoutMs;
  for (;;) {
    if (child.exitCode !== null || child.signalCode !== null) {
      throw new Error(`berth serve exited during start (${child.exitCode ?? child.signalCode}): ${stderr}`);
    }
    try {
      const response = await fetch(`${url}/health`);
      if (response.status === 200) break;
    } catch {
      // Not listening yet.
    }
    if (Date.now() > deadline) {
      child.kill('SIGKILL');
      throw new Error(`berth serve did not answer /health within ${healthTimeoutMs} ms: ${stderr}`);
    }
    await new Promise((done) => setTimeout(done, 25));
  }
  const keyFile = resolve(options.dataDir, 'admin.key');
  if (options.apiKey === undefined && !existsSync(keyFile)) throw new Error(`no admin key at ${keyFile}`);
  const apiKey = options.apiKey ?? readFileSync(keyFile, 'utf8').trim();
  const stopWith = async (signal: NodeJS.Signals) => {
    if (child.exitCode === null && child.signalCode === null) child.kill(signal);
    await exited;
  };
  return {
    url,
    apiKey,
    child,
    startedAt,
    kill: () => stopWith('SIGKILL'),
    stop: () => stopWith('SIGTERM'),
    stderr: () => stderr,
    output: () => output.join(''),
  };
}

/**
 * Processes of the sandbox whose workspace disk is mounted on `workdir` (the host side of a
 * workspace): those that have that disk where a sandbox puts its workspace (`/workspace`, or
 * `/run/berth/workdir` in its launcher's namespace). Other sandboxes' launcher namespaces hold
 * copies of every host mount under their host paths, so matching the path alone finds them too.
 */
export function sandboxProcessesOf(workdir: string): Array<{ pid: number; command: string }> {
  // mountinfo fields: id, parent, major:minor, root, mount point, ...; loop devices are unique.
  const device = readFileSync('/proc/self/mountinfo', 'utf8')
    .split('\n')
    .map((line) => line.split(' '))
    .findLast((fields) => fields[4] === workdir && fields[2]?.startsWith('7:'))?.[2];
  if (device === undefined) return [];
  const found: Array<{ pid: number; command: string }> = [];
  for (const entry of readdirSync('/proc')) {
    const pid = Number(entry);
    if (!Number.isInteger(pid) || pid === process.pid) continue;
    try {
      const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
      if (stat.slice(stat.lastIndexOf(')') + 2).startsWith('Z')) continue;
      const uses = readFileSync(`/proc/${pid}/mountinfo`, 'utf8')
        .split('\n')
        .some((line) => {
          const fields = line.split(' ');
          return fields[2] === device && ['/workspace', '/run/berth/workdir'].includes(fields[4] ?? '');
        });
      if (uses)
        found.push({
          pid,
          command: readFileSync(`/proc/${pid}/cmdline`, 'utf8').replaceAll('\0', ' ').trim(),
        });
    } catch {
      // Gone, or not ours to read.
    }
  }
  return found;
}

/**
 * Live (not zombie) processes whose command line contains one of `needles`, with their parent
 * pid. A sandbox names its session on bwrap's command line (`BERTH_SESSION_ID <session>`, pooled
 * ones `pool:<dataDir>/sandbox-pool`) and a launcher its workdir, so a test finds what its own
 * servers started by its data directory and session ids. Unlike `processesUsing`, mounts do not
 * count: every sandbox started on this host while a test's disk was mounted keeps a copy of that
 * mount, whoever started it.
 */
export function processesNaming(
  needles: readonly string[],
): Array<{ pid: number; parentPid: number; command: string }> {
  const found: Array<{ pid: number; parentPid: number; command: string }> = [];
  for (const entry of readdirSync('/proc')) {
    const pid = Number(entry);
    if (!Number.isInteger(pid) || pid === process.pid) continue;
    try {
      const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
      const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      if (fields[0] === 'Z') continue;
      const command = readFileSync(`/proc/${pid}/cmdline`, 'utf8').replaceAll('\0', ' ').trim();
      if (needles.some((needle) => command.includes(needle))) {
        found.push({ pid, parentPid: Number(fields[1]), command });
      }
    } catch {
      // Gone, or not ours to read.
    }
  }
  return found;
}

/**
 * Live (not zombie) processes that use `path`: in their command line or in a mount (a
 * sandbox binds its session's workspace). Finds sandboxes a killed server left behind even
 * after they were reparented, which a scan of the server's descendants cannot.
 */
export function processesUsing(path: string): Array<{ pid: number; command: string }> {
  const hostMountNamespace = readlinkSync('/proc/self/ns/mnt');
  const found: Array<{ pid: number; command: string }> = [];
  for (const entry of readdirSync('/proc')) {
    const pid = Number(entry);
    if (!Number.isInteger(pid) || pid === process.pid) continue;
    try {
      const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
      if (stat.slice(stat.lastIndexOf(')') + 2).startsWith('Z')) continue;
      const command = readFileSync(`/proc/${pid}/cmdline`, 'utf8').replaceAll('\0', ' ').trim();
      // Mounts count only in other mount namespaces (sandboxes): a workspace disk mounted on the
      // host shows up in every host process's mount table.
      const ownMounts = readlinkSync(`/proc/${pid}/ns/mnt`) === hostMountNamespace;
      if (
        command.includes(path) ||
        (!ownMounts && readFileSync(`/proc/${pid}/mountinfo`, 'utf8').includes(path))
      ) {
        found.push({ pid, command });
      }
    } catch {
      // Gone, or not ours to read.
    }
  }
  return found;
}

/**
 * SIGKILLs every process `processesUsing(path)` finds: for a test's own unique directory
 * (a server or sandbox a failed test left behind), never for a shared one.
 */
export function killProcessesUsing(path: string): void {
  for (const { pid } of processesUsing(path)) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // Gone already.
    }
  }
}
