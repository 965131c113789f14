import { resolve } from 'node:path';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { berthCli } from './support/berth-cli.js';
import { startTestBerth, type TestBerth } from './support/berth-instance.js';
import { findFreePort } from './support/berth-process.js';
import { createTestDatabase } from './support/postgres-database.js';

const _root = resolve(import.meta.dirname, '..');

let berth: TestBerth;

beforeAll(async () => {
  berth = await startTestBerth();
});

afterAll(async () => {
  await berth?.dispose();
});

/** Operators create tenants on the server's store; tenant admins manage users and keys over the API. */
describe('berth tenants, users and keys', () => {
  it('creates a tenant whose admin key works at once and sees nothing of other tenants', async () => {
    const created = await berthCli([
      'tenants',
      'create',
      'acme',
      '--live-sessions',
      '5',
      '--data-dir',
      berth.dataDir,
    ]);
    expect(created.code, created.stderr).toBe(0);
    const key = created.stdout.trim();
    expect(key).toMatch(/^berth_sk_/);
    expect(created.stderr).toMatch(/Created tenant acme \(tnt_\w+\)/);

    const me = await fetch(`${berth.url}/v1/me`, { headers: { 'x-api-key': key } });
    expect(me.status).toBe(200);
    expect(await me.json()).toMatchObject({ tenant: { name: 'acme' }, role: 'admin' });
    await berth.client.beta.agents.create({ name: 'default-tenant-agent', model: 'scripted/echo' });
    const agents = await fetch(`${berth.url}/v1/agents`, { headers: { 'x-api-key': key } });
    expect(((await agents.json()) as { data: unknown[] }).data).toEqual([]);

    const again = await berthCli(['tenants', 'create', 'acme', '--data-dir', berth.dataDir]);
    expect(again.code).not.toBe(0);
    expect(again.stderr).toMatch(/already exists/);
    const badName = await berthCli(['tenants', 'create', 'Not A Name', '--data-dir', berth.dataDir]);
    expect(badName.code).not.toBe(0);
    expect(badName.stderr).toMatch(/tenant name/);

    const listed = await berthCli(['tenants', 'list', '--json', '--data-dir', berth.dataDir]);
    const tenants = JSON.parse(listed.stdout) as { name: string; limits: unknown }[];
    expect(tenants.map((tenant) => tenant.name)).toEqual(['default', 'acme']);
    expect(tenants[1]!.limits).toEqual({ liveSessions: 5 });
  });

  it('lets an admin create a member with a key, list keys, and revoke one so it stops working', async () => {
    const options = ['--url', berth.url, '--api-key', berth.apiKey];
    const user = await berthCli(['users', 'create', 'carol', ...options]);
    expect(user.code, user.stderr).toBe(0);
    const carolKey = user.stdout.trim();
    expect(carolKey).toMatch(/^berth_sk_/);
    expect(user.stderr).toMatch(/Created member carol/);
    const me = (await (await fetch(`${berth.url}/v1/me`, { headers: { 'x-api-key': carolKey } })).json()) as {
      user: { id: string; name: string };
      role: string;
    };
    expect(me).toMatchObject({ user: { name: 'carol' }, role: 'member' });

    const usersList = await berthCli(['users', 'list', ...options]);
    expect(usersList.stdout).toMatch(/member\s+carol/);

    const second = await berthCli([
      'keys',
      'create',
      '--user',
      me.user.id,
      '--name',
      'ci',
      '--json',
      ...options,
    ]);
    const secondKey = JSON.parse(second.stdout) as { id: string; key: string; name: string };
    expect(secondKey.name).toBe('ci');
    const keys = JSON.parse(
      (await berthCli(['keys', 'list', '--user', me.user.id, '--json', ...options])).stdout,
    ) as {
      id: string;
      key?: string;
    }[];
    expect(keys).toHaveLength(2);
    // Listing never shows a key again.
    expect(keys.every((key) => key.key === undefined)).toBe(true);

    const revoked = await berthCli(['keys', 'revoke', secondKey.id, ...options]);
    expect(revoked.code, revoked.stderr).toBe(0);
    expect((await fetch(`${berth.url}/v1/me`, { headers: { 'x-api-key': secondKey.key } })).status).toBe(401);
    expect((await fetch(`${berth.url}/v1/me`, { headers: { 'x-api-key': carolKey } })).status).toBe(200);

    // A member cannot create users.
    const denied = await berthCli(['users', 'create', 'mallory', '--url', berth.url, '--api-key', carolKey]);
    expect(denied.code).not.toBe(0);
    expect(denied.stderr).toMatch(/admins/);
  });

  it("lets an admin change a user's role, which their key carries on its next request", async () => {
    const options = ['--url', berth.url, '--api-key', berth.apiKey];
    const call = async (key: string, method: string, path: string, body?: unknown) =>
      fetch(`${berth.url}${path}`, {
        method,
        headers: { 'x-api-key': key, 'content-type': 'application/json' },
        body: body === undefined ? undefined : JSON.stringify(body),
      });
    const user = (await (await call(berth.apiKey, 'POST', '/v1/users', { name: 'dave' })).json()) as {
      id: string;
    };
    const { key } = (await (
      await call(berth.apiKey, 'POST', '/v1/api_keys', { name: 'dave', user_id: user.id })
    ).json()) as { key: string };
    expect((await call(key, 'GET', '/v1/users')).status).toBe(403);

    const promoted = await berthCli(['users', 'set-role', user.id, 'admin', ...options]);
    expect(promoted.code, promoted.stderr).toBe(0);
    expect(promoted.stderr).toContain('dave');
    expect((await call(key, 'GET', '/v1/users')).status).toBe(200);
    const invalid = await berthCli(['users', 'set-role', user.id, 'owner', ...options]);
    expect(invalid.code).not.toBe(0);
  });
});

/**
 * Operators run `berth tenants` against PostgreSQL with the app role's URL, the one the servers
 * use. That role may not change the schema, so the command must not try; when a migration is
 * needed it says what to set instead of printing PostgreSQL's `permission denied` stack.
 */
describe('berth tenants on PostgreSQL as the app role', () => {
  it('says to set BERTH_DATABASE_MIGRATION_URL when the schema is missing, and works once migrated', async () => {
    const database = await createTestDatabase(inject('postgresUrl'));
    const app = ['--database', database.url, '--data-dir', berth.dataDir];

    const refused = await berthCli(['tenants', 'list', ...app]);
    expect(refused.code).not.toBe(0);
    expect(refused.stderr).toMatch(
      /^berth: the database has no Berth schema "berth" yet: set BERTH_DATABASE_MIGRATION_URL/,
    );
    expect(refused.stderr).not.toMatch(/permission denied|\n\s+at /);

    // A server given only the app role cannot migrate either, and says what to set.
    const serve = await berthCli(['serve', '--port', '0', ...app]);
    expect(serve.code).not.toBe(0);
    expect(serve.stderr).toMatch(/^berth: role berth_app may not migrate the database \(permission denied/m);
    expect(serve.stderr).toMatch(/set BERTH_DATABASE_MIGRATION_URL/);

    // Told how, the command migrates as the owner; afterwards the app role alone is enough.
    const created = await berthCli(['tenants', 'create', 'globex', ...app], undefined, {
      BERTH_DATABASE_MIGRATION_URL: database.migrationUrl,
    });
    expect(created.code, created.stderr).toBe(0);
    expect(created.stdout.trim()).toMatch(/^berth_sk_/);
    const listed = await berthCli(['tenants', 'list', '--json', ...app]);
    expect(listed.code, listed.stderr).toBe(0);
    expect((JSON.parse(listed.stdout) as { name: string }[]).map((tenant) => tenant.name)).toEqual([
      'globex',
    ]);
    const second = await berthCli(['tenants', 'create', 'initech', ...app]);
    expect(second.code, second.stderr).toBe(0);
  }, 240_000);
});

describe('a client command that cannot reach its server', () => {
  it('names the URL it tried and why it failed', async () => {
    const url = `http://127.0.0.1:${await findFreePort()}`;
    const result = await berthCli(['sessions', 'list', '--url', url, '--api-key', 'berth_sk_unused']);
    expect(result.code).not.toBe(0);
    expect(result.stderr.trim()).toBe(
      `berth: could not reach the Berth server at ${url}: connection refused: is \`berth serve\` running there? (ECONNREFUSED)`,
    );
    expect(result.stderr).not.toMatch(/undefined/);
  }, 120_000);
});
