import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import Anthropic from '@anthropic-ai/sdk';
import { type BerthConfig, loadConfig } from '../../src/config/config.js';
import type { Logger, SessionOwnerKey } from '../../src/control/supervisor.js';
import { DEFAULT_TENANT_ID } from '../../src/identity/api-keys.js';
import type { ModelRegistry } from '../../src/models/model-registry.js';
import { type RunningBerth, startBerth } from '../../src/server.js';
import type { TestDatabaseUrls } from './postgres-database.js';

/** A Berth server started in-process on a free loopback port, with a client for it. */
export interface TestBerth extends RunningBerth {
  apiKey: string;
  client: Anthropic;
  dataDir: string;
  /** The store key of a session the admin key created (tenant `tnt_default`, user `user_admin`). */
  keyOf(sessionId: string): SessionOwnerKey;
  /** Stops the server and removes its data directory (unless it was given one). */
  dispose(): Promise<void>;
}

const quietLogger: Logger = {
  info: () => undefined,
  warn: () => undefined,
  error: (message, fields) => console.error(message, fields),
};

/** Every limit set to 0 (unlimited), for tests that set only the limits they are about. */
export const UNLIMITED_LIMITS: Readonly<Record<string, string>> = {
  BERTH_TENANT_LIVE_SESSIONS: '0',
  BERTH_TENANT_SESSIONS_PER_MINUTE: '0',
  BERTH_TENANT_EVENTS_PER_MINUTE: '0',
  BERTH_USER_LIVE_SESSIONS: '0',
  BERTH_USER_SESSIONS_PER_MINUTE: '0',
  BERTH_USER_EVENTS_PER_MINUTE: '0',
};

/** Starts Berth on SQLite in a temp data directory (or the given store / environment). */
export async function startTestBerth(
  options: {
    environment?: Record<string, string | undefined>;
    /** PostgreSQL URLs (app role and migration owner); SQLite in the data directory when absent. */
    database?: TestDatabaseUrls;
    models?: ModelRegistry;
    configure?: (config: BerthConfig) => void;
    /** An existing data directory (another server's, restarted); kept by `dispose`. */
    dataDir?: string;
  } = {},
): Promise<TestBerth> {
  const dataDir = options.dataDir ?? (await mkdtemp(join(tmpdir(), 'berth-test-')));
  const config = loadConfig({
    flags: { port: 0, dataDir, database: options.database?.url },
    environment: {
      BERTH_RETRY_BASE_DELAY_MS: '20',
      BERTH_DATABASE_MIGRATION_URL: options.database?.migrationUrl,
      ...options.environment,
    },
  });
  options.configure?.(config);
  const berth = await startBerth(config, { logger: quietLogger, models: options.models });
  const apiKey = (await readFile(join(dataDir, 'admin.key'), 'utf8')).trim();
  const client = new Anthropic({ apiKey, baseURL: berth.url, maxRetries: 0 });
  return {
    ...berth,
    apiKey,
    client,
    dataDir,
    keyOf: (sessionId) => ({ tenantId: DEFAULT_TENANT_ID, id: sessionId, ownerId: 'user_admin' }),
    async dispose() {
      await berth.close();
      if (options.dataDir === undefined) await rm(dataDir, { recursive: true, force: true });
    },
  };
}
