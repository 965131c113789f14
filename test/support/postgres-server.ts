import { execFile, execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { delimiter, join } from 'node:path';
import { promisify } from 'node:util';

const run = promisify(execFile);

/** A PostgreSQL server for tests: its connection URL and how to stop it. */
export interface TestPostgres {
  url: string;
  stop(): Promise<void>;
}

/** System user that runs a test server when we are root (initdb and postgres refuse root). */
const FALLBACK_USER = 'berthpg';

/**
 * Starts a throwaway PostgreSQL (initdb into a temp dir, fsync off, listening on a free port
 * of 127.0.0.1 only), or uses `BERTH_TEST_POSTGRES_URL` when set and starts nothing.
 */
export async function startPostgres(): Promise<TestPostgres> {
  const givenUrl = process.env.BERTH_TEST_POSTGRES_URL;
  if (givenUrl !== undefined && givenUrl !== '') return { url: givenUrl, stop: async () => {} };

  const binaries = findPostgresBinaries();
  const runAs = process.getuid?.() === 0 ? ensureServerUser() : undefined;
  const directory = mkdtempSync(join(tmpdir(), 'berth-postgres-'));
  const dataDirectory = join(directory, 'data');
  if (runAs !== undefined) execFileSync('chown', [runAs, directory]);
  const command = (binary: string, args: string[]) => {
    const path = join(binaries, binary);
    return runAs === undefined ? run(path, args) : run('runuser', ['-u', runAs, '--', path, ...args]);
  };

  const port = await freePort();
  try {
    await command('initdb', [
      '-D',
      dataDirectory,
      '-U',
      'postgres',
      '-A',
      'trust',
      '--no-sync',
      '-E',
      'UTF8',
    ]);
    await command('pg_ctl', [
      'start',
      '-w',
      '-D',
      dataDirectory,
      '-l',
      join(directory, 'server.log'),
      '-o',
      `-F -k ${directory} -p ${port} -c listen_addresses=127.0.0.1 -c max_connections=200`,
    ]);
  } catch (error) {
    rmSync(directory, { recursive: true, force: true });
    throw new Error(`could not start a test PostgreSQL: ${String(error)}`);
  }
  return {
    url: `postgres://postgres@127.0.0.1:${port}/postgres`,
    async stop() {
      await command('pg_ctl', ['stop', '-D', dataDirectory, '-m', 'immediate', '-w']).catch(() => {});
      rmSync(directory, { recursive: true, force: true });
    },
  };
}

/** The directory holding initdb and pg_ctl: PATH first, then Debian's versioned directories. */
function findPostgresBinaries(): string {
  const candidates = (process.env.PATH ?? '').split(delimiter).filter((entry) => entry !== '');
  const debianRoot = '/usr/lib/postgresql';
  if (existsSync(debianRoot)) {
    const versions = readdirSync(debianRoot)
      .filter((name) => /^\d+$/.test(name))
      .sort((left, right) => Number(right) - Number(left));
    candidates.push(...versions.map((version) => join(debianRoot, version, 'bin')));
  }
  const found = candidates.find(
    (directory) => existsSync(join(directory, 'initdb')) && existsSync(join(directory, 'pg_ctl')),
  );
  if (found === undefined) {
    throw new Error(
      'PostgreSQL binaries (initdb, pg_ctl) not found on PATH or in /usr/lib/postgresql/*/bin: ' +
        'install the postgresql package or set BERTH_TEST_POSTGRES_URL',
    );
  }
  return found;
}

/** Picks `postgres` when that user exists, else creates a system user for the test server. */
function ensureServerUser(): string {
  for (const user of ['postgres', FALLBACK_USER]) {
    try {
      execFileSync('id', ['-u', user], { stdio: 'ignore' });
      return user;
    } catch {
      // not present; try the next one
    }
  }
  execFileSync('useradd', ['--system', '--no-create-home', '--shell', '/usr/sbin/nologin', FALLBACK_USER]);
  return FALLBACK_USER;
}

/** A TCP port on 127.0.0.1 that nothing listens on right now. */
function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const address = server.address();
      server.close(() => {
        if (typeof address === 'object' && address !== null) resolve(address.port);
        else reject(new Error('no port'));
      });
    });
  });
}
