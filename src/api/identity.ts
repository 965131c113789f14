import { Hono } from 'hono';
import { BerthError, invalidRequest, notFound } from '../errors.js';
import { issueApiKey, type Principal } from '../identity/api-keys.js';
import { newId } from '../ids.js';
import type { ApiKeyRecord, UserRecord } from '../store/resource-store.js';
import { type ApiDependencies, type ApiEnvironment, nowIso, readBody } from './context.js';
import { apiKeyCreate, userCreate, userUpdate } from './schemas.js';

/** A user as the API shows it. */
function presentUser(user: UserRecord) {
  return { id: user.id, type: 'user', name: user.name, role: user.role, created_at: user.createdAt };
}

/** A key as the API shows it: never the key or its hash. */
function presentKey(key: ApiKeyRecord) {
  return {
    id: key.id,
    type: 'api_key',
    name: key.name,
    user_id: key.userId,
    role: key.role,
    created_at: key.createdAt,
    expires_at: key.expiresAt,
    revoked_at: key.revokedAt,
  };
}

function requireAdmin(principal: Principal, what: string): void {
  if (principal.role !== 'admin') throw new BerthError('permission', `only tenant admins can ${what}`);
}

/**
 * Berth's identity API (extensions, not in the official SDK): `/v1/me`, `/v1/users` and
 * `/v1/api_keys`, all within the caller's tenant. Admins manage users (and their roles) and
 * every key of the tenant; members see themselves and manage their own keys. A key or user of another tenant,
 * or (for members) of another user, answers 404.
 */
export function identityRoutes(dependencies: ApiDependencies) {
  const { store, authenticator } = dependencies;
  const { resources } = store;
  const app = new Hono<ApiEnvironment>();

  app.get('/me', async (context) => {
    const principal = context.get('principal');
    const [tenant, user] = await Promise.all([
      resources.getTenant(principal.tenantId),
      resources.getUser(principal.tenantId, principal.userId),
    ]);
    return context.json({
      type: 'principal',
      tenant: tenant ? { id: tenant.id, name: tenant.name } : { id: principal.tenantId, name: null },
      user: user ? presentUser(user) : null,
      api_key_id: principal.keyId,
      role: principal.role,
    });
  });

  app.get('/users', async (context) => {
    requireAdmin(context.get('principal'), 'list users');
    const users = await resources.listUsers(context.get('principal').tenantId);
    return context.json({ data: users.map(presentUser), next_page: null });
  });

  app.post('/users', async (context) => {
    const principal = context.get('principal');
    requireAdmin(principal, 'create users');
    const input = await readBody(context, userCreate);
    const user: UserRecord = {
      id: newId('user'),
      tenantId: principal.tenantId,
      name: input.name,
      role: input.role,
      createdAt: nowIso(),
    };
    await resources.createUser(user);
    return context.json(presentUser(user));
  });

  /** A user the caller may see: any of the tenant's for admins, themselves for members. */
  async function loadUser(principal: Principal, id: string): Promise<UserRecord> {
    if (principal.role !== 'admin' && id !== principal.userId) throw notFound('user', id);
    const user = await resources.getUser(principal.tenantId, id);
    if (!user) throw notFound('user', id);
    return user;
  }

  app.get('/users/:id', async (context) => {
    return context.json(presentUser(await loadUser(context.get('principal'), context.req.param('id'))));
  });

  // A role change applies at once: the user's keys carry the new role on their next request,
  // on every node, and streams opened under the old role close.
  app.post('/users/:id', async (context) => {
    const principal = context.get('principal');
    const user = await loadUser(principal, context.req.param('id'));
    requireAdmin(principal, 'change roles');
    const input = await readBody(context, userUpdate);
    if (input.role === user.role) return context.json(presentUser(user));
    if (user.id === principal.userId) {
      throw invalidRequest(
        'admins cannot change their own role (the tenant could be left without one); ask another admin',
      );
    }
    const change = { kind: 'user', tenantId: principal.tenantId, id: user.id } as const;
    const heard = authenticator.heard(change);
    const updated = await resources.setUserRole(principal.tenantId, user.id, input.role);
    if (!updated) throw notFound('user', user.id);
    authenticator.changed(change);
    // Answered once every other live node said it applied the change (at once on one node).
    await heard.wait();
    return context.json(presentUser(updated));
  });

  app.get('/api_keys', async (context) => {
    const principal = context.get('principal');
    const requested = context.req.query('user_id') || undefined;
    const userId = principal.role === 'admin' ? requested : principal.userId;
    if (principal.role !== 'admin' && requested !== undefined && requested !== principal.userId) {
      return context.json({ data: [], next_page: null });
    }
    const keys = await resources.listApiKeys(principal.tenantId, userId);
    return context.json({ data: keys.map(presentKey), next_page: null });
  });

  app.post('/api_keys', async (context) => {
    const principal = context.get('principal');
    const input = await readBody(context, apiKeyCreate);
    const userId = input.user_id ?? principal.userId;
    if (userId !== principal.userId && principal.role !== 'admin') throw notFound('user', userId);
    const user = await resources.getUser(principal.tenantId, userId);
    if (!user) throw notFound('user', userId);
    const expiresAt =
      input.expires_at !== undefined
        ? new Date(input.expires_at).toISOString()
        : input.expires_in_seconds !== undefined
          ? new Date(Date.now() + input.expires_in_seconds * 1000).toISOString()
          : null;
    if (expiresAt !== null && Date.parse(expiresAt) <= Date.now())
      throw invalidRequest('expires_at is in the past');
    const { record, key } = await issueApiKey(resources, user, { name: input.name, expiresAt });
    // The key itself is shown this once; only its hash is stored.
    return context.json({ ...presentKey(record), key });
  });

  /** A key the caller may manage: any of the tenant's for admins, their own for members. */
  async function loadKey(principal: Principal, id: string): Promise<ApiKeyRecord> {
    const key = await resources.getApiKey(principal.tenantId, id);
    if (!key || (principal.role !== 'admin' && key.userId !== principal.userId))
      throw notFound('api_key', id);
    return key;
  }

  app.get('/api_keys/:id', async (context) => {
    return context.json(presentKey(await loadKey(context.get('principal'), context.req.param('id'))));
  });

  app.post('/api_keys/:id/revoke', async (context) => {
    const principal = context.get('principal');
    const key = await loadKey(principal, context.req.param('id'));
    const heard = key.revokedAt
      ? undefined
      : authenticator.heard({ kind: 'key', tenantId: key.tenantId, id: key.id });
    const revoked = (await resources.revokeApiKey(principal.tenantId, key.id, nowIso())) ?? key;
    // At once on this node: the cache forgets it and streams opened with it close.
    authenticator.revoked(revoked);
    // Answered once every other live node said it applied the change (at once on one node).
    await heard?.wait();
    return context.json(presentKey(revoked));
  });

  return app;
}
