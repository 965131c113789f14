/**
 * `exec` and `spawn` of the driver port on top of an agent connection (see `agent-connection.ts`),
 * shared by the drivers whose sandboxes run `berth-agent`: bwrap and microvm. The agent caps
 * output and kills process trees; this side adds the timeout, the abort signal, and a watchdog
 * for an agent too wedged to confirm a kill.
 */
import { PassThrough, Writable } from 'node:stream';
import type { SandboxProcess, SandboxProcessExit } from '../driver.js';
import { CappedBuffer, DEFAULT_MAX_OUTPUT_BYTES, DEFAULT_TIMEOUT_MS } from '../exec-process.js';
import type { AgentConnection, AgentExit } from './agent-connection.js';

/** How long a kill may go unconfirmed before the command is reported killed anyway. */
const KILL_CONFIRMATION_MS = 5_000;

/** A command to run through the agent: what the agent needs plus the host-side controls. */
export interface AgentCommand {
  argv: readonly string[];
  env: Readonly<Record<string, string>>;
  /** Directory inside the sandbox. */
  cwd: string;
  stdin?: string | Uint8Array;
  timeoutMs?: number;
  signal?: AbortSignal;
  maxOutputBytes?: number;
}

/** A finished command's output and how it ended (the shape `execResultOf` takes). */
export interface AgentCommandResult {
  stdout: Buffer;
  stderr: Buffer;
  exitCode: number | null;
  signal: string | null;
  timedOut: boolean;
  truncated: boolean;
  durationMs: number;
  /** True when the connection (the sandbox) went away before the command ended. */
  lost: boolean;
}

/** Runs a command to completion; never rejects (a lost connection reads as a kill). */
export function runOnAgent(agent: AgentConnection, command: AgentCommand): Promise<AgentCommandResult> {
  const maxOutputBytes = command.maxOutputBytes ?? DEFAULT_MAX_OUTPUT_BYTES;
  const started = performance.now();
  if (command.signal?.aborted) {
    return Promise.resolve({
      stdout: Buffer.alloc(0),
      stderr: Buffer.alloc(0),
      exitCode: null,
      signal: 'SIGKILL',
      timedOut: false,
      truncated: false,
      durationMs: 0,
      lost: false,
    });
  }
  return new Promise<AgentCommandResult>((resolve) => {
    const stdout = new CappedBuffer(maxOutputBytes);
    const stderr = new CappedBuffer(maxOutputBytes);
    let timedOut = false;
    let settled = false;
    let watchdog: NodeJS.Timeout | undefined;
    const settle = (exit: AgentExit) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      clearTimeout(watchdog);
      command.signal?.removeEventListener('abort', onAbort);
      resolve({
        stdout: stdout.toBuffer(),
        stderr: stderr.toBuffer(),
        exitCode: exit.exitCode,
        signal: exit.signal,
        timedOut,
        truncated: exit.truncated || stdout.truncated || stderr.truncated,
        durationMs: performance.now() - started,
        lost: exit.lost && !timedOut,
      });
    };
    const id = agent.start(
      { argv: command.argv, env: command.env, cwd: command.cwd, maxOutputBytes },
      { stdout: (chunk) => stdout.push(chunk), stderr: (chunk) => stderr.push(chunk), exit: settle },
    );
    const kill = () => {
      agent.kill(id);
      watchdog ??= setTimeout(
        () => settle({ exitCode: null, signal: 'SIGKILL', truncated: false, lost: true }),
        KILL_CONFIRMATION_MS,
      );
    };
    const timer = setTimeout(() => {
      timedOut = true;
      kill();
    }, command.timeoutMs ?? DEFAULT_TIMEOUT_MS);
    const onAbort = () => kill();
    command.signal?.addEventListener('abort', onAbort, { once: true });
    if (command.stdin !== undefined) {
      agent.stdin(id, typeof command.stdin === 'string' ? Buffer.from(command.stdin, 'utf8') : command.stdin);
    }
    agent.endStdin(id);
  });
}

/**
 * Starts a long-lived process (no output cap, no timeout) talked to over its streams; `onExit`
 * runs once it has ended, however it ended.
 */
export function spawnOnAgent(
  agent: AgentConnection,
  command: Pick<AgentCommand, 'argv' | 'env' | 'cwd'>,
  onExit?: () => void,
): SandboxProcess {
  const stdout = new PassThrough();
  const stderr = new PassThrough();
  let finished = false;
  let settle: (exit: SandboxProcessExit) => void = () => undefined;
  const exited = new Promise<SandboxProcessExit>((resolve) => {
    settle = resolve;
  });
  const id = agent.start(
    { argv: command.argv, env: command.env, cwd: command.cwd, maxOutputBytes: 0 },
    {
      stdout: (chunk) => stdout.write(chunk),
      stderr: (chunk) => stderr.write(chunk),
      exit: (exit) => {
        finished = true;
        stdout.end();
        stderr.end();
        onExit?.();
        settle({ exitCode: exit.exitCode, signal: exit.signal });
      },
    },
  );
  const stdin = new Writable({
    write(chunk: Buffer, _encoding, callback) {
      if (!finished) agent.stdin(id, chunk);
      callback();
    },
    final(callback) {
      if (!finished) agent.endStdin(id);
      callback();
    },
  });
  return {
    stdin,
    stdout,
    stderr,
    exited,
    kill: () => {
      if (!finished) agent.kill(id);
    },
  };
}
