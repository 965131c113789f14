import type { TestProject } from 'vitest/node';
import { ensureTestRoles } from './postgres-database.js';
import { startPostgres } from './postgres-server.js';
import { missingInCi, requiredInCi } from './required-in-ci.js';

declare module 'vitest' {
  export interface ProvidedContext {
    /** Connection URL of the run's test PostgreSQL; each test file isolates itself in a schema. */
    postgresUrl: string;
  }
}

/**
 * Vitest global setup: one PostgreSQL for the whole run, stopped when the run ends. Without it
 * the run fails, naming PostgreSQL (in CI as the setup's fault).
 */
export default async function setup(project: TestProject): Promise<() => Promise<void>> {
  const postgres = await startPostgres().catch((error: unknown) => {
    const reason = error instanceof Error ? error.message : String(error);
    throw requiredInCi ? missingInCi('PostgreSQL', reason) : error;
  });
  await ensureTestRoles(postgres.url).catch(async (error: unknown) => {
    await postgres.stop();
    const reason = `cannot prepare the test roles at ${postgres.url}: ${error instanceof Error ? error.message : String(error)}`;
    throw requiredInCi ? missingInCi('PostgreSQL', reason) : error;
  });
  project.provide('postgresUrl', postgres.url);
  return () => postgres.stop();
}
