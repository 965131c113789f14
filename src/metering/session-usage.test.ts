import { describe, expect, it } from 'vitest';
import type { StoredEvent } from '../store/event-store.js';
import type { SessionRecord } from '../store/resource-store.js';
import { costOf, loadPresetPriceBook } from './price-books.js';
import { usageFromLog } from './session-usage.js';

function sessionWithModel(model: unknown): SessionRecord {
  return {
    id: 'sesn_1',
    tenantId: 'tnt_1',
    ownerId: 'user_1',
    createdAt: '2026-12-01T00:00:00.000Z',
    updatedAt: '2026-12-01T00:00:00.000Z',
    archivedAt: null,
    body: { agent: { model } },
    agentId: 'agent_1',
    agentVersion: 1,
    environmentId: 'env_1',
    status: 'idle',
    stopReason: null,
    lastSeq: 1,
  };
}

const modelCall: StoredEvent = {
  seq: 1,
  event: {
    id: 'sevt_1',
    type: 'span.model_request_end',
    processed_at: '2026-12-01T00:00:01.000Z',
    model_usage: { input_tokens: 1000, output_tokens: 100 },
  },
} as unknown as StoredEvent;

describe('session usage', () => {
  it('counts and prices a bare claude-* model as anthropic/claude-*, like the rest of the API', () => {
    const book = loadPresetPriceBook('anthropic');
    for (const model of ['claude-sonnet-4-5', { id: 'claude-sonnet-4-5' }]) {
      const usage = usageFromLog(sessionWithModel(model), [modelCall], Date.parse('2026-12-01T00:01:00Z'));
      expect(Object.keys(usage.tokens)).toEqual(['anthropic/claude-sonnet-4-5']);
      const cost = costOf(usage, book);
      expect(cost.unpricedModels).toEqual([]);
      expect(cost.tokensTotal).toBeGreaterThan(0);
    }
  });
});
