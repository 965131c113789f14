/**
 * MCP tool servers for one session. Each declared server gets one MCP client, connected on first
 * use: `url` servers over streamable HTTP from the Berth host, `stdio` servers as processes inside
 * the session's sandbox (never on the host). Tools are listed once per session and cached. One
 * bad server never fails the session: its tools are missing and `errors()` says why; a tool call
 * that cannot complete becomes an error outcome, never a throw, and never outlasts its timeout.
 */
import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js';
import { ErrorCode, McpError } from '@modelcontextprotocol/sdk/types.js';
import { BerthError } from '../errors.js';
import type { SandboxProcess } from '../sandbox/driver.js';
import type { McpFetch } from './mcp-fetch.js';
import { SandboxStdioTransport } from './sandbox-stdio-transport.js';

/** A tool server declared for a session. */
export type McpServerSpec =
  /** Streamable HTTP, reached from the Berth host. */
  | { name: string; type: 'url'; url: string; headers?: Record<string, string> }
  /** A process started inside the session's sandbox; see `mcp-packages.ts` for installed servers. */
  | { name: string; type: 'stdio'; command: string; args?: string[]; env?: Record<string, string> };

/** A tool one server offers, as the model will see it. */
export interface McpTool {
  serverName: string;
  name: string;
  description: string;
  /** JSON Schema of the tool's input, as the server declared it. */
  inputSchema: Record<string, unknown>;
}

/** What a tool call produced: its text content and whether it is an error. */
export interface McpToolOutcome {
  content: string;
  isError: boolean;
}

/** Why a server's tools are missing from `listTools`. */
export interface McpServerFailure {
  serverName: string;
  message: string;
}

export interface McpSessionOptions {
  servers: readonly McpServerSpec[];
  /** Starts a process inside the session's sandbox (lazily provisioned by the caller). */
  spawnInSandbox: (argv: readonly string[], env?: Record<string, string>) => Promise<SandboxProcess>;
  /**
   * The fetch a remote server is reached with (Berth's egress client with the session's
   * credentials: `mcp-fetch.ts`); default: the global fetch with the trace headers.
   */
  fetchFor?: (spec: Extract<McpServerSpec, { type: 'url' }>) => McpFetch;
  /** Deadline for connecting to a server, for listing its tools and for each tool call (default 60 s). */
  requestTimeoutMs?: number;
  /**
   * The caller's trace context as W3C headers (`traceparent`, `tracestate`), read per request:
   * sent as HTTP headers to remote servers and in every tool call's `_meta`.
   */
  traceHeaders?: () => Record<string, string>;
}

/** The MCP servers of one session; see the file comment. */
export interface McpSession {
  /** Every reachable server's tools; connects and lists on the first call only. Never throws. */
  listTools(): Promise<McpTool[]>;
  /** Calls a tool; every failure (unknown tool, crash, timeout, abort) is an error outcome. */
  callTool(
    serverName: string,
    toolName: string,
    input: unknown,
    options: { signal: AbortSignal },
  ): Promise<McpToolOutcome>;
  /** Servers whose tools could not be listed, and why. */
  errors(): McpServerFailure[];
  /** Closes every connection and stops the stdio servers. */
  close(): Promise<void>;
}

/** Default deadline for connecting, listing and each tool call. */
export const DEFAULT_MCP_REQUEST_TIMEOUT_MS = 60_000;

const CLIENT_INFO = { name: 'berth', version: '0.1.0' };

interface Connection {
  client: Client;
  transport: SandboxStdioTransport | StreamableHTTPClientTransport;
  /** Set once the connection has closed (server crashed or we closed it). */
  closed: boolean;
}

interface ServerState {
  spec: McpServerSpec;
  connection?: Connection;
  connecting?: Promise<Connection>;
  tools?: McpTool[];
  failure?: string;
}

/** Why a deadline-bound wait ended early; kept apart from the SDK's wire errors. */
class WaitEndedError extends Error {
  constructor(readonly reason: 'timeout' | 'aborted') {
    super(reason);
  }
}

/** Resolves with `promise`, or rejects with WaitEndedError once `ms` pass or `signal` fires. */
function within<T>(promise: Promise<T>, ms: number, signal?: AbortSignal): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    if (signal?.aborted) {
      reject(new WaitEndedError('aborted'));
      return;
    }
    const onAbort = () => finish(() => reject(new WaitEndedError('aborted')));
    const timer = setTimeout(() => finish(() => reject(new WaitEndedError('timeout'))), ms);
    signal?.addEventListener('abort', onAbort, { once: true });
    let done = false;
    const finish = (settle: () => void) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      signal?.removeEventListener('abort', onAbort);
      settle();
    };
    promise.then(
      (value) => finish(() => resolve(value)),
      (error: unknown) => finish(() => reject(error)),
    );
  });
}

/** An error's message, with its cause's (fetch says only "fetch failed"). */
function errorMessage(error: unknown): string {
  if (!(error instanceof Error)) return String(error);
  const cause = error.cause instanceof Error ? error.cause.message : undefined;
  return cause && !error.message.includes(cause) ? `${error.message} (${cause})` : error.message;
}

/** Approximate decoded size of base64 data, for describing binary content. */
function base64Bytes(data: string): number {
  const padding = data.endsWith('==') ? 2 : data.endsWith('=') ? 1 : 0;
  return Math.max(0, Math.floor((data.length * 3) / 4) - padding);
}

type ContentBlock = { type: string } & Record<string, unknown>;

/** One content block as text; non-text blocks are described in a line. */
function renderBlock(block: ContentBlock): string {
  switch (block.type) {
    case 'text':
      return String(block.text ?? '');
    case 'image':
    case 'audio':
      return `[${block.type}: ${String(block.mimeType ?? 'unknown type')}, ${base64Bytes(String(block.data ?? ''))} bytes]`;
    case 'resource_link':
      return `[resource link: ${String(block.uri)}${block.name ? ` (${String(block.name)})` : ''}]`;
    case 'resource': {
      const resource = (block.resource ?? {}) as Record<string, unknown>;
      if (typeof resource.text === 'string') return `[resource: ${String(resource.uri)}]\n${resource.text}`;
      return `[resource: ${String(resource.uri)}, ${String(resource.mimeType ?? 'binary')}, ${base64Bytes(String(resource.blob ?? ''))} bytes]`;
    }
    default:
      return `[${block.type} content]`;
  }
}

/** The text of a tools/call result (the pre-2024-11 `toolResult` form included). */
function renderResult(result: Record<string, unknown>): string {
  if (!Array.isArray(result.content))
    return JSON.stringify(result.toolResult ?? result.structuredContent ?? null);
  const text = (result.content as ContentBlock[]).map(renderBlock).join('\n');
  if (text === '' && result.structuredContent !== undefined) return JSON.stringify(result.structuredContent);
  return text;
}

/** A fetch that adds the current trace headers to each request to a remote MCP server. */
function tracingFetch(traceHeaders: () => Record<string, string>): typeof fetch {
  return (input, init) => {
    const headers = new Headers(init?.headers);
    for (const [name, value] of Object.entries(traceHeaders())) headers.set(name, value);
    return fetch(input, { ...init, headers });
  };
}

/** Creates the MCP clients of one session; nothing connects until `listTools` or `callTool`. */
export function createMcpSession(options: McpSessionOptions): McpSession {
  const timeoutMs = options.requestTimeoutMs ?? DEFAULT_MCP_REQUEST_TIMEOUT_MS;
  const servers = new Map<string, ServerState>();
  for (const spec of options.servers) {
    if (spec.name === '' || servers.has(spec.name)) {
      throw new BerthError(
        'invalid_request',
        `MCP server names must be unique and non-empty: "${spec.name}"`,
      );
    }
    servers.set(spec.name, { spec });
  }
  let listing: Promise<void> | undefined;
  let closed = false;

  /** Adds what the server process said (exit code, stderr) to a failure message. */
  const withServerDetails = (connection: Connection | undefined, message: string): string => {
    const details =
      connection?.transport instanceof SandboxStdioTransport ? connection.transport.describeServer() : '';
    return details ? `${message} (${details})` : message;
  };

  const closeConnection = async (connection: Connection): Promise<void> => {
    connection.closed = true;
    if (connection.transport instanceof StreamableHTTPClientTransport && connection.transport.sessionId) {
      // Lets the server drop its per-session state; best effort.
      await within(connection.transport.terminateSession(), 1000).catch(() => undefined);
    }
    await connection.client.close().catch(() => undefined);
  };

  const openConnection = async (state: ServerState): Promise<Connection> => {
    const { spec } = state;
    const transport =
      spec.type === 'url'
        ? new StreamableHTTPClientTransport(new URL(spec.url), {
            requestInit: { headers: spec.headers },
            fetch: options.fetchFor
              ? options.fetchFor(spec)
              : options.traceHeaders
                ? tracingFetch(options.traceHeaders)
                : undefined,
          })
        : new SandboxStdioTransport({
            startProcess: () => options.spawnInSandbox([spec.command, ...(spec.args ?? [])], spec.env),
          });
    const client = new Client(CLIENT_INFO, { capabilities: {} });
    const connection: Connection = { client, transport, closed: false };
    client.onclose = () => {
      connection.closed = true;
      if (state.connection === connection) state.connection = undefined;
    };
    try {
      // The deadline covers starting the process too (the SDK's timeout starts at initialize).
      await within(client.connect(transport, { timeout: timeoutMs }), timeoutMs);
    } catch (error) {
      await closeConnection(connection);
      const reason =
        error instanceof WaitEndedError
          ? `did not complete the MCP handshake within ${timeoutMs} ms`
          : `could not connect: ${errorMessage(error)}`;
      throw new Error(withServerDetails(connection, reason));
    }
    if (closed) {
      await closeConnection(connection);
      throw new Error('the MCP session is closed');
    }
    return connection;
  };

  /** The live connection to a server, (re)connecting when there is none. */
  const connect = (state: ServerState): Promise<Connection> => {
    if (closed) return Promise.reject(new Error('the MCP session is closed'));
    if (state.connection && !state.connection.closed) return Promise.resolve(state.connection);
    state.connecting ??= openConnection(state)
      .then((connection) => {
        state.connection = connection;
        return connection;
      })
      .finally(() => {
        state.connecting = undefined;
      });
    return state.connecting;
  };

  const listServer = async (state: ServerState): Promise<void> => {
    let connection: Connection | undefined;
    try {
      connection = await connect(state);
      const client = connection.client;
      const tools: McpTool[] = [];
      const listAll = async () => {
        let cursor: string | undefined;
        do {
          const page = await client.listTools(cursor === undefined ? undefined : { cursor }, {
            timeout: timeoutMs,
          });
          for (const tool of page.tools) {
            tools.push({
              serverName: state.spec.name,
              name: tool.name,
              description: tool.description ?? '',
              inputSchema: tool.inputSchema as Record<string, unknown>,
            });
          }
          cursor = page.nextCursor;
        } while (cursor !== undefined);
      };
      await within(listAll(), timeoutMs);
      state.tools = tools;
    } catch (error) {
      state.tools = [];
      const reason =
        error instanceof WaitEndedError
          ? `did not list its tools within ${timeoutMs} ms`
          : errorMessage(error);
      state.failure = connection ? withServerDetails(connection, reason) : reason;
      if (connection) await closeConnection(connection);
    }
  };

  const ensureListed = (): Promise<void> => {
    listing ??= Promise.all([...servers.values()].map(listServer)).then(() => undefined);
    return listing;
  };

  const failed = (content: string): McpToolOutcome => ({ content, isError: true });

  return {
    async listTools() {
      await ensureListed();
      return [...servers.values()].flatMap((state) => state.tools ?? []);
    },

    async callTool(serverName, toolName, input, { signal }) {
      const state = servers.get(serverName);
      if (!state) return failed(`unknown MCP server "${serverName}"`);
      if (input !== undefined && input !== null && (typeof input !== 'object' || Array.isArray(input))) {
        return failed(`the input of MCP tool "${toolName}" must be a JSON object`);
      }
      try {
        // Listing shares the per-server deadlines, so this wait is bounded too.
        await within(ensureListed(), timeoutMs * 2, signal);
      } catch (error) {
        return failed(
          error instanceof WaitEndedError && error.reason === 'aborted'
            ? 'the tool call was cancelled'
            : `MCP servers did not list their tools in time`,
        );
      }
      if (state.failure !== undefined)
        return failed(`MCP server "${serverName}" is unavailable: ${state.failure}`);
      if (!state.tools?.some((tool) => tool.name === toolName)) {
        return failed(`MCP server "${serverName}" has no tool "${toolName}"`);
      }
      let connection: Connection | undefined;
      try {
        // A server that died after listing is restarted once per call.
        connection = await within(connect(state), timeoutMs, signal);
        const result = await within(
          connection.client.callTool(
            {
              name: toolName,
              arguments: (input ?? {}) as Record<string, unknown>,
              ...(options.traceHeaders ? { _meta: options.traceHeaders() } : {}),
            },
            undefined,
            { signal, timeout: timeoutMs },
          ),
          // The SDK times out first (and tells the server to cancel); this guards a stuck send.
          timeoutMs + 1000,
          signal,
        );
        return { content: renderResult(result as Record<string, unknown>), isError: result.isError === true };
      } catch (error) {
        if (signal.aborted || (error instanceof WaitEndedError && error.reason === 'aborted')) {
          return failed('the tool call was cancelled');
        }
        if (
          (error instanceof WaitEndedError && error.reason === 'timeout') ||
          (error instanceof McpError && error.code === ErrorCode.RequestTimeout)
        ) {
          return failed(`MCP server "${serverName}" did not answer within ${timeoutMs} ms`);
        }
        if (error instanceof McpError && error.code === ErrorCode.ConnectionClosed) {
          return failed(withServerDetails(connection, `MCP server "${serverName}" closed the connection`));
        }
        const message = errorMessage(error);
        return failed(
          connection
            ? `MCP server "${serverName}" failed the call: ${message}`
            : `MCP server "${serverName}" could not be reached: ${message}`,
        );
      }
    },

    errors() {
      return [...servers.values()]
        .filter((state) => state.failure !== undefined)
        .map((state) => ({ serverName: state.spec.name, message: state.failure! }));
    },

    async close() {
      closed = true;
      const connections = [...servers.values()].map(async (state) => {
        const pending = state.connecting?.catch(() => undefined);
        const connection = state.connection ?? (await pending);
        if (connection) await closeConnection(connection);
      });
      await Promise.all(connections);
    },
  };
}
