import { mkdtempSync, rmSync } from 'node:fs';
import { createServer, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { EgressRelay } from './egress-relay.js';

const OPEN = 1;
const DATA = 2;
const CLOSE = 4;

function frame(type: number, id: number, payload: Buffer = Buffer.alloc(0)): Buffer {
  const header = Buffer.alloc(9);
  header.writeUInt8(type, 0);
  header.writeUInt32LE(id, 1);
  header.writeUInt32LE(payload.length, 5);
  return Buffer.concat([header, payload]);
}

/** Frames the relay sends back to the "guest", parsed as they arrive. */
function framesFrom(socket: Socket): { type: number; id: number; length: number }[] {
  const frames: { type: number; id: number; length: number }[] = [];
  let input = Buffer.alloc(0);
  socket.on('data', (chunk: Buffer) => {
    input = Buffer.concat([input, chunk]);
    while (input.length >= 9 && input.length >= 9 + input.readUInt32LE(5)) {
      const length = input.readUInt32LE(5);
      frames.push({ type: input.readUInt8(0), id: input.readUInt32LE(1), length });
      input = input.subarray(9 + length);
    }
  });
  return frames;
}

/**
 * The relay's guest side is QEMU's socket for a VM's egress port, and whoever is root in the
 * guest can write anything to it. Here a hostile "guest" (a unix socket standing in for QEMU's)
 * breaks the protocol; the host must stay bounded.
 */
describe('microvm egress relay against a hostile guest', () => {
  let directory: string;
  let guestSide: Server;
  let guest: Promise<Socket>;
  let proxy: Server;
  let proxyConnections: Socket[];
  let relay: EgressRelay;

  beforeEach(async () => {
    directory = mkdtempSync(join(tmpdir(), 'berth-egress-relay-'));
    let accept: (socket: Socket) => void;
    guest = new Promise((resolve) => {
      accept = resolve;
    });
    guestSide = createServer((socket) => accept(socket));
    await new Promise<void>((resolve) => guestSide.listen(join(directory, 'port.sock'), resolve));
    proxyConnections = [];
    // A proxy that accepts and never reads: whatever the relay writes piles up on the host.
    proxy = createServer((socket) => {
      socket.pause();
      proxyConnections.push(socket);
    });
    await new Promise<void>((resolve) => proxy.listen(join(directory, 'egress.sock'), resolve));
    relay = await EgressRelay.connect(join(directory, 'port.sock'), join(directory, 'egress.sock'), 5000);
  });

  afterEach(async () => {
    relay.close();
    for (const socket of proxyConnections) socket.destroy();
    await new Promise((resolve) => proxy.close(resolve));
    await new Promise((resolve) => guestSide.close(resolve));
    rmSync(directory, { recursive: true, force: true });
  });

  it('cuts off a connection whose guest sends past its credit instead of buffering it', async () => {
    const socket = await guest;
    const frames = framesFrom(socket);
    socket.write(frame(OPEN, 7));
    await expect.poll(() => proxyConnections.length).toBe(1);
    // 4 MiB in 32 KiB frames without waiting for a single acknowledgement (the credit is 256 KiB).
    const chunk = Buffer.alloc(32 * 1024, 97);
    for (let sent = 0; sent < 128; sent++) socket.write(frame(DATA, 7, chunk));
    await expect.poll(() => frames.some((seen) => seen.type === CLOSE && seen.id === 7)).toBe(true);
    // The relay hung up on the proxy too (the proxy sees its end once it reads).
    const closed = new Promise((resolve) => proxyConnections[0]!.once('close', resolve));
    proxyConnections[0]!.resume();
    await closed;
  });

  it('relays at most 64 connections at once and refuses the rest', async () => {
    const socket = await guest;
    const frames = framesFrom(socket);
    for (let id = 1; id <= 100; id++) socket.write(frame(OPEN, id));
    await expect.poll(() => frames.filter((seen) => seen.type === CLOSE).length).toBe(36);
    await expect.poll(() => proxyConnections.length).toBe(64);
    expect(
      frames
        .filter((seen) => seen.type === CLOSE)
        .map((seen) => seen.id)
        .sort((a, b) => a - b),
    ).toEqual(Array.from({ length: 36 }, (_, index) => 65 + index));
  });

  it('stops relaying for a VM whose frames claim more than the credit allows', async () => {
    const socket = await guest;
    const header = Buffer.alloc(9);
    header.writeUInt8(DATA, 0);
    header.writeUInt32LE(1, 1);
    header.writeUInt32LE(64 * 1024 * 1024, 5);
    socket.write(header);
    await new Promise((resolve) => socket.once('close', resolve));
  });
});
