import { randomBytes } from 'node:crypto';
import pg from 'pg';

/**
 * Roles every PostgreSQL test uses, as a production deployment would: `berth_owner` owns the
 * schema and runs migrations; `berth_app` is what Berth connects as, neither owner nor
 * superuser nor BYPASSRLS, so row-level security binds every test that touches PostgreSQL.
 */
export const TEST_OWNER_ROLE = 'berth_owner';
export const TEST_APP_ROLE = 'berth_app';

/** Creates the two test roles on the server (idempotent; run once by the global setup). */
export async function ensureTestRoles(serverUrl: string): Promise<void> {
  const client = new pg.Client({ connectionString: serverUrl });
  await client.connect();
  try {
    for (const [role, options] of [
      [TEST_OWNER_ROLE, 'LOGIN NOSUPERUSER NOBYPASSRLS'],
      [TEST_APP_ROLE, 'LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE'],
    ] as const) {
      const exists = await client.query('SELECT 1 FROM pg_roles WHERE rolname = $1', [role]);
      if (exists.rowCount === 0) await client.query(`CREATE ROLE ${role} ${options}`);
    }
    // The store contract suite puts each test's schema in the server's own database.
    const database = new URL(serverUrl).pathname.slice(1) || 'postgres';
    await client.query(`GRANT CREATE ON DATABASE ${client.escapeIdentifier(database)} TO ${TEST_OWNER_ROLE}`);
  } finally {
    await client.end();
  }
}

/** Where a test's Berth connects: the app role's URL and the owner's (for migrations). */
export interface TestDatabaseUrls {
  url: string;
  migrationUrl: string;
}

/** The app and owner URLs of a database on the test server (trust authentication). */
export function testRoleUrls(serverUrl: string, database?: string): TestDatabaseUrls {
  const withRole = (role: string) => {
    const url = new URL(serverUrl);
    url.username = role;
    url.password = '';
    if (database !== undefined) url.pathname = `/${database}`;
    return url.toString();
  };
  return { url: withRole(TEST_APP_ROLE), migrationUrl: withRole(TEST_OWNER_ROLE) };
}

/**
 * Creates a fresh, empty database owned by the owner role and returns its URLs, so a test
 * file can run a whole Berth on PostgreSQL without seeing other files' data.
 */
export async function createTestDatabase(serverUrl: string): Promise<TestDatabaseUrls> {
  const name = `berth_test_${randomBytes(6).toString('hex')}`;
  const client = new pg.Client({ connectionString: serverUrl });
  await client.connect();
  try {
    await client.query(`CREATE DATABASE ${name} OWNER ${TEST_OWNER_ROLE}`);
  } finally {
    await client.end();
  }
  return testRoleUrls(serverUrl, name);
}
