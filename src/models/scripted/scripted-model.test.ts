import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  APICallError,
  type LanguageModelV3CallOptions,
  type LanguageModelV3Prompt,
  type LanguageModelV3StreamPart,
} from '@ai-sdk/provider';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { isBerthError } from '../../errors.js';
import { bashOnceScript, DEMO_BASH_COMMAND, demoScript, echoScript } from './built-in-scripts.js';
import { loadScriptFile, type Script } from './script.js';
import { END_OF_SCRIPT_TEXT, planScriptedResponse, ScriptedLanguageModel } from './scripted-model.js';

const user = (text: string): LanguageModelV3Prompt[number] => ({
  role: 'user',
  content: [{ type: 'text', text }],
});
const assistantToolCall = (toolCallId: string, toolName: string): LanguageModelV3Prompt[number] => ({
  role: 'assistant',
  content: [{ type: 'tool-call', toolCallId, toolName, input: {} }],
});
const toolResult = (toolCallId: string, text: string): LanguageModelV3Prompt[number] => ({
  role: 'tool',
  content: [{ type: 'tool-result', toolCallId, toolName: 'bash', output: { type: 'text', value: text } }],
});
const assistantText = (text: string): LanguageModelV3Prompt[number] => ({
  role: 'assistant',
  content: [{ type: 'text', text }],
});

function callOptions(prompt: LanguageModelV3Prompt, abortSignal?: AbortSignal): LanguageModelV3CallOptions {
  return { prompt, abortSignal };
}

async function collect(
  stream: ReadableStream<LanguageModelV3StreamPart>,
): Promise<LanguageModelV3StreamPart[]> {
  const parts: LanguageModelV3StreamPart[] = [];
  for await (const part of stream) parts.push(part);
  return parts;
}

describe('scripted model step selection', () => {
  const script: Script = { name: 'three', steps: [{ text: 'zero' }, { text: 'one' }, { text: 'two' }] };

  it('plays step 0 for a fresh user message', () => {
    expect(planScriptedResponse(script, [user('hi')]).text).toBe('zero');
  });

  it('advances one step per assistant message after the last user message', () => {
    const prompt = [user('hi'), assistantToolCall('a', 'bash'), toolResult('a', 'ok'), assistantText('x')];
    expect(planScriptedResponse(script, prompt).stepIndex).toBe(2);
    expect(planScriptedResponse(script, prompt).text).toBe('two');
  });

  it('starts again from step 0 after a new user message', () => {
    const prompt = [user('hi'), assistantText('zero'), assistantText('one'), user('again')];
    expect(planScriptedResponse(script, prompt).text).toBe('zero');
  });

  it('answers with a fixed end-of-script text past the last step', () => {
    const prompt = [user('hi'), assistantText('0'), assistantText('1'), assistantText('2')];
    const response = planScriptedResponse(script, prompt);
    expect(response.text).toBe(END_OF_SCRIPT_TEXT);
    expect(response.finishReason.unified).toBe('stop');
  });

  it('gives the same answer to the same prompt and different tool call ids to different prompts', () => {
    const first = planScriptedResponse(bashOnceScript, [user('ls')]);
    expect(planScriptedResponse(bashOnceScript, [user('ls')])).toEqual(first);
    const second = planScriptedResponse(bashOnceScript, [user('ls'), assistantText('done'), user('pwd')]);
    expect(second.toolCalls[0]!.toolCallId).not.toBe(first.toolCalls[0]!.toolCallId);
  });
});

describe('scripted model templates', () => {
  it('echo replies with the text of the last user message', () => {
    const response = planScriptedResponse(echoScript, [
      user('first'),
      assistantText('x'),
      user('say this back'),
    ]);
    expect(response.text).toBe('say this back');
    expect(response.toolCalls).toEqual([]);
  });

  it('bash-once runs the user message as a bash command, then replies with its output', () => {
    const first = planScriptedResponse(bashOnceScript, [user('echo "quoted" && ls')]);
    expect(first.toolCalls).toHaveLength(1);
    expect(first.toolCalls[0]!.toolName).toBe('bash');
    expect(JSON.parse(first.toolCalls[0]!.input)).toEqual({ command: 'echo "quoted" && ls' });
    expect(first.finishReason.unified).toBe('tool-calls');

    const id = first.toolCalls[0]!.toolCallId;
    const second = planScriptedResponse(bashOnceScript, [
      user('echo "quoted" && ls'),
      assistantToolCall(id, 'bash'),
      toolResult(id, 'quoted\nfile.txt'),
    ]);
    expect(second.text).toBe('quoted\nfile.txt');
    expect(second.finishReason.unified).toBe('stop');
  });

  it('fills templates inside nested tool inputs', () => {
    const script: Script = {
      name: 'nested',
      steps: [
        {
          toolCalls: [
            { toolName: 'write', input: { files: [{ content: 'got {{last_user_message}}' }], n: 1 } },
          ],
        },
      ],
    };
    const response = planScriptedResponse(script, [user('abc')]);
    expect(JSON.parse(response.toolCalls[0]!.input)).toEqual({ files: [{ content: 'got abc' }], n: 1 });
  });

  it('the demo runs bash, writes, reads, then summarises as Berth’s scripted model', () => {
    const tools: string[] = [];
    const prompt: LanguageModelV3Prompt = [user('show me')];
    for (let step = 0; step < 4; step++) {
      const response = planScriptedResponse(demoScript, prompt);
      expect(response.text).toMatch(/Berth scripted demo model/);
      for (const call of response.toolCalls) {
        tools.push(call.toolName);
        prompt.push(
          assistantToolCall(call.toolCallId, call.toolName),
          toolResult(call.toolCallId, `out ${step}`),
        );
      }
      if (step === 0)
        expect(JSON.parse(response.toolCalls[0]!.input)).toEqual({ command: DEMO_BASH_COMMAND });
      if (step === 3) expect(response.text).toContain('out 2');
    }
    expect(tools).toEqual(['bash', 'write', 'read']);
  });
});

describe('scripted model streaming', () => {
  const script: Script = {
    name: 'stream',
    steps: [
      {
        reasoning: 'thinking about {{last_user_message}}',
        text: 'A fairly long answer so that it streams in several chunks.',
        toolCalls: [
          { toolName: 'bash', input: { command: 'ls' } },
          { toolName: 'read', input: { file_path: 'a.txt' } },
        ],
      },
    ],
  };

  it('streams stream-start, metadata, reasoning, text deltas, tool calls and a finish with usage', async () => {
    const model = new ScriptedLanguageModel(script);
    const { stream } = await model.doStream(callOptions([user('the question')]));
    const parts = await collect(stream);
    const types = parts.map((part) => part.type);
    expect(types[0]).toBe('stream-start');
    expect(types[1]).toBe('response-metadata');
    expect(types.at(-1)).toBe('finish');

    const reasoning = parts.flatMap((part) => (part.type === 'reasoning-delta' ? [part.delta] : []));
    expect(reasoning.join('')).toBe('thinking about the question');
    const textDeltas = parts.flatMap((part) => (part.type === 'text-delta' ? [part.delta] : []));
    expect(textDeltas.length).toBeGreaterThan(1);
    expect(textDeltas.join('')).toBe('A fairly long answer so that it streams in several chunks.');
    expect(types.indexOf('reasoning-end')).toBeLessThan(types.indexOf('text-start'));

    const toolCalls = parts.filter((part) => part.type === 'tool-call');
    expect(toolCalls.map((call) => call.toolName)).toEqual(['bash', 'read']);
    expect(JSON.parse(toolCalls[1]!.input)).toEqual({ file_path: 'a.txt' });
    expect(new Set(toolCalls.map((call) => call.toolCallId)).size).toBe(2);
    const inputDeltas = parts.flatMap((part) =>
      part.type === 'tool-input-delta' && part.id === toolCalls[0]!.toolCallId ? [part.delta] : [],
    );
    expect(inputDeltas.join('')).toBe(toolCalls[0]!.input);

    const finish = parts.at(-1);
    if (finish?.type !== 'finish') throw new Error('expected finish');
    expect(finish.finishReason.unified).toBe('tool-calls');
    expect(finish.usage.inputTokens.total).toBe(Math.ceil('the question'.length / 4));
    expect(finish.usage.outputTokens.reasoning).toBe(Math.ceil('thinking about the question'.length / 4));
    expect(finish.usage.outputTokens.total).toBeGreaterThan(finish.usage.outputTokens.reasoning!);
  });

  it('returns the same content from doGenerate without streaming', async () => {
    const model = new ScriptedLanguageModel(script);
    const result = await model.doGenerate(callOptions([user('the question')]));
    expect(result.content.map((part) => part.type)).toEqual(['reasoning', 'text', 'tool-call', 'tool-call']);
    expect(result.finishReason.unified).toBe('tool-calls');
    const plan = planScriptedResponse(script, [user('the question')]);
    expect(result.usage).toEqual(plan.usage);
  });

  it('waits delayMs before the first part', async () => {
    const model = new ScriptedLanguageModel({ name: 'slow', steps: [{ text: 'late', delayMs: 60 }] });
    const started = Date.now();
    const { stream } = await model.doStream(callOptions([user('x')]));
    const reader = stream.getReader();
    await reader.read();
    expect(Date.now() - started).toBeGreaterThanOrEqual(50);
  });

  it('errors the stream with an AbortError when aborted during the delay', async () => {
    const model = new ScriptedLanguageModel({ name: 'slow', steps: [{ text: 'late', delayMs: 10_000 }] });
    const controller = new AbortController();
    const { stream } = await model.doStream(callOptions([user('x')], controller.signal));
    setTimeout(() => controller.abort(), 20);
    const started = Date.now();
    await expect(collect(stream)).rejects.toMatchObject({ name: 'AbortError' });
    expect(Date.now() - started).toBeLessThan(5_000);
  });

  it('rejects doGenerate with an AbortError when already aborted', async () => {
    const model = new ScriptedLanguageModel(echoScript);
    await expect(model.doGenerate(callOptions([user('x')], AbortSignal.abort()))).rejects.toMatchObject({
      name: 'AbortError',
    });
  });

  it('fails an error step with a retryable APICallError, streaming or not', async () => {
    const model = new ScriptedLanguageModel({ name: 'flaky', steps: [{ error: 'overloaded' }] });
    const streamError = await model.doStream(callOptions([user('x')])).catch((error: unknown) => error);
    expect(APICallError.isInstance(streamError)).toBe(true);
    expect((streamError as APICallError).isRetryable).toBe(true);
    expect((streamError as APICallError).message).toContain('overloaded');
    const generateError = await model.doGenerate(callOptions([user('x')])).catch((error: unknown) => error);
    expect(APICallError.isInstance(generateError)).toBe(true);
  });
});

describe('script files', () => {
  let directory: string;
  beforeAll(async () => {
    directory = await mkdtemp(join(tmpdir(), 'berth-scripts-'));
  });
  afterAll(async () => {
    await rm(directory, { recursive: true, force: true });
  });

  it('loads a valid JSON script', async () => {
    const path = join(directory, 'ok.json');
    const script = {
      name: 'custom',
      steps: [{ text: 'hi' }, { toolCalls: [{ toolName: 'bash', input: { command: 'ls' } }] }],
    };
    await writeFile(path, JSON.stringify(script));
    expect(await loadScriptFile(path)).toEqual(script);
  });

  it('names the file and the bad field when a script is invalid', async () => {
    const path = join(directory, 'bad.json');
    await writeFile(
      path,
      JSON.stringify({ name: 'bad', steps: [{ toolCalls: [{ toolName: 'bash', input: 'ls' }] }] }),
    );
    const error = await loadScriptFile(path).catch((caught: unknown) => caught);
    expect(isBerthError(error, 'invalid_request')).toBe(true);
    expect((error as Error).message).toContain(path);
    expect((error as Error).message).toMatch(/steps\[0\]\.toolCalls\[0\]\.input/);
  });

  it('reports malformed JSON and missing files clearly', async () => {
    const path = join(directory, 'broken.json');
    await writeFile(path, '{ not json');
    await expect(loadScriptFile(path)).rejects.toThrow(/not valid JSON/);
    await expect(loadScriptFile(join(directory, 'missing.json'))).rejects.toThrow(
      /Cannot read scripted model script file/,
    );
  });
});
