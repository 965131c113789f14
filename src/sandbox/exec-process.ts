/**
 * Spawning helpers shared by sandbox drivers: run a host process with capped output, a
 * timeout and an abort signal, and kill a whole process tree. Drivers build the argv (bwrap,
 * nsenter, runsc, ...); this file only knows about host processes.
 */
import { type ChildProcess, type SpawnOptions, spawn } from 'node:child_process';
import { readdirSync, readFileSync } from 'node:fs';

/** Default per-stream output cap (1 MiB), as documented on `ExecOptions.maxOutputBytes`. */
export const DEFAULT_MAX_OUTPUT_BYTES = 1024 * 1024;
/** Default command timeout (120 s), as documented on `ExecOptions.timeoutMs`. */
export const DEFAULT_TIMEOUT_MS = 120_000;

/**
 * After the direct child exits, how long to wait for its pipes to close. A background
 * process started by the command (`sleep 100 &`) may hold them open forever.
 */
const PIPE_DRAIN_GRACE_MS = 100;

export interface RunProcessOptions {
  /** Passed to `spawn` (stdio and detached are set by this helper). */
  spawnOptions: Omit<SpawnOptions, 'stdio' | 'detached'>;
  /** Extra file descriptors from fd 3 on (pipes, open fds or 'ignore'). */
  extraStdio?: ReadonlyArray<'pipe' | 'ignore' | number>;
  stdin?: string | Uint8Array;
  timeoutMs: number;
  signal?: AbortSignal;
  maxOutputBytes: number;
  /** Kills everything the process started; called on timeout and abort. */
  killTree: (child: ChildProcess) => void;
  /** Called right after spawn, before any output is read (e.g. to feed extra fds). */
  onSpawn?: (child: ChildProcess) => void;
}

export interface RunProcessResult {
  stdout: Buffer;
  stderr: Buffer;
  exitCode: number | null;
  signal: string | null;
  timedOut: boolean;
  aborted: boolean;
  truncated: boolean;
  durationMs: number;
}

/** Keeps the first `limit` bytes of a stream and counts (but drops) the rest. */
export class CappedBuffer {
  private readonly chunks: Buffer[] = [];
  private size = 0;
  truncated = false;

  constructor(private readonly limit: number) {}

  push(chunk: Buffer): void {
    const room = this.limit - this.size;
    if (room <= 0) {
      if (chunk.length > 0) this.truncated = true;
      return;
    }
    if (chunk.length > room) {
      this.chunks.push(chunk.subarray(0, room));
      this.size += room;
      this.truncated = true;
      return;
    }
    this.chunks.push(chunk);
    this.size += chunk.length;
  }

  toBuffer(): Buffer {
    return Buffer.concat(this.chunks, this.size);
  }
}

/**
 * Runs a process in its own process group and resolves when it exits (never rejects for a
 * non-zero exit; rejects only when it cannot be spawned). On timeout or abort `killTree` is
 * called and the result says so.
 */
export function runProcess(command: string, args: readonly string[], options: RunProcessOptions) {
  return new Promise<RunProcessResult>((resolve, reject) => {
    const started = performance.now();
    const stdout = new CappedBuffer(options.maxOutputBytes);
    const stderr = new CappedBuffer(options.maxOutputBytes);
    let timedOut = false;
    let aborted = false;

    if (options.signal?.aborted) {
      resolve({
        stdout: Buffer.alloc(0),
        stderr: Buffer.alloc(0),
        exitCode: null,
        signal: 'SIGKILL',
        timedOut: false,
        aborted: true,
        truncated: false,
        durationMs: 0,
      });
      return;
    }

    let child: ChildProcess;
    try {
      child = spawn(command, args, {
        ...options.spawnOptions,
        detached: true,
        stdio: ['pipe', 'pipe', 'pipe', ...(options.extraStdio ?? [])],
      });
    } catch (error) {
      reject(error);
      return;
    }

    const kill = () => {
      try {
        options.killTree(child);
      } catch {
        // The process may already be gone.
      }
    };
    const timer = setTimeout(() => {
      timedOut = true;
      kill();
    }, options.timeoutMs);
    const onAbort = () => {
      aborted = true;
      kill();
    };
    options.signal?.addEventListener('abort', onAbort, { once: true });

    child.stdout?.on('data', (chunk: Buffer) => stdout.push(chunk));
    child.stderr?.on('data', (chunk: Buffer) => stderr.push(chunk));
    // A command that exits without reading its stdin makes our write fail with EPIPE.
    child.stdin?.on('error', () => {});
    options.onSpawn?.(child);
    if (options.stdin !== undefined) child.stdin?.end(options.stdin);
    else child.stdin?.end();

    let settled = false;
    child.on('error', (error) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      options.signal?.removeEventListener('abort', onAbort);
      reject(error);
    });
    child.on('exit', (exitCode, signal) => {
      const finish = () => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        clearTimeout(drainTimer);
        options.signal?.removeEventListener('abort', onAbort);
        child.stdout?.destroy();
        child.stderr?.destroy();
        resolve({
          stdout: stdout.toBuffer(),
          stderr: stderr.toBuffer(),
          exitCode,
          signal,
          timedOut,
          aborted,
          truncated: stdout.truncated || stderr.truncated,
          durationMs: performance.now() - started,
        });
      };
      let open = [child.stdout, child.stderr].filter((stream) => stream && !stream.closed).length;
      const drainTimer = setTimeout(finish, PIPE_DRAIN_GRACE_MS);
      if (open === 0) finish();
      for (const stream of [child.stdout, child.stderr]) {
        if (stream && !stream.closed)
          stream.once('close', () => {
            open -= 1;
            if (open === 0) finish();
          });
      }
    });
  });
}

/** Host pids of every descendant of `rootPid` (found by scanning /proc), children first. */
export function findDescendants(rootPid: number): number[] {
  const childrenByParent = new Map<number, number[]>();
  for (const entry of readdirSync('/proc')) {
    const pid = Number(entry);
    if (!Number.isInteger(pid)) continue;
    let stat: string;
    try {
      stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    } catch {
      continue;
    }
    // The command name may contain spaces and parentheses; fields resume after the last ')'.
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    const parent = Number(fields[1]);
    const siblings = childrenByParent.get(parent);
    if (siblings) siblings.push(pid);
    else childrenByParent.set(parent, [pid]);
  }
  const result: number[] = [];
  const queue = [rootPid];
  while (queue.length > 0) {
    const pid = queue.shift()!;
    for (const child of childrenByParent.get(pid) ?? []) {
      result.push(child);
      queue.push(child);
    }
  }
  return result;
}

/**
 * SIGKILLs a process, its process group and every descendant (even those that started their
 * own session). Repeats the scan so a process forked mid-kill is caught too.
 */
export function killProcessTree(rootPid: number): void {
  const sendKill = (target: number) => {
    try {
      process.kill(target, 'SIGKILL');
    } catch {
      // Already gone.
    }
  };
  for (let round = 0; round < 3; round += 1) {
    const descendants = findDescendants(rootPid);
    sendKill(-rootPid);
    for (const pid of descendants) sendKill(pid);
    if (descendants.length === 0) break;
  }
  sendKill(rootPid);
}
