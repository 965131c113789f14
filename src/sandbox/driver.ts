/**
 * The sandbox driver port. A driver turns a spec into an isolated environment for one
 * session and runs commands in it. Drivers live in subfolders named after their technology
 * (`bwrap/`, later `gvisor/`, `microvm/`, `isolate/`); every driver passes the contract suite
 * in `driver-contract.test-suite.ts`. Optional capabilities are optional methods; a driver
 * that cannot do something throws a `sandbox_unavailable` BerthError saying so.
 */
import type { Readable, Writable } from 'node:stream';

/**
 * Resource limits; an absent field takes its `DEFAULT_SANDBOX_LIMITS` value. A driver enforces
 * what it can, says which on the handle (`enforcedLimits`), and refuses a spec whose explicit
 * limits it cannot enforce.
 */
export interface SandboxLimits {
  /** CPU cores (fractional allowed). */
  cpu?: number;
  memoryMb?: number;
  /** Processes and threads alive at once (a fork bomb stops here). */
  pids?: number;
  /** Space for the working directory's files (MiB); writes past it fail with ENOSPC. */
  diskMb?: number;
}

/**
 * Limits for an environment that sets none: one core, 1 GiB and 512 processes are enough for
 * builds, test runs and a language server, and small enough that a runaway agent cannot starve
 * a 2-vCPU node running several sandboxes. 10 GiB of disk holds a large repository with its
 * dependencies and build output; it is a ceiling, not a reservation (drivers allocate what is
 * written), and stops one runaway `dd` from filling the host disk the server's data lives on.
 */
export const DEFAULT_SANDBOX_LIMITS = { cpu: 1, memoryMb: 1024, pids: 512, diskMb: 10240 } as const;

/** The limits a sandbox actually runs under. */
export interface EnforcedLimits {
  cpu: number;
  memoryMb: number;
  pids: number;
  /** Present only when the working directory's size is enforced. */
  diskMb?: number;
}

/** What a sandbox has used since it was provisioned (everything it ran, counted by the kernel). */
export interface SandboxStats {
  cpuSeconds: number;
  memoryBytes: number;
  /** Highest memory use so far, or null when the host does not track it. */
  memoryPeakBytes: number | null;
}

export interface SandboxSpec {
  sessionId: string;
  /** Host directory that becomes the sandbox's working directory (`/workspace` inside). */
  workdir: string;
  limits?: SandboxLimits;
  /** Extra environment variables visible to every command. */
  env?: Readonly<Record<string, string>>;
  /**
   * Host directories or files visible read-only inside the sandbox (e.g. the MCP server
   * packages). Both paths are absolute; `insidePath` must not be `/`, `/workspace` or below
   * `/proc`, `/dev`, `/tmp`, `/workspace`.
   */
  readOnlyMounts?: readonly ReadOnlyMount[];
  /**
   * A directory that `suspend` of an earlier sandbox of this session wrote: the new sandbox
   * resumes from it (the working directory's files, and memory for drivers that keep it). The
   * driver may move what is in it; the caller deletes the directory after provisioning.
   */
  restoreFrom?: string;
}

/** What `suspend` kept of a sandbox. */
export interface SuspendResult {
  /** True when processes and memory were saved too (resume continues them), not only files. */
  memory: boolean;
}

/** A host path bound read-only into the sandbox. */
export interface ReadOnlyMount {
  hostPath: string;
  insidePath: string;
}

export interface SandboxHandle {
  readonly id: string;
  readonly sessionId: string;
  readonly driver: string;
  /** The working directory as commands inside see it. */
  readonly workdirInside: string;
  /** The limits the kernel enforces on this sandbox; absent when none are (never a claim it cannot keep). */
  readonly enforcedLimits?: EnforcedLimits;
  /**
   * A host directory the sandbox sees read-only (bwrap: at `/run/berth`), where the server puts
   * what the sandbox may use but not change: the egress proxy's socket, whose connections the
   * sandbox reaches at 127.0.0.1:3128, and the proxy's CA certificate. Absent for drivers
   * without one (then the sandbox has no network at all).
   */
  readonly servicesDirectory?: string;
}

export interface ExecOptions {
  /** Directory inside the sandbox (default: the working directory). */
  cwd?: string;
  env?: Readonly<Record<string, string>>;
  stdin?: string | Uint8Array;
  /** Kill the command after this long (default 120 s). */
  timeoutMs?: number;
  signal?: AbortSignal;
  /** Cap on each of stdout and stderr (default 1 MiB); the rest is dropped. */
  maxOutputBytes?: number;
}

export interface ExecResult {
  stdout: string;
  stderr: string;
  /** Exit code, or null when killed by a signal. */
  exitCode: number | null;
  signal: string | null;
  timedOut: boolean;
  /** True when stdout or stderr hit the cap. */
  truncated: boolean;
  durationMs: number;
}

/** Options for `SandboxDriver.spawn`. */
export interface SandboxSpawnOptions {
  /** Directory inside the sandbox (default: the working directory). */
  cwd?: string;
  env?: Readonly<Record<string, string>>;
}

/** How a spawned process ended: an exit code, or null and the signal that killed it. */
export interface SandboxProcessExit {
  exitCode: number | null;
  signal: string | null;
}

/**
 * A long-lived process inside a sandbox, talked to over its pipes (e.g. an MCP stdio server).
 * Nothing caps its output or time: the caller reads the streams and kills it when done.
 */
export interface SandboxProcess {
  readonly stdin: Writable;
  readonly stdout: Readable;
  readonly stderr: Readable;
  /** SIGKILLs the process and everything it started; safe to call more than once. */
  kill(): void;
  /** Settles (never rejects) once the process has exited. */
  readonly exited: Promise<SandboxProcessExit>;
}

/**
 * Whether this host can run the driver, and if not, what to do about it. `warnings` name what
 * works only in part (e.g. resource limits not enforced), for the server to log.
 */
export type DriverAvailability = { ok: true; warnings?: readonly string[] } | { ok: false; reason: string };

export interface SandboxDriver {
  readonly name: string;
  /** Checks the host once (binaries, kernel features); never throws. */
  checkAvailability(): Promise<DriverAvailability>;
  provision(spec: SandboxSpec): Promise<SandboxHandle>;
  /** Runs `argv` (argv[0] looked up on PATH inside the sandbox). */
  exec(handle: SandboxHandle, argv: readonly string[], options?: ExecOptions): Promise<ExecResult>;
  /**
   * Starts a long-lived process inside the sandbox with the same user, environment rules and
   * isolation as `exec`. `destroy` kills it. Drivers that cannot keep a process inside a live
   * sandbox throw a `sandbox_unavailable` BerthError.
   */
  spawn?(handle: SandboxHandle, argv: readonly string[], options?: SandboxSpawnOptions): SandboxProcess;
  /** Reads a file, resolving `path` inside the sandbox (symlinks cannot escape it). */
  readFile(handle: SandboxHandle, path: string, maxBytes?: number): Promise<Uint8Array>;
  /** Writes a file inside the sandbox, creating parent directories. */
  writeFile(handle: SandboxHandle, path: string, data: string | Uint8Array): Promise<void>;
  /**
   * What the sandbox has used so far (for metering). Drivers that cannot measure a sandbox throw
   * a `sandbox_unavailable` BerthError.
   */
  stats?(handle: SandboxHandle): Promise<SandboxStats>;
  /**
   * False once the sandbox is gone: destroyed, or died on its own (its init, user-space kernel or
   * VM exited). Callers then provision a new one over the same working directory.
   */
  isAlive(handle: SandboxHandle): boolean;
  /** Kills everything in the sandbox and releases its resources; the workdir stays. */
  destroy(handle: SandboxHandle): Promise<void>;
  /**
   * Stops the sandbox and writes into `directory` (an empty host directory) everything a later
   * `provision({ ...spec, restoreFrom: directory })` needs to resume it: the working directory's
   * files always, and processes and memory for drivers that can (`SuspendResult.memory`).
   * Afterwards the sandbox is gone as after `destroy`, and so is its working directory on the
   * host (its files are in `directory` now).
   */
  suspend(handle: SandboxHandle, directory: string): Promise<SuspendResult>;
  /**
   * Kills sandboxes of this driver that a dead Berth process left on the host (called at
   * start-up, before sessions resume). Returns how many it found.
   */
  reapOrphans?(): Promise<number>;
  /**
   * Starts background work that makes later provisions faster, such as keeping sandboxes
   * started ahead of need (called once the server has reaped orphans).
   */
  warmUp?(): void;
  /** Ends that background work and releases what it holds (server shutdown). */
  close?(): Promise<void>;
}
