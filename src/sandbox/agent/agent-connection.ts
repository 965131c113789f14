/**
 * The host side of the sandbox agent's protocol (see `berth-agent.c`): frames of a 9-byte
 * header (u8 type, u32 command id, u32 payload length, little-endian) and a payload, over the
 * unix socket QEMU exposes for a VM's virtio-serial port (microvm) or the agent's stdin and
 * stdout pipes (bwrap). Many commands share the connection; each has an id the host picks.
 */

import { connect, type Socket } from 'node:net';
import { constants } from 'node:os';
import type { Readable, Writable } from 'node:stream';

/** Message types; the agent's enum has the same numbers. */
export const AgentMessage = {
  init: 1,
  start: 2,
  stdin: 3,
  stdinEnd: 4,
  kill: 5,
  ready: 10,
  stdout: 11,
  stderr: 12,
  exit: 13,
  error: 14,
} as const;

const HEADER_BYTES = 9;

/** How a guest command ended. `lost` means the VM or the connection went away first. */
export interface AgentExit {
  exitCode: number | null;
  signal: string | null;
  truncated: boolean;
  lost: boolean;
}

/** Callbacks for one command's output and end. */
export interface CommandListener {
  stdout(chunk: Buffer): void;
  stderr(chunk: Buffer): void;
  exit(result: AgentExit): void;
}

/** What the agent needs to start a command. */
export interface StartRequest {
  argv: readonly string[];
  env: Readonly<Record<string, string>>;
  cwd: string;
  /** Bytes kept per stream (0: no cap); the agent drains and drops the rest. */
  maxOutputBytes: number;
}

/** What a new connection tells the agent first. */
export interface InitRequest {
  /** Process limit for everything commands run (0: none). */
  pids: number;
  /** Mount the workspace disk (a VM restored from a template has not yet). */
  mountWorkspace: boolean;
  /** Give every file on the workspace disk to the sandbox user (files imported from the host). */
  chownWorkspace: boolean;
}

function frame(type: number, id: number, payload: Buffer = Buffer.alloc(0)): Buffer {
  const header = Buffer.alloc(HEADER_BYTES);
  header.writeUInt8(type, 0);
  header.writeUInt32LE(id, 1);
  header.writeUInt32LE(payload.length, 5);
  return Buffer.concat([header, payload]);
}

const signalNames = new Map<number, string>(
  Object.entries(constants.signals).map(([name, number]) => [number as number, name]),
);

/** A connection to one sandbox's agent. */
export class AgentConnection {
  readonly #input: Readable;
  readonly #output: Writable;
  readonly #commands = new Map<number, CommandListener>();
  #buffered: Buffer = Buffer.alloc(0);
  #nextId = 1;
  #closed = false;
  #control: { resolve: () => void; reject: (error: Error) => void } | undefined;

  private constructor(input: Readable, output: Writable) {
    this.#input = input;
    this.#output = output;
    input.on('data', (chunk: Buffer) => this.#receive(chunk));
    for (const stream of new Set<Readable | Writable>([input, output])) {
      stream.on('error', () => this.#close());
      stream.on('close', () => this.#close());
    }
    input.on('end', () => this.#close());
  }

  /** A connection over an agent's stdout (`input`) and stdin (`output`) pipes. */
  static overPipes(input: Readable, output: Writable): AgentConnection {
    return new AgentConnection(input, output);
  }

  /** Connects to the agent socket QEMU serves (QEMU creates it as it starts, so retry briefly). */
  static async connect(socketPath: string, timeoutMs: number): Promise<AgentConnection> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      try {
        const socket = await new Promise<Socket>((resolve, reject) => {
          const attempt = connect(socketPath);
          attempt.once('connect', () => {
            attempt.off('error', reject);
            resolve(attempt);
          });
          attempt.once('error', reject);
        });
        return new AgentConnection(socket, socket);
      } catch (error) {
        if (Date.now() > deadline) throw error;
        await new Promise((resolve) => setTimeout(resolve, 20));
      }
    }
  }

  get closed(): boolean {
    return this.#closed;
  }

  /** Resolves on the agent's unprompted READY (an agent started with `--stdio` sends one). */
  ready(timeoutMs: number): Promise<void> {
    return this.#awaitControl(timeoutMs);
  }

  /**
   * Sends INIT (fresh clock and entropy, the pids limit, and whether to mount the workspace) and
   * resolves once the agent says it is ready; rejects with the agent's error or on timeout.
   */
  init(request: InitRequest, entropy: Buffer, timeoutMs: number): Promise<void> {
    const payload = Buffer.alloc(48);
    payload.writeBigUInt64LE(BigInt(Date.now()), 0);
    payload.writeUInt32LE(request.pids, 8);
    payload.writeUInt32LE((request.mountWorkspace ? 1 : 0) | (request.chownWorkspace ? 2 : 0), 12);
    entropy.copy(payload, 16, 0, 32);
    const answered = this.#awaitControl(timeoutMs);
    this.#send(frame(AgentMessage.init, 0, payload));
    return answered;
  }

  /** Waits for the agent's next READY (resolves) or ERROR (rejects) about itself. */
  #awaitControl(timeoutMs: number): Promise<void> {
    if (this.#closed) return Promise.reject(new Error('the agent connection closed'));
    return new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#control = undefined;
        reject(new Error(`the sandbox agent did not answer within ${timeoutMs} ms`));
      }, timeoutMs);
      this.#control = {
        resolve: () => {
          clearTimeout(timer);
          resolve();
        },
        reject: (error) => {
          clearTimeout(timer);
          reject(error);
        },
      };
    });
  }

  /** Starts a command; returns its id for `stdin`, `endStdin` and `kill`. */
  start(request: StartRequest, listener: CommandListener): number {
    const id = this.#nextId++;
    if (this.#closed) {
      queueMicrotask(() =>
        listener.exit({ exitCode: null, signal: 'SIGKILL', truncated: false, lost: true }),
      );
      return id;
    }
    this.#commands.set(id, listener);
    const counts = Buffer.alloc(12);
    const env = Object.entries(request.env).map(([name, value]) => `${name}=${value}`);
    counts.writeUInt32LE(request.maxOutputBytes, 0);
    counts.writeUInt32LE(request.argv.length, 4);
    counts.writeUInt32LE(env.length, 8);
    const strings = [request.cwd, ...request.argv, ...env].map((text) => Buffer.from(`${text}\0`, 'utf8'));
    this.#send(frame(AgentMessage.start, id, Buffer.concat([counts, ...strings])));
    return id;
  }

  stdin(id: number, data: Uint8Array): void {
    // Frames stay well below the agent's 16 MiB limit.
    for (let offset = 0; offset < data.byteLength; offset += 1024 * 1024) {
      this.#send(frame(AgentMessage.stdin, id, Buffer.from(data.subarray(offset, offset + 1024 * 1024))));
    }
  }

  endStdin(id: number): void {
    this.#send(frame(AgentMessage.stdinEnd, id));
  }

  /** Kills the command and everything it started (its cgroup in the guest). */
  kill(id: number): void {
    this.#send(frame(AgentMessage.kill, id));
  }

  /** Closes the connection; commands still running report a lost exit. */
  close(): void {
    this.#input.destroy();
    this.#output.destroy();
    this.#close();
  }

  #send(data: Buffer): void {
    if (!this.#closed) this.#output.write(data);
  }

  #close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#control?.reject(new Error('the agent connection closed'));
    this.#control = undefined;
    const listeners = [...this.#commands.values()];
    this.#commands.clear();
    for (const listener of listeners)
      listener.exit({ exitCode: null, signal: 'SIGKILL', truncated: false, lost: true });
  }

  #receive(chunk: Buffer): void {
    this.#buffered = this.#buffered.length === 0 ? chunk : Buffer.concat([this.#buffered, chunk]);
    while (this.#buffered.length >= HEADER_BYTES) {
      const length = this.#buffered.readUInt32LE(5);
      if (this.#buffered.length < HEADER_BYTES + length) break;
      const type = this.#buffered.readUInt8(0);
      const id = this.#buffered.readUInt32LE(1);
      const payload = this.#buffered.subarray(HEADER_BYTES, HEADER_BYTES + length);
      this.#buffered = this.#buffered.subarray(HEADER_BYTES + length);
      this.#dispatch(type, id, payload);
    }
  }

  #dispatch(type: number, id: number, payload: Buffer): void {
    if (id === 0) {
      if (type === AgentMessage.ready) this.#control?.resolve();
      else if (type === AgentMessage.error) this.#control?.reject(new Error(payload.toString('utf8')));
      this.#control = undefined;
      return;
    }
    const listener = this.#commands.get(id);
    if (!listener) return;
    if (type === AgentMessage.stdout) listener.stdout(Buffer.from(payload));
    else if (type === AgentMessage.stderr) listener.stderr(Buffer.from(payload));
    else if (type === AgentMessage.exit || type === AgentMessage.error) {
      this.#commands.delete(id);
      if (type === AgentMessage.error) {
        listener.stderr(Buffer.from(`berth: ${payload.toString('utf8')}\n`));
        listener.exit({ exitCode: 126, signal: null, truncated: false, lost: false });
        return;
      }
      const exitCode = payload.readInt32LE(0);
      const signalNumber = payload.readInt32LE(4);
      listener.exit({
        exitCode: exitCode >= 0 ? exitCode : null,
        signal: signalNumber > 0 ? (signalNames.get(signalNumber) ?? String(signalNumber)) : null,
        truncated: payload.readUInt8(8) === 1,
        lost: false,
      });
    }
  }
}
