import { describe, expect, it } from 'vitest';
import type { StoredEvent } from '../store/event-store.js';
import { buildPrompt } from './context.js';

function log(...entries: [string, Record<string, unknown>?][]): StoredEvent[] {
  return entries.map(([type, fields], index) => ({
    sessionId: 's',
    seq: index + 1,
    event: { id: `e${index + 1}`, type, processed_at: '2026-11-22T00:00:00.000Z', ...fields },
  }));
}
const text = (value: string) => ({ content: [{ type: 'text', text: value }] });

describe('buildPrompt: the model context rebuilt from the log', () => {
  it('pairs tool results with their calls by event id and skips runtime-only events', () => {
    const prompt = buildPrompt(
      'Be brief.',
      log(
        ['user.message', text('list files')],
        ['session.status_running'],
        ['span.model_request_start'],
        ['agent.message', text('Looking.')],
        ['agent.tool_use', { name: 'bash', input: { command: 'ls' } }],
        ['span.model_request_end', { is_error: false }],
        ['agent.tool_result', { tool_use_id: 'e5', ...text('a.txt'), is_error: false }],
        ['span.model_request_start'],
        ['agent.message', text('One file.')],
        ['span.model_request_end', { is_error: false }],
        ['session.status_idle', { stop_reason: { type: 'end_turn' } }],
      ),
    );
    expect(prompt).toEqual([
      { role: 'system', content: 'Be brief.' },
      { role: 'user', content: [{ type: 'text', text: 'list files' }] },
      {
        role: 'assistant',
        content: [
          { type: 'text', text: 'Looking.' },
          { type: 'tool-call', toolCallId: 'e5', toolName: 'bash', input: { command: 'ls' } },
        ],
      },
      {
        role: 'tool',
        content: [
          {
            type: 'tool-result',
            toolCallId: 'e5',
            toolName: 'bash',
            output: { type: 'text', value: 'a.txt' },
          },
        ],
      },
      { role: 'assistant', content: [{ type: 'text', text: 'One file.' }] },
    ]);
  });

  it('places a message sent during a model request after that request and its tool results', () => {
    const prompt = buildPrompt(
      null,
      log(
        ['user.message', text('first')],
        ['session.status_running'],
        ['span.model_request_start'],
        ['user.message', text('second')],
        ['agent.tool_use', { name: 'bash', input: {} }],
        ['span.model_request_end', { is_error: false }],
        ['agent.tool_result', { tool_use_id: 'e5', ...text('done') }],
      ),
    );
    expect(prompt.map((message) => message.role)).toEqual(['user', 'assistant', 'tool', 'user']);
    expect(prompt[3]).toEqual({ role: 'user', content: [{ type: 'text', text: 'second' }] });
  });

  it('gives the model only the first result when a tool use was answered twice', () => {
    const prompt = buildPrompt(
      null,
      log(
        ['user.message', text('go')],
        ['span.model_request_start'],
        ['agent.custom_tool_use', { name: 'lookup', input: {} }],
        ['span.model_request_end', { is_error: false }],
        ['user.custom_tool_result', { custom_tool_use_id: 'e3', ...text('one') }],
        ['user.custom_tool_result', { custom_tool_use_id: 'e3', ...text('two') }],
      ),
    );
    const results = prompt.filter((message) => message.role === 'tool').flatMap((message) => message.content);
    expect(results).toHaveLength(1);
    expect(results[0]).toMatchObject({ toolCallId: 'e3', output: { value: 'one' } });
  });

  it('places a message sent while a tool ran after that tool result', () => {
    const prompt = buildPrompt(
      null,
      log(
        ['user.message', text('first')],
        ['span.model_request_start'],
        ['agent.tool_use', { name: 'bash', input: {} }],
        ['span.model_request_end', { is_error: false }],
        ['user.message', text('second')],
        ['agent.tool_result', { tool_use_id: 'e3', ...text('done') }],
      ),
    );
    expect(prompt.map((message) => message.role)).toEqual(['user', 'assistant', 'tool', 'user']);
  });
});
