import type {
  LanguageModelV3Message,
  LanguageModelV3Prompt,
  LanguageModelV3ToolCallPart,
  LanguageModelV3ToolResultPart,
} from '@ai-sdk/provider';
import type { StoredEvent } from '../store/event-store.js';

/** Text of an API content array (`[{type:'text', text}]`), other blocks described briefly. */
export function contentText(content: unknown): string {
  if (!Array.isArray(content)) return typeof content === 'string' ? content : '';
  return content
    .map((block: { type?: string; text?: string }) => {
      if (block?.type === 'text') return block.text ?? '';
      if (block?.type === 'redacted') return '';
      return `[${block?.type ?? 'unknown'} block]`;
    })
    .join('');
}

/**
 * The name the model knows a tool use by: the tool's name, or `<server>__<tool>` for an MCP
 * tool (names must be unique across servers and match providers' `[a-zA-Z0-9_-]{1,64}`).
 */
export function modelToolName(event: { type: string; name?: unknown; mcp_server_name?: unknown }): string {
  if (event.type === 'agent.mcp_tool_use')
    return mcpModelToolName(String(event.mcp_server_name), String(event.name));
  return String(event.name);
}

/** The model-facing name of an MCP server's tool. */
export function mcpModelToolName(serverName: string, toolName: string): string {
  return `${serverName}__${toolName}`.replace(/[^a-zA-Z0-9_-]/g, '_').slice(0, 64);
}

type AssistantPart =
  | LanguageModelV3ToolCallPart
  | { type: 'text'; text: string }
  | { type: 'reasoning'; text: string };

/**
 * Rebuilds the model's context from the log, every turn: the system prompt, then user
 * messages, the agent's messages and tool calls, and tool results. Tool call ids are the
 * `agent.tool_use` event ids, so a result always pairs with its call across restarts.
 * Events the model never saw (status, spans, errors) are skipped.
 */
export function buildPrompt(system: string | null, log: readonly StoredEvent[]): LanguageModelV3Prompt {
  const prompt: LanguageModelV3Message[] = [];
  if (system) prompt.push({ role: 'system', content: system });
  let assistant: AssistantPart[] | undefined;
  let toolResults: LanguageModelV3ToolResultPart[] | undefined;
  const toolNames = new Map<string, string>();

  const flush = () => {
    if (assistant && assistant.length > 0) prompt.push({ role: 'assistant', content: assistant });
    if (toolResults && toolResults.length > 0) prompt.push({ role: 'tool', content: toolResults });
    assistant = undefined;
    toolResults = undefined;
  };
  const resultsSeen = new Set<string>();
  const deferred: LanguageModelV3Message[] = [];
  let requestOpen = false;
  // Tool calls still waiting for their results: their results must directly follow them.
  const unansweredCalls = new Set<string>();
  const flushDeferred = () => {
    flush();
    prompt.push(...deferred);
    deferred.length = 0;
  };
  const addResult = (toolCallId: string, content: unknown, isError: boolean) => {
    // Providers reject two results for one call; the first one stored is the answer.
    if (resultsSeen.has(toolCallId)) return;
    resultsSeen.add(toolCallId);
    unansweredCalls.delete(toolCallId);
    if (assistant) {
      prompt.push({ role: 'assistant', content: assistant });
      assistant = undefined;
    }
    toolResults ??= [];
    const text = contentText(content);
    toolResults.push({
      type: 'tool-result',
      toolCallId,
      toolName: toolNames.get(toolCallId) ?? 'unknown',
      output: isError ? { type: 'error-text', value: text } : { type: 'text', value: text },
    });
  };

  for (const { event } of log) {
    switch (event.type) {
      case 'user.message': {
        const message: LanguageModelV3Message = {
          role: 'user',
          content: [{ type: 'text', text: contentText(event.content) }],
        };
        // Sent while a model request was open, or while its tools ran: that response did not
        // see it, and its tool results must come first, so the message follows them.
        if (requestOpen || unansweredCalls.size > 0) {
          deferred.push(message);
          break;
        }
        flushDeferred();
        prompt.push(message);
        break;
      }
      case 'span.model_request_start':
        flushDeferred();
        requestOpen = true;
        break;
      case 'span.model_request_end':
        // Messages that came in during the request go after its tool results, which must
        // directly follow the tool calls.
        requestOpen = false;
        break;
      case 'agent.message':
        if (toolResults) flush();
        assistant ??= [];
        assistant.push({ type: 'text', text: contentText(event.content) });
        break;
      case 'agent.tool_use':
      case 'agent.custom_tool_use':
      case 'agent.mcp_tool_use':
        if (toolResults) flush();
        assistant ??= [];
        toolNames.set(event.id, modelToolName(event));
        unansweredCalls.add(event.id);
        assistant.push({
          type: 'tool-call',
          toolCallId: event.id,
          toolName: modelToolName(event),
          input: event.input,
        });
        break;
      case 'agent.tool_result':
        addResult(event.tool_use_id as string, event.content, event.is_error === true);
        break;
      case 'agent.mcp_tool_result':
        addResult(event.mcp_tool_use_id as string, event.content, event.is_error === true);
        break;
      case 'user.custom_tool_result':
        addResult(event.custom_tool_use_id as string, event.content, event.is_error === true);
        break;
      default:
        break;
    }
  }
  flushDeferred();
  return prompt;
}
