/**
 * Loopback servers and clients for the egress proxy's tests: upstreams that record what they got
 * and echo it back, plain HTTP and CONNECT clients on the proxy's unix socket, raw TLS over a
 * tunnel (so a test controls every header byte), and a TCP bridge like the sandbox's
 * (127.0.0.1:<port> → the proxy's socket) for off-the-shelf clients such as curl.
 */
import { execFile } from 'node:child_process';
import {
  createServer as createHttpServer,
  request as httpRequest,
  type IncomingHttpHeaders,
  type IncomingMessage,
  type Server,
  type ServerResponse,
} from 'node:http';
import {
  type AddressInfo,
  createServer as createNetServer,
  connect as netConnect,
  type Socket,
} from 'node:net';
import { type PeerCertificate, connect as tlsConnect } from 'node:tls';

export interface Seen {
  method: string;
  url: string;
  headers: IncomingHttpHeaders;
  body: string;
}

export interface Upstream {
  server: Server;
  port: number;
  seen: Seen[];
  close(): Promise<void>;
}

type Handler = (request: IncomingMessage, response: ServerResponse, seen: Seen) => void;

/** By default: 200, `x-echo` = the authorization header, body = `you sent: <authorization> / <body>`. */
const echo: Handler = (request, response, seen) => {
  const echoed = String(request.headers.authorization ?? '');
  response.writeHead(200, { 'content-type': 'text/plain', 'x-echo': echoed });
  response.end(`you sent: ${echoed} / ${seen.body}`);
};

/** Starts `server` on 127.0.0.1 (or `host`), recording every request before `handler` answers. */
export async function startUpstream(
  server: Server,
  handler: Handler = echo,
  host = '127.0.0.1',
): Promise<Upstream> {
  const seen: Seen[] = [];
  server.on('request', (request: IncomingMessage, response: ServerResponse) => {
    const chunks: Buffer[] = [];
    request.on('data', (chunk: Buffer) => chunks.push(chunk));
    request.on('end', () => {
      const entry = {
        method: request.method ?? '',
        url: request.url ?? '',
        headers: request.headers,
        body: Buffer.concat(chunks).toString('utf8'),
      };
      seen.push(entry);
      handler(request, response, entry);
    });
  });
  await new Promise<void>((resolve) => server.listen(0, host, resolve));
  return {
    server,
    seen,
    port: (server.address() as AddressInfo).port,
    close: () =>
      new Promise((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}

/** A plain HTTP upstream. */
export const startHttpUpstream = (handler?: Handler, host?: string) =>
  startUpstream(createHttpServer(), handler, host);

export interface ProxyAnswer {
  status: number;
  headers: IncomingHttpHeaders;
  body: string;
  /** The body as bytes. */
  bytes: Buffer;
}

/** One absolute-form request through the proxy's socket. */
export function viaProxy(
  socketPath: string,
  url: string,
  options: { method?: string; headers?: Record<string, string>; body?: string | string[] } = {},
): Promise<ProxyAnswer> {
  return new Promise((resolve, reject) => {
    const request = httpRequest(
      {
        socketPath,
        path: url,
        method: options.method ?? (options.body ? 'POST' : 'GET'),
        headers: options.headers,
        agent: false,
      },
      (response) => {
        const chunks: Buffer[] = [];
        response.on('data', (chunk: Buffer) => chunks.push(chunk));
        response.on('end', () => {
          const bytes = Buffer.concat(chunks);
          resolve({
            status: response.statusCode ?? 0,
            headers: response.headers,
            body: bytes.toString('utf8'),
            bytes,
          });
        });
      },
    );
    request.on('error', reject);
    if (Array.isArray(options.body)) {
      // Separate writes: a chunked body whose chunks split wherever the test says.
      const chunks = [...options.body];
      const next = () => {
        const chunk = chunks.shift();
        if (chunk === undefined) request.end();
        else request.write(chunk, () => setTimeout(next, 5));
      };
      next();
    } else request.end(options.body);
  });
}

export interface Tunnel {
  status: number;
  socket: Socket;
  /** The proxy's answer body when it refused. */
  text: string;
}

/** CONNECT through the proxy: the status, and the socket when it was accepted. */
export function connectVia(socketPath: string, authority: string): Promise<Tunnel> {
  return new Promise((resolve, reject) => {
    const request = httpRequest({ socketPath, method: 'CONNECT', path: authority, agent: false });
    request.on('connect', (response, socket, head) => {
      const status = response.statusCode ?? 0;
      if (status === 200) return resolve({ status, socket, text: '' });
      // A refusal's body follows the status line on the same socket.
      const chunks: Buffer[] = [head];
      socket.on('data', (chunk: Buffer) => chunks.push(chunk));
      socket.on('close', () => resolve({ status, socket, text: Buffer.concat(chunks).toString('utf8') }));
    });
    request.on('response', (response) => {
      let text = '';
      response.on('data', (chunk: Buffer) => {
        text += chunk.toString('utf8');
      });
      response.on('end', () => resolve({ status: response.statusCode ?? 0, socket: response.socket, text }));
    });
    request.on('error', reject);
    request.end();
  });
}

export type TlsResult =
  | { response: string; certificate: PeerCertificate; status: number; headers: string; body: string }
  | { error: string };

/**
 * HTTPS over a CONNECT tunnel to `host:port`, trusting only `ca`; `requestText` is written as is
 * after the handshake (a whole HTTP/1.1 request; `connection: close` makes the answer end).
 */
export async function tlsVia(
  socketPath: string,
  host: string,
  port: number,
  ca: string[],
  requestText: string,
): Promise<TlsResult> {
  const tunnel = await connectVia(socketPath, `${host}:${port}`);
  if (tunnel.status !== 200) return { error: `CONNECT ${tunnel.status}: ${tunnel.text}` };
  return new Promise((resolve) => {
    const tls = tlsConnect({ socket: tunnel.socket, servername: host, ca }, () => {
      const certificate = tls.getPeerCertificate();
      tls.write(requestText);
      const chunks: Buffer[] = [];
      tls.on('data', (chunk: Buffer) => chunks.push(chunk));
      const done = () => {
        const response = Buffer.concat(chunks).toString('utf8');
        const split = response.indexOf('\r\n\r\n');
        const head = split < 0 ? response : response.slice(0, split);
        const raw = split < 0 ? '' : response.slice(split + 4);
        resolve({
          response,
          certificate,
          status: Number(/^HTTP\/1\.1 (\d{3})/.exec(head)?.[1] ?? 0),
          headers: head,
          body: /^transfer-encoding: chunked$/im.test(head) ? dechunk(raw) : raw,
        });
      };
      tls.on('end', done);
      tls.on('close', done);
    });
    tls.on('error', (error) => resolve({ error: error.message }));
  });
}

/** The payload of a chunked HTTP/1.1 body. */
function dechunk(raw: string): string {
  let body = '';
  let rest = raw;
  for (;;) {
    const line = rest.indexOf('\r\n');
    const size = Number.parseInt(rest.slice(0, line), 16);
    if (line < 0 || !(size > 0)) return body;
    body += rest.slice(line + 2, line + 2 + size);
    rest = rest.slice(line + 2 + size + 2);
  }
}

/** A whole HTTP/1.1 request as text, with a content-length and `connection: close`. */
export function requestText(
  host: string,
  options: { method?: string; path?: string; headers?: Record<string, string>; body?: string } = {},
): string {
  const body = options.body ?? '';
  const headers = {
    host,
    ...options.headers,
    'content-length': String(Buffer.byteLength(body)),
    connection: 'close',
  };
  const lines = Object.entries(headers).map(([name, value]) => `${name}: ${value}\r\n`);
  return `${options.method ?? 'POST'} ${options.path ?? '/'} HTTP/1.1\r\n${lines.join('')}\r\n${body}`;
}

/** A TCP listener on 127.0.0.1 relaying each connection to the proxy's socket (the sandbox's bridge). */
export async function startBridge(socketPath: string): Promise<{ port: number; close(): Promise<void> }> {
  const sockets = new Set<Socket>();
  const server = createNetServer((client) => {
    const proxy = netConnect(socketPath);
    for (const socket of [client, proxy]) {
      sockets.add(socket);
      socket.on('close', () => sockets.delete(socket));
      socket.on('error', () => undefined);
    }
    client.pipe(proxy).pipe(client);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    port: (server.address() as AddressInfo).port,
    close: () =>
      new Promise((resolve) => {
        for (const socket of sockets) socket.destroy();
        server.close(() => resolve());
      }),
  };
}

/** Runs curl; resolves with its exit code, stdout and stderr. */
export function curl(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile('curl', args, { timeout: 20_000 }, (error, stdout, stderr) => {
      const code = error ? (typeof error.code === 'number' ? error.code : 1) : 0;
      resolve({ code, stdout, stderr });
    });
  });
}
