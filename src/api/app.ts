import { type Context, Hono, type Next } from 'hono';
import { bodyLimit } from 'hono/body-limit';
import { BerthError, invalidRequest } from '../errors.js';
import { authorizeVaultChange, loadSessionFor } from '../identity/access.js';
import { MAX_SKILL_BYTES } from '../skills/skill-package.js';
import { agentRoutes } from './agents.js';
import { type ApiDependencies, type ApiEnvironment, presentedKey } from './context.js';
import { environmentRoutes } from './environments.js';
import { errorBody, handleError } from './errors.js';
import { eventRoutes } from './events.js';
import { fileRoutes } from './files.js';
import { clusterRouting } from './forwarding.js';
import { identityRoutes } from './identity.js';
import { sandboxRoutes } from './sandbox.js';
import { sessionRoutes } from './sessions.js';
import { MAX_SKILL_UPLOAD_BYTES, skillRoutes } from './skills.js';
import { usageRoutes } from './usage.js';
import { vaultRoutes } from './vaults.js';

/** The largest request body by default (skill uploads have their own limit). */
export const DEFAULT_MAX_BODY_BYTES = 1024 * 1024;

/**
 * The HTTP API: the official SDK's `/v1/agents`, `/v1/environments`, `/v1/vaults`,
 * `/v1/sessions` and `/v1/sessions/:id/events[/stream]` paths. Every `/v1` route is authenticated; the
 * `anthropic-beta` header is accepted and not required.
 */
export function createApp(dependencies: ApiDependencies) {
  const app = new Hono<ApiEnvironment>();
  const { authenticator } = dependencies;
  app.onError(handleError);
  app.notFound((context) =>
    context.json(errorBody('not_found_error', `No route for ${context.req.method} ${context.req.path}`), 404),
  );

  app.get('/health', (context) => context.json({ status: 'ok' }));
  // Aggregates only (no ids, no tenant names): served without a key, like /health, for
  // Prometheus on the operator's network. BERTH_METRICS=off removes it.
  const { metrics } = dependencies;
  if (metrics) {
    app.get('/metrics', async (context) => {
      const { body, contentType } = await metrics.render();
      return context.body(body, 200, { 'content-type': contentType });
    });
  }

  // Skill uploads carry files (up to 8 MiB); every other body has the general limit.
  const skillUploadLimit = bodyLimit({
    maxSize: MAX_SKILL_UPLOAD_BYTES,
    onError: (context) =>
      context.json(
        errorBody('request_too_large', `A skill upload may hold at most ${MAX_SKILL_BYTES} bytes of files`),
        413,
        { connection: 'close' },
      ),
  });
  const generalLimit = bodyLimit({
    maxSize: dependencies.maxBodyBytes ?? DEFAULT_MAX_BODY_BYTES,
    // The rest of the body is not read, so the connection cannot be reused.
    onError: (context) =>
      context.json(
        errorBody(
          'request_too_large',
          `Request body exceeds ${dependencies.maxBodyBytes ?? DEFAULT_MAX_BODY_BYTES} bytes`,
        ),
        413,
        { connection: 'close' },
      ),
  });
  app.use('/v1/*', (context, next) => {
    const { method } = context.req;
    // No body to limit; and asking for one would build a full web Request for every GET.
    if (method === 'GET' || method === 'HEAD') return next();
    return /^\/v1\/skills(\/[^/]+\/versions)?\/?$/.test(context.req.path) && method === 'POST'
      ? skillUploadLimit(context, next)
      : generalLimit(context, next);
  });
  app.use('/v1/*', async (context, next) => {
    // No id or value Berth stores may contain NUL (PostgreSQL text cannot hold it).
    if (/%00/.test(context.req.url)) throw invalidRequest('NUL characters are not allowed in URLs');
    const key = presentedKey(context.req);
    if (!key) {
      throw new BerthError(
        'authentication',
        'Missing API key: send it in the x-api-key header or as Authorization: Bearer',
      );
    }
    const principal = await authenticator.authenticate(key);
    if (!principal) throw new BerthError('authentication', 'Invalid API key');
    context.set('principal', principal);
    await next();
  });

  // The one ownership check of every session path, present and future: any route under
  // /v1/sessions/:id runs only after the session was loaded for the caller (404 otherwise).
  const withSession = async (context: Context<ApiEnvironment>, next: Next) => {
    context.set(
      'session',
      await loadSessionFor(dependencies.store, context.get('principal'), context.req.param('id')!),
    );
    await next();
  };
  app.use('/v1/sessions/:id', withSession);
  app.use('/v1/sessions/:id/*', withSession);
  // The one check of every change to a vault or credential, present and future: anything but a
  // read under /v1/vaults/:id runs only after `authorizeVaultChange` allowed it.
  const vaultChange = async (context: Context<ApiEnvironment>, next: Next) => {
    const { method } = context.req;
    if (method !== 'GET' && method !== 'HEAD') {
      const credential = /^\/v1\/vaults\/[^/]+\/credentials\/([^/]+)/.exec(context.req.path)?.[1];
      await authorizeVaultChange(
        dependencies.store,
        context.get('principal'),
        context.req.param('id')!,
        credential === undefined ? undefined : decodeURIComponent(credential),
      );
    }
    await next();
  };
  app.use('/v1/vaults/:id', vaultChange);
  app.use('/v1/vaults/:id/*', vaultChange);
  if (dependencies.cluster) {
    const routing = clusterRouting(dependencies.cluster);
    app.use('/v1/sessions/:id', routing);
    app.use('/v1/sessions/:id/*', routing);
  }

  app.route('/v1', identityRoutes(dependencies));
  app.route('/v1/usage', usageRoutes(dependencies));
  app.route('/v1/agents', agentRoutes(dependencies));
  app.route('/v1/environments', environmentRoutes(dependencies));
  app.route('/v1/vaults', vaultRoutes(dependencies));
  app.route('/v1/skills', skillRoutes(dependencies));
  app.route('/v1/sessions', eventRoutes(dependencies));
  app.route('/v1/sessions', fileRoutes(dependencies));
  app.route('/v1/sessions', sandboxRoutes(dependencies));
  app.route('/v1/sessions', sessionRoutes(dependencies));
  return app;
}
