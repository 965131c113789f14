import { describe, expect, it } from 'vitest';
import type { StoredEvent } from '../store/event-store.js';
import { selectTools, TOOL_SELECTION_SIZE } from './tool-selection.js';

const tools = Array.from({ length: 100 }, (_, index) => ({
  name: `tool_${index}`,
  description: index === 42 ? 'Translate text between languages' : `Does chore number ${index}`,
}));

function log(...events: Record<string, unknown>[]): StoredEvent[] {
  return events.map((event, index) => ({
    sessionId: 's',
    seq: index + 1,
    event: { id: `e${index}`, processed_at: '', type: 'user.message', ...event },
  }));
}

describe('selectTools', () => {
  it('keeps every tool of an agent with few tools', () => {
    expect(selectTools(tools.slice(0, 10), [])).toHaveLength(10);
  });

  it('picks the tools whose name or description match the user, and keeps tools already used', () => {
    const selected = selectTools(
      tools,
      log(
        { type: 'agent.tool_use', name: 'tool_7', input: {} },
        { content: [{ type: 'text', text: 'Please translate this into French' }] },
      ),
    );
    const names = selected.map((tool) => tool.name);
    expect(names).toContain('tool_42');
    expect(names).toContain('tool_7');
    expect(names.length).toBeLessThanOrEqual(TOOL_SELECTION_SIZE + 1);
  });

  it('offers only tools already used when nothing matches', () => {
    expect(selectTools(tools, log({ content: [{ type: 'text', text: 'zzz' }] }))).toEqual([]);
  });
});
