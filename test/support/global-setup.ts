import type { TestProject } from 'vitest/node';
import { ensureTestRoles } from './postgres-database.js';
import { startPostgres } from './postgres-server.js';

declare module 'vitest' {
  export interface ProvidedContext {
    /** Connection URL of the run's test PostgreSQL; each test file isolates itself in a schema. */
    postgresUrl: string;
  }
}

/** Vitest global setup: one PostgreSQL for the whole run, stopped when the run ends. */
export default async function setup(project: TestProject): Promise<() => Promise<void>> {
  const postgres = await startPostgres();
  await ensureTestRoles(postgres.url);
  project.provide('postgresUrl', postgres.url);
  return () => postgres.stop();
}
