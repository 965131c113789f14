import { randomBytes } from 'node:crypto';
import pg from 'pg';

/**
 * Creates a fresh, empty database on the test PostgreSQL server and returns its URL, so a test
 * file can run a whole Berth on PostgreSQL without seeing other files' data.
 */
export async function createTestDatabase(serverUrl: string): Promise<string> {
  const name = `berth_test_${randomBytes(6).toString('hex')}`;
  const client = new pg.Client({ connectionString: serverUrl });
  await client.connect();
  try {
    await client.query(`CREATE DATABASE ${name}`);
  } finally {
    await client.end();
  }
  const url = new URL(serverUrl);
  url.pathname = `/${name}`;
  return url.toString();
}
