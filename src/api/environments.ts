import { Hono } from 'hono';
import { DEFAULT_IDLE_TIMEOUT_S, DEFAULT_MAX_LIFETIME_S } from '../control/sandbox-manager.js';
import { conflict, invalidRequest, notFound } from '../errors.js';
import { newId } from '../ids.js';
import {
  type ApiDependencies,
  type ApiEnvironment,
  archiveRecord,
  listRecords,
  mergeMetadata,
  newRecord,
  nowIso,
  readBody,
} from './context.js';
import { type EnvironmentConfigParams, environmentCreate, environmentUpdate } from './schemas.js';

function normalizeConfig(config: EnvironmentConfigParams | null | undefined, dependencies: ApiDependencies) {
  if (config?.type === 'self_hosted') {
    throw invalidRequest(
      'self_hosted environments are not supported by Berth; use type "cloud" (Berth runs the sandbox)',
    );
  }
  const networking =
    config?.networking?.type === 'limited'
      ? {
          type: 'limited' as const,
          allowed_hosts: config.networking.allowed_hosts ?? [],
          allow_mcp_servers: config.networking.allow_mcp_servers ?? false,
          allow_package_managers: config.networking.allow_package_managers ?? false,
        }
      : { type: 'unrestricted' as const };
  const packages = {
    type: 'packages' as const,
    apt: config?.packages?.apt ?? [],
    cargo: config?.packages?.cargo ?? [],
    gem: config?.packages?.gem ?? [],
    go: config?.packages?.go ?? [],
    npm: config?.packages?.npm ?? [],
    pip: config?.packages?.pip ?? [],
  };
  if (Object.entries(packages).some(([key, list]) => key !== 'type' && (list as string[]).length > 0)) {
    throw invalidRequest(
      'environment packages are not supported by Berth yet; install them from a bash tool call',
    );
  }
  const driver = config?.berth?.driver ?? dependencies.sandboxDrivers[0] ?? 'bwrap';
  if (!dependencies.sandboxDrivers.includes(driver)) {
    const reason = dependencies.unavailableDrivers?.[driver];
    throw invalidRequest(
      reason
        ? `sandbox driver "${driver}" cannot run on this host: ${reason}`
        : `unknown sandbox driver "${driver}"; available: ${dependencies.sandboxDrivers.join(', ') || 'none'}`,
    );
  }
  const idle = config?.berth?.lifecycle?.idle_timeout_s ?? DEFAULT_IDLE_TIMEOUT_S;
  const maxLifetime = config?.berth?.lifecycle?.max_lifetime_s ?? DEFAULT_MAX_LIFETIME_S;
  const minimum = dependencies.minLifecycleSeconds ?? 60;
  for (const [name, value] of [
    ['idle_timeout_s', idle],
    ['max_lifetime_s', maxLifetime],
  ] as const) {
    if (value < minimum) throw invalidRequest(`${name} must be at least ${minimum} seconds (got ${value})`);
  }
  if (idle > maxLifetime) {
    throw invalidRequest(`idle_timeout_s (${idle}) must not exceed max_lifetime_s (${maxLifetime})`);
  }
  return {
    type: 'cloud' as const,
    networking,
    packages,
    berth: {
      driver,
      limits: config?.berth?.limits ?? {},
      lifecycle: { idle_timeout_s: idle, max_lifetime_s: maxLifetime },
    },
  };
}

/** `/v1/environments`: where sessions run (`config.berth` picks the sandbox driver and limits). */
export function environmentRoutes(dependencies: ApiDependencies) {
  const { resources } = dependencies.store;
  const app = new Hono<ApiEnvironment>();

  const load = async (tenantId: string, id: string) => {
    const record = await resources.get('environment', tenantId, id);
    if (!record) throw notFound('environment', id);
    return record;
  };

  app.post('/', async (context) => {
    const principal = context.get('principal');
    const input = await readBody(context, environmentCreate);
    const now = nowIso();
    const id = newId('env');
    const body = {
      id,
      type: 'environment',
      name: input.name,
      description: input.description ?? null,
      config: normalizeConfig(input.config, dependencies),
      metadata: input.metadata ?? {},
      scope: input.scope ?? 'organization',
      created_at: now,
      updated_at: now,
      archived_at: null,
    };
    const record = newRecord(principal, id, now, body);
    await resources.insert('environment', record);
    return context.json(body);
  });

  app.get('/', (context) => listRecords(context, resources, 'environment'));

  app.get('/:id', async (context) => {
    const record = await load(context.get('principal').tenantId, context.req.param('id'));
    return context.json(record.body);
  });

  app.post('/:id', async (context) => {
    const principal = context.get('principal');
    const record = await load(principal.tenantId, context.req.param('id'));
    const input = await readBody(context, environmentUpdate);
    if (record.archivedAt) throw invalidRequest(`environment ${record.id} is archived and cannot be updated`);
    const now = nowIso();
    const body: Record<string, unknown> = { ...record.body, updated_at: now };
    if (input.name != null) body.name = input.name;
    if (input.description !== undefined) body.description = input.description;
    if (input.scope != null) body.scope = input.scope;
    if (input.config != null) body.config = normalizeConfig(input.config, dependencies);
    if (input.metadata !== undefined) {
      body.metadata = mergeMetadata(body.metadata as Record<string, string>, input.metadata);
    }
    record.body = body;
    record.updatedAt = now;
    await resources.update('environment', record);
    return context.json(body);
  });

  app.post('/:id/archive', async (context) => {
    const record = await load(context.get('principal').tenantId, context.req.param('id'));
    return context.json(await archiveRecord(resources, 'environment', record));
  });

  app.delete('/:id', async (context) => {
    const principal = context.get('principal');
    const id = context.req.param('id');
    await load(principal.tenantId, id);
    const inUse = await resources.listSessions({
      tenantId: principal.tenantId,
      limit: 1000,
      statuses: ['running', 'rescheduling', 'idle'],
    });
    if (inUse.items.some((session) => session.environmentId === id)) {
      throw conflict(`environment ${id} is used by sessions that are not terminated; archive it instead`);
    }
    await resources.delete('environment', principal.tenantId, id);
    return context.json({ id, type: 'environment_deleted' });
  });

  return app;
}
