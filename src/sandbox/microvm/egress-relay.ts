/**
 * The host end of a microvm's one way out. The VM has no network device; inside it,
 * `berth-agent --egress-port berth.egress 3128` listens on 127.0.0.1:3128 and carries each
 * connection over a second virtio-serial port (see the top of `../agent/berth-agent.c`). Here,
 * each connection it opens becomes one connection to the sandbox's egress proxy socket
 * (`<services directory>/egress.sock`), bytes relayed both ways. Credit keeps memory bounded: the
 * guest never has more than `EGRESS_WINDOW` bytes of a connection unacknowledged here, and this
 * side stops reading the proxy while the guest has that much of it unacknowledged.
 */
import { connect, type Socket } from 'node:net';

const OPEN = 1;
const DATA = 2;
const END = 3;
const CLOSE = 4;
const ACK = 5;
const HEADER_BYTES = 9;
/** Must match EGRESS_WINDOW in berth-agent.c. */
const EGRESS_WINDOW = 256 * 1024;
/** Proxy bytes per DATA frame. */
const CHUNK_BYTES = 32 * 1024;
/** Connections relayed at once per VM (as in berth-agent.c); more are refused. */
const MAX_CONNECTIONS = 64;

/** One relayed connection: the proxy side, and what the guest has not acknowledged yet. */
interface Relayed {
  proxy: Socket;
  /** Proxy bytes sent to the guest and not acknowledged. */
  inFlight: number;
  /** Guest bytes received and not yet handed on to the proxy (acknowledged when they are). */
  fromGuest: number;
  /** Proxy bytes read but beyond the guest's credit, sent as acknowledgements come. */
  waiting: Buffer[];
  /** The proxy sent all it will (ended or closed): END follows the waiting bytes. */
  ended: boolean;
  endSent: boolean;
  /** The proxy socket closed: more bytes from the guest abort the connection. */
  proxyGone: boolean;
  /** Forgotten here (CLOSE sent or received). */
  closed: boolean;
}

/** Relays a microvm's egress port to its egress proxy socket until `close`. */
export class EgressRelay {
  readonly #port: Socket;
  readonly #proxySocketPath: string;
  readonly #connections = new Map<number, Relayed>();
  #input = Buffer.alloc(0);
  #closed = false;

  private constructor(port: Socket, proxySocketPath: string) {
    this.#port = port;
    this.#proxySocketPath = proxySocketPath;
    port.on('data', (chunk: Buffer) => this.#receive(chunk));
    port.on('error', () => undefined);
    port.on('close', () => this.close());
  }

  /** Connects to QEMU's socket for the egress port (QEMU creates it as it starts, so retry briefly). */
  static async connect(
    portSocketPath: string,
    proxySocketPath: string,
    timeoutMs: number,
  ): Promise<EgressRelay> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      try {
        const socket = await new Promise<Socket>((resolve, reject) => {
          const attempt = connect(portSocketPath);
          attempt.once('connect', () => {
            attempt.off('error', reject);
            resolve(attempt);
          });
          attempt.once('error', reject);
        });
        return new EgressRelay(socket, proxySocketPath);
      } catch (error) {
        if (Date.now() > deadline) throw error;
        await new Promise((resolve) => setTimeout(resolve, 20));
      }
    }
  }

  /** Ends every relayed connection and the port connection. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    for (const relayed of this.#connections.values()) relayed.proxy.destroy();
    this.#connections.clear();
    this.#port.destroy();
  }

  #send(type: number, id: number, payload: Buffer = Buffer.alloc(0)): void {
    if (this.#closed) return;
    const header = Buffer.alloc(HEADER_BYTES);
    header.writeUInt8(type, 0);
    header.writeUInt32LE(id, 1);
    header.writeUInt32LE(payload.length, 5);
    this.#port.write(payload.length > 0 ? Buffer.concat([header, payload]) : header);
  }

  #receive(chunk: Buffer): void {
    this.#input = this.#input.length > 0 ? Buffer.concat([this.#input, chunk]) : Buffer.from(chunk);
    while (this.#input.length >= HEADER_BYTES) {
      const length = this.#input.readUInt32LE(5);
      if (length > EGRESS_WINDOW) {
        // Not the guest's protocol: stop relaying for this VM.
        this.close();
        return;
      }
      if (this.#input.length < HEADER_BYTES + length) break;
      const type = this.#input.readUInt8(0);
      const id = this.#input.readUInt32LE(1);
      const payload = this.#input.subarray(HEADER_BYTES, HEADER_BYTES + length);
      this.#input = this.#input.subarray(HEADER_BYTES + length);
      this.#frame(type, id, payload);
    }
  }

  #frame(type: number, id: number, payload: Buffer): void {
    // The guest is not trusted to keep the protocol: a broken rule costs it the connection.
    if (type === OPEN) {
      if (this.#connections.has(id)) return;
      if (this.#connections.size >= MAX_CONNECTIONS) this.#send(CLOSE, id);
      else this.#open(id);
      return;
    }
    const relayed = this.#connections.get(id);
    if (!relayed) return;
    if (type === DATA && relayed.proxyGone) {
      this.#forget(id, true);
    } else if (type === DATA) {
      // Acknowledged once the bytes are handed to the kernel, so the guest's credit bounds what
      // this process holds for the proxy; a guest that sends past its credit is cut off.
      const length = payload.length;
      relayed.fromGuest += length;
      if (relayed.fromGuest > EGRESS_WINDOW) {
        this.#forget(id, true);
        return;
      }
      relayed.proxy.write(Buffer.from(payload), () => {
        // (After an error too: the guest learns of a closed proxy from END and CLOSE, not credit.)
        relayed.fromGuest -= length;
        if (!relayed.closed) this.#send(ACK, id, uint32(length));
      });
    } else if (type === END) {
      relayed.proxy.end();
    } else if (type === CLOSE) {
      this.#forget(id, false);
    } else if (type === ACK && payload.length === 4) {
      relayed.inFlight = Math.max(0, relayed.inFlight - payload.readUInt32LE(0));
      this.#toGuest(id, relayed);
    }
  }

  #open(id: number): void {
    // The proxy may not be listening (not attached yet, or detached): the guest's client sees
    // its connection closed, as under bwrap.
    const proxy = connect(this.#proxySocketPath);
    const relayed: Relayed = {
      proxy,
      inFlight: 0,
      fromGuest: 0,
      waiting: [],
      ended: false,
      endSent: false,
      proxyGone: false,
      closed: false,
    };
    this.#connections.set(id, relayed);
    proxy.on('data', (data: Buffer) => {
      relayed.waiting.push(data);
      this.#toGuest(id, relayed);
    });
    proxy.on('end', () => {
      relayed.ended = true;
      this.#toGuest(id, relayed);
    });
    proxy.on('error', () => undefined);
    // The guest's client still gets what was read (END after it); the guest closes the
    // connection once its client is done too.
    proxy.on('close', () => {
      relayed.proxyGone = true;
      relayed.ended = true;
      this.#toGuest(id, relayed);
    });
  }

  /** Sends waiting proxy bytes within the guest's credit; reads the proxy again only when all went. */
  #toGuest(id: number, relayed: Relayed): void {
    while (relayed.waiting.length > 0 && relayed.inFlight < EGRESS_WINDOW) {
      const next = relayed.waiting[0]!;
      const part = next.subarray(0, Math.min(CHUNK_BYTES, EGRESS_WINDOW - relayed.inFlight));
      if (part.length === next.length) relayed.waiting.shift();
      else relayed.waiting[0] = next.subarray(part.length);
      relayed.inFlight += part.length;
      this.#send(DATA, id, part);
    }
    if (relayed.waiting.length > 0) {
      relayed.proxy.pause();
      return;
    }
    if (relayed.ended && !relayed.endSent) {
      relayed.endSent = true;
      this.#send(END, id);
    } else if (!relayed.closed && !relayed.ended) relayed.proxy.resume();
  }

  #forget(id: number, tellGuest: boolean): void {
    const relayed = this.#connections.get(id);
    if (!relayed) return;
    relayed.closed = true;
    this.#connections.delete(id);
    relayed.proxy.destroy();
    if (tellGuest) this.#send(CLOSE, id);
  }
}

function uint32(value: number): Buffer {
  const buffer = Buffer.alloc(4);
  buffer.writeUInt32LE(value, 0);
  return buffer;
}
