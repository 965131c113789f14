import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import type { NewEvent } from '../src/store/event-store.js';
import { startTestBerth, type TestBerth } from './support/berth-instance.js';
import { createTestDatabase } from './support/postgres-database.js';

type Streamed = { id: string; type: string; n?: number };

/**
 * A stream opened with a cursor in the middle of the history gets every later event exactly
 * once, in order, across the history/live seam, while other events are being appended.
 */
describe.each(['sqlite', 'postgres'] as const)('resumable event stream on %s', (storeKind) => {
  let berth: TestBerth;
  let sessionId: string;

  beforeAll(async () => {
    const database = storeKind === 'postgres' ? await createTestDatabase(inject('postgresUrl')) : undefined;
    berth = await startTestBerth({ database });
    const agent = await berth.client.beta.agents.create({ name: 'seam', model: 'scripted/echo' });
    const environment = await berth.client.beta.environments.create({ name: 'seam' });
    sessionId = (await berth.client.beta.sessions.create({ agent: agent.id, environment_id: environment.id }))
      .id;
  });
  afterAll(async () => berth?.dispose());

  /** Appends `count` marker events in small batches, yielding between batches. */
  async function appendMarkers(first: number, count: number) {
    for (let n = first; n < first + count; n += 5) {
      const batch: NewEvent[] = [];
      for (let k = n; k < Math.min(n + 5, first + count); k++)
        batch.push({ type: 'berth.test_marker', n: k });
      await berth.store.events.append(berth.keyOf(sessionId), batch);
      await new Promise((resolve) => setImmediate(resolve));
    }
  }

  /** Reads a stream through the official SDK, resuming after `cursorId`, until marker `lastN`. */
  async function readStream(cursorId: string, lastN: number, how: 'header' | 'query'): Promise<Streamed[]> {
    const stream = await berth.client.beta.sessions.events.stream(
      sessionId,
      {},
      how === 'header' ? { headers: { 'Last-Event-ID': cursorId } } : { query: { after_id: cursorId } },
    );
    const seen: Streamed[] = [];
    for await (const event of stream) {
      const streamed = event as unknown as Streamed;
      seen.push(streamed);
      if (streamed.n === lastN) break;
    }
    return seen;
  }

  it('delivers every event after the cursor exactly once while appends continue', async () => {
    await appendMarkers(0, 100);
    const history = await berth.store.events.read(berth.keyOf(sessionId), { limit: 1000 });
    const cursors = [history[10]!, history[49]!, history[99]!];
    const total = 600;
    const writer = appendMarkers(100, total - 100);
    // Open streams at different moments of the burst, alternating cursor styles.
    const readers = cursors.map(async (cursor, index) => {
      await new Promise((resolve) => setTimeout(resolve, index * 15));
      return {
        cursor,
        seen: await readStream(cursor.event.id, total - 1, index % 2 === 0 ? 'header' : 'query'),
      };
    });
    await writer;
    const all = await berth.store.events.read(berth.keyOf(sessionId), { limit: 10_000 });
    for (const { cursor, seen } of await Promise.all(readers)) {
      const expected = all.filter((stored) => stored.seq > cursor.seq).map((stored) => stored.event.id);
      expect(seen.map((event) => event.id)).toEqual(expected);
    }
  });

  it('a stream without a cursor starts at the present and sees each new event once', async () => {
    const stream = await berth.client.beta.sessions.events.stream(sessionId);
    const before = await berth.store.events.headSeq(berth.keyOf(sessionId));
    const writer = appendMarkers(1000, 200);
    const seen: Streamed[] = [];
    for await (const event of stream) {
      seen.push(event as unknown as Streamed);
      if ((event as unknown as Streamed).n === 1199) break;
    }
    await writer;
    const after = await berth.store.events.read(berth.keyOf(sessionId), { afterSeq: before, limit: 10_000 });
    expect(seen.map((event) => event.id)).toEqual(after.map((stored) => stored.event.id));
  });
});
