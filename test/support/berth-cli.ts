import { execFile } from 'node:child_process';
import { join, resolve } from 'node:path';

const root = resolve(import.meta.dirname, '../..');

/** What a `berth` command printed and how it exited. */
export interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
}

/**
 * Runs `node bin/berth.js <args>` as a child process without blocking the event loop (the test
 * server lives in this process). BERTH_URL, BERTH_API_KEY and BERTH_DATABASE_URL are cleared so
 * only the given flags (and `environment`) count.
 */
export function berthCli(
  args: string[],
  cwd = root,
  environment: Record<string, string> = {},
): Promise<CliResult> {
  return new Promise((done) => {
    execFile(
      process.execPath,
      [join(root, 'bin/berth.js'), ...args],
      {
        cwd,
        env: { ...process.env, BERTH_URL: '', BERTH_API_KEY: '', BERTH_DATABASE_URL: '', ...environment },
      },
      (error, stdout, stderr) => {
        done({ code: error ? ((error as { code?: number }).code ?? 1) : 0, stdout, stderr });
      },
    );
  });
}
