import { randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import pg from 'pg';
import { afterAll, describe, expect, inject, it } from 'vitest';
import { testRoleUrls } from '../../test/support/postgres-database.js';
import { openStore } from './open-store.js';
import { POSTGRES_MIGRATIONS, quoteSchemaName } from './postgres/schema.js';
import type { Store } from './resource-store.js';
import { SQLITE_MIGRATIONS } from './sqlite/schema.js';

/**
 * A database made by the foundation release (schema version 2: keys carried their own role,
 * no tenants or users) upgrades in place: its admin key becomes the admin of tenant `default`,
 * and its sessions keep working under their tenant.
 */
const KEY_HASH = 'f'.repeat(64);
const NOW = '2026-11-01T00:00:00.000Z';

async function expectUpgraded(store: Store) {
  expect(await store.resources.getTenant('tnt_default')).toMatchObject({ name: 'default' });
  expect(await store.resources.getUser('tnt_default', 'user_admin')).toMatchObject({
    name: 'admin',
    role: 'admin',
  });
  expect(await store.resources.findApiKeyByHash(KEY_HASH)).toMatchObject({
    tenantId: 'tnt_default',
    userId: 'user_admin',
    role: 'admin',
  });
  const session = { tenantId: 'tnt_default', id: 'sesn_old' };
  expect((await store.events.read(session)).map((stored) => stored.event.type)).toEqual(['user.message']);
  await store.events.append(session, [{ type: 'user.message', content: [] }]);
  expect(await store.events.headSeq(session)).toBe(2);
  expect(await store.events.read({ tenantId: 'tnt_other', id: 'sesn_old' })).toEqual([]);
}

const rows = {
  key: ['key_old', 'tnt_default', 'user_admin', 'admin', KEY_HASH, 'admin', NOW],
  session: ['sesn_old', 'tnt_default', 'user_admin', 'agent_x', 1, 'env_x', NOW, NOW, '{"id":"sesn_old"}'],
  event: ['sesn_old', 1, 'sevt_old', 'user.message', NOW, '{"id":"sevt_old","type":"user.message"}'],
};

describe('upgrading a foundation database', () => {
  const cleanups: (() => Promise<void>)[] = [];
  afterAll(async () => {
    for (const cleanup of cleanups) await cleanup();
  });

  it('makes the SQLite admin key the admin of tenant default', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'berth-upgrade-'));
    cleanups.push(() => rm(dir, { recursive: true, force: true }));
    const path = join(dir, 'berth.db');
    const database = new Database(path);
    database.exec('CREATE TABLE schema_version (version INTEGER NOT NULL)');
    for (const [index, migration] of SQLITE_MIGRATIONS.slice(0, 2).entries()) {
      database.exec(migration);
      database.prepare('INSERT INTO schema_version (version) VALUES (?)').run(index + 1);
    }
    database
      .prepare(
        'INSERT INTO api_keys (id, tenant_id, user_id, role, hash, name, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)',
      )
      .run(...rows.key);
    database
      .prepare(
        `INSERT INTO sessions (id, tenant_id, owner_id, agent_id, agent_version, environment_id, created_at, updated_at, body)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)`,
      )
      .run(...rows.session);
    database
      .prepare(
        "INSERT INTO session_heads (session_id, status, last_seq, updated_at) VALUES ('sesn_old', 'idle', 1, ?)",
      )
      .run(NOW);
    database
      .prepare('INSERT INTO events (session_id, seq, id, type, processed_at, body) VALUES (?, ?, ?, ?, ?, ?)')
      .run(...rows.event);
    database.close();

    const store = await openStore({ kind: 'sqlite', path });
    try {
      await expectUpgraded(store);
    } finally {
      await store.close();
    }
  });

  it('makes the PostgreSQL admin key the admin of tenant default, under row-level security', async () => {
    const serverUrl = inject('postgresUrl');
    const urls = testRoleUrls(serverUrl);
    const schema = `berth_upgrade_${randomBytes(4).toString('hex')}`;
    const s = quoteSchemaName(schema);
    const owner = new pg.Client({ connectionString: urls.migrationUrl });
    await owner.connect();
    cleanups.push(async () => {
      await owner.query(`DROP SCHEMA IF EXISTS ${s} CASCADE`);
      await owner.end();
    });
    await owner.query(`CREATE SCHEMA ${s}`);
    await owner.query(`CREATE TABLE ${s}.schema_version (version integer NOT NULL)`);
    for (const [index, migration] of POSTGRES_MIGRATIONS.slice(0, 2).entries()) {
      await owner.query(migration(s));
      await owner.query(`INSERT INTO ${s}.schema_version (version) VALUES ($1)`, [index + 1]);
    }
    await owner.query(
      `INSERT INTO ${s}.api_keys (id, tenant_id, user_id, role, hash, name, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)`,
      rows.key,
    );
    await owner.query(
      `INSERT INTO ${s}.sessions (id, tenant_id, owner_id, agent_id, agent_version, environment_id, created_at, updated_at, body)
       VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)`,
      rows.session,
    );
    await owner.query(
      `INSERT INTO ${s}.session_heads (session_id, status, last_seq, updated_at) VALUES ('sesn_old', 'idle', 1, $1)`,
      [NOW],
    );
    await owner.query(
      `INSERT INTO ${s}.events (session_id, seq, id, type, processed_at, body) VALUES ($1, $2, $3, $4, $5, $6)`,
      rows.event,
    );

    const store = await openStore({ kind: 'postgres', ...urls, schema });
    try {
      expect(store.rowLevelSecurity).toEqual({ enforced: true });
      await expectUpgraded(store);
    } finally {
      await store.close();
    }
  });
});
