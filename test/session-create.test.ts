import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { startTestBerth, type TestBerth } from './support/berth-instance.js';
import { createTestDatabase } from './support/postgres-database.js';

/**
 * Session create with `initial_events` is one write, and a retried create (same
 * `Idempotency-Key`, same owner) makes no second session: a client whose first request timed
 * out after the server committed can retry without leaving a duplicate session behind.
 */
describe.each(['sqlite', 'postgres'] as const)('session create (%s store)', (storeKind) => {
  let berth: TestBerth;
  let agentId: string;
  let environmentId: string;

  beforeAll(async () => {
    berth = await startTestBerth(
      storeKind === 'postgres' ? { database: await createTestDatabase(inject('postgresUrl')) } : {},
    );
    const agent = await berth.client.beta.agents.create({ name: 'create', model: 'scripted/echo' });
    const environment = await berth.client.beta.environments.create({ name: 'create' });
    agentId = agent.id;
    environmentId = environment.id;
  });
  afterAll(async () => berth?.dispose());

  const create = (key: string | undefined, text: string, apiKey = berth.apiKey) =>
    fetch(`${berth.url}/v1/sessions`, {
      method: 'POST',
      headers: {
        'x-api-key': apiKey,
        'content-type': 'application/json',
        ...(key === undefined ? {} : { 'idempotency-key': key }),
      },
      body: JSON.stringify({
        agent: agentId,
        environment_id: environmentId,
        initial_events: [{ type: 'user.message', content: [{ type: 'text', text }] }],
      }),
    });

  const sessionIds = async () => {
    const ids: string[] = [];
    for await (const session of berth.client.beta.sessions.list({ limit: 100 })) ids.push(session.id);
    return ids;
  };

  it('answers a retried create with the first session and stores its initial events once', async () => {
    const before = await sessionIds();
    const first = await create('create-1', 'hello once');
    expect(first.status).toBe(200);
    const firstBody = (await first.json()) as { id: string };
    const second = await create('create-1', 'hello once');
    expect(second.status).toBe(200);
    const secondBody = (await second.json()) as { id: string };
    expect(secondBody.id).toBe(firstBody.id);

    const after = await sessionIds();
    expect(after.filter((id) => !before.includes(id))).toEqual([firstBody.id]);
    await berth.supervisor.settled(berth.keyOf(firstBody.id));
    const messages: string[] = [];
    for await (const event of berth.client.beta.sessions.events.list(firstBody.id)) {
      if (event.type === 'user.message') messages.push(JSON.stringify(event.content));
    }
    expect(messages).toHaveLength(1);
    expect(messages[0]).toContain('hello once');
  });

  it('makes one session from concurrent creates with the same key', async () => {
    const before = await sessionIds();
    const answers = await Promise.all(Array.from({ length: 8 }, () => create('create-burst', 'burst')));
    const ids = await Promise.all(
      answers.map(async (answer) => {
        expect(answer.status).toBe(200);
        return ((await answer.json()) as { id: string }).id;
      }),
    );
    expect(new Set(ids).size).toBe(1);
    const after = await sessionIds();
    expect(after.filter((id) => !before.includes(id))).toEqual([ids[0]]);
  });

  it('creates a new session for a new key, or without a key', async () => {
    const one = (await (await create('create-2', 'a')).json()) as { id: string };
    const two = (await (await create('create-3', 'a')).json()) as { id: string };
    const three = (await (await create(undefined, 'a')).json()) as { id: string };
    const four = (await (await create(undefined, 'a')).json()) as { id: string };
    expect(new Set([one.id, two.id, three.id, four.id]).size).toBe(4);
  });

  it('refuses an Idempotency-Key longer than 255 characters and creates nothing', async () => {
    const before = await sessionIds();
    const answer = await create('k'.repeat(256), 'too long');
    expect(answer.status).toBe(400);
    expect(await answer.json()).toMatchObject({
      type: 'error',
      error: { type: 'invalid_request_error', message: expect.stringMatching(/Idempotency-Key/) },
    });
    expect(await sessionIds()).toEqual(before);
  });
});
