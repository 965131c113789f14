import { readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startTestBerth, type TestBerth } from './support/berth-instance.js';

/** Bad input gets a clear 4xx in the Anthropic error shape, and changes nothing. */
describe('bad input is refused and changes nothing', () => {
  let berth: TestBerth;
  let sessionId: string;
  let agentId: string;
  let environmentId: string;

  const request = (method: string, path: string, body?: unknown, headers: Record<string, string> = {}) =>
    fetch(`${berth.url}${path}`, {
      method,
      headers: { 'x-api-key': berth.apiKey, 'content-type': 'application/json', ...headers },
      body: body === undefined ? undefined : typeof body === 'string' ? body : JSON.stringify(body),
    });

  const eventCount = async () => {
    const response = await request('GET', `/v1/sessions/${sessionId}/events?limit=1000`);
    return ((await response.json()) as { data: unknown[] }).data.length;
  };

  const expectError = async (response: Response, status: number, type: string, message: RegExp) => {
    expect(response.status).toBe(status);
    const body = (await response.json()) as { type: string; error: { type: string; message: string } };
    expect(body.type).toBe('error');
    expect(body.error.type).toBe(type);
    expect(body.error.message).toMatch(message);
  };

  beforeAll(async () => {
    berth = await startTestBerth();
    const agent = await berth.client.beta.agents.create({ name: 'validation', model: 'scripted/echo' });
    const environment = await berth.client.beta.environments.create({ name: 'validation' });
    const session = await berth.client.beta.sessions.create({
      agent: agent.id,
      environment_id: environment.id,
    });
    agentId = agent.id;
    environmentId = environment.id;
    sessionId = session.id;
  });
  afterAll(async () => berth?.dispose());

  it('answers malformed JSON with 400 invalid_request_error', async () => {
    await expectError(
      await request('POST', `/v1/sessions/${sessionId}/events`, '{"events": [', {}),
      400,
      'invalid_request_error',
      /not valid JSON/,
    );
    expect(await eventCount()).toBe(0);
  });

  it('names an unknown event type and writes nothing', async () => {
    await expectError(
      await request('POST', `/v1/sessions/${sessionId}/events`, { events: [{ type: 'user.telepathy' }] }),
      400,
      'invalid_request_error',
      /unknown event type "user.telepathy"/,
    );
    expect(await eventCount()).toBe(0);
  });

  it('refuses the whole batch when one event has wrong types', async () => {
    const response = await request('POST', `/v1/sessions/${sessionId}/events`, {
      events: [
        { type: 'user.message', content: [{ type: 'text', text: 'fine' }] },
        { type: 'user.message', content: 'not an array' },
      ],
    });
    await expectError(response, 400, 'invalid_request_error', /events\.1/);
    expect(await eventCount()).toBe(0);
  });

  it('refuses runtime event types sent by a client', async () => {
    await expectError(
      await request('POST', `/v1/sessions/${sessionId}/events`, {
        events: [{ type: 'agent.message', content: [{ type: 'text', text: 'forged' }] }],
      }),
      400,
      'invalid_request_error',
      /events\.0/,
    );
    expect(await eventCount()).toBe(0);
  });

  it('refuses multiagent with a clear 400 until multi-agent sessions exist, and stores nothing', async () => {
    const agentCount = async () =>
      ((await (await request('GET', '/v1/agents?limit=1000')).json()) as { data: unknown[] }).data.length;
    const before = await agentCount();
    const multiagent = { type: 'coordinator', agents: [{ type: 'agent', id: agentId }] };
    await expectError(
      await request('POST', '/v1/agents', { name: 'team', model: 'scripted/echo', multiagent }),
      400,
      'invalid_request_error',
      /multiagent.*not supported by Berth yet/,
    );
    expect(await agentCount()).toBe(before);
    await expectError(
      await request('POST', `/v1/agents/${agentId}`, { multiagent }),
      400,
      'invalid_request_error',
      /multiagent.*not supported by Berth yet/,
    );
    const unchanged = (await (await request('GET', `/v1/agents/${agentId}`)).json()) as { version: number };
    expect(unchanged.version).toBe(1);
    // null (no multi-agent configuration) is what Berth has anyway.
    const plain = await request('POST', `/v1/agents/${agentId}`, { multiagent: null });
    expect(plain.status).toBe(200);
    expect(((await plain.json()) as { multiagent: unknown; version: number }).multiagent).toBeNull();
  });

  it('refuses user.define_outcome in initial_events with one clear reason, and creates no session', async () => {
    const sessionCount = async () =>
      ((await (await request('GET', '/v1/sessions?limit=1000')).json()) as { data: unknown[] }).data.length;
    const before = await sessionCount();
    const outcome = {
      type: 'user.define_outcome',
      description: 'Write a report',
      rubric: { type: 'text', content: 'It is complete.' },
    };
    for (const initial_events of [
      [outcome],
      [{ type: 'user.message', content: [{ type: 'text', text: 'go' }] }, outcome],
    ]) {
      const response = await request('POST', '/v1/sessions', {
        agent: agentId,
        environment_id: environmentId,
        initial_events,
      });
      expect(response.status).toBe(400);
      const body = (await response.json()) as { error: { type: string; message: string } };
      expect(body.error.type).toBe('invalid_request_error');
      expect(body.error.message).toBe(
        `initial_events.${initial_events.length - 1}: outcomes are not supported by Berth yet`,
      );
    }
    expect(await sessionCount()).toBe(before);
  });

  it('answers session resources with a clear 400, not a missing route', async () => {
    for (const [method, path, body] of [
      ['GET', `/v1/sessions/${sessionId}/resources`, undefined],
      ['POST', `/v1/sessions/${sessionId}/resources`, { type: 'file', file_id: 'file_1' }],
      ['GET', `/v1/sessions/${sessionId}/resources/sesrsc_1`, undefined],
      ['POST', `/v1/sessions/${sessionId}/resources/sesrsc_1`, { authorization_token: 'x' }],
      ['DELETE', `/v1/sessions/${sessionId}/resources/sesrsc_1`, undefined],
    ] as const) {
      await expectError(
        await request(method, path, body),
        400,
        'invalid_request_error',
        /session resources are not supported by Berth yet/,
      );
    }
    // Through the official SDK too; another session id is still a 404.
    await expect(berth.client.beta.sessions.resources.list(sessionId)).rejects.toThrow(
      /session resources are not supported/,
    );
    await expectError(
      await request('GET', '/v1/sessions/sesn_missing/resources'),
      404,
      'not_found_error',
      /sesn_missing/,
    );
  });

  it('answers unknown ids with 404 not_found_error', async () => {
    await expectError(
      await request('POST', '/v1/sessions/sesn_doesnotexist/events', {
        events: [{ type: 'user.message', content: [{ type: 'text', text: 'hi' }] }],
      }),
      404,
      'not_found_error',
      /session sesn_doesnotexist not found/,
    );
    await expectError(
      await request('GET', '/v1/agents/agent_nope'),
      404,
      'not_found_error',
      /agent agent_nope/,
    );
    await expectError(
      await request('POST', '/v1/sessions', { agent: 'agent_nope', environment_id: environmentId }),
      404,
      'not_found_error',
      /agent agent_nope/,
    );
    await expectError(
      await request('POST', '/v1/sessions', { agent: agentId, environment_id: 'env_nope' }),
      404,
      'not_found_error',
      /environment env_nope/,
    );
    const sessions = (await (await request('GET', '/v1/sessions')).json()) as { data: unknown[] };
    expect(sessions.data).toHaveLength(1);
  });

  it('answers an oversized body with 413 request_too_large', async () => {
    const huge = 'x'.repeat(1024 * 1024 + 10);
    await expectError(
      await request('POST', `/v1/sessions/${sessionId}/events`, {
        events: [{ type: 'user.message', content: [{ type: 'text', text: huge }] }],
      }),
      413,
      'request_too_large',
      /exceeds/,
    );
    expect(await eventCount()).toBe(0);
  });

  it('refuses unknown fields, bad model ids and out-of-range values on resources', async () => {
    await expectError(
      await request('POST', '/v1/agents', { name: 'x', model: 'scripted/echo', colour: 'blue' }),
      400,
      'invalid_request_error',
      /colour/,
    );
    await expectError(
      await request('POST', '/v1/agents', { name: 'x', model: 'gpt-5' }),
      400,
      'invalid_request_error',
      /provider/,
    );
    await expectError(
      await request('POST', '/v1/environments', {
        name: 'x',
        config: { type: 'cloud', berth: { lifecycle: { idle_timeout_s: 10 } } },
      }),
      400,
      'invalid_request_error',
      /idle_timeout_s/,
    );
    await expectError(
      await request('POST', '/v1/environments', {
        name: 'x',
        config: { type: 'cloud', berth: { driver: 'nope' } },
      }),
      400,
      'invalid_request_error',
      /sandbox driver "nope"/,
    );
    await expectError(await request('GET', '/v1/agents?limit=0'), 400, 'invalid_request_error', /limit/);
    const agents = (await (await request('GET', '/v1/agents')).json()) as { data: unknown[] };
    expect(agents.data).toHaveLength(1);
  });

  it('refuses NUL characters and out-of-range numbers in URLs and bodies with 400', async () => {
    await expectError(await request('GET', '/v1/sessions/%00'), 400, 'invalid_request_error', /NUL/);
    await expectError(
      await request('POST', `/v1/sessions/${sessionId}/events`, {
        events: [{ type: 'user.message', content: [{ type: 'text', text: 'a\u0000b' }] }],
      }),
      400,
      'invalid_request_error',
      /NUL/,
    );
    await expectError(
      await request('GET', '/v1/sessions?agent_version=abc'),
      400,
      'invalid_request_error',
      /agent_version/,
    );
    await expectError(
      await request('GET', `/v1/agents/${agentId}?version=99999999999`),
      400,
      'invalid_request_error',
      /version/,
    );
    const hugeCursor = Buffer.from('seq:99999999999999999999').toString('base64url');
    await expectError(
      await request('GET', `/v1/sessions/${sessionId}/events?page=${hugeCursor}`),
      400,
      'invalid_request_error',
      /cursor/,
    );
    expect(await eventCount()).toBe(0);
  });

  it('requires an API key and refuses a wrong one with 401', async () => {
    const missing = await fetch(`${berth.url}/v1/agents`);
    await expectError(missing, 401, 'authentication_error', /Missing API key/);
    await expectError(
      await request('GET', '/v1/agents', undefined, { 'x-api-key': 'berth_sk_wrong' }),
      401,
      'authentication_error',
      /Invalid API key/,
    );
    const bearer = await fetch(`${berth.url}/v1/agents`, {
      headers: { authorization: `Bearer ${berth.apiKey}` },
    });
    expect(bearer.status).toBe(200);
  });

  it('keeps the admin key only in admin.key (mode 0600) and only its hash in the database', () => {
    const file = join(berth.dataDir, 'admin.key');
    expect(statSync(file).mode & 0o777).toBe(0o600);
    expect(readFileSync(file, 'utf8').trim()).toBe(berth.apiKey);
    for (const name of ['berth.db', 'berth.db-wal']) {
      let bytes: Buffer;
      try {
        bytes = readFileSync(join(berth.dataDir, name));
      } catch {
        continue;
      }
      expect(bytes.includes(berth.apiKey)).toBe(false);
    }
  });

  it('stores a send once when the Idempotency-Key repeats, and answers the same', async () => {
    const before = await eventCount();
    const body = { events: [{ type: 'user.message', content: [{ type: 'text', text: 'once' }] }] };
    const first = await request('POST', `/v1/sessions/${sessionId}/events`, body, {
      'idempotency-key': 'k-1',
    });
    const second = await request('POST', `/v1/sessions/${sessionId}/events`, body, {
      'idempotency-key': 'k-1',
    });
    expect(first.status).toBe(200);
    expect(await second.json()).toEqual(await first.json());
    await berth.supervisor.settled(berth.keyOf(sessionId));
    const events = (await (await request('GET', `/v1/sessions/${sessionId}/events?limit=1000`)).json()) as {
      data: { type: string }[];
    };
    expect(events.data.filter((event) => event.type === 'user.message')).toHaveLength(1);
    expect(events.data.length).toBeGreaterThan(before);
  });

  it('refuses a stream cursor that is not an event of the session', async () => {
    await expectError(
      await request('GET', `/v1/sessions/${sessionId}/events/stream?after_id=sevt_nope`),
      400,
      'invalid_request_error',
      /after_id/,
    );
  });
});
