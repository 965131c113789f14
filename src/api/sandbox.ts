import { Hono } from 'hono';
import { invalidRequest } from '../errors.js';
import type { ApiContext, ApiDependencies, ApiEnvironment } from './context.js';

/**
 * `/v1/sessions/:id/sandbox` (Berth): the state of a session's sandbox, and `…/stop`, which stops
 * it into a snapshot without ending the session. The next tool call (or files request) resumes it
 * where it was; the session's status does not change.
 */
export function sandboxRoutes(dependencies: ApiDependencies) {
  const { sandboxes } = dependencies;
  const app = new Hono<ApiEnvironment>();

  const describe = async (context: ApiContext) => {
    const session = context.get('session');
    return context.json({
      type: 'sandbox',
      session_id: session.id,
      state: await sandboxes.stateOf(session),
    });
  };

  app.get('/:id/sandbox', describe);

  app.post('/:id/stop', async (context) => {
    const session = context.get('session');
    if (session.status === 'terminated') throw invalidRequest(`session ${session.id} is terminated`);
    // A command in flight answers 409: stopping must not kill work the client did not interrupt.
    await sandboxes.stop(session, 'requested', { requireIdle: true });
    return describe(context);
  });

  return app;
}
