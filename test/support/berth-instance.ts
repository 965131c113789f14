import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import Anthropic from '@anthropic-ai/sdk';
import { type BerthConfig, loadConfig } from '../../src/config/config.js';
import type { Logger } from '../../src/control/supervisor.js';
import type { ModelRegistry } from '../../src/models/model-registry.js';
import { type RunningBerth, startBerth } from '../../src/server.js';

/** A Berth server started in-process on a free loopback port, with a client for it. */
export interface TestBerth extends RunningBerth {
  apiKey: string;
  client: Anthropic;
  dataDir: string;
  /** Stops the server and removes its data directory. */
  dispose(): Promise<void>;
}

const quietLogger: Logger = {
  info: () => undefined,
  warn: () => undefined,
  error: (message, fields) => console.error(message, fields),
};

/** Starts Berth on SQLite in a temp data directory (or the given store / environment). */
export async function startTestBerth(
  options: {
    environment?: Record<string, string | undefined>;
    database?: string;
    models?: ModelRegistry;
    configure?: (config: BerthConfig) => void;
  } = {},
): Promise<TestBerth> {
  const dataDir = await mkdtemp(join(tmpdir(), 'berth-test-'));
  const config = loadConfig({
    flags: { port: 0, dataDir, database: options.database },
    environment: { BERTH_RETRY_BASE_DELAY_MS: '20', ...options.environment },
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
    async dispose() {
      await berth.close();
      await rm(dataDir, { recursive: true, force: true });
    },
  };
}
