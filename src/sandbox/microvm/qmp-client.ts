/**
 * A minimal client for QEMU's machine protocol (QMP) over a unix socket: one JSON object per
 * line, commands answered in order. Enough for stop, migrate, query-migrate, query-status and
 * quit; events are ignored.
 */
import { connect, type Socket } from 'node:net';

/** A connected QMP session (capabilities negotiated). */
export interface QmpClient {
  /** Runs a command and resolves with its `return` value; rejects with QEMU's error text. */
  execute<T = unknown>(command: string, arguments_?: Record<string, unknown>): Promise<T>;
  close(): void;
}

interface Waiter {
  resolve: (value: unknown) => void;
  reject: (error: Error) => void;
}

/** Connects to a QMP socket and negotiates capabilities. */
export async function connectQmp(socketPath: string): Promise<QmpClient> {
  const socket: Socket = connect(socketPath);
  const waiters: Waiter[] = [];
  let greeted: (() => void) | undefined;
  let closedError: Error | undefined;
  let buffered = '';
  socket.setEncoding('utf8');
  socket.on('data', (chunk: string) => {
    buffered += chunk;
    for (let newline = buffered.indexOf('\n'); newline >= 0; newline = buffered.indexOf('\n')) {
      const line = buffered.slice(0, newline).trim();
      buffered = buffered.slice(newline + 1);
      if (!line) continue;
      const message = JSON.parse(line) as {
        QMP?: unknown;
        return?: unknown;
        error?: { desc?: string };
        event?: string;
      };
      if (message.QMP !== undefined) greeted?.();
      else if (message.event !== undefined) continue;
      else if (message.error !== undefined)
        waiters.shift()?.reject(new Error(message.error.desc ?? 'QMP error'));
      else waiters.shift()?.resolve(message.return);
    }
  });
  const onGone = (error?: Error) => {
    closedError = error ?? new Error('QMP connection closed');
    for (const waiter of waiters.splice(0)) waiter.reject(closedError);
  };
  socket.on('error', onGone);
  socket.on('close', () => onGone());

  await new Promise<void>((resolve, reject) => {
    greeted = resolve;
    socket.once('error', reject);
  });
  const client: QmpClient = {
    execute<T>(command: string, arguments_?: Record<string, unknown>): Promise<T> {
      if (closedError) return Promise.reject(closedError);
      return new Promise<T>((resolve, reject) => {
        waiters.push({ resolve: resolve as (value: unknown) => void, reject });
        socket.write(
          `${JSON.stringify({ execute: command, ...(arguments_ ? { arguments: arguments_ } : {}) })}\n`,
        );
      });
    },
    close() {
      socket.destroy();
    },
  };
  await client.execute('qmp_capabilities');
  return client;
}
