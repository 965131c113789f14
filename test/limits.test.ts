import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createTenantWithAdmin } from '../src/identity/api-keys.js';
import { createModelRegistry } from '../src/models/provider-registry.js';
import type { TenantLimits } from '../src/store/resource-store.js';
import { startTestBerth, type TestBerth, UNLIMITED_LIMITS } from './support/berth-instance.js';
import { keepAliveClient } from './support/http-client.js';

/** `scripted/slow` keeps a turn in flight (a model call that waits 30 s unless interrupted). */
const models = createModelRegistry({
  environment: {},
  scriptedScripts: { slow: { name: 'slow', steps: [{ delayMs: 30_000, text: 'finally' }] } },
});

const hello = [{ type: 'user.message', content: [{ type: 'text', text: 'hi' }] }];

/** One Berth with the given limits, and helpers that drive it over HTTP as a client would. */
function limitedBerth(environment: Record<string, string>) {
  let berth: TestBerth;
  let tenants = 0;

  beforeAll(async () => {
    berth = await startTestBerth({ environment: { ...UNLIMITED_LIMITS, ...environment }, models });
  });
  afterAll(async () => berth?.dispose());

  const request = async (key: string, method: string, path: string, body?: unknown) =>
    fetch(`${berth.url}${path}`, {
      method,
      headers: { 'x-api-key': key, 'content-type': 'application/json' },
      body: body === undefined ? undefined : JSON.stringify(body),
    });

  async function json<T>(response: Response): Promise<T> {
    const text = await response.text();
    expect(response.status, text).toBe(200);
    return JSON.parse(text) as T;
  }

  /** A fresh tenant (so its buckets are fresh) with an agent and environment, and a member-maker. */
  async function tenant(options: { limits?: TenantLimits; model?: string } = {}) {
    tenants++;
    const created = await createTenantWithAdmin(berth.store.resources, {
      name: `limits-${tenants}`,
      limits: options.limits,
    });
    const adminKey = created.key;
    const agent = await json<{ id: string }>(
      await request(adminKey, 'POST', '/v1/agents', {
        name: 'limited',
        model: options.model ?? 'scripted/echo',
      }),
    );
    const environment = await json<{ id: string }>(
      await request(adminKey, 'POST', '/v1/environments', { name: 'limited' }),
    );
    let users = 0;
    return {
      adminKey,
      /** A new member of the tenant, with their own key. */
      async member() {
        users++;
        const user = await json<{ id: string }>(
          await request(adminKey, 'POST', '/v1/users', { name: `member-${users}`, role: 'member' }),
        );
        const key = await json<{ key: string }>(
          await request(adminKey, 'POST', '/v1/api_keys', { name: 'member', user_id: user.id }),
        );
        return key.key;
      },
      createSession: (key: string, extra: Record<string, unknown> = {}) =>
        request(key, 'POST', '/v1/sessions', { agent: agent.id, environment_id: environment.id, ...extra }),
      async newSession(key: string) {
        return (await json<{ id: string }>(await this.createSession(key))).id;
      },
      send: (key: string, sessionId: string, events: unknown[] = hello) =>
        request(key, 'POST', `/v1/sessions/${sessionId}/events`, { events }),
      /** Sessions of the tenant, as its admin lists them. */
      async sessionCount() {
        return (await json<{ data: unknown[] }>(await request(adminKey, 'GET', '/v1/sessions?limit=1000')))
          .data.length;
      },
      /** Client events in a session's log. */
      async clientEventCount(sessionId: string) {
        const page = await json<{ data: { type: string }[] }>(
          await request(adminKey, 'GET', `/v1/sessions/${sessionId}/events?limit=1000`),
        );
        return page.data.filter((event) => event.type.startsWith('user.')).length;
      },
      async status(sessionId: string) {
        return (await json<{ status: string }>(await request(adminKey, 'GET', `/v1/sessions/${sessionId}`)))
          .status;
      },
      async waitForStatus(sessionId: string, status: string, timeoutMs = 5_000) {
        const deadline = Date.now() + timeoutMs;
        while ((await this.status(sessionId)) !== status) {
          if (Date.now() > deadline) throw new Error(`session ${sessionId} never became ${status}`);
          await new Promise((resolve) => setTimeout(resolve, 20));
        }
      },
    };
  }

  return { tenant, request, berth: () => berth };
}

/** Asserts a 429 in the Anthropic error shape with a whole-second retry-after; returns the seconds. */
async function expectRateLimited(response: Response, message: RegExp): Promise<number> {
  const text = await response.text();
  expect(response.status, text).toBe(429);
  const retryAfter = response.headers.get('retry-after');
  expect(retryAfter).toMatch(/^\d+$/);
  expect(Number(retryAfter)).toBeGreaterThanOrEqual(1);
  const body = JSON.parse(text) as { type: string; error: { type: string; message: string } };
  expect(body.type).toBe('error');
  expect(body.error.type).toBe('rate_limit_error');
  expect(body.error.message).toMatch(message);
  return Number(retryAfter);
}

/** Fires `count` requests at once and splits the answers into accepted and refused. */
async function burst(count: number, make: () => Promise<Response>) {
  const responses = await Promise.all(Array.from({ length: count }, make));
  return {
    accepted: responses.filter((response) => response.status === 200),
    refused: responses.filter((response) => response.status !== 200),
  };
}

describe('sessions created per minute', () => {
  const { tenant } = limitedBerth({
    BERTH_USER_SESSIONS_PER_MINUTE: '3',
    BERTH_TENANT_SESSIONS_PER_MINUTE: '5',
  });

  it("refuses a user's burst past 3 sessions a minute with 429 and creates none of the refused", async () => {
    const acme = await tenant();
    const member = await acme.member();
    const { accepted, refused } = await burst(7, () => acme.createSession(member));
    expect(accepted).toHaveLength(3);
    expect(refused).toHaveLength(4);
    for (const response of refused) {
      const seconds = await expectRateLimited(response, /at most 3 sessions created per minute of the user/);
      expect(seconds).toBeLessThanOrEqual(60);
    }
    expect(await acme.sessionCount()).toBe(3);
    // Another user of the same tenant is not held back by the first one's limit.
    expect((await acme.createSession(await acme.member())).status).toBe(200);
  });

  it("refuses past 5 sessions a minute across the tenant's users", async () => {
    const acme = await tenant();
    const [first, second, third] = [await acme.member(), await acme.member(), await acme.member()];
    for (let index = 0; index < 3; index++) expect((await acme.createSession(first)).status).toBe(200);
    expect((await acme.createSession(second)).status).toBe(200);
    expect((await acme.createSession(second)).status).toBe(200);
    await expectRateLimited(
      await acme.createSession(second),
      /at most 5 sessions created per minute of the tenant/,
    );
    await expectRateLimited(await acme.createSession(third), /of the tenant/);
    expect(await acme.sessionCount()).toBe(5);
    // Other tenants have buckets of their own.
    const other = await tenant();
    expect((await other.createSession(other.adminKey)).status).toBe(200);
  });

  it("applies a tenant's own overrides, lower or higher than the defaults", async () => {
    const strict = await tenant({ limits: { sessionsPerMinute: 1 } });
    expect((await strict.createSession(strict.adminKey)).status).toBe(200);
    await expectRateLimited(await strict.createSession(await strict.member()), /at most 1 sessions created/);
    expect(await strict.sessionCount()).toBe(1);

    const generous = await tenant({ limits: { sessionsPerMinute: 0 } });
    const members = [await generous.member(), await generous.member(), await generous.member()];
    const results = await Promise.all(
      members.flatMap((member) => [1, 2, 3].map(() => generous.createSession(member))),
    );
    expect(results.map((response) => response.status)).toEqual(Array(9).fill(200));
    expect(await generous.sessionCount()).toBe(9);
  });
});

describe('client events per minute', () => {
  const { tenant } = limitedBerth({ BERTH_USER_EVENTS_PER_MINUTE: '5', BERTH_TENANT_EVENTS_PER_MINUTE: '8' });

  it("refuses a user's burst past 5 events a minute with 429 and appends none of the refused", async () => {
    const acme = await tenant();
    const member = await acme.member();
    const sessionId = await acme.newSession(member);
    const { accepted, refused } = await burst(9, () => acme.send(member, sessionId));
    expect(accepted).toHaveLength(5);
    expect(refused).toHaveLength(4);
    for (const response of refused)
      await expectRateLimited(response, /at most 5 events per minute of the user/);
    expect(await acme.clientEventCount(sessionId)).toBe(5);
  });

  it('refuses a single send carrying more events than a whole minute allows', async () => {
    const acme = await tenant();
    const sessionId = await acme.newSession(acme.adminKey);
    const seconds = await expectRateLimited(
      await acme.send(acme.adminKey, sessionId, Array(6).fill(hello[0])),
      /at most 5 events per minute/,
    );
    expect(seconds).toBe(60);
    expect(await acme.clientEventCount(sessionId)).toBe(0);
    expect((await acme.send(acme.adminKey, sessionId)).status).toBe(200);
  });

  it("refuses past 8 events a minute across the tenant's users, and honours a tenant override", async () => {
    const acme = await tenant();
    const [first, second] = [await acme.member(), await acme.member()];
    const [firstSession, secondSession] = [await acme.newSession(first), await acme.newSession(second)];
    expect((await acme.send(first, firstSession, Array(5).fill(hello[0]))).status).toBe(200);
    expect((await acme.send(second, secondSession, Array(3).fill(hello[0]))).status).toBe(200);
    await expectRateLimited(
      await acme.send(second, secondSession),
      /at most 8 events per minute of the tenant/,
    );
    expect(await acme.clientEventCount(secondSession)).toBe(3);

    const strict = await tenant({ limits: { eventsPerMinute: 2 } });
    const strictSession = await strict.newSession(strict.adminKey);
    expect((await strict.send(strict.adminKey, strictSession, Array(2).fill(hello[0]))).status).toBe(200);
    await expectRateLimited(await strict.send(strict.adminKey, strictSession), /at most 2 events per minute/);
    expect(await strict.clientEventCount(strictSession)).toBe(2);
  });
});

describe('live sessions (turns in flight)', () => {
  const { tenant } = limitedBerth({ BERTH_USER_LIVE_SESSIONS: '2', BERTH_TENANT_LIVE_SESSIONS: '3' });

  it('refuses a third turn in flight for a user, still takes an interrupt, and admits again once a turn ends', async () => {
    const acme = await tenant({ model: 'scripted/slow' });
    const member = await acme.member();
    const [first, second, third] = [
      await acme.newSession(member),
      await acme.newSession(member),
      await acme.newSession(member),
    ];
    expect((await acme.send(member, first)).status).toBe(200);
    expect((await acme.send(member, second)).status).toBe(200);
    await acme.waitForStatus(second, 'running');

    const seconds = await expectRateLimited(
      await acme.send(member, third),
      /at most 2 live sessions of the user/,
    );
    expect(seconds).toBe(1);
    expect(await acme.clientEventCount(third)).toBe(0);
    expect(await acme.status(third)).toBe('idle');
    // A session already live takes more input: it starts no new turn.
    expect((await acme.send(member, first)).status).toBe(200);
    // A session created with a first message would be a third live one: refused, not created.
    await expectRateLimited(
      await acme.createSession(member, { initial_events: hello }),
      /live sessions of the user/,
    );
    expect(await acme.sessionCount()).toBe(3);

    expect((await acme.send(member, first, [{ type: 'user.interrupt' }])).status).toBe(200);
    await acme.waitForStatus(first, 'idle');
    expect((await acme.send(member, third)).status).toBe(200);
    await acme.waitForStatus(third, 'running');
    await expectRateLimited(await acme.send(member, first), /live sessions of the user/);
  });

  it('refuses a fourth turn in flight across the tenant, and honours a tenant override', async () => {
    const acme = await tenant({ model: 'scripted/slow' });
    const [first, second] = [await acme.member(), await acme.member()];
    // Two sessions each: neither user passes their own limit of 2, together they pass the tenant's 3.
    const owners = [first, first, second, second];
    const sessions: string[] = [];
    for (const owner of owners) sessions.push(await acme.newSession(owner));
    const responses = await Promise.all(
      sessions.map((sessionId, index) => acme.send(owners[index]!, sessionId)),
    );
    const accepted = responses.filter((response) => response.status === 200);
    const refused = responses.filter((response) => response.status !== 200);
    expect(accepted).toHaveLength(3);
    expect(refused).toHaveLength(1);
    await expectRateLimited(refused[0]!, /at most 3 live sessions of the tenant/);
    const counts = await Promise.all(sessions.map((sessionId) => acme.clientEventCount(sessionId)));
    expect(counts.reduce((sum, count) => sum + count, 0)).toBe(3);

    const strict = await tenant({ model: 'scripted/slow', limits: { liveSessions: 1 } });
    const [one, two] = [await strict.newSession(strict.adminKey), await strict.newSession(strict.adminKey)];
    expect((await strict.send(strict.adminKey, one)).status).toBe(200);
    await expectRateLimited(await strict.send(strict.adminKey, two), /at most 1 live sessions of the tenant/);
    expect(await strict.clientEventCount(two)).toBe(0);
  });
});

describe('a refused request costs nothing', () => {
  const { tenant } = limitedBerth({
    BERTH_USER_LIVE_SESSIONS: '1',
    BERTH_USER_EVENTS_PER_MINUTE: '3',
    BERTH_USER_SESSIONS_PER_MINUTE: '3',
  });

  it('does not use up the events or sessions allowance with requests refused for the live limit', async () => {
    const acme = await tenant({ model: 'scripted/slow' });
    const member = await acme.member();
    const [first, second] = [await acme.newSession(member), await acme.newSession(member)];
    expect((await acme.send(member, first)).status).toBe(200);
    await acme.waitForStatus(first, 'running');
    for (let attempt = 0; attempt < 5; attempt++) {
      await expectRateLimited(await acme.send(member, second), /live sessions of the user/);
      await expectRateLimited(
        await acme.createSession(member, { initial_events: hello }),
        /live sessions of the user/,
      );
    }
    expect(await acme.sessionCount()).toBe(2);

    // Interrupts are free; the message after it is the second event of the minute.
    expect((await acme.send(member, first, [{ type: 'user.interrupt' }])).status).toBe(200);
    await acme.waitForStatus(first, 'idle');
    expect((await acme.send(member, second)).status).toBe(200);
    // The third session of the minute.
    expect((await acme.createSession(member)).status).toBe(200);

    // The third event spends the allowance; a fourth is refused, but an interrupt still stops
    // the turn (a client must always be able to stop a runaway agent).
    await acme.waitForStatus(second, 'running');
    expect((await acme.send(member, second)).status).toBe(200);
    await expectRateLimited(await acme.send(member, second), /events per minute of the user/);
    expect((await acme.send(member, second, [{ type: 'user.interrupt' }])).status).toBe(200);
    await acme.waitForStatus(second, 'idle');
  });
});

describe('the server stays responsive for other tenants', () => {
  const { tenant, berth } = limitedBerth({});

  it("answers tenant B's requests quickly while tenant A hammers past its limits", async () => {
    const hammering = await tenant({ limits: { sessionsPerMinute: 2, eventsPerMinute: 2 } });
    const hammerSession = await hammering.newSession(hammering.adminKey);
    const quiet = await tenant();
    const quietSession = await quiet.newSession(quiet.adminKey);
    const hammerClient = keepAliveClient(berth().url);
    const quietClient = keepAliveClient(berth().url);
    const agentId = (
      JSON.parse((await hammerClient.request('GET', '/v1/agents', { key: hammering.adminKey })).text) as {
        data: { id: string }[];
      }
    ).data[0]!.id;
    const environmentId = (
      JSON.parse(
        (await hammerClient.request('GET', '/v1/environments', { key: hammering.adminKey })).text,
      ) as {
        data: { id: string }[];
      }
    ).data[0]!.id;

    // Tenant A: 2,000 requests over 20 connections, half session creations, half messages.
    const hammerTotal = 2_000;
    const hammerStatuses = new Map<number, number>();
    let issued = 0;
    const hammer = async () => {
      while (issued < hammerTotal) {
        const answer =
          issued++ % 2 === 0
            ? await hammerClient.request('POST', '/v1/sessions', {
                key: hammering.adminKey,
                body: { agent: agentId, environment_id: environmentId },
              })
            : await hammerClient.request('POST', `/v1/sessions/${hammerSession}/events`, {
                key: hammering.adminKey,
                body: { events: hello },
              });
        hammerStatuses.set(answer.status, (hammerStatuses.get(answer.status) ?? 0) + 1);
      }
    };
    // Tenant B: two clients cycling through reads and messages until A is done.
    const quietRequests: [string, string, unknown?][] = [
      ['GET', `/v1/sessions/${quietSession}`],
      ['GET', '/v1/sessions'],
      ['GET', `/v1/sessions/${quietSession}/events?limit=20`],
      ['GET', '/v1/agents'],
      ['GET', '/v1/me'],
      ['POST', `/v1/sessions/${quietSession}/events`, { events: hello }],
    ];
    const latencies: number[] = [];
    const quietFailures: string[] = [];
    let hammerDone = false;
    const quietLoop = async () => {
      for (let index = 0; !hammerDone; index++) {
        const [method, path, body] = quietRequests[index % quietRequests.length]!;
        const started = performance.now();
        const answer = await quietClient.request(method, path, { key: quiet.adminKey, body });
        latencies.push(performance.now() - started);
        if (answer.status !== 200) quietFailures.push(`${method} ${path} -> ${answer.status}`);
      }
    };
    // Warm the connections up first: the first requests of a fresh connection measure the client.
    await Promise.all(
      Array.from({ length: 20 }, () => quietClient.request('GET', '/v1/me', { key: quiet.adminKey })),
    );

    const started = performance.now();
    const quietDone = Promise.all([quietLoop(), quietLoop()]);
    await Promise.all(Array.from({ length: 20 }, hammer));
    const hammerMs = performance.now() - started;
    hammerDone = true;
    await quietDone;
    hammerClient.close();
    quietClient.close();

    latencies.sort((a, b) => a - b);
    const percentile = (p: number) =>
      latencies[Math.min(latencies.length - 1, Math.floor(latencies.length * p))]!;
    console.log(
      `tenant A: ${hammerTotal} requests in ${hammerMs.toFixed(0)} ms, statuses ${JSON.stringify(Object.fromEntries(hammerStatuses))}; ` +
        `tenant B: ${latencies.length} requests, all 200: ${quietFailures.length === 0}, ` +
        `p50 ${percentile(0.5).toFixed(1)} ms, p99 ${percentile(0.99).toFixed(1)} ms, max ${latencies[latencies.length - 1]!.toFixed(1)} ms`,
    );
    expect(hammerStatuses.get(429)).toBeGreaterThanOrEqual(hammerTotal - 10);
    expect(quietFailures).toEqual([]);
    expect(latencies.length).toBeGreaterThan(50);
    expect(percentile(0.99)).toBeLessThan(250);
    // Only what A's limits admitted was written.
    expect(await hammering.sessionCount()).toBeLessThanOrEqual(1 + 3);
    expect(await hammering.clientEventCount(hammerSession)).toBeLessThanOrEqual(3);
  });
});
