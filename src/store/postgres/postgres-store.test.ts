import { randomBytes } from 'node:crypto';
import pg from 'pg';
import { afterAll, beforeAll, inject } from 'vitest';
import { testRoleUrls } from '../../../test/support/postgres-database.js';
import { runStoreContract } from '../store-contract.test-suite.js';

const url = inject('postgresUrl');
/** One connection for creating and dropping each test's private schema. */
const admin = new pg.Client({ connectionString: url });

beforeAll(() => admin.connect());
afterAll(() => admin.end());

runStoreContract('postgres', async () => {
  const schema = `berth_test_${randomBytes(6).toString('hex')}`;
  return {
    options: { kind: 'postgres', ...testRoleUrls(url), schema, maxConnections: 4 },
    dispose: async () => {
      await admin.query(`DROP SCHEMA IF EXISTS "${schema}" CASCADE`);
    },
  };
});
