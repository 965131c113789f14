/**
 * An MCP client transport over a process inside a session's sandbox. The SDK's
 * `StdioClientTransport` spawns a host process; this one speaks the same newline-delimited
 * JSON-RPC framing over the pipes of a `SandboxProcess`, so a stdio server never runs on the host.
 */

import { ReadBuffer, serializeMessage } from '@modelcontextprotocol/sdk/shared/stdio.js';
import type { Transport } from '@modelcontextprotocol/sdk/shared/transport.js';
import type { JSONRPCMessage } from '@modelcontextprotocol/sdk/types.js';
import type { SandboxProcess, SandboxProcessExit } from '../sandbox/driver.js';

/** How much of the server's stderr is kept for error messages. */
const STDERR_TAIL_BYTES = 2048;
/** After stdin is closed, how long a server gets to exit on its own before it is killed. */
const DEFAULT_CLOSE_GRACE_MS = 500;

export interface SandboxStdioTransportOptions {
  /** Starts the server process (called once, from `start`). */
  startProcess: () => Promise<SandboxProcess>;
  /** How long `close` waits for the server to exit after closing its stdin (default 500 ms). */
  closeGraceMs?: number;
}

/** Client transport whose server is a `SandboxProcess`; see the file comment. */
export class SandboxStdioTransport implements Transport {
  onclose?: () => void;
  onerror?: (error: Error) => void;
  onmessage?: (message: JSONRPCMessage) => void;

  private readonly readBuffer = new ReadBuffer();
  private process: SandboxProcess | undefined;
  private started = false;
  private closed = false;
  private closeNotified = false;
  private exit: SandboxProcessExit | undefined;
  private stderrTail = '';
  /** True when `close` had to kill the server (so a crash is not reported for it). */
  private stoppedByClose = false;

  constructor(private readonly options: SandboxStdioTransportOptions) {}

  async start(): Promise<void> {
    if (this.started) throw new Error('SandboxStdioTransport already started');
    this.started = true;
    const process = await this.options.startProcess();
    if (this.closed) {
      // Closed (e.g. a connect deadline passed) while the sandbox was starting the process.
      process.kill();
      throw new Error('transport closed before the server started');
    }
    this.process = process;
    process.stdout.on('data', (chunk: Buffer) => {
      try {
        this.readBuffer.append(chunk);
      } catch (error) {
        // Over the SDK's buffer cap (10 MiB without a newline): the stream is unusable.
        this.onerror?.(error as Error);
        void this.close();
        return;
      }
      this.drainMessages();
    });
    process.stdout.on('error', (error: Error) => this.onerror?.(error));
    process.stdin.on('error', (error: Error) => this.onerror?.(error));
    process.stderr.on('data', (chunk: Buffer) => {
      this.stderrTail = (this.stderrTail + chunk.toString('utf8')).slice(-STDERR_TAIL_BYTES);
    });
    void process.exited.then((exit) => {
      this.exit = exit;
      this.notifyClosed();
    });
  }

  async send(message: JSONRPCMessage): Promise<void> {
    const process = this.process;
    if (!process || this.closed || this.exit) throw new Error('Not connected');
    if (process.stdin.write(serializeMessage(message))) return;
    // Back-pressure: wait for the pipe to drain, unless the server dies first.
    await new Promise<void>((resolve) => {
      process.stdin.once('drain', resolve);
      void process.exited.then(() => resolve());
    });
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    const process = this.process;
    if (process && !this.exit) {
      process.stdin.end();
      const grace = new Promise((resolve) =>
        setTimeout(resolve, this.options.closeGraceMs ?? DEFAULT_CLOSE_GRACE_MS),
      );
      await Promise.race([process.exited, grace]);
      this.stoppedByClose = true;
      process.kill();
      await process.exited;
    }
    this.readBuffer.clear();
    this.notifyClosed();
  }

  /** How the server process ended and the end of its stderr, for error messages. */
  describeServer(): string {
    const parts: string[] = [];
    if (this.exit) {
      parts.push(
        this.exit.exitCode !== null
          ? `the server process exited with code ${this.exit.exitCode}`
          : this.stoppedByClose
            ? 'the server process was stopped'
            : `the server process was killed (${this.exit.signal ?? 'unknown signal'})`,
      );
    }
    const stderr = this.stderrTail.trim();
    if (stderr) parts.push(`stderr: ${stderr}`);
    return parts.join('; ');
  }

  private drainMessages(): void {
    for (;;) {
      let message: JSONRPCMessage | null;
      try {
        message = this.readBuffer.readMessage();
      } catch (error) {
        // One malformed line (e.g. a stray log line on stdout) is reported and skipped.
        this.onerror?.(error as Error);
        continue;
      }
      if (message === null) return;
      this.onmessage?.(message);
    }
  }

  private notifyClosed(): void {
    if (this.closeNotified) return;
    this.closeNotified = true;
    this.onclose?.();
  }
}
