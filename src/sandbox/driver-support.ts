/**
 * Small checks and host helpers every sandbox driver needs the same way: argv and environment
 * validation (what reaches a command line or an environment block), paths inside the sandbox,
 * finding host binaries, and handing a working directory to the sandbox user.
 */
import { accessSync, constants, lchownSync, lstatSync, readdirSync } from 'node:fs';
import { delimiter, join, posix } from 'node:path';
import { BerthError } from '../errors.js';
import {
  DEFAULT_SANDBOX_LIMITS,
  type EnforcedLimits,
  type ExecResult,
  type SandboxDriver,
  type SandboxHandle,
  type SandboxSpec,
} from './driver.js';

/** The first executable called `name` on PATH or in the system binary directories. */
export function findExecutable(name: string): string | undefined {
  const directories = [
    ...(process.env.PATH ?? '').split(delimiter),
    '/usr/sbin',
    '/sbin',
    '/usr/bin',
    '/bin',
  ];
  for (const directory of directories) {
    if (!directory) continue;
    const candidate = join(directory, name);
    try {
      accessSync(candidate, constants.X_OK);
      return candidate;
    } catch {
      // Keep looking.
    }
  }
  return undefined;
}

/** Gives `path` and everything below it to `uid:gid` (symlinks themselves, never their targets). */
export function chownTree(path: string, uid: number, gid: number): void {
  const stats = lstatSync(path);
  if (stats.uid !== uid || stats.gid !== gid) lchownSync(path, uid, gid);
  if (!stats.isDirectory()) return;
  for (const entry of readdirSync(path)) chownTree(join(path, entry), uid, gid);
}

/**
 * Environment variables must be shell-style names with values free of NUL; `reserved` names are
 * the driver's own and may not be set by callers.
 */
export function validateEnvironment(
  env: Readonly<Record<string, string>> | undefined,
  reserved: readonly string[] = [],
): void {
  for (const [name, value] of Object.entries(env ?? {})) {
    if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(name) || value.includes('\0') || reserved.includes(name)) {
      throw new BerthError('invalid_request', `invalid environment variable name or value: ${name}`);
    }
  }
}

/** A command: at least a program name, no NUL bytes, and no `=` in argv[0] (env(1) would take it). */
export function validateArgv(argv: readonly string[]): void {
  if (argv.length === 0 || argv[0] === '') throw new BerthError('invalid_request', 'argv must not be empty');
  if (argv.some((argument) => argument.includes('\0'))) {
    throw new BerthError('invalid_request', 'argv must not contain NUL bytes');
  }
  if (argv[0]!.includes('=')) throw new BerthError('invalid_request', 'argv[0] must not contain "="');
}

/** `path` as an absolute path inside the sandbox, relative ones taken from `workdirInside`. */
export function pathInside(workdirInside: string, path: string): string {
  if (path.length === 0 || path.includes('\0')) throw new BerthError('invalid_request', 'invalid path');
  return posix.resolve(workdirInside, path);
}

/** Largest file `readFile` returns without an explicit limit. */
const DEFAULT_MAX_READ_BYTES = 64 * 1024 * 1024;
const FILE_OPERATION_TIMEOUT_MS = 30_000;

/** What the file operations need of a driver: run a command in the sandbox as its user. */
export type SandboxCommandRunner = (
  handle: SandboxHandle,
  argv: readonly string[],
  options: { stdin?: string | Uint8Array; timeoutMs: number; maxOutputBytes: number },
) => Promise<{
  stdout: Buffer;
  stderr: Buffer;
  exitCode: number | null;
  timedOut: boolean;
  truncated: boolean;
}>;

/** A failed file command as the error a caller can act on (missing, refused, or the sandbox's fault). */
function fileError(
  operation: string,
  path: string,
  result: { stderr: Buffer; timedOut: boolean },
): BerthError {
  const message = result.stderr.toString('utf8').trim();
  if (result.timedOut)
    return new BerthError('sandbox_failed', `${operation} ${path} timed out`, { retryable: true });
  if (/No such file or directory/.test(message)) return new BerthError('not_found', `no such file: ${path}`);
  if (/Is a directory|Not a directory|Permission denied|Read-only file system/.test(message)) {
    return new BerthError('invalid_request', `cannot ${operation} ${path}: ${message}`);
  }
  return new BerthError('sandbox_failed', `cannot ${operation} ${path}: ${message || 'unknown error'}`);
}

/**
 * `readFile` and `writeFile` done by commands inside the sandbox as its user (never on the host
 * path), so a symlink the agent made resolves in the sandbox's own tree and cannot reach a host file.
 */
export function sandboxFiles(
  run: SandboxCommandRunner,
  workdirInside: string,
): Pick<SandboxDriver, 'readFile' | 'writeFile'> {
  return {
    async readFile(handle, path, maxBytes) {
      const target = pathInside(workdirInside, path);
      const limit = maxBytes ?? DEFAULT_MAX_READ_BYTES;
      // `head -c` stops reading at the limit; one extra byte tells us the file was larger.
      const result = await run(handle, ['head', '-c', String(limit + 1), '--', target], {
        maxOutputBytes: limit,
        timeoutMs: FILE_OPERATION_TIMEOUT_MS,
      });
      if (result.exitCode !== 0) throw fileError('read', path, result);
      if (result.truncated && maxBytes === undefined) {
        throw new BerthError('payload_too_large', `${path} is larger than ${limit} bytes`);
      }
      return new Uint8Array(result.stdout.buffer, result.stdout.byteOffset, result.stdout.byteLength);
    },
    async writeFile(handle, path, data) {
      const target = pathInside(workdirInside, path);
      const result = await run(
        handle,
        ['sh', '-c', 'mkdir -p -- "$(dirname -- "$1")" && cat > "$1"', 'sh', target],
        { stdin: data, timeoutMs: FILE_OPERATION_TIMEOUT_MS, maxOutputBytes: 64 * 1024 },
      );
      if (result.exitCode !== 0) throw fileError('write', path, result);
    },
  };
}

/** A finished command's captured output as the port's `ExecResult` (text decoded as UTF-8). */
export function execResultOf(result: {
  stdout: Buffer;
  stderr: Buffer;
  exitCode: number | null;
  signal: string | null;
  timedOut: boolean;
  truncated: boolean;
  durationMs: number;
}): ExecResult {
  return {
    stdout: result.stdout.toString('utf8'),
    stderr: result.stderr.toString('utf8'),
    exitCode: result.exitCode,
    signal: result.signal,
    timedOut: result.timedOut,
    truncated: result.truncated,
    durationMs: result.durationMs,
  };
}

/**
 * The limits a spec asks for with defaults filled in (`DEFAULT_SANDBOX_LIMITS`); `explicit` when it
 * named any of cpu, memory or pids itself, `explicitDisk` for diskMb. Non-positive values are refused.
 */
export function resolveLimits(spec: SandboxSpec): {
  limits: Required<EnforcedLimits>;
  explicit: boolean;
  explicitDisk: boolean;
} {
  const requested = {
    cpu: spec.limits?.cpu,
    memoryMb: spec.limits?.memoryMb,
    pids: spec.limits?.pids,
    diskMb: spec.limits?.diskMb,
  };
  for (const [name, value] of Object.entries(requested)) {
    if (value !== undefined && !(Number.isFinite(value) && value > 0)) {
      throw new BerthError(
        'invalid_request',
        `sandbox limit ${name} must be a positive number, got ${value}`,
      );
    }
  }
  return {
    limits: {
      cpu: requested.cpu ?? DEFAULT_SANDBOX_LIMITS.cpu,
      memoryMb: requested.memoryMb ?? DEFAULT_SANDBOX_LIMITS.memoryMb,
      pids: requested.pids ?? DEFAULT_SANDBOX_LIMITS.pids,
      diskMb: Math.round(requested.diskMb ?? DEFAULT_SANDBOX_LIMITS.diskMb),
    },
    explicit: [requested.cpu, requested.memoryMb, requested.pids].some((value) => value !== undefined),
    explicitDisk: requested.diskMb !== undefined,
  };
}
