import { afterEach, describe, expect, it } from 'vitest';
import { type FakeOpenAiServer, startFakeOpenAiServer } from './fake-openai-server.js';

interface Chunk {
  object: string;
  choices: Array<{
    delta: {
      content?: string;
      tool_calls?: Array<{ index: number; id?: string; function: { name?: string; arguments?: string } }>;
    };
    finish_reason: string | null;
  }>;
  usage?: { prompt_tokens: number; completion_tokens: number; total_tokens: number };
}

describe('fake OpenAI server', () => {
  let server: FakeOpenAiServer | undefined;
  afterEach(async () => {
    await server?.close();
    server = undefined;
  });

  const post = (path: string, body: unknown) =>
    fetch(`${server!.url.replace(/\/v1$/, '')}${path}`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify(body),
    });

  it('streams SSE chunks with split tool call arguments, a finish chunk, usage and [DONE]', async () => {
    server = await startFakeOpenAiServer(() => ({
      text: 'hello world',
      toolCalls: [{ id: 'call_x', name: 'bash', arguments: { command: 'uname -a' } }],
      usage: { promptTokens: 5, completionTokens: 7 },
    }));
    const response = await post('/v1/chat/completions', {
      model: 'm',
      stream: true,
      stream_options: { include_usage: true },
      messages: [{ role: 'user', content: 'hi' }],
    });
    expect(response.headers.get('content-type')).toBe('text/event-stream');
    const lines = (await response.text()).split('\n').filter((line) => line.startsWith('data: '));
    expect(lines.at(-1)).toBe('data: [DONE]');
    const chunks = lines.slice(0, -1).map((line) => JSON.parse(line.slice(6)) as Chunk);
    expect(chunks.every((chunk) => chunk.object === 'chat.completion.chunk')).toBe(true);

    const content = chunks.map((chunk) => chunk.choices[0]?.delta.content ?? '').join('');
    expect(content).toBe('hello world');
    const toolDeltas = chunks.flatMap((chunk) => chunk.choices[0]?.delta.tool_calls ?? []);
    expect(toolDeltas.length).toBeGreaterThan(2);
    expect(toolDeltas[0]).toMatchObject({ index: 0, id: 'call_x', function: { name: 'bash' } });
    expect(toolDeltas.map((delta) => delta.function.arguments ?? '').join('')).toBe('{"command":"uname -a"}');
    expect(chunks.at(-2)?.choices[0]?.finish_reason).toBe('tool_calls');
    expect(chunks.at(-1)?.choices).toEqual([]);
    expect(chunks.at(-1)?.usage).toEqual({ prompt_tokens: 5, completion_tokens: 7, total_tokens: 12 });
  });

  it('omits the usage chunk unless the client asks for it', async () => {
    server = await startFakeOpenAiServer([{ text: 'x' }]);
    const text = await (await post('/chat/completions', { stream: true, messages: [] })).text();
    expect(text).not.toContain('"usage"');
    expect(text.trim().endsWith('data: [DONE]')).toBe(true);
  });

  it('answers non-streaming requests with a chat.completion and records every request', async () => {
    server = await startFakeOpenAiServer([
      { text: 'one' },
      { toolCalls: [{ name: 'read', arguments: { file_path: 'a' } }] },
    ]);
    const first = (await (
      await post('/v1/chat/completions', { model: 'm', messages: [{ role: 'user', content: 'a' }] })
    ).json()) as {
      object: string;
      choices: Array<{ message: { content: string | null }; finish_reason: string }>;
    };
    expect(first.object).toBe('chat.completion');
    expect(first.choices[0]).toMatchObject({ message: { content: 'one' }, finish_reason: 'stop' });
    const second = (await (await post('/v1/chat/completions', { model: 'm', messages: [] })).json()) as {
      choices: Array<{ message: { content: string | null; tool_calls: unknown[] }; finish_reason: string }>;
    };
    expect(second.choices[0]?.finish_reason).toBe('tool_calls');
    expect(second.choices[0]?.message.tool_calls).toEqual([
      {
        id: expect.any(String),
        type: 'function',
        function: { name: 'read', arguments: '{"file_path":"a"}' },
      },
    ]);
    expect(server.requests.map((request) => request.body.messages)).toEqual([
      [{ role: 'user', content: 'a' }],
      [],
    ]);
  });

  it('returns an OpenAI-style error body for error replies and an exhausted queue', async () => {
    server = await startFakeOpenAiServer([{ status: 429, error: 'slow down' }]);
    const limited = await post('/v1/chat/completions', { messages: [] });
    expect(limited.status).toBe(429);
    expect(await limited.json()).toMatchObject({ error: { message: 'slow down' } });
    const exhausted = await post('/v1/chat/completions', { messages: [] });
    expect(exhausted.status).toBe(500);
    expect(((await exhausted.json()) as { error: { message: string } }).error.message).toMatch(
      /no reply queued/,
    );
  });
});
