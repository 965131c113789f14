import { Hono } from 'hono';
import { BerthError, invalidRequest } from '../errors.js';
import type { ApiContext, ApiDependencies, ApiEnvironment } from './context.js';

/**
 * A path inside the session's working directory, as the API takes it: relative, no `..`, no
 * empty or `.` segments, no NUL. Everything is then done by the sandbox driver inside the
 * session's sandbox as its user, so a symlink the agent made can only reach what the sandbox
 * itself can read, never a host file.
 */
function workspacePath(raw: string): string {
  let path: string;
  try {
    path = decodeURIComponent(raw);
  } catch {
    throw invalidRequest('the file path is not valid percent-encoding');
  }
  const segments = path.split('/');
  if (
    path.length === 0 ||
    path.length > 1024 ||
    path.startsWith('/') ||
    path.includes('\0') ||
    segments.some((segment) => segment === '' || segment === '.' || segment === '..')
  ) {
    throw invalidRequest(
      `invalid file path ${JSON.stringify(path)}: use a relative path inside the workspace, without "..", "." or empty segments`,
    );
  }
  return path;
}

/** The path after `/files/` in the request URL (Hono's `*` is not captured as a parameter). */
function pathOf(context: ApiContext): string {
  const marker = '/files/';
  const url = new URL(context.req.url);
  const index = url.pathname.indexOf(marker);
  return workspacePath(index < 0 ? '' : url.pathname.slice(index + marker.length));
}

/**
 * `/v1/sessions/:id/files` (Berth): upload a file into a session's working directory, download
 * one, list them, delete one. Bodies are raw bytes, at most the request body limit
 * (`BERTH_MAX_BODY_BYTES`, 1 MiB by default); downloads are capped at 100 MiB. The session's
 * sandbox is provisioned if it is not running (files live in its working directory).
 */
export function fileRoutes(dependencies: ApiDependencies) {
  const { sandboxes } = dependencies;
  const app = new Hono<ApiEnvironment>();
  const sandboxOf = async (context: ApiContext) => {
    const session = context.get('session');
    const handle = await sandboxes.access(session).get();
    const driver = sandboxes.driverOf(session);
    if (!driver) throw new BerthError('sandbox_unavailable', "the session's sandbox is not available");
    return { driver, handle };
  };

  app.get('/:id/files', async (context) => {
    const { driver, handle } = await sandboxOf(context);
    const result = await driver.exec(
      handle,
      ['find', '.', '-type', 'f', '-printf', '%P\\t%s\\t%TY-%Tm-%TdT%TH:%TM:%TSZ\\n'],
      {
        cwd: handle.workdirInside,
        timeoutMs: 10_000,
        maxOutputBytes: 1024 * 1024,
      },
    );
    if (result.exitCode !== 0)
      throw new BerthError('sandbox_failed', `listing files failed: ${result.stderr}`);
    const data = result.stdout
      .toString()
      .split('\n')
      .filter((line) => line !== '')
      .slice(0, 10_000)
      .map((line) => {
        const [path, size, modified] = line.split('\t');
        return {
          type: 'file',
          path,
          size_bytes: Number(size),
          modified_at: modified?.replace(/\.\d+Z$/, 'Z') ?? null,
        };
      })
      .sort((left, right) => (left.path! < right.path! ? -1 : 1));
    return context.json({ data, truncated: result.truncated });
  });

  app.put('/:id/files/*', async (context) => {
    const path = pathOf(context);
    const bytes = new Uint8Array(await context.req.arrayBuffer());
    const { driver, handle } = await sandboxOf(context);
    await driver.writeFile(handle, path, bytes);
    return context.json({ type: 'file', path, size_bytes: bytes.byteLength });
  });

  app.get('/:id/files/*', async (context) => {
    const path = pathOf(context);
    const { driver, handle } = await sandboxOf(context);
    const bytes = await driver.readFile(handle, path, 100 * 1024 * 1024);
    return context.body(bytes as Uint8Array<ArrayBuffer>, 200, {
      'content-type': 'application/octet-stream',
      'content-disposition': `attachment; filename="${encodeURIComponent(path.split('/').pop()!)}"`,
    });
  });

  app.delete('/:id/files/*', async (context) => {
    const path = pathOf(context);
    const { driver, handle } = await sandboxOf(context);
    // Idempotent, like object stores: deleting a file that is not there succeeds.
    const result = await driver.exec(
      handle,
      ['sh', '-c', 'test -e "$1" || test -L "$1" || exit 3; rm -- "$1"', 'sh', path],
      { cwd: handle.workdirInside, timeoutMs: 10_000 },
    );
    if (result.exitCode !== 0 && result.exitCode !== 3) {
      throw invalidRequest(`cannot delete ${path}: ${result.stderr.toString().trim()}`);
    }
    return context.json({ type: 'file_deleted', path, existed: result.exitCode === 0 });
  });

  return app;
}
