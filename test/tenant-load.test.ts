import { randomBytes } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { createTenantWithAdmin } from '../src/identity/api-keys.js';
import { startTestBerth, type TestBerth, UNLIMITED_LIMITS } from './support/berth-instance.js';
import { type HttpAnswer, type KeepAliveClient, keepAliveClient } from './support/http-client.js';
import { createTestDatabase } from './support/postgres-database.js';

const TENANTS = 8;
const SESSIONS_PER_TENANT = 3;
const REQUESTS = 10_000;
const IN_FLIGHT = 200;

/** What one tenant owns; every id and its marker must stay out of other tenants' answers. */
interface LoadTenant {
  index: number;
  /** Unique text in the tenant's name, metadata and messages. */
  marker: string;
  key: string;
  tenantId: string;
  userId: string;
  keyId: string;
  agentId: string;
  environmentId: string;
  sessionIds: string[];
}

/** A small seeded generator, so a failing mix can be replayed from the printed seed. */
function seededRandom(seed: number) {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let value = state;
    value = Math.imul(value ^ (value >>> 15), value | 1);
    value ^= value + Math.imul(value ^ (value >>> 7), value | 61);
    return ((value ^ (value >>> 14)) >>> 0) / 4_294_967_296;
  };
}

/** Ids and markers all look like `prefix_<16+ base32 or hex digits>`. */
const TOKEN = /[a-z]+_[0-9a-z]{16,}/g;

/**
 * Many tenants at once on one PostgreSQL pool: every request runs on whichever pooled
 * connection is free, so a tenant setting that leaked from one request to the next would show
 * up as another tenant's data in an answer.
 */
describe('tenant isolation under concurrent load (PostgreSQL)', () => {
  let berth: TestBerth;
  let client: KeepAliveClient;
  const tenants: LoadTenant[] = [];
  /** Who owns each id and marker. */
  const ownerOf = new Map<string, number>();

  const call = (tenant: LoadTenant, method: string, path: string, body?: unknown) =>
    client.request(method, path, { key: tenant.key, body });

  async function json<T>(answer: Promise<HttpAnswer>): Promise<T> {
    const { status, text } = await answer;
    expect(status, text).toBe(200);
    return JSON.parse(text) as T;
  }

  const message = (tenant: LoadTenant, text: string) => ({
    events: [{ type: 'user.message', content: [{ type: 'text', text: `${text} ${tenant.marker} here` }] }],
  });

  async function waitForIdleReply(tenant: LoadTenant, sessionId: string) {
    const deadline = Date.now() + 15_000;
    for (;;) {
      const session = await json<{ status: string }>(call(tenant, 'GET', `/v1/sessions/${sessionId}`));
      const events = await json<{ data: { type: string }[] }>(
        call(tenant, 'GET', `/v1/sessions/${sessionId}/events?limit=100`),
      );
      if (session.status === 'idle' && events.data.some((event) => event.type === 'agent.message')) return;
      if (Date.now() > deadline) throw new Error(`session ${sessionId} never answered`);
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  }

  async function createTenant(index: number): Promise<LoadTenant> {
    const marker = `mark_${randomBytes(8).toString('hex')}`;
    const created = await createTenantWithAdmin(berth.store.resources, { name: marker });
    const tenant: LoadTenant = {
      index,
      marker,
      key: created.key,
      tenantId: created.tenant.id,
      userId: created.admin.id,
      keyId: created.keyRecord.id,
      agentId: '',
      environmentId: '',
      sessionIds: [],
    };
    const metadata = { tenant: marker };
    tenant.agentId = (
      await json<{ id: string }>(
        call(tenant, 'POST', '/v1/agents', {
          name: `agent of ${marker}`,
          model: 'scripted/echo',
          system: `You work for ${marker}.`,
          metadata,
        }),
      )
    ).id;
    tenant.environmentId = (
      await json<{ id: string }>(
        call(tenant, 'POST', '/v1/environments', { name: `environment of ${marker}` }),
      )
    ).id;
    for (let session = 0; session < SESSIONS_PER_TENANT; session++) {
      const created = await json<{ id: string }>(
        call(tenant, 'POST', '/v1/sessions', {
          agent: tenant.agentId,
          environment_id: tenant.environmentId,
          title: `session ${session} of ${marker}`,
          metadata,
        }),
      );
      tenant.sessionIds.push(created.id);
      await json(
        call(tenant, 'POST', `/v1/sessions/${created.id}/events`, message(tenant, 'first words from')),
      );
    }
    await Promise.all(tenant.sessionIds.map((sessionId) => waitForIdleReply(tenant, sessionId)));
    return tenant;
  }

  beforeAll(async () => {
    berth = await startTestBerth({
      database: await createTestDatabase(inject('postgresUrl')),
      // No limit may refuse any of the load.
      environment: UNLIMITED_LIMITS,
    });
    // The app role is bound by row-level security, and requests share the store's pool.
    expect(berth.store.kind).toBe('postgres');
    expect(berth.store.rowLevelSecurity).toEqual({ enforced: true });
    client = keepAliveClient(berth.url, IN_FLIGHT);
    tenants.push(...(await Promise.all(Array.from({ length: TENANTS }, (_, index) => createTenant(index)))));
    for (const tenant of tenants) {
      const owned = [
        tenant.marker,
        tenant.tenantId,
        tenant.userId,
        tenant.keyId,
        tenant.agentId,
        tenant.environmentId,
        ...tenant.sessionIds,
      ];
      for (const sessionId of tenant.sessionIds) {
        const events = await json<{ data: { id: string }[] }>(
          call(tenant, 'GET', `/v1/sessions/${sessionId}/events?limit=100`),
        );
        owned.push(...events.data.map((event) => event.id));
      }
      for (const token of owned) {
        expect(token).toMatch(TOKEN);
        ownerOf.set(token, tenant.index);
      }
    }
  }, 120_000);
  afterAll(async () => {
    client?.close();
    await berth?.dispose();
  });

  it('answers 10,000 concurrent mixed-tenant requests with none carrying another tenant’s data', async () => {
    const seed = Number(process.env.BERTH_LOAD_SEED ?? Date.now() % 1_000_000);
    const random = seededRandom(seed);
    const pick = <T>(items: readonly T[]): T => items[Math.floor(random() * items.length)]!;

    type Planned = { caller: LoadTenant; method: string; path: string; body?: unknown; foreign: boolean };
    /** 90 % requests for the caller's own resources, 10 % for another tenant's ids (must be 404). */
    const plan = (): Planned => {
      const caller = pick(tenants);
      const roll = random();
      if (roll < 0.1) {
        const victim = pick(tenants.filter((tenant) => tenant !== caller));
        const sessionId = pick(victim.sessionIds);
        const [method, path, body] = pick<[string, string, unknown?]>([
          ['GET', `/v1/sessions/${sessionId}`],
          ['GET', `/v1/sessions/${sessionId}/events`],
          ['POST', `/v1/sessions/${sessionId}/events`, message(caller, 'intruding words from')],
          ['GET', `/v1/agents/${victim.agentId}`],
          ['GET', `/v1/environments/${victim.environmentId}`],
        ]);
        return { caller, method, path, body, foreign: true };
      }
      const sessionId = pick(caller.sessionIds);
      const own: [number, string, string, unknown?][] = [
        [0.25, 'GET', `/v1/sessions/${sessionId}`],
        [0.38, 'GET', '/v1/sessions'],
        [0.52, 'GET', `/v1/sessions/${sessionId}/events?limit=20&order=desc`],
        [0.62, 'GET', `/v1/agents/${caller.agentId}`],
        [0.72, 'GET', '/v1/agents'],
        [0.82, 'GET', '/v1/environments'],
        [0.96, 'GET', '/v1/me'],
        [1, 'POST', `/v1/sessions/${sessionId}/events`, message(caller, 'load words from')],
      ];
      const [, method, path, body] = own.find(([upTo]) => roll < upTo)!;
      return { caller, method, path, body, foreign: false };
    };

    let violations = 0;
    let ownChecked = 0;
    let ownWithOwnData = 0;
    let foreignRefused = 0;
    const unexpected: string[] = [];
    const leaks: string[] = [];
    const counts = new Map<string, number>();
    const latencies: number[] = [];

    /** Counts every id or marker of another tenant in an answer the caller was given. */
    const check = (request: Planned, answer: HttpAnswer) => {
      const route = `${request.foreign ? 'foreign ' : ''}${request.method} ${request.path.replace(/[a-z]+_[0-9a-z]{16,}/g, ':id').replace(/\?.*/, '')}`;
      counts.set(route, (counts.get(route) ?? 0) + 1);
      if (request.foreign) {
        if (answer.status === 404 && JSON.parse(answer.text).error?.type === 'not_found_error')
          foreignRefused++;
        else unexpected.push(`${route} -> ${answer.status} ${answer.text.slice(0, 200)}`);
        return;
      }
      if (answer.status !== 200) {
        unexpected.push(`${route} -> ${answer.status} ${answer.text.slice(0, 200)}`);
        return;
      }
      ownChecked++;
      let sawOwn = false;
      for (const token of answer.text.match(TOKEN) ?? []) {
        const owner = ownerOf.get(token);
        if (owner === undefined) continue;
        if (owner === request.caller.index) sawOwn = true;
        else {
          violations++;
          if (leaks.length < 10) leaks.push(`${route} as tenant ${request.caller.index} carried ${token}`);
        }
      }
      if (sawOwn) ownWithOwnData++;
    };

    const planned = Array.from({ length: REQUESTS }, plan);
    let next = 0;
    const worker = async () => {
      while (next < planned.length) {
        const request = planned[next++]!;
        const started = performance.now();
        const answer = await call(request.caller, request.method, request.path, request.body);
        latencies.push(performance.now() - started);
        check(request, answer);
      }
    };
    const started = performance.now();
    await Promise.all(Array.from({ length: IN_FLIGHT }, worker));
    const elapsed = performance.now() - started;

    latencies.sort((a, b) => a - b);
    const percentile = (p: number) =>
      latencies[Math.min(latencies.length - 1, Math.floor(latencies.length * p))]!;
    console.log(
      [
        `seed ${seed}: ${REQUESTS} requests (${IN_FLIGHT} in flight) from ${TENANTS} tenants in ${(elapsed / 1000).toFixed(1)} s, ` +
          `${Math.round(REQUESTS / (elapsed / 1000))} req/s; latency p50 ${percentile(0.5).toFixed(0)} ms, ` +
          `p99 ${percentile(0.99).toFixed(0)} ms, max ${latencies[latencies.length - 1]!.toFixed(0)} ms`,
        `own answers checked: ${ownChecked} (${ownWithOwnData} naming the caller's own ids), foreign ids refused with 404: ${foreignRefused}, violations: ${violations}`,
        ...[...counts].sort().map(([route, count]) => `  ${String(count).padStart(5)}  ${route}`),
        ...leaks,
        ...unexpected.slice(0, 10),
      ].join('\n'),
    );
    expect(leaks).toEqual([]);
    expect(violations).toBe(0);
    expect(unexpected).toEqual([]);
    expect(ownChecked + foreignRefused).toBe(REQUESTS);
    expect(foreignRefused).toBeGreaterThan(REQUESTS * 0.08);
    // The scan had something to find: nearly every answer names the caller's own ids.
    expect(ownWithOwnData).toBeGreaterThan(ownChecked * 0.95);
  }, 60_000);

  it("keeps every tenant's logs free of other tenants' messages after the load", async () => {
    for (const tenant of tenants) {
      for (const sessionId of tenant.sessionIds) {
        await berth.supervisor.settled({ tenantId: tenant.tenantId, id: sessionId });
        const log = await berth.store.events.read(
          { tenantId: tenant.tenantId, id: sessionId },
          { limit: 100_000 },
        );
        const text = JSON.stringify(log);
        for (const other of tenants) {
          if (other !== tenant)
            expect(text.includes(other.marker), `${sessionId} holds ${other.marker}`).toBe(false);
        }
        expect(text).toContain(tenant.marker);
      }
    }
  });
});
