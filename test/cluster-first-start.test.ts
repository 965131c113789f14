import { existsSync, readFileSync } from 'node:fs';
import { mkdtemp } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pg from 'pg';
import { afterEach, describe, expect, inject, it } from 'vitest';
import { formatVaultKey, generateVaultKey } from '../src/vault/keyring.js';
import { type BerthProcess, startBerthProcess } from './support/berth-process.js';
import { clusterNodeEnvironment, stopCluster } from './support/cluster-client.js';
import { createTestDatabase } from './support/postgres-database.js';

const serverUrl = inject('postgresUrl');

async function waitFor(condition: () => boolean, what: string, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting until ${what}`);
    await new Promise((done) => setTimeout(done, 50));
  }
}
const ROUNDS = 5;
const NODES = 3;

/**
 * The README's cluster recipe starts its nodes together on an empty database. Each must come
 * up (none may die on the first-start bootstrap), and the cluster must end with one admin key
 * that every node accepts: only the node that created it has it in its data directory, and the
 * others say where it is. Repeated, since the race is a matter of timing.
 */
describe('nodes of a new cluster started at the same moment', () => {
  let parts: { nodes: (BerthProcess | undefined)[]; owner?: pg.Client; root?: string } = { nodes: [] };

  afterEach(() => stopCluster(parts));

  it(
    `all start, with one admin key every node accepts (${ROUNDS} rounds of ${NODES} nodes)`,
    async () => {
      for (let round = 0; round < ROUNDS; round++) {
        const database = await createTestDatabase(serverUrl);
        const root = await mkdtemp(join(tmpdir(), 'berth-first-start-'));
        const owner = new pg.Client({ connectionString: database.migrationUrl });
        await owner.connect();
        parts = { nodes: [], owner, root };
        const vaultKeys = formatVaultKey(generateVaultKey());
        const started = await Promise.allSettled(
          Array.from({ length: NODES }, (_, index) =>
            startBerthProcess({
              dataDir: join(root, `node-${index}`),
              environment: clusterNodeEnvironment({
                nodeId: `node-${index}`,
                modelUrl: 'http://127.0.0.1:9/v1',
                migrationUrl: database.migrationUrl,
                leaseMs: 3000,
                vaultKeys,
              }),
              args: ['--cluster', database.url],
              // The key is read below: only one data directory is to hold it.
              apiKey: '',
              // Three Node processes compiling TypeScript at once on a loaded 2-core machine.
              healthTimeoutMs: 90_000,
            }),
          ),
        );
        parts.nodes = started.map((outcome) => (outcome.status === 'fulfilled' ? outcome.value : undefined));
        const failures = started.flatMap((outcome, index) =>
          outcome.status === 'rejected' ? [`node-${index}: ${String(outcome.reason)}`] : [],
        );
        expect(failures, `round ${round}`).toEqual([]);
        const nodes = parts.nodes as BerthProcess[];

        // One key in the database, in one data directory; no half-written key file anywhere.
        const keys = await owner.query<{ hash: string; name: string }>(
          'SELECT hash, name FROM berth.api_keys',
        );
        expect(keys.rows, `round ${round}`).toHaveLength(1);
        const holders = nodes.flatMap((_, index) =>
          existsSync(join(root, `node-${index}`, 'admin.key')) ? [index] : [],
        );
        expect(holders, `round ${round}`).toHaveLength(1);
        for (let index = 0; index < NODES; index++) {
          expect(existsSync(join(root, `node-${index}`, 'admin.key.new'))).toBe(false);
        }
        const creator = holders[0]!;
        const creatorDir = join(root, `node-${creator}`);
        const apiKey = readFileSync(join(creatorDir, 'admin.key'), 'utf8').trim();
        expect(keys.rows[0]!.name).toContain(creatorDir);

        for (const [index, node] of nodes.entries()) {
          // Every node accepts the key and is still alive.
          const me = await fetch(`${node.url}/v1/me`, { headers: { 'x-api-key': apiKey } });
          expect(me.status, `round ${round} node-${index}: ${node.stderr()}`).toBe(200);
          expect(node.child.exitCode).toBeNull();
          // The others say the key is not theirs, and where it is (printed just after /health).
          await waitFor(() => node.stderr().includes('API key: '), `node-${index} names its API key`);
          if (index === creator) expect(node.stderr()).toMatch(/API key: .*admin\.key/);
          else {
            expect(node.stderr()).toMatch(/API key: created by another node/);
            expect(node.stderr()).toContain(creatorDir);
          }
        }
        await stopCluster(parts);
        parts = { nodes: [] };
      }
    },
    ROUNDS * 120_000,
  );
});
