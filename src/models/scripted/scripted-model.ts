import { createHash } from 'node:crypto';
import {
  APICallError,
  type LanguageModelV3,
  type LanguageModelV3CallOptions,
  type LanguageModelV3Content,
  type LanguageModelV3FinishReason,
  type LanguageModelV3GenerateResult,
  type LanguageModelV3Prompt,
  type LanguageModelV3StreamPart,
  type LanguageModelV3StreamResult,
  type LanguageModelV3ToolResultOutput,
  type LanguageModelV3Usage,
} from '@ai-sdk/provider';
import type { Script, ScriptStep } from './script.js';

/** Text the scripted model answers with once its script has no steps left. */
export const END_OF_SCRIPT_TEXT = '(scripted model: end of script)';

/** What the scripted model will answer to one prompt; a pure function of script and prompt. */
export interface ScriptedResponse {
  /** Index of the script step played (may equal `steps.length` past the end). */
  stepIndex: number;
  text: string | undefined;
  reasoning: string | undefined;
  toolCalls: Array<{ toolCallId: string; toolName: string; input: string }>;
  delayMs: number;
  error: string | undefined;
  finishReason: LanguageModelV3FinishReason;
  usage: LanguageModelV3Usage;
  /** Deterministic response id, derived from the prompt. */
  responseId: string;
}

/**
 * A deterministic `LanguageModelV3` that plays a script, for tests and the offline demo.
 * Like the harness it is stateless: the step is the number of assistant messages after the
 * last user message, so replaying a log replays the same answers.
 */
export class ScriptedLanguageModel implements LanguageModelV3 {
  readonly specificationVersion = 'v3';
  readonly provider = 'scripted';
  readonly modelId: string;
  readonly supportedUrls: Record<string, RegExp[]> = {};
  readonly script: Script;

  constructor(script: Script) {
    this.script = script;
    this.modelId = script.name;
  }

  async doGenerate(options: LanguageModelV3CallOptions): Promise<LanguageModelV3GenerateResult> {
    const response = planScriptedResponse(this.script, options.prompt);
    await waitFor(response.delayMs, options.abortSignal);
    if (response.error !== undefined) throw scriptedCallError(this.modelId, response);
    const content: LanguageModelV3Content[] = [];
    if (response.reasoning) content.push({ type: 'reasoning', text: response.reasoning });
    if (response.text) content.push({ type: 'text', text: response.text });
    for (const toolCall of response.toolCalls) content.push({ type: 'tool-call', ...toolCall });
    return {
      content,
      finishReason: response.finishReason,
      usage: response.usage,
      response: { id: response.responseId, modelId: this.modelId },
      warnings: [],
    };
  }

  async doStream(options: LanguageModelV3CallOptions): Promise<LanguageModelV3StreamResult> {
    const response = planScriptedResponse(this.script, options.prompt);
    if (response.error !== undefined) {
      // Real providers reject doStream when the HTTP request fails; do the same.
      await waitFor(response.delayMs, options.abortSignal);
      throw scriptedCallError(this.modelId, response);
    }
    const parts = streamParts(response, this.modelId);
    const signal = options.abortSignal;
    let index = 0;
    const stream = new ReadableStream<LanguageModelV3StreamPart>({
      pull: async (controller) => {
        try {
          if (index === 0) await waitFor(response.delayMs, signal);
          else await nextTick();
          if (signal?.aborted) throw abortError();
        } catch (error) {
          controller.error(error);
          return;
        }
        const part = parts[index++];
        if (part === undefined) controller.close();
        else controller.enqueue(part);
      },
    });
    return { stream };
  }
}

/**
 * Decides the response to a prompt: picks the step, fills in templates, derives tool call
 * ids (unique per call because they hash the whole prompt) and deterministic usage.
 */
export function planScriptedResponse(script: Script, prompt: LanguageModelV3Prompt): ScriptedResponse {
  const stepIndex = countAssistantMessagesAfterLastUserMessage(prompt);
  const step: ScriptStep = script.steps[stepIndex] ?? { text: END_OF_SCRIPT_TEXT };
  const templates: Record<string, string> = {
    last_user_message: lastUserMessageText(prompt),
    last_tool_result: lastToolResultText(prompt),
  };
  const promptHash = createHash('sha256').update(JSON.stringify(prompt)).digest('hex').slice(0, 16);
  const text = step.text === undefined ? undefined : fillTemplates(step.text, templates);
  const reasoning = step.reasoning === undefined ? undefined : fillTemplates(step.reasoning, templates);
  const toolCalls = (step.toolCalls ?? []).map((toolCall, position) => ({
    toolCallId: `scripted_call_${promptHash}_${position}`,
    toolName: toolCall.toolName,
    input: JSON.stringify(fillTemplatesDeep(toolCall.input, templates)),
  }));
  const outputTextTokens = estimateTokens(
    (text ?? '').length + toolCalls.reduce((sum, call) => sum + call.toolName.length + call.input.length, 0),
  );
  const reasoningTokens = estimateTokens((reasoning ?? '').length);
  const inputTokens = estimateTokens(promptCharacterCount(prompt));
  const hasToolCalls = toolCalls.length > 0;
  return {
    stepIndex,
    text,
    reasoning,
    toolCalls,
    delayMs: step.delayMs ?? 0,
    error: step.error,
    finishReason: {
      unified: hasToolCalls ? 'tool-calls' : 'stop',
      raw: hasToolCalls ? 'tool_calls' : 'stop',
    },
    usage: {
      inputTokens: { total: inputTokens, noCache: inputTokens, cacheRead: 0, cacheWrite: 0 },
      outputTokens: {
        total: outputTextTokens + reasoningTokens,
        text: outputTextTokens,
        reasoning: reasoningTokens,
      },
      raw: { input_tokens: inputTokens, output_tokens: outputTextTokens + reasoningTokens },
    },
    responseId: `scripted_response_${promptHash}`,
  };
}

function streamParts(response: ScriptedResponse, modelId: string): LanguageModelV3StreamPart[] {
  const parts: LanguageModelV3StreamPart[] = [
    { type: 'stream-start', warnings: [] },
    { type: 'response-metadata', id: response.responseId, modelId },
  ];
  if (response.reasoning) {
    parts.push({ type: 'reasoning-start', id: 'reasoning-0' });
    for (const delta of splitIntoChunks(response.reasoning)) {
      parts.push({ type: 'reasoning-delta', id: 'reasoning-0', delta });
    }
    parts.push({ type: 'reasoning-end', id: 'reasoning-0' });
  }
  if (response.text) {
    parts.push({ type: 'text-start', id: 'text-0' });
    for (const delta of splitIntoChunks(response.text))
      parts.push({ type: 'text-delta', id: 'text-0', delta });
    parts.push({ type: 'text-end', id: 'text-0' });
  }
  for (const toolCall of response.toolCalls) {
    parts.push({ type: 'tool-input-start', id: toolCall.toolCallId, toolName: toolCall.toolName });
    for (const delta of splitIntoChunks(toolCall.input)) {
      parts.push({ type: 'tool-input-delta', id: toolCall.toolCallId, delta });
    }
    parts.push({ type: 'tool-input-end', id: toolCall.toolCallId });
    parts.push({ type: 'tool-call', ...toolCall });
  }
  parts.push({ type: 'finish', finishReason: response.finishReason, usage: response.usage });
  return parts;
}

function countAssistantMessagesAfterLastUserMessage(prompt: LanguageModelV3Prompt): number {
  let count = 0;
  for (let index = prompt.length - 1; index >= 0; index--) {
    const message = prompt[index]!;
    if (message.role === 'user') break;
    if (message.role === 'assistant') count++;
  }
  return count;
}

function lastUserMessageText(prompt: LanguageModelV3Prompt): string {
  for (let index = prompt.length - 1; index >= 0; index--) {
    const message = prompt[index]!;
    if (message.role !== 'user') continue;
    return message.content.flatMap((part) => (part.type === 'text' ? [part.text] : [])).join('\n');
  }
  return '';
}

function lastToolResultText(prompt: LanguageModelV3Prompt): string {
  for (let index = prompt.length - 1; index >= 0; index--) {
    const message = prompt[index]!;
    if (message.role !== 'tool' && message.role !== 'assistant') continue;
    for (let partIndex = message.content.length - 1; partIndex >= 0; partIndex--) {
      const part = message.content[partIndex]!;
      if (part.type === 'tool-result') return toolResultOutputText(part.output);
    }
  }
  return '';
}

function toolResultOutputText(output: LanguageModelV3ToolResultOutput): string {
  switch (output.type) {
    case 'text':
    case 'error-text':
      return output.value;
    case 'json':
    case 'error-json':
      return JSON.stringify(output.value);
    case 'execution-denied':
      return output.reason ?? 'execution denied';
    case 'content':
      return output.value.flatMap((item) => (item.type === 'text' ? [item.text] : [])).join('\n');
  }
}

function promptCharacterCount(prompt: LanguageModelV3Prompt): number {
  let count = 0;
  for (const message of prompt) {
    if (message.role === 'system') {
      count += message.content.length;
      continue;
    }
    for (const part of message.content) {
      if (part.type === 'text' || part.type === 'reasoning') count += part.text.length;
      else if (part.type === 'tool-call') count += JSON.stringify(part.input ?? null).length;
      else if (part.type === 'tool-result') count += toolResultOutputText(part.output).length;
    }
  }
  return count;
}

const TEMPLATE_PATTERN = /\{\{\s*(last_user_message|last_tool_result)\s*\}\}/g;

function fillTemplates(text: string, templates: Record<string, string>): string {
  return text.replace(TEMPLATE_PATTERN, (_match, name: string) => templates[name] ?? '');
}

function fillTemplatesDeep(value: unknown, templates: Record<string, string>): unknown {
  if (typeof value === 'string') return fillTemplates(value, templates);
  if (Array.isArray(value)) return value.map((item) => fillTemplatesDeep(item, templates));
  if (typeof value === 'object' && value !== null) {
    return Object.fromEntries(
      Object.entries(value).map(([key, item]) => [key, fillTemplatesDeep(item, templates)]),
    );
  }
  return value;
}

/** Deterministic stand-in for a tokenizer: about four characters per token. */
function estimateTokens(characters: number): number {
  return Math.ceil(characters / 4);
}

/** Splits text into up to four chunks so consumers see real incremental deltas. */
function splitIntoChunks(text: string): string[] {
  const size = Math.max(1, Math.ceil(text.length / 4));
  const chunks: string[] = [];
  for (let start = 0; start < text.length; start += size) chunks.push(text.slice(start, start + size));
  return chunks;
}

function scriptedCallError(modelId: string, response: ScriptedResponse): APICallError {
  return new APICallError({
    message: `Scripted model error (step ${response.stepIndex}): ${response.error}`,
    url: `scripted://${modelId}`,
    requestBodyValues: undefined,
    statusCode: 503,
    isRetryable: true,
  });
}

function abortError(): DOMException {
  return new DOMException('The scripted model call was aborted', 'AbortError');
}

function nextTick(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}

function waitFor(milliseconds: number, signal: AbortSignal | undefined): Promise<void> {
  if (signal?.aborted) return Promise.reject(abortError());
  if (milliseconds <= 0) return Promise.resolve();
  return new Promise((resolve, reject) => {
    const onAbort = () => {
      clearTimeout(timer);
      reject(abortError());
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      resolve();
    }, milliseconds);
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}
