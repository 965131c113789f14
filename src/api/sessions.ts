import { Hono } from 'hono';
import { conflict, invalidRequest, notFound } from '../errors.js';
import { sessionOwnerFilter } from '../identity/access.js';
import { newId } from '../ids.js';
import { costOf, type PriceBook } from '../metering/price-books.js';
import { emptyUsage } from '../metering/usage.js';
import { canonicalModelId } from '../models/provider-registry.js';
import type { SessionStatus } from '../store/event-store.js';
import type { CreatedAtBounds, SessionRecord, Store } from '../store/resource-store.js';
import { extractTraceContext } from '../telemetry/tracing.js';
import { agentWithOverrides, presentAgent } from './agents.js';
import {
  type ApiDependencies,
  type ApiEnvironment,
  mergeMetadata,
  newRecord,
  nowIso,
  readArrayQuery,
  readBody,
  readFlag,
  readIdempotencyKey,
  readOrder,
  readPageQuery,
  readPositiveInteger,
} from './context.js';
import { sessionCreate, sessionUpdate } from './schemas.js';
import { checkSkillReferences, type SkillReference } from './skills.js';

const usageEventTypes = [
  'session.usage',
  'span.model_request_end',
  'session.status_running',
  'session.status_idle',
  'session.status_terminated',
  'session.status_rescheduled',
];

/**
 * The session as the API shows it: the stored body plus what the log says now (status,
 * usage from `span.model_request_end`, active time from status changes).
 */
export async function presentSession(store: Store, session: SessionRecord) {
  const events = await store.events.read(session, {
    types: usageEventTypes,
    limit: Number.MAX_SAFE_INTEGER,
  });
  const usage = {
    input_tokens: 0,
    output_tokens: 0,
    cache_read_input_tokens: 0,
    cache_creation_input_tokens: 0,
  };
  let activeMilliseconds = 0;
  let runningSince: number | undefined;
  let snapshot: { usage: { list_cost?: unknown }; berth?: unknown } | undefined;
  for (const { event } of events) {
    if (event.type === 'session.usage') {
      snapshot = event as unknown as typeof snapshot;
    } else if (event.type === 'span.model_request_end') {
      const modelUsage = event.model_usage as Record<string, number> | undefined;
      usage.input_tokens += modelUsage?.input_tokens ?? 0;
      usage.output_tokens += modelUsage?.output_tokens ?? 0;
      usage.cache_read_input_tokens += modelUsage?.cache_read_input_tokens ?? 0;
      usage.cache_creation_input_tokens += modelUsage?.cache_creation_input_tokens ?? 0;
    } else if (event.type === 'session.status_running') {
      runningSince ??= Date.parse(event.processed_at);
    } else if (runningSince !== undefined) {
      activeMilliseconds += Date.parse(event.processed_at) - runningSince;
      runningSince = undefined;
    }
  }
  const now = Date.now();
  if (runningSince !== undefined) activeMilliseconds += now - runningSince;
  const activeSeconds = Math.round(activeMilliseconds / 10) / 100;
  return {
    ...session.body,
    agent: presentAgent(session.body.agent as Record<string, unknown>),
    status: session.status,
    stop_reason: session.status === 'idle' ? session.stopReason : null,
    usage: {
      input_tokens: usage.input_tokens,
      output_tokens: usage.output_tokens,
      cache_read_input_tokens: usage.cache_read_input_tokens,
      cache_creation: { ephemeral_5m_input_tokens: usage.cache_creation_input_tokens },
      active_seconds: activeSeconds,
      // As of the newest `session.usage` snapshot (taken at every idle); null when the price
      // book cannot price a model of the session (`berth.unpriced_models` names it).
      ...(snapshot ? { list_cost: snapshot.usage.list_cost ?? null, berth: snapshot.berth } : {}),
    },
    stats: {
      active_seconds: activeSeconds,
      duration_seconds: Math.round((now - Date.parse(session.createdAt)) / 10) / 100,
    },
    updated_at: session.updatedAt,
    archived_at: session.archivedAt,
  };
}

/**
 * A budget needs a list price for the session's model (the official API's
 * `model_not_budgetable`): a model the price book cannot price could spend without limit.
 */
function checkBudgetable(agent: Record<string, unknown>, book: PriceBook): void {
  const model = agent.model as string | { id?: string } | undefined;
  const given = typeof model === 'string' ? model : model?.id;
  // A bare claude-* id is anthropic/claude-*, as everywhere else in the API.
  const modelId = given === undefined ? 'unknown' : canonicalModelId(given);
  const probe = {
    ...emptyUsage(),
    tokens: { [modelId]: { input: 1, output: 1, cacheRead: 0, cacheWrite: 0 } },
  };
  if (costOf(probe, book).unpricedModels.length > 0) {
    throw invalidRequest(
      `model_not_budgetable: the price book "${book.id}" has no list price for ${modelId}, so a budget cannot be enforced; remove the budget or use a priced model`,
    );
  }
}

const statuses = new Set<SessionStatus>(['idle', 'running', 'rescheduling', 'terminated']);

/** `created_at[gt|gte|lt|lte]` of a list request, as ISO strings the stores compare as text. */
function readCreatedAtBounds(context: { req: { query(name: string): string | undefined } }): CreatedAtBounds {
  const bounds: CreatedAtBounds = {};
  for (const bound of ['gt', 'gte', 'lt', 'lte'] as const) {
    const name = `created_at[${bound}]`;
    const value = context.req.query(name);
    if (value === undefined || value === '') continue;
    const time = Date.parse(value);
    const iso = Number.isNaN(time) ? '' : new Date(time).toISOString();
    // Four-digit years only: the stores compare ISO strings as text.
    if (!/^\d{4}-/.test(iso)) throw invalidRequest(`${name} must be an RFC 3339 timestamp`);
    bounds[bound] = iso;
  }
  return bounds;
}

/** `/v1/sessions`: create (pinning an agent version), read, update, list, archive, delete. */
export function sessionRoutes(dependencies: ApiDependencies) {
  const { store, supervisor, limits } = dependencies;
  const { resources } = store;
  const app = new Hono<ApiEnvironment>();

  app.post('/', async (context) => {
    const principal = context.get('principal');
    const input = await readBody(context, sessionCreate);
    // A retried create (same Idempotency-Key, same owner) is answered with the session the
    // first one made, before any other check and without charging the limits again.
    const idempotencyKey = readIdempotencyKey(context);
    if (idempotencyKey !== undefined) {
      const existing = await resources.findSessionByIdempotencyKey(
        principal.tenantId,
        principal.userId,
        idempotencyKey,
      );
      if (existing) return context.json(await presentSession(store, existing));
    }
    const agentId = typeof input.agent === 'string' ? input.agent : input.agent.id;
    const version = typeof input.agent === 'string' ? undefined : input.agent.version;
    const agent = await resources.getAgentVersion(principal.tenantId, agentId, version);
    if (!agent) throw notFound('agent', version ? `${agentId} version ${version}` : agentId);
    if (agent.archivedAt) throw invalidRequest(`agent ${agentId} is archived`);
    // The agent this session runs: the version, or (agent_with_overrides) the version with the
    // given fields replaced for this session only.
    const agentBody =
      typeof input.agent !== 'string' && input.agent.type === 'agent_with_overrides'
        ? agentWithOverrides(agent.body, input.agent)
        : agent.body;
    if (input.budget) checkBudgetable(agentBody, dependencies.budgetBook);
    const environment = await resources.get('environment', principal.tenantId, input.environment_id);
    if (!environment) throw notFound('environment', input.environment_id);
    if (environment.archivedAt) throw invalidRequest(`environment ${input.environment_id} is archived`);
    // Each vault must be the tenant's and in use; another tenant's reads exactly like a missing one.
    const vaultIds = [...new Set(input.vault_ids ?? [])];
    for (const vaultId of vaultIds) {
      const vault = await store.vaults.getVault(principal.tenantId, vaultId);
      if (!vault) throw invalidRequest(`vault_ids: vault ${vaultId} not found`);
      if (vault.archivedAt) throw invalidRequest(`vault_ids: vault ${vaultId} is archived`);
    }
    // Skills are pinned like the agent: `latest` becomes the version current now.
    const skills = await checkSkillReferences(
      store.skills,
      principal.tenantId,
      (agentBody.skills as SkillReference[] | undefined) ?? [],
      { resolve: true, field: 'agent.skills' },
    );
    // Limits are charged after validation and before the first write: a refused request
    // (429) leaves nothing behind.
    const initialEvents = input.initial_events ?? [];
    const refunds: Array<() => void> = [];
    let admitted: (() => void) | undefined;
    try {
      refunds.push(await limits.chargeSessionCreate(principal));
      if (initialEvents.length > 0) refunds.push(await limits.chargeEvents(principal, initialEvents.length));
      admitted = initialEvents.length > 0 ? await limits.admitLiveSession(principal) : undefined;
    } catch (error) {
      for (const refund of refunds) refund();
      throw error;
    }

    const now = nowIso();
    const id = newId('sesn');
    const {
      created_at: _created,
      updated_at: _updated,
      archived_at: _archived,
      metadata: _metadata,
      ...pinned
    } = agentBody;
    const body = {
      id,
      type: 'session',
      agent: { ...pinned, skills },
      environment_id: environment.id,
      title: input.title ?? null,
      metadata: input.metadata ?? {},
      budget: input.budget ?? null,
      vault_ids: vaultIds,
      resources: [],
      outcome_evaluations: [],
      created_at: now,
    };
    const record: SessionRecord = {
      ...newRecord(principal, id, now, body),
      agentId: agent.id,
      agentVersion: agent.body.version as number,
      environmentId: environment.id,
      status: 'idle',
      stopReason: null,
      lastSeq: 0,
    };
    let result: Awaited<ReturnType<typeof resources.createSession>>;
    try {
      // One transaction: the session and its initial events land together or not at all.
      result = await resources.createSession(record, { initialEvents, idempotencyKey });
    } catch (error) {
      for (const refund of refunds) refund();
      admitted?.();
      throw error;
    }
    try {
      if (!result.created) {
        // A concurrent create with the same key won: this request made nothing.
        for (const refund of refunds) refund();
        const existing = await resources.getSession(principal.tenantId, result.existingSessionId);
        return context.json(await presentSession(store, existing!));
      }
      if (result.events.length > 0) {
        supervisor.notify(
          record,
          { session: record, events: result.events },
          { trace: extractTraceContext((name) => context.req.header(name)) },
        );
      }
    } finally {
      admitted?.();
    }
    const created = await resources.getSession(principal.tenantId, id);
    return context.json(await presentSession(store, created!));
  });

  app.get('/', async (context) => {
    const principal = context.get('principal');
    const { limit, cursor } = readPageQuery(context);
    const requested = readArrayQuery(context, 'statuses');
    for (const status of requested ?? []) {
      if (!statuses.has(status as SessionStatus)) throw invalidRequest(`unknown session status "${status}"`);
    }

    const page = await resources.listSessions({
      tenantId: principal.tenantId,
      ownerId: sessionOwnerFilter(principal),
      limit,
      cursor,
      includeArchived: readFlag(context, 'include_archived'),
      order: readOrder(context, 'desc'),
      agentId: context.req.query('agent_id') || undefined,
      agentVersion: readPositiveInteger(context, 'agent_version'),
      statuses: requested as SessionStatus[] | undefined,
      createdAt: readCreatedAtBounds(context),
    });
    const data = await Promise.all(page.items.map((session) => presentSession(store, session)));
    return context.json({ data, next_page: page.nextCursor, prev_page: null });
  });

  // Session resources (files, repositories, memory stores mounted into the session) are the
  // SDK's `sessions.resources`; Berth has none yet, so every such call gets a clear 400.
  const noResources = () => {
    throw invalidRequest('session resources are not supported by Berth yet');
  };
  app.all('/:id/resources', noResources);
  app.all('/:id/resources/*', noResources);

  app.get('/:id', async (context) => {
    return context.json(await presentSession(store, context.get('session')));
  });

  app.post('/:id', async (context) => {
    const session = context.get('session');
    const input = await readBody(context, sessionUpdate);
    if (input.agent !== undefined)
      throw invalidRequest("changing a session's agent is not supported by Berth yet");
    const now = nowIso();
    const body = { ...session.body };
    if (input.title !== undefined) body.title = input.title;
    if (input.budget) checkBudgetable(session.body.agent as Record<string, unknown>, dependencies.budgetBook);
    if (input.budget !== undefined) body.budget = input.budget;
    if (input.metadata !== undefined) {
      body.metadata = mergeMetadata(body.metadata as Record<string, string>, input.metadata);
    }
    session.body = body;
    session.updatedAt = now;
    await resources.update('session', session);
    supervisor.sessionChanged(session);
    return context.json(await presentSession(store, session));
  });

  app.post('/:id/archive', async (context) => {
    const session = context.get('session');
    if (!session.archivedAt) {
      const now = nowIso();
      session.archivedAt = now;
      session.updatedAt = now;
      await resources.update('session', session);
    }
    return context.json(await presentSession(store, session));
  });

  app.delete('/:id', async (context) => {
    const session = context.get('session');
    if (session.status === 'running' || session.status === 'rescheduling') {
      throw conflict(
        `session ${session.id} is ${session.status}; send user.interrupt and wait for idle before deleting`,
      );
    }
    await supervisor.settled(session);
    await resources.delete('session', session.tenantId, session.id);
    await dependencies.forgetSession(session);
    return context.json({ id: session.id, type: 'session_deleted' });
  });

  return app;
}
