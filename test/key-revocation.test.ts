import { resolve } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createTenantWithAdmin } from '../src/identity/api-keys.js';
import { berthCli } from './support/berth-cli.js';
import { startTestBerth, type TestBerth } from './support/berth-instance.js';
import { type OpenStream, openSseStream } from './support/sse-stream.js';

const _root = resolve(import.meta.dirname, '..');

/** A key made through the API: its id and the secret (shown once). */
interface IssuedKey {
  id: string;
  key: string;
  expires_at: string | null;
}

/** Revoked and expired keys stop working at once on every path, open streams included. */
describe('key revocation and expiry', () => {
  let berth: TestBerth;
  let agentId: string;
  let environmentId: string;

  const request = (key: string, method: string, path: string, body?: unknown) =>
    fetch(`${berth.url}${path}`, {
      method,
      headers: { 'x-api-key': key, 'content-type': 'application/json' },
      body: body === undefined ? undefined : JSON.stringify(body),
    });

  async function json<T>(response: Response, status = 200): Promise<T> {
    const text = await response.text();
    expect(response.status, text).toBe(status);
    return JSON.parse(text) as T;
  }

  /** A member of the admin's tenant and a key for them, made through the identity API. */
  async function newMember(adminKey: string, name: string, keyOptions: Record<string, unknown> = {}) {
    const user = await json<{ id: string }>(
      await request(adminKey, 'POST', '/v1/users', { name, role: 'member' }),
    );
    const key = await json<IssuedKey>(
      await request(adminKey, 'POST', '/v1/api_keys', {
        name: `${name} key`,
        user_id: user.id,
        ...keyOptions,
      }),
    );
    return { userId: user.id, ...key };
  }

  async function newSession(key: string) {
    const session = await json<{ id: string }>(
      await request(key, 'POST', '/v1/sessions', { agent: agentId, environment_id: environmentId }),
    );
    return session.id;
  }

  async function openStream(key: string, sessionId: string): Promise<OpenStream> {
    return openSseStream(`${berth.url}/v1/sessions/${sessionId}/events/stream`, key);
  }

  /** Opens a stream with `key` and proves it delivers events before anything is revoked. */
  async function openLiveStream(key: string, sessionId: string, marker: string) {
    const stream = await openStream(key, sessionId);
    await json(
      await request(berth.apiKey, 'POST', `/v1/sessions/${sessionId}/events`, {
        events: [{ type: 'user.message', content: [{ type: 'text', text: marker }] }],
      }),
    );
    await stream.waitForText(marker);
    return stream;
  }

  /**
   * Calls every API route with the key (path ids filled with real ones it could reach before)
   * and returns the routes that did not answer 401 authentication_error.
   */
  async function routesStillOpenTo(key: string, ids: { sessionId: string; userId: string; keyId: string }) {
    const byPrefix: Record<string, string> = {
      '/v1/sessions/': ids.sessionId,
      '/v1/agents/': agentId,
      '/v1/environments/': environmentId,
      '/v1/users/': ids.userId,
      '/v1/api_keys/': ids.keyId,
    };
    const open: string[] = [];
    const routes = berth.routes.filter((route) => route.path.startsWith('/v1/'));
    expect(routes.length).toBeGreaterThan(25);
    await Promise.all(
      routes.map(async (route) => {
        const prefix = Object.keys(byPrefix).find((candidate) => route.path.startsWith(candidate));
        const path = prefix ? route.path.replace(':id', byPrefix[prefix]!) : route.path;
        const response = await request(key, route.method, path, route.method === 'GET' ? undefined : {});
        const body = (await response.json().catch(() => undefined)) as
          | { error?: { type?: string } }
          | undefined;
        if (response.status !== 401 || body?.error?.type !== 'authentication_error')
          open.push(`${route.method} ${path} -> ${response.status}`);
      }),
    );
    return open;
  }

  beforeAll(async () => {
    berth = await startTestBerth();
    agentId = (await berth.client.beta.agents.create({ name: 'revocation', model: 'scripted/echo' })).id;
    environmentId = (await berth.client.beta.environments.create({ name: 'revocation' })).id;
  });
  afterAll(async () => berth?.dispose());

  it('closes an open stream within a second of revocation and answers 401 on every path afterwards', async () => {
    const member = await newMember(berth.apiKey, 'revoked-member');
    const sessionId = await newSession(member.key);
    expect((await request(member.key, 'GET', '/v1/me')).status).toBe(200);
    const stream = await openLiveStream(member.key, sessionId, 'before revocation');

    const revokedAt = Date.now();
    const revoked = await json<{ revoked_at: string | null }>(
      await request(berth.apiKey, 'POST', `/v1/api_keys/${member.id}/revoke`),
    );
    expect(revoked.revoked_at).not.toBeNull();
    const endedAt = await stream.endedWithin(1_000);
    await stream.cancel();
    expect(endedAt, 'the stream stayed open after revocation').toBeDefined();
    console.log(`stream closed ${endedAt! - revokedAt} ms after the revoke request was sent`);

    expect(
      await routesStillOpenTo(member.key, { sessionId, userId: member.userId, keyId: member.id }),
    ).toEqual([]);
    // Nothing the revoked key tried was written; the admin still sees the session as it was.
    const events = await json<{ data: { type: string }[] }>(
      await request(berth.apiKey, 'GET', `/v1/sessions/${sessionId}/events?limit=1000`),
    );
    expect(events.data.filter((event) => event.type === 'user.message')).toHaveLength(1);
    expect((await request(berth.apiKey, 'GET', `/v1/sessions/${sessionId}`)).status).toBe(200);
  });

  it('closes an open stream within a second of expiry and answers 401 on every path afterwards', async () => {
    const member = await newMember(berth.apiKey, 'expiring-member', { expires_in_seconds: 2 });
    expect(member.expires_at).not.toBeNull();
    const expiresAt = Date.parse(member.expires_at!);
    const sessionId = await newSession(member.key);
    expect((await request(member.key, 'GET', `/v1/sessions/${sessionId}`)).status).toBe(200);
    const stream = await openLiveStream(member.key, sessionId, 'before expiry');

    const endedAt = await stream.endedWithin(expiresAt - Date.now() + 1_000);
    await stream.cancel();
    expect(endedAt, 'the stream stayed open after expiry').toBeDefined();
    console.log(`stream closed ${endedAt! - expiresAt} ms after the key's expiry`);
    expect(endedAt!).toBeGreaterThanOrEqual(expiresAt - 50);
    expect(endedAt! - expiresAt).toBeLessThan(1_000);

    expect(
      await routesStillOpenTo(member.key, { sessionId, userId: member.userId, keyId: member.id }),
    ).toEqual([]);
  });

  it("lets a member revoke their own key and answers 404 for another user's key", async () => {
    const alice = await newMember(berth.apiKey, 'alice');
    const bob = await newMember(berth.apiKey, 'bob');

    const refused = await request(alice.key, 'POST', `/v1/api_keys/${bob.id}/revoke`);
    expect(refused.status).toBe(404);
    expect(((await refused.json()) as { error: { type: string } }).error.type).toBe('not_found_error');
    expect((await request(bob.key, 'GET', '/v1/me')).status).toBe(200);

    const spare = await json<IssuedKey>(await request(alice.key, 'POST', '/v1/api_keys', { name: 'spare' }));
    await json(await request(alice.key, 'POST', `/v1/api_keys/${spare.id}/revoke`));
    expect((await request(spare.key, 'GET', '/v1/me')).status).toBe(401);
    // Revoking one's own key in use works too; the next request with it is refused.
    await json(await request(alice.key, 'POST', `/v1/api_keys/${alice.id}/revoke`));
    expect((await request(alice.key, 'GET', '/v1/me')).status).toBe(401);
    expect((await request(bob.key, 'GET', '/v1/me')).status).toBe(200);
  });

  it("answers 404 to another tenant's admin revoking a key, and the key keeps working", async () => {
    const other = await createTenantWithAdmin(berth.store.resources, { name: 'revocation-other' });
    const member = await newMember(berth.apiKey, 'carol');
    const sessionId = await newSession(member.key);
    const stream = await openLiveStream(member.key, sessionId, 'still here');

    const refused = await request(other.key, 'POST', `/v1/api_keys/${member.id}/revoke`);
    expect(refused.status).toBe(404);
    expect(((await refused.json()) as { error: { type: string } }).error.type).toBe('not_found_error');
    expect((await request(other.key, 'GET', `/v1/api_keys/${member.id}`)).status).toBe(404);

    expect(await stream.endedWithin(300)).toBeUndefined();
    await stream.cancel();
    expect((await request(member.key, 'GET', `/v1/sessions/${sessionId}`)).status).toBe(200);
    const key = await json<{ revoked_at: string | null }>(
      await request(berth.apiKey, 'GET', `/v1/api_keys/${member.id}`),
    );
    expect(key.revoked_at).toBeNull();
  });

  it('revokes at once through `berth keys revoke`, closing the open stream', async () => {
    const member = await newMember(berth.apiKey, 'cli-member');
    const sessionId = await newSession(member.key);
    const stream = await openLiveStream(member.key, sessionId, 'before the cli');

    const result = await berthCli([
      'keys',
      'revoke',
      member.id,
      '--url',
      berth.url,
      '--api-key',
      berth.apiKey,
    ]);
    expect(result.code, result.stderr).toBe(0);
    expect(result.stderr).toContain(`Revoked ${member.id}`);
    const endedAt = await stream.endedWithin(1_000);
    await stream.cancel();
    expect(endedAt, 'the stream stayed open after `berth keys revoke`').toBeDefined();
    expect((await request(member.key, 'GET', '/v1/me')).status).toBe(401);
    expect((await request(member.key, 'GET', `/v1/sessions/${sessionId}/events/stream`)).status).toBe(401);
  });

  it("applies a role change at once: a demoted admin's admin routes and admin-opened streams are gone", async () => {
    const member = await newMember(berth.apiKey, 'watched');
    const memberSession = await newSession(member.key);
    const user = await json<{ id: string }>(
      await request(berth.apiKey, 'POST', '/v1/users', { name: 'demoted-admin', role: 'admin' }),
    );
    const key = await json<IssuedKey>(
      await request(berth.apiKey, 'POST', '/v1/api_keys', { name: 'demoted', user_id: user.id }),
    );
    expect((await request(key.key, 'GET', '/v1/users')).status).toBe(200);
    const stream = await openLiveStream(key.key, memberSession, 'watched by an admin');

    // Members may not change roles (403, they see themselves); admins not their own (400).
    const byMember = await request(member.key, 'POST', `/v1/users/${member.userId}`, { role: 'admin' });
    expect(byMember.status).toBe(403);
    expect(((await byMember.json()) as { error: { type: string } }).error.type).toBe('permission_error');
    const own = await request(key.key, 'POST', `/v1/users/${user.id}`, { role: 'member' });
    expect(own.status).toBe(400);
    expect(((await own.json()) as { error: { type: string } }).error.type).toBe('invalid_request_error');
    const bad = await request(berth.apiKey, 'POST', `/v1/users/${user.id}`, { role: 'owner' });
    expect(bad.status).toBe(400);

    const changed = await json<{ role: string }>(
      await request(berth.apiKey, 'POST', `/v1/users/${user.id}`, { role: 'member' }),
    );
    const answeredAt = Date.now();
    expect(changed.role).toBe('member');
    expect((await request(key.key, 'GET', '/v1/users')).status).toBe(403);
    expect((await request(key.key, 'GET', `/v1/sessions/${memberSession}`)).status).toBe(404);
    const endedAt = await stream.endedWithin(1_000);
    await stream.cancel();
    expect(endedAt, 'the admin-opened stream stayed open after the demotion').toBeDefined();
    console.log(`stream closed ${endedAt! - answeredAt} ms after the role change's answer`);
    expect(
      (await json<{ role: string }>(await request(berth.apiKey, 'GET', `/v1/users/${user.id}`))).role,
    ).toBe('member');
  });
});
