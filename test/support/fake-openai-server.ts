import { createServer, type IncomingHttpHeaders, type IncomingMessage, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';

/** One request the fake server received, recorded so tests can assert what the model saw. */
export interface FakeOpenAiRequest {
  method: string;
  path: string;
  headers: IncomingHttpHeaders;
  /** Parsed JSON body (`model`, `messages`, `tools`, `stream`, `stream_options`, ...). */
  body: FakeChatCompletionBody;
}

/** The parts of a Chat Completions request body tests usually look at; the rest is kept as-is. */
export interface FakeChatCompletionBody {
  model?: string;
  messages?: Array<Record<string, unknown>>;
  tools?: Array<{ type: string; function: { name: string; description?: string; parameters?: unknown } }>;
  stream?: boolean;
  stream_options?: { include_usage?: boolean };
  [key: string]: unknown;
}

/** What the fake server answers to one request. */
export interface FakeReply {
  text?: string;
  toolCalls?: Array<{ id?: string; name: string; arguments: Record<string, unknown> }>;
  /** Wait before answering (headers included). */
  delayMs?: number;
  /** HTTP status for an error reply (default 500 when `error` is set). */
  status?: number;
  /** Error message; the reply becomes an OpenAI-style `{ error: { message } }` body. */
  error?: string;
  /** Token counts to report; by default about one token per four characters. */
  usage?: { promptTokens: number; completionTokens: number };
}

/** Decides the reply to each request; may be async. */
export type FakeResponder = (request: FakeOpenAiRequest) => FakeReply | Promise<FakeReply>;

/** A running fake server. */
export interface FakeOpenAiServer {
  /** Base URL ending in `/v1`, ready for `OPENAI_COMPATIBLE_BASE_URL` or `OPENAI_BASE_URL`. */
  url: string;
  /** Every chat completion request received, in order. */
  requests: FakeOpenAiRequest[];
  close(): Promise<void>;
}

/**
 * Starts a real HTTP server on 127.0.0.1 (random port) speaking the OpenAI Chat Completions
 * wire protocol, streaming (SSE) and not. Pass a function of the request, or a queue of
 * replies consumed one per request (an empty queue answers 500).
 */
export async function startFakeOpenAiServer(respond: FakeResponder | FakeReply[]): Promise<FakeOpenAiServer> {
  const requests: FakeOpenAiRequest[] = [];
  const responder: FakeResponder = Array.isArray(respond)
    ? () => respond.shift() ?? { status: 500, error: 'fake OpenAI server: no reply queued for this request' }
    : respond;
  let completionCount = 0;

  const server = createServer((incoming, outgoing) => {
    handle(incoming, outgoing).catch((error: unknown) => {
      if (!outgoing.headersSent) sendJson(outgoing, 500, errorBody(String(error)));
      else outgoing.destroy();
    });
  });

  async function handle(incoming: IncomingMessage, outgoing: ServerResponse): Promise<void> {
    const path = new URL(incoming.url ?? '/', 'http://localhost').pathname;
    if (incoming.method !== 'POST' || (path !== '/v1/chat/completions' && path !== '/chat/completions')) {
      sendJson(outgoing, 404, errorBody(`fake OpenAI server: no route for ${incoming.method} ${path}`));
      return;
    }
    const rawBody = await readBody(incoming);
    let body: FakeChatCompletionBody;
    try {
      body = JSON.parse(rawBody) as FakeChatCompletionBody;
    } catch {
      sendJson(outgoing, 400, errorBody('fake OpenAI server: request body is not JSON'));
      return;
    }
    const request: FakeOpenAiRequest = { method: incoming.method, path, headers: incoming.headers, body };
    requests.push(request);
    const reply = await responder(request);
    if (reply.delayMs) await new Promise((resolve) => setTimeout(resolve, reply.delayMs));
    if (outgoing.destroyed) return;
    if (reply.error !== undefined || (reply.status !== undefined && reply.status >= 400)) {
      sendJson(outgoing, reply.status ?? 500, errorBody(reply.error ?? `fake error ${reply.status}`));
      return;
    }
    completionCount++;
    const completion = buildCompletion(reply, body, `chatcmpl-fake-${completionCount}`);
    if (body.stream) sendStream(outgoing, completion, body.stream_options?.include_usage === true);
    else sendJson(outgoing, 200, completionBody(completion));
  }

  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve());
  });
  const { port } = server.address() as AddressInfo;

  return {
    url: `http://127.0.0.1:${port}/v1`,
    requests,
    close: () =>
      new Promise<void>((resolve, reject) => {
        server.closeAllConnections();
        server.close((error) => (error ? reject(error) : resolve()));
      }),
  };
}

interface Completion {
  id: string;
  model: string;
  created: number;
  text: string | undefined;
  toolCalls: Array<{ id: string; name: string; arguments: string }>;
  finishReason: 'stop' | 'tool_calls';
  usage: { prompt_tokens: number; completion_tokens: number; total_tokens: number };
}

function buildCompletion(reply: FakeReply, body: FakeChatCompletionBody, id: string): Completion {
  const toolCalls = (reply.toolCalls ?? []).map((call, position) => ({
    id: call.id ?? `call_${id}_${position}`,
    name: call.name,
    arguments: JSON.stringify(call.arguments),
  }));
  const promptTokens = reply.usage?.promptTokens ?? Math.ceil(JSON.stringify(body.messages ?? []).length / 4);
  const completionTokens =
    reply.usage?.completionTokens ??
    Math.ceil(
      ((reply.text ?? '').length + toolCalls.reduce((sum, call) => sum + call.arguments.length, 0)) / 4,
    );
  return {
    id,
    model: body.model ?? 'fake-model',
    created: Math.floor(Date.now() / 1000),
    text: reply.text,
    toolCalls,
    finishReason: toolCalls.length > 0 ? 'tool_calls' : 'stop',
    usage: {
      prompt_tokens: promptTokens,
      completion_tokens: completionTokens,
      total_tokens: promptTokens + completionTokens,
    },
  };
}

function completionBody(completion: Completion): Record<string, unknown> {
  return {
    id: completion.id,
    object: 'chat.completion',
    created: completion.created,
    model: completion.model,
    choices: [
      {
        index: 0,
        message: {
          role: 'assistant',
          content: completion.text ?? null,
          ...(completion.toolCalls.length > 0
            ? {
                tool_calls: completion.toolCalls.map((call) => ({
                  id: call.id,
                  type: 'function',
                  function: { name: call.name, arguments: call.arguments },
                })),
              }
            : {}),
        },
        finish_reason: completion.finishReason,
      },
    ],
    usage: completion.usage,
  };
}

function sendStream(outgoing: ServerResponse, completion: Completion, includeUsage: boolean): void {
  outgoing.writeHead(200, {
    'content-type': 'text/event-stream',
    'cache-control': 'no-cache',
    connection: 'keep-alive',
  });
  const chunk = (choices: unknown[], extra: Record<string, unknown> = {}) =>
    `data: ${JSON.stringify({
      id: completion.id,
      object: 'chat.completion.chunk',
      created: completion.created,
      model: completion.model,
      choices,
      ...extra,
    })}\n\n`;
  const delta = (value: Record<string, unknown>) => chunk([{ index: 0, delta: value, finish_reason: null }]);

  outgoing.write(delta({ role: 'assistant', content: '' }));
  for (const piece of splitIntoPieces(completion.text ?? '')) outgoing.write(delta({ content: piece }));
  completion.toolCalls.forEach((call, index) => {
    outgoing.write(
      delta({
        tool_calls: [{ index, id: call.id, type: 'function', function: { name: call.name, arguments: '' } }],
      }),
    );
    for (const piece of splitIntoPieces(call.arguments)) {
      outgoing.write(delta({ tool_calls: [{ index, function: { arguments: piece } }] }));
    }
  });
  outgoing.write(chunk([{ index: 0, delta: {}, finish_reason: completion.finishReason }]));
  if (includeUsage) outgoing.write(chunk([], { usage: completion.usage }));
  outgoing.end('data: [DONE]\n\n');
}

/** Splits into three pieces (fewer for short strings) so clients must reassemble deltas. */
function splitIntoPieces(text: string): string[] {
  const size = Math.max(1, Math.ceil(text.length / 3));
  const pieces: string[] = [];
  for (let start = 0; start < text.length; start += size) pieces.push(text.slice(start, start + size));
  return pieces;
}

function errorBody(message: string): Record<string, unknown> {
  return { error: { message, type: 'server_error', param: null, code: null } };
}

function sendJson(outgoing: ServerResponse, status: number, body: unknown): void {
  outgoing.writeHead(status, { 'content-type': 'application/json' });
  outgoing.end(JSON.stringify(body));
}

async function readBody(incoming: IncomingMessage): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const chunk of incoming) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks).toString('utf8');
}
