import { execFile } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { mkdtemp, readdir, readFile, rm, symlink } from 'node:fs/promises';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { killProcessesUsing } from './support/berth-process.js';
import { startPostgres, type TestPostgres } from './support/postgres-server.js';

const root = resolve(import.meta.dirname, '..');
const NODE_PORTS = [8081, 8082, 8083];

/** The README's cluster recipe: every sh block marked `<!-- tested: cluster recipe -->`, in order. */
function recipeBlocks(): string[] {
  const readme = readFileSync(join(root, 'README.md'), 'utf8');
  return [...readme.matchAll(/<!-- tested: cluster recipe -->\n```sh\n([\s\S]*?)```/g)].map(
    (match) => match[1]!,
  );
}

/** Replaces the one line that assigns `variable` (the recipe's own setting lines). */
function setLine(script: string, variable: string, line: string): string {
  const pattern = new RegExp(`^${variable}=.*$`, 'gm');
  expect(script.match(pattern), `the recipe sets ${variable} on one line`).toHaveLength(1);
  return script.replace(pattern, line);
}

const listening = (port: number) =>
  new Promise<boolean>((done) => {
    const socket = connect(port, '127.0.0.1');
    socket.once('connect', () => {
      socket.destroy();
      done(true);
    });
    socket.once('error', () => done(false));
  });

const alive = (pid: number) => {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
};

/**
 * A new operator pastes the README's cluster recipe on a fresh machine with PostgreSQL: it must
 * create the roles and the database, start three nodes, and leave a cluster that serves every
 * node with row-level security binding. Runs the blocks as written against a PostgreSQL of its
 * own (the recipe creates roles `berth_owner` and `berth_app`, which the shared test server
 * already has), changing only the lines that say how to reach PostgreSQL.
 */
describe.skipIf(Boolean(process.env.BERTH_TEST_POSTGRES_URL))(
  'the README cluster recipe (needs a PostgreSQL of its own, so not with BERTH_TEST_POSTGRES_URL)',
  () => {
    let postgres: TestPostgres;
    let directory: string;
    let pids: number[] = [];

    beforeAll(async () => {
      postgres = await startPostgres();
      directory = await mkdtemp(join(tmpdir(), 'berth-readme-cluster-'));
      // The recipe runs from a checkout: give the directory the checkout's bin/.
      await symlink(join(root, 'bin'), join(directory, 'bin'));
    }, 120_000);

    afterAll(async () => {
      for (const pid of pids) if (alive(pid)) process.kill(pid, 'SIGTERM');
      const deadline = Date.now() + 60_000;
      while (pids.some(alive) && Date.now() < deadline) await new Promise((done) => setTimeout(done, 100));
      for (const pid of pids) if (alive(pid)) process.kill(pid, 'SIGKILL');
      await postgres?.stop();
      if (directory) {
        // As stopCluster does: anything a killed node left using the data directories.
        killProcessesUsing(directory);
        await rm(directory, { recursive: true, force: true });
      }
    }, 90_000);

    it('creates the roles and database, starts three nodes under row-level security, and each serves the admin key', async () => {
      for (const port of NODE_PORTS)
        expect(await listening(port), `port ${port} is free for the recipe`).toBe(false);
      const blocks = recipeBlocks();
      expect(blocks.length).toBeGreaterThanOrEqual(3);
      const server = new URL(postgres.url);
      let script = blocks.join('\n');
      script = setLine(script, 'PSQL_SUPERUSER', `PSQL_SUPERUSER="psql ${postgres.url}"`);
      script = setLine(script, 'DB_HOST', `DB_HOST=${server.hostname} DB_PORT=${server.port}`);
      // The test's own addition: which processes to stop afterwards.
      script += '\njobs -p > recipe.pids\n';

      // A fresh shell: none of this process's BERTH_* settings.
      const environment = Object.fromEntries(
        Object.entries(process.env).filter(([name]) => !name.startsWith('BERTH_')),
      );
      const run = await new Promise<{ code: number; stdout: string; stderr: string }>((done) => {
        execFile(
          'bash',
          ['-c', script],
          { cwd: directory, env: environment, timeout: 400_000 },
          (error, stdout, stderr) =>
            done({ code: error ? Number((error as { code?: number }).code ?? 1) : 0, stdout, stderr }),
        );
      });
      pids = (await readFile(join(directory, 'recipe.pids'), 'utf8').catch(() => ''))
        .split('\n')
        .filter(Boolean)
        .map(Number);
      const logs = await Promise.all(
        [1, 2, 3].map((n) => readFile(join(directory, `berth-${n}.log`), 'utf8').catch(() => '')),
      );
      const context = `exit ${run.code}\n${run.stdout}\n${run.stderr}\n${logs.join('\n---\n')}`;
      expect(run.code, context).toBe(0);
      expect(pids, context).toHaveLength(3);
      // Each node answered `users list` with the admin key: three listings of the admin.
      expect(run.stdout.match(/^user_admin\s+admin\s+admin\s/gm), context).toHaveLength(3);
      for (const [index, log] of logs.entries()) {
        expect(log, `node ${index + 1}`).toMatch(/joined the cluster/);
        // Row-level security binds: the server warns when it does not.
        expect(log, `node ${index + 1}`).not.toMatch(/row-level security is not a second wall/);
        expect(log, `node ${index + 1}`).not.toMatch(/vault key lives in this node's data directory/);
      }
      // One data directory holds the admin key; the other nodes said where it is.
      const holders = (await readdir(directory)).filter(
        (name) => name.startsWith('.berth-') && existsSync(join(directory, name, 'admin.key')),
      );
      expect(holders, context).toHaveLength(1);
      expect(logs.filter((log) => /API key: created by another node/.test(log))).toHaveLength(2);
      expect(pids.every(alive), context).toBe(true);
    }, 420_000);
  },
);
