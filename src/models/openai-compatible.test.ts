import type { LanguageModelV3CallOptions, LanguageModelV3StreamPart } from '@ai-sdk/provider';
import { afterEach, describe, expect, it } from 'vitest';
import { type FakeOpenAiServer, startFakeOpenAiServer } from '../../test/support/fake-openai-server.js';
import { createModelRegistry } from './provider-registry.js';

const bashTool: LanguageModelV3CallOptions['tools'] = [
  {
    type: 'function',
    name: 'bash',
    description: 'Run a shell command',
    inputSchema: { type: 'object', properties: { command: { type: 'string' } }, required: ['command'] },
  },
];

async function collect(
  stream: ReadableStream<LanguageModelV3StreamPart>,
): Promise<LanguageModelV3StreamPart[]> {
  const parts: LanguageModelV3StreamPart[] = [];
  for await (const part of stream) parts.push(part);
  return parts;
}

describe('openai-compatible models through the registry', () => {
  let server: FakeOpenAiServer | undefined;
  afterEach(async () => {
    await server?.close();
    server = undefined;
  });

  it('streams text and a tool call from an OpenAI-compatible server, with usage', async () => {
    server = await startFakeOpenAiServer([
      {
        text: 'Let me look at the files.',
        toolCalls: [{ name: 'bash', arguments: { command: 'ls -la /workspace' } }],
        usage: { promptTokens: 42, completionTokens: 17 },
      },
    ]);
    const registry = createModelRegistry({
      environment: { OPENAI_COMPATIBLE_BASE_URL: server.url, OPENAI_COMPATIBLE_API_KEY: 'local-key' },
    });
    const model = registry.resolve('openai-compatible/fake-model');

    const { stream } = await model.doStream({
      prompt: [
        { role: 'system', content: 'You are a test agent.' },
        { role: 'user', content: [{ type: 'text', text: 'List the files' }] },
      ],
      tools: bashTool,
    });
    const parts = await collect(stream);

    const text = parts.flatMap((part) => (part.type === 'text-delta' ? [part.delta] : [])).join('');
    expect(text).toBe('Let me look at the files.');
    const toolCalls = parts.filter((part) => part.type === 'tool-call');
    expect(toolCalls).toHaveLength(1);
    expect(toolCalls[0]!.toolName).toBe('bash');
    expect(JSON.parse(toolCalls[0]!.input)).toEqual({ command: 'ls -la /workspace' });
    expect(toolCalls[0]!.toolCallId).toMatch(/^call_/);

    const finish = parts.find((part) => part.type === 'finish');
    if (finish?.type !== 'finish') throw new Error('expected a finish part');
    expect(finish.finishReason.unified).toBe('tool-calls');
    expect(finish.usage.inputTokens.total).toBe(42);
    expect(finish.usage.outputTokens.total).toBe(17);

    expect(server.requests).toHaveLength(1);
    const request = server.requests[0]!;
    expect(request.headers.authorization).toBe('Bearer local-key');
    expect(request.body.model).toBe('fake-model');
    expect(request.body.stream).toBe(true);
    expect(request.body.stream_options).toEqual({ include_usage: true });
    expect(request.body.messages).toEqual([
      { role: 'system', content: 'You are a test agent.' },
      { role: 'user', content: 'List the files' },
    ]);
    expect(request.body.tools?.map((tool) => tool.function.name)).toEqual(['bash']);
  });

  it('sends tool results back and receives the final answer without streaming', async () => {
    server = await startFakeOpenAiServer((request) => ({
      text: `saw ${request.body.messages?.length} messages`,
    }));
    const model = createModelRegistry({ environment: { OPENAI_COMPATIBLE_BASE_URL: server.url } }).resolve(
      'openai-compatible/fake-model',
    );
    const result = await model.doGenerate({
      prompt: [
        { role: 'user', content: [{ type: 'text', text: 'List the files' }] },
        {
          role: 'assistant',
          content: [{ type: 'tool-call', toolCallId: 'call_1', toolName: 'bash', input: { command: 'ls' } }],
        },
        {
          role: 'tool',
          content: [
            {
              type: 'tool-result',
              toolCallId: 'call_1',
              toolName: 'bash',
              output: { type: 'text', value: 'a.txt' },
            },
          ],
        },
      ],
      tools: bashTool,
    });
    expect(result.content).toEqual([{ type: 'text', text: 'saw 3 messages' }]);
    expect(result.finishReason.unified).toBe('stop');
    expect(result.usage.inputTokens.total).toBeGreaterThan(0);
    expect(server.requests[0]!.headers.authorization).toBeUndefined();
    expect(server.requests[0]!.body.messages?.[2]).toMatchObject({
      role: 'tool',
      tool_call_id: 'call_1',
      content: 'a.txt',
    });
  });

  it('surfaces a server error as a retryable API call error', async () => {
    server = await startFakeOpenAiServer([{ status: 503, error: 'model is loading' }]);
    const model = createModelRegistry({ environment: { OPENAI_COMPATIBLE_BASE_URL: server.url } }).resolve(
      'openai-compatible/fake-model',
    );
    await expect(
      model.doStream({ prompt: [{ role: 'user', content: [{ type: 'text', text: 'hi' }] }] }),
    ).rejects.toMatchObject({
      statusCode: 503,
      isRetryable: true,
      message: expect.stringContaining('model is loading'),
    });
  });
});
