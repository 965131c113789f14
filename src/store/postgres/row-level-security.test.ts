import { randomBytes } from 'node:crypto';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { TEST_APP_ROLE, TEST_OWNER_ROLE, testRoleUrls } from '../../../test/support/postgres-database.js';
import { openStore } from '../open-store.js';
import type { Store } from '../resource-store.js';
import { TENANT_TABLES } from './schema.js';

/**
 * Row-level security as the second wall between tenants, checked against a real PostgreSQL as
 * Berth's application role. Every per-table isolation check is paired with a proof: with that
 * table's `tenant_isolation` policy replaced by a permissive one, the same check fails.
 */

const serverUrl = inject('postgresUrl');
const { url: appUrl, migrationUrl: ownerUrl } = testRoleUrls(serverUrl);
const CREATED_AT = '2026-01-01T00:00:00.000Z';

/** What the store puts in every tenant table for one tenant. */
interface SeededTenant {
  tenantId: string;
  name: string;
  userId: string;
  apiKeyId: string;
  apiKeyHash: string;
  agentId: string;
  environmentId: string;
  sessionId: string;
  vaultId: string;
  credentialId: string;
  skillId: string;
  skillVersion: string;
}

function seededTenant(letter: 'a' | 'b'): SeededTenant {
  return {
    tenantId: `tnt_rls_${letter}`,
    name: `rls-${letter}`,
    userId: `user_rls_${letter}`,
    apiKeyId: `key_rls_${letter}`,
    apiKeyHash: letter.repeat(64),
    agentId: `agent_rls_${letter}`,
    environmentId: `env_rls_${letter}`,
    sessionId: `sesn_rls_${letter}`,
    vaultId: `vlt_rls_${letter}`,
    credentialId: `vcrd_rls_${letter}`,
    skillId: `skill_rls_${letter}`,
    skillVersion: '1767225600000000',
  };
}

const TENANT_A = seededTenant('a');
const TENANT_B = seededTenant('b');

/** Stores one tenant's rows in every tenant table, through the store API only. */
async function seed(store: Store, tenant: SeededTenant): Promise<void> {
  const { resources } = store;
  const record = (id: string, body: Record<string, unknown>) => ({
    id,
    tenantId: tenant.tenantId,
    ownerId: tenant.userId,
    createdAt: CREATED_AT,
    updatedAt: CREATED_AT,
    archivedAt: null,
    body: { id, ...body },
  });
  await resources.createTenant({
    id: tenant.tenantId,
    name: tenant.name,
    createdAt: CREATED_AT,
    limits: null,
  });
  await resources.createUser({
    id: tenant.userId,
    tenantId: tenant.tenantId,
    name: `admin-${tenant.name}`,
    role: 'admin',
    createdAt: CREATED_AT,
  });
  await resources.createApiKey({
    id: tenant.apiKeyId,
    tenantId: tenant.tenantId,
    userId: tenant.userId,
    hash: tenant.apiKeyHash,
    name: 'ci',
    createdAt: CREATED_AT,
    expiresAt: null,
    revokedAt: null,
  });
  await resources.createAgent(record(tenant.agentId, { name: 'helper', version: 1 }));
  await resources.insert('environment', record(tenant.environmentId, { name: 'sandbox' }));
  await resources.createSession({
    ...record(tenant.sessionId, { type: 'session', metadata: {} }),
    agentId: tenant.agentId,
    agentVersion: 1,
    environmentId: tenant.environmentId,
    status: 'idle',
    stopReason: null,
    lastSeq: 0,
  });
  await store.events.append(
    { tenantId: tenant.tenantId, id: tenant.sessionId },
    [{ type: 'user.message', content: [{ type: 'text', text: 'hello' }] }],
    { idempotencyKey: 'first-message' },
  );
  await store.vaults.createVault(record(tenant.vaultId, { type: 'vault', display_name: 'keys' }));
  await store.vaults.createCredential({
    ...record(tenant.credentialId, { type: 'vault_credential' }),
    vaultId: tenant.vaultId,
    secret: { keyId: 'rls', sealed: 'v1.rls.sealed' },
  });
  await store.skills.createSkill(record(tenant.skillId, { type: 'skill', display_title: 'rls' }), {
    tenantId: tenant.tenantId,
    skillId: tenant.skillId,
    version: tenant.skillVersion,
    createdAt: CREATED_AT,
    body: { type: 'skill_version', skill_id: tenant.skillId, version: tenant.skillVersion },
    archive: Buffer.from(`skill of ${tenant.name}`),
  });
  await store.snapshotArchives!.put(
    { tenantId: tenant.tenantId, id: tenant.sessionId },
    { createdAt: CREATED_AT, info: { driver: 'bwrap' }, archive: Buffer.from(`files of ${tenant.name}`) },
  );
}

interface Statement {
  sql: string;
  parameters: unknown[];
}

/**
 * For each tenant table: an INSERT of a row claiming a tenant other than `own`, valid in every
 * other way (its foreign keys and unique columns are satisfied), so only row-level security can
 * refuse it; `before` inserts any row of `own` it needs first.
 */
function foreignInsert(
  s: string,
  table: string,
  own: SeededTenant,
  other: SeededTenant,
): { before?: Statement; insert: Statement } {
  const record = `owner_id, created_at, updated_at, body`;
  const recordValues = [other.userId, CREATED_AT, CREATED_AT, '{}'];
  switch (table) {
    case 'tenants':
      return {
        insert: {
          sql: `INSERT INTO ${s}.tenants (id, name, created_at) VALUES ($1, $2, $3)`,
          parameters: ['tnt_rls_intruder', 'rls-intruder', CREATED_AT],
        },
      };
    case 'users':
      return {
        insert: {
          sql: `INSERT INTO ${s}.users (id, tenant_id, name, role, created_at) VALUES ($1, $2, $3, $4, $5)`,
          parameters: ['user_rls_intruder', other.tenantId, 'intruder', 'admin', CREATED_AT],
        },
      };
    case 'api_keys':
      return {
        insert: {
          sql: `INSERT INTO ${s}.api_keys (id, tenant_id, user_id, hash, name, created_at) VALUES ($1, $2, $3, $4, $5, $6)`,
          parameters: [
            'key_rls_intruder',
            other.tenantId,
            other.userId,
            'f'.repeat(64),
            'intruder',
            CREATED_AT,
          ],
        },
      };
    case 'agents':
      return {
        insert: {
          sql: `INSERT INTO ${s}.agents (id, tenant_id, latest_version, ${record}) VALUES ($1, $2, 1, $3, $4, $5, $6)`,
          parameters: ['agent_rls_intruder', other.tenantId, ...recordValues],
        },
      };
    case 'agent_versions':
      return {
        insert: {
          sql: `INSERT INTO ${s}.agent_versions (agent_id, version, tenant_id, ${record}) VALUES ($1, 99, $2, $3, $4, $5, $6)`,
          parameters: [other.agentId, other.tenantId, ...recordValues],
        },
      };
    case 'environments':
      return {
        insert: {
          sql: `INSERT INTO ${s}.environments (id, tenant_id, ${record}) VALUES ($1, $2, $3, $4, $5, $6)`,
          parameters: ['env_rls_intruder', other.tenantId, ...recordValues],
        },
      };
    case 'sessions':
      return {
        insert: {
          sql: `INSERT INTO ${s}.sessions (id, tenant_id, agent_id, agent_version, environment_id, ${record})
                VALUES ($1, $2, $3, 1, $4, $5, $6, $7, $8)`,
          parameters: [
            'sesn_rls_intruder',
            other.tenantId,
            other.agentId,
            other.environmentId,
            ...recordValues,
          ],
        },
      };
    case 'session_heads':
      // Every seeded session has its head already: add a headless session of our own first.
      return {
        before: {
          sql: `INSERT INTO ${s}.sessions (id, tenant_id, agent_id, agent_version, environment_id, ${record})
                VALUES ($1, $2, $3, 1, $4, $5, $6, $7, $8)`,
          parameters: [
            'sesn_rls_headless',
            own.tenantId,
            own.agentId,
            own.environmentId,
            own.userId,
            CREATED_AT,
            CREATED_AT,
            '{}',
          ],
        },
        insert: {
          sql: `INSERT INTO ${s}.session_heads (session_id, tenant_id, status, updated_at) VALUES ($1, $2, 'idle', $3)`,
          parameters: ['sesn_rls_headless', other.tenantId, CREATED_AT],
        },
      };
    case 'events':
      return {
        insert: {
          sql: `INSERT INTO ${s}.events (session_id, tenant_id, seq, id, type, processed_at, body)
                VALUES ($1, $2, 99, $3, 'user.message', $4, '{}')`,
          parameters: [other.sessionId, other.tenantId, 'sevt_rls_intruder', CREATED_AT],
        },
      };
    case 'idempotency_keys':
      return {
        insert: {
          sql: `INSERT INTO ${s}.idempotency_keys (session_id, tenant_id, key, first_seq, count) VALUES ($1, $2, $3, 99, 1)`,
          parameters: [other.sessionId, other.tenantId, 'intruder-key'],
        },
      };
    case 'vaults':
      return {
        insert: {
          sql: `INSERT INTO ${s}.vaults (id, tenant_id, ${record}) VALUES ($1, $2, $3, $4, $5, $6)`,
          parameters: ['vlt_rls_intruder', other.tenantId, ...recordValues],
        },
      };
    case 'vault_credentials':
      return {
        insert: {
          sql: `INSERT INTO ${s}.vault_credentials (id, tenant_id, vault_id, key_id, sealed_secret, ${record})
                VALUES ($1, $2, $3, 'rls', 'v1.rls.intruder', $4, $5, $6, $7)`,
          parameters: ['vcrd_rls_intruder', other.tenantId, other.vaultId, ...recordValues],
        },
      };
    case 'sandbox_snapshots':
      return {
        insert: {
          sql: `INSERT INTO ${s}.sandbox_snapshots (tenant_id, session_id, created_at, info, archive)
                VALUES ($1, $2, $3, '{}', '\\x00')`,
          parameters: [other.tenantId, 'sesn_rls_intruder', CREATED_AT],
        },
      };
    case 'skills':
      return {
        insert: {
          sql: `INSERT INTO ${s}.skills (id, tenant_id, ${record}) VALUES ($1, $2, $3, $4, $5, $6)`,
          parameters: ['skill_rls_intruder', other.tenantId, ...recordValues],
        },
      };
    case 'skill_versions':
      // A version id the other tenant's skill does not have yet, so only the tenant is wrong.
      return {
        insert: {
          sql: `INSERT INTO ${s}.skill_versions (tenant_id, skill_id, version, created_at, body, archive)
                VALUES ($1, $2, '1767225600000099', $3, '{}', '\\x00')`,
          parameters: [other.tenantId, other.skillId, CREATED_AT],
        },
      };
    default:
      throw new Error(`no foreign insert written for tenant table ${table}; add one`);
  }
}

/** The parts of the isolation check; each names a way one tenant could reach another's rows. */
const ISOLATION_STEPS = [
  'reads rows with no tenant set',
  "reads the other tenant's rows",
  "updates the other tenant's rows",
  "deletes the other tenant's rows",
  'inserts a row for another tenant',
  'moves its own rows to another tenant',
] as const;

type IsolationStep = (typeof ISOLATION_STEPS)[number];

interface Violation {
  step: IsolationStep;
  detail: string;
}

/** Violations as readable lines, for assertion messages. */
function described(violations: readonly Violation[]): string[] {
  return violations.map((violation) => `${violation.step}: ${violation.detail}`);
}

/** How a statement ended: the rows it touched, or the SQLSTATE it failed with. */
type Outcome = { rowCount: number } | { errorCode: string };

const ROW_SECURITY_VIOLATION = '42501';

/**
 * Runs the isolation check of one table as the app role on `app` and returns every way tenant A
 * reached tenant B's rows (none when the table's policy holds). Changes are rolled back.
 */
async function isolationViolations(
  app: pg.Client,
  s: string,
  table: string,
  column: string,
): Promise<Violation[]> {
  const violations: Violation[] = [];
  const own = TENANT_A;
  const other = TENANT_B;

  /** One statement in a savepoint, so a refused one leaves the transaction usable. */
  async function attempt(statement: Statement): Promise<Outcome> {
    await app.query('SAVEPOINT isolation_step');
    try {
      const result = await app.query(statement.sql, statement.parameters);
      await app.query('RELEASE SAVEPOINT isolation_step');
      return { rowCount: result.rowCount ?? 0 };
    } catch (error) {
      await app.query('ROLLBACK TO SAVEPOINT isolation_step');
      return { errorCode: String((error as { code?: unknown }).code ?? error) };
    }
  }
  function expectNoRows(step: IsolationStep, outcome: Outcome): void {
    if ('errorCode' in outcome)
      violations.push({ step, detail: `reached them and failed with ${outcome.errorCode}` });
    else if (outcome.rowCount > 0) violations.push({ step, detail: `${outcome.rowCount} rows` });
  }
  function expectRefused(step: IsolationStep, outcome: Outcome): void {
    if ('rowCount' in outcome) violations.push({ step, detail: `accepted (${outcome.rowCount} rows)` });
    else if (outcome.errorCode !== ROW_SECURITY_VIOLATION) {
      violations.push({ step, detail: `not refused by row-level security but by ${outcome.errorCode}` });
    }
  }

  await app.query('BEGIN');
  try {
    const unscoped = await app.query<{ rows: number }>(`SELECT count(*)::int AS rows FROM ${s}.${table}`);
    if (unscoped.rows[0]!.rows > 0) {
      violations.push({ step: 'reads rows with no tenant set', detail: `${unscoped.rows[0]!.rows} rows` });
    }
  } finally {
    await app.query('ROLLBACK');
  }

  await app.query('BEGIN');
  try {
    await app.query(`SELECT set_config('berth.tenant_id', $1, true)`, [own.tenantId]);
    const seen = await app.query<{ own: number; other: number }>(
      `SELECT count(*) FILTER (WHERE ${column} = $1)::int AS own,
              count(*) FILTER (WHERE ${column} IS DISTINCT FROM $1)::int AS other
       FROM ${s}.${table}`,
      [own.tenantId],
    );
    // Not a leak, but a check that sees nothing at all would prove nothing.
    if (seen.rows[0]!.own === 0) throw new Error(`tenant A sees none of its own ${table} rows`);
    if (seen.rows[0]!.other > 0) {
      violations.push({ step: "reads the other tenant's rows", detail: `${seen.rows[0]!.other} rows` });
    }
    expectNoRows(
      "updates the other tenant's rows",
      await attempt({
        sql: `UPDATE ${s}.${table} SET ${column} = ${column} WHERE ${column} = $1`,
        parameters: [other.tenantId],
      }),
    );
    expectNoRows(
      "deletes the other tenant's rows",
      await attempt({ sql: `DELETE FROM ${s}.${table} WHERE ${column} = $1`, parameters: [other.tenantId] }),
    );
    const { before, insert } = foreignInsert(s, table, own, other);
    if (before !== undefined) {
      const prepared = await attempt(before);
      if ('errorCode' in prepared)
        throw new Error(`preparing the ${table} insert failed: ${prepared.errorCode}`);
    }
    expectRefused('inserts a row for another tenant', await attempt(insert));
    expectRefused(
      'moves its own rows to another tenant',
      await attempt({
        sql: `UPDATE ${s}.${table} SET ${column} = $1 WHERE ${column} = $2`,
        // A tenant's own row cannot take another tenant's id: it takes a new one.
        parameters: [table === 'tenants' ? 'tnt_rls_moved' : other.tenantId, own.tenantId],
      }),
    );
  } finally {
    await app.query('ROLLBACK');
  }
  return violations;
}

/** Creates a fresh schema name and remembers it for cleanup. */
const createdSchemas: string[] = [];
function freshSchema(): string {
  const schema = `berth_rls_${randomBytes(6).toString('hex')}`;
  createdSchemas.push(schema);
  return schema;
}

/** Everything a test opens, closed in afterAll. */
const openedStores: Store[] = [];
const openedClients: pg.Client[] = [];

async function connect(connectionString: string): Promise<pg.Client> {
  const client = new pg.Client({ connectionString });
  await client.connect();
  openedClients.push(client);
  return client;
}

async function open(options: {
  url: string;
  migrationUrl?: string;
  schema: string;
  maxConnections?: number;
}) {
  const store = await openStore({ kind: 'postgres', ...options });
  openedStores.push(store);
  return store;
}

const schema = freshSchema();
const s = `"${schema}"`;
let store: Store;
let superuser: pg.Client;
let owner: pg.Client;
let app: pg.Client;

beforeAll(async () => {
  superuser = await connect(serverUrl);
  owner = await connect(ownerUrl);
  app = await connect(appUrl);
  store = await open({ url: appUrl, migrationUrl: ownerUrl, schema, maxConnections: 4 });
  await seed(store, TENANT_A);
  await seed(store, TENANT_B);
});

afterAll(async () => {
  for (const opened of openedStores) await opened.close();
  for (const schemaName of createdSchemas)
    await superuser?.query(`DROP SCHEMA IF EXISTS "${schemaName}" CASCADE`);
  for (const client of openedClients) await client.end();
});

describe('PostgreSQL row-level security', () => {
  it('the store put rows of both tenants in every tenant table', async () => {
    for (const [table, column] of TENANT_TABLES) {
      const counts = await superuser.query<{ tenant: string; rows: number }>(
        `SELECT ${column} AS tenant, count(*)::int AS rows FROM ${s}.${table} GROUP BY 1 ORDER BY 1`,
      );
      expect(
        counts.rows.map((row) => row.tenant),
        table,
      ).toEqual([TENANT_A.tenantId, TENANT_B.tenantId]);
    }
  });

  describe('roles', () => {
    it('the app role is not a superuser, not BYPASSRLS, and owns nothing in the schema', async () => {
      const role = await app.query<{ name: string; superuser: boolean; bypass: boolean }>(
        `SELECT current_user AS name, rolsuper AS superuser, rolbypassrls AS bypass
         FROM pg_catalog.pg_roles WHERE rolname = current_user`,
      );
      expect(role.rows).toEqual([{ name: TEST_APP_ROLE, superuser: false, bypass: false }]);

      const relations = await app.query<{
        name: string;
        owner: string;
        ownedByApp: boolean;
        actsAsOwner: boolean;
      }>(
        `SELECT c.relname AS name, pg_catalog.pg_get_userbyid(c.relowner) AS owner,
                c.relowner = (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = current_user) AS "ownedByApp",
                pg_catalog.pg_has_role(current_user, c.relowner, 'USAGE') AS "actsAsOwner"
         FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = $1`,
        [schema],
      );
      // Not vacuous: every tenant table is there, and all of it belongs to the owner role.
      expect(relations.rows.map((row) => row.name)).toEqual(
        expect.arrayContaining(TENANT_TABLES.map(([table]) => table)),
      );
      for (const relation of relations.rows) {
        expect(relation, relation.name).toMatchObject({
          owner: TEST_OWNER_ROLE,
          ownedByApp: false,
          actsAsOwner: false,
        });
      }
      const functions = await app.query<{ name: string; owner: string }>(
        `SELECT p.proname AS name, pg_catalog.pg_get_userbyid(p.proowner) AS owner
         FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
         WHERE n.nspname = $1`,
        [schema],
      );
      expect(functions.rows.length).toBeGreaterThan(0);
      expect(new Set(functions.rows.map((row) => row.owner))).toEqual(new Set([TEST_OWNER_ROLE]));
      const namespace = await app.query<{ owner: string }>(
        `SELECT pg_catalog.pg_get_userbyid(nspowner) AS owner FROM pg_catalog.pg_namespace WHERE nspname = $1`,
        [schema],
      );
      expect(namespace.rows).toEqual([{ owner: TEST_OWNER_ROLE }]);
    });

    it('every tenant table has row-level security enabled and forced', async () => {
      const tables = await app.query<{ name: string; enabled: boolean; forced: boolean }>(
        `SELECT c.relname AS name, c.relrowsecurity AS enabled, c.relforcerowsecurity AS forced
         FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = $1 AND c.relname = ANY($2::text[]) ORDER BY c.relname`,
        [schema, TENANT_TABLES.map(([table]) => table)],
      );
      expect(tables.rows).toEqual(
        TENANT_TABLES.map(([table]) => ({ name: table, enabled: true, forced: true })).sort((left, right) =>
          left.name < right.name ? -1 : 1,
        ),
      );
    });

    it('a store connected as the app role with a separate migration role reports row-level security enforced', () => {
      expect(store.rowLevelSecurity).toEqual({ enforced: true });
    });

    it('a store connected as the owner of the tables reports row-level security not enforced, naming ownership', async () => {
      const asOwner = await open({ url: ownerUrl, schema: freshSchema() });
      expect(asOwner.rowLevelSecurity.enforced).toBe(false);
      expect(asOwner.rowLevelSecurity.reason).toMatch(/owns the tables/);
    });

    it('a store connected as a member of the owner role reports row-level security not enforced', async () => {
      const member = `berth_member_${randomBytes(4).toString('hex')}`;
      await superuser.query(`CREATE ROLE ${member} LOGIN NOSUPERUSER NOBYPASSRLS IN ROLE ${TEST_OWNER_ROLE}`);
      try {
        const url = new URL(appUrl);
        url.username = member;
        const asMember = await open({ url: url.toString(), migrationUrl: ownerUrl, schema: freshSchema() });
        expect(asMember.rowLevelSecurity.enforced).toBe(false);
        expect(asMember.rowLevelSecurity.reason).toMatch(new RegExp(`member of ${TEST_OWNER_ROLE}`));
        await asMember.close();
      } finally {
        await superuser.query(`DROP OWNED BY ${member} CASCADE`).catch(() => undefined);
        await superuser.query(`DROP ROLE ${member}`);
      }
    });

    it('a store connected as a superuser reports row-level security not enforced', async () => {
      const asSuperuser = await open({ url: serverUrl, schema: freshSchema() });
      expect(asSuperuser.rowLevelSecurity.enforced).toBe(false);
      expect(asSuperuser.rowLevelSecurity.reason).toMatch(/superuser/);
    });
  });

  describe('tenant isolation', () => {
    it('with no tenant set, a fresh app connection sees no row of any tenant table', async () => {
      const fresh = await connect(appUrl);
      expect(
        (await fresh.query(`SELECT current_setting('berth.tenant_id', true) AS tenant`)).rows[0].tenant,
      ).toBeNull();
      for (const [table] of TENANT_TABLES) {
        const result = await fresh.query<{ rows: number }>(`SELECT count(*)::int AS rows FROM ${s}.${table}`);
        expect(result.rows[0]!.rows, table).toBe(0);
      }
    });

    for (const [table, column] of TENANT_TABLES) {
      it(`tenant A can neither see, change, delete nor create tenant B's ${table} rows`, async () => {
        expect(described(await isolationViolations(app, s, table, column))).toEqual([]);
      });

      it(`without its tenant_isolation policy, ${table} leaks across tenants in every way the check looks for`, async () => {
        const original = await owner.query<{ using: string; check: string }>(
          `SELECT qual AS using, with_check AS check FROM pg_catalog.pg_policies
           WHERE schemaname = $1 AND tablename = $2 AND policyname = 'tenant_isolation'`,
          [schema, table],
        );
        expect(original.rows).toHaveLength(1);
        const { using, check } = original.rows[0]!;
        await owner.query(
          `BEGIN;
           DROP POLICY tenant_isolation ON ${s}.${table};
           CREATE POLICY tenant_isolation ON ${s}.${table} USING (true) WITH CHECK (true);
           COMMIT`,
        );
        try {
          const violations = await isolationViolations(app, s, table, column);
          expect(
            violations.map((violation) => violation.step),
            described(violations).join('; '),
          ).toEqual([...ISOLATION_STEPS]);
        } finally {
          await owner.query(
            `BEGIN;
             DROP POLICY tenant_isolation ON ${s}.${table};
             CREATE POLICY tenant_isolation ON ${s}.${table} USING (${using}) WITH CHECK (${check});
             COMMIT`,
          );
        }
        // The restored policy isolates again, so later checks run against the real one.
        expect(described(await isolationViolations(app, s, table, column))).toEqual([]);
      });
    }
  });

  describe('tenant per transaction', () => {
    it('the tenant a transaction sets is gone once it commits or rolls back', async () => {
      const client = await connect(appUrl);
      const tenantNow = async () =>
        (await client.query(`SELECT current_setting('berth.tenant_id', true) AS tenant`)).rows[0].tenant;
      for (const end of ['COMMIT', 'ROLLBACK']) {
        // The statement the store opens every transaction with.
        await client.query(
          `BEGIN; SELECT set_config('berth.tenant_id', ${client.escapeLiteral(TENANT_A.tenantId)}, true)`,
        );
        expect(await tenantNow()).toBe(TENANT_A.tenantId);
        await client.query(end);
        expect(['', null], end).toContain(await tenantNow());
        const keys = await client.query<{ rows: number }>(`SELECT count(*)::int AS rows FROM ${s}.api_keys`);
        expect(keys.rows[0]!.rows, end).toBe(0);
      }
    });

    it("the store's pooled connection carries no tenant from one call to the next", async () => {
      const probeSchema = freshSchema();
      const probed = `"${probeSchema}"`;
      const single = await open({
        url: appUrl,
        migrationUrl: ownerUrl,
        schema: probeSchema,
        maxConnections: 1,
      });
      // A probe: the store calls count_api_keys outside any tenant transaction. Made to run with
      // the caller's rights, it counts only the keys the connection's current tenant may see.
      await owner.query(
        `CREATE OR REPLACE FUNCTION ${probed}.count_api_keys() RETURNS bigint
         LANGUAGE sql STABLE SECURITY INVOKER AS $f$ SELECT count(*) FROM ${probed}.api_keys $f$`,
      );
      const expectNoTenantLeft = async (after: string) =>
        expect(await single.resources.countApiKeys(), `after ${after}`).toBe(0);
      // One pooled connection: each store call runs on the same one as the call before it.
      await seed(single, TENANT_A);
      await expectNoTenantLeft('seeding');
      // The probe does see a tenant left on a connection.
      const leaky = await connect(appUrl);
      await leaky.query(`SELECT set_config('berth.tenant_id', $1, false)`, [TENANT_A.tenantId]);
      expect((await leaky.query(`SELECT ${probed}.count_api_keys()::int AS keys`)).rows[0].keys).toBe(1);

      const session = { tenantId: TENANT_A.tenantId, id: TENANT_A.sessionId };
      expect(await single.resources.getTenant(TENANT_A.tenantId)).toMatchObject({ id: TENANT_A.tenantId });
      await expectNoTenantLeft('getTenant');
      expect(await single.resources.getSession(TENANT_A.tenantId, TENANT_A.sessionId)).toMatchObject({
        id: TENANT_A.sessionId,
      });
      await expectNoTenantLeft('getSession');
      expect(await single.events.read(session)).toHaveLength(1);
      await expectNoTenantLeft('read');
      expect(
        (await single.events.append(session, [{ type: 'user.message', content: [] }])).events,
      ).toHaveLength(1);
      await expectNoTenantLeft('append');
      // A call that fails and rolls back leaves no tenant behind either.
      await expect(
        single.resources.createTenant({
          id: TENANT_A.tenantId,
          name: 'again',
          createdAt: CREATED_AT,
          limits: null,
        }),
      ).rejects.toThrow();
      await expectNoTenantLeft('a failed createTenant');
    });
  });

  describe('cross-tenant functions', () => {
    it("find_api_key returns only the key with the given hash, whatever the caller's tenant", async () => {
      const found = await app.query(`SELECT * FROM ${s}.find_api_key($1)`, [TENANT_B.apiKeyHash]);
      expect(found.rows).toEqual([
        expect.objectContaining({ id: TENANT_B.apiKeyId, tenant_id: TENANT_B.tenantId, role: 'admin' }),
      ]);
      expect((await app.query(`SELECT * FROM ${s}.find_api_key($1)`, ['0'.repeat(64)])).rows).toEqual([]);
      expect(await store.resources.findApiKeyByHash(TENANT_A.apiKeyHash)).toMatchObject({
        id: TENANT_A.apiKeyId,
        tenantId: TENANT_A.tenantId,
      });
    });

    it('sessions_in_status returns sessions of every tenant, with session columns only (no events)', async () => {
      const result = await app.query(`SELECT * FROM ${s}.sessions_in_status($1::text[])`, [['idle']]);
      expect(result.rows.map((row) => row.id).sort()).toEqual([TENANT_A.sessionId, TENANT_B.sessionId]);
      expect(result.fields.map((field) => field.name)).toEqual([
        'position',
        'id',
        'tenant_id',
        'owner_id',
        'created_at',
        'updated_at',
        'archived_at',
        'body',
        'agent_id',
        'agent_version',
        'environment_id',
        'status',
        'stop_reason',
        'last_seq',
      ]);
      expect(JSON.stringify(result.rows)).not.toContain('hello');
    });

    it('the cross-tenant functions (counts and lookups only) run as their owner with a fixed search path, and only granted roles may call them', async () => {
      const signatures = [
        `${s}.find_api_key(text)`,
        `${s}.count_api_keys()`,
        `${s}.sessions_in_status(text[])`,
        `${s}.list_tenants()`,
        `${s}.session_status_counts()`,
        `${s}.sessions_with_work(text, integer)`,
      ];
      // These six are the only functions that run with the owner's rights.
      const definers = await app.query<{ name: string }>(
        `SELECT p.proname AS name FROM pg_catalog.pg_proc p
         JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
         WHERE n.nspname = $1 AND p.prosecdef ORDER BY 1`,
        [schema],
      );
      expect(definers.rows.map((row) => row.name)).toEqual([
        'count_api_keys',
        'find_api_key',
        'list_tenants',
        'session_status_counts',
        'sessions_in_status',
        'sessions_with_work',
      ]);
      const stranger = `berth_rls_stranger_${randomBytes(6).toString('hex')}`;
      await superuser.query(`CREATE ROLE ${stranger} NOLOGIN`);
      try {
        for (const signature of signatures) {
          const privileges = await superuser.query<{
            stranger: boolean;
            app: boolean;
            definer: boolean;
            config: string[] | null;
          }>(
            `SELECT has_function_privilege($1, $3::regprocedure, 'EXECUTE') AS stranger,
                    has_function_privilege($2, $3::regprocedure, 'EXECUTE') AS app,
                    p.prosecdef AS definer, p.proconfig AS config
             FROM pg_catalog.pg_proc p WHERE p.oid = $3::regprocedure`,
            [stranger, TEST_APP_ROLE, signature],
          );
          expect(privileges.rows[0], signature).toEqual({
            stranger: false,
            app: true,
            definer: true,
            config: ['search_path=pg_catalog, pg_temp'],
          });
        }
      } finally {
        await superuser.query(`DROP ROLE ${stranger}`);
      }
    });
  });
});
