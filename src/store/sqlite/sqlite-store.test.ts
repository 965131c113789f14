import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { runStoreContract } from '../store-contract.test-suite.js';

runStoreContract('sqlite', async () => {
  const directory = mkdtempSync(join(tmpdir(), 'berth-sqlite-'));
  return {
    options: { kind: 'sqlite', path: join(directory, 'berth.db') },
    dispose: async () => rmSync(directory, { recursive: true, force: true }),
  };
});
