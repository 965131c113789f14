/**
 * Small checks and host helpers every sandbox driver needs the same way: argv and environment
 * validation (what reaches a command line or an environment block), paths inside the sandbox,
 * finding host binaries, and handing a working directory to the sandbox user.
 */
import { accessSync, constants, lchownSync, lstatSync, readdirSync } from 'node:fs';
import { delimiter, join, posix } from 'node:path';
import { BerthError } from '../errors.js';

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
