import { execFile } from 'node:child_process';
import { resolve } from 'node:path';
import { promisify } from 'node:util';
import { describe, expect, inject, it } from 'vitest';

const run = promisify(execFile);
const projectRoot = resolve(import.meta.dirname, '..');
const VITEST = resolve(projectRoot, 'node_modules/vitest/vitest.mjs');

/**
 * Runs one test file in a vitest of its own, as CI would (`CI=true`) or not, on a host where
 * nothing is on PATH: the sandbox drivers' binaries (runsc, qemu) are then missing, as after a
 * setup that failed to install them.
 */
async function runVitest(file: string, options: { ci: boolean; postgresUrl: string }) {
  const environment: NodeJS.ProcessEnv = {
    ...process.env,
    PATH: '/nonexistent',
    // Drivers also look in /usr/bin and /usr/sbin: name a QEMU that is not there.
    BERTH_TEST_QEMU_PATH: '/nonexistent/qemu-system-x86_64',
    BERTH_TEST_POSTGRES_URL: options.postgresUrl,
    NO_COLOR: '1',
  };
  delete environment.CI;
  delete environment.VITEST;
  delete environment.VITEST_POOL_ID;
  delete environment.VITEST_WORKER_ID;
  if (options.ci) environment.CI = 'true';
  const outcome = await run(process.execPath, [VITEST, 'run', file], {
    cwd: projectRoot,
    env: environment,
    maxBuffer: 16 * 1024 * 1024,
  }).then(
    ({ stdout, stderr }) => ({ exitCode: 0, output: stdout + stderr }),
    (error: { code?: number; stdout?: string; stderr?: string }) => ({
      exitCode: error.code ?? -1,
      output: (error.stdout ?? '') + (error.stderr ?? ''),
    }),
  );
  return outcome;
}

describe('CI fails on a missing sandbox driver or PostgreSQL instead of skipping', () => {
  it('fails a run with CI=true when a sandbox driver is missing, naming the driver', async () => {
    const outcome = await runVitest('src/sandbox/microvm/microvm-driver.test.ts', {
      ci: true,
      postgresUrl: inject('postgresUrl'),
    });
    expect(outcome.exitCode, outcome.output).not.toBe(0);
    expect(outcome.output).toContain('CI=true, but the microvm sandbox driver is missing here');
  }, 120_000);

  it('still skips a missing sandbox driver outside CI, saying why', async () => {
    const outcome = await runVitest('src/sandbox/microvm/microvm-driver.test.ts', {
      ci: false,
      postgresUrl: inject('postgresUrl'),
    });
    expect(outcome.exitCode, outcome.output).toBe(0);
    expect(outcome.output).toMatch(/skipped/);
  }, 120_000);

  it('fails a run with CI=true when PostgreSQL cannot be reached, naming PostgreSQL', async () => {
    // Port 1 on loopback: nothing listens there.
    const outcome = await runVitest('src/egress/replace-stream.test.ts', {
      ci: true,
      postgresUrl: 'postgres://postgres@127.0.0.1:1/postgres',
    });
    expect(outcome.exitCode).not.toBe(0);
    expect(outcome.output).toContain('CI=true, but PostgreSQL is missing here');
  }, 120_000);
});
