import { Hono } from 'hono';
import { conflict, invalidRequest, notFound } from '../errors.js';
import { newId } from '../ids.js';
import type { ResourceRecord } from '../store/resource-store.js';
import type { ApiDependencies } from './context.js';
import {
  type ApiEnvironment,
  archiveRecord,
  listRecords,
  mergeMetadata,
  newRecord,
  nowIso,
  readBody,
  readPageQuery,
  readPositiveInteger,
} from './context.js';
import {
  type AgentCreate,
  type AgentUpdate,
  type AgentWithOverrides,
  agentCreate,
  agentUpdate,
  builtinToolNames,
  resolveUrlSources,
  type UrlSourcesParams,
} from './schemas.js';
import { checkSkillReferences } from './skills.js';

type ToolParams = NonNullable<AgentCreate['tools']>[number];
type Policy = { type: 'always_allow' | 'always_ask' | 'auto' };

/**
 * Fills in defaults the way the official API shows tools: every built-in tool listed, with the
 * fields the SDK's resolved config requires. `web_search` is listed as disabled: Berth has no
 * search backend, so the model is never offered it (enabling it explicitly is refused).
 */
function normalizeTools(tools: readonly ToolParams[]) {
  return tools.map((tool) => {
    if (tool.type === 'agent_toolset_20260401') {
      const defaults = {
        enabled: tool.default_config?.enabled ?? true,
        permission_policy: (tool.default_config?.permission_policy ?? { type: 'always_allow' }) as Policy,
      };
      const configs = builtinToolNames.map((name) => {
        const given = tool.configs?.find((config) => config.name === name);
        const { type: _type, enabled, permission_policy, ...rest } = given ?? { name };
        const resolved: Record<string, unknown> = {
          ...rest,
          name,
          type: name,
          enabled: name === 'web_search' ? false : (enabled ?? defaults.enabled),
          permission_policy: (permission_policy ?? defaults.permission_policy) as Policy,
        };
        if (name === 'web_fetch') {
          resolved.url_sources = resolveUrlSources(
            (rest as { url_sources?: UrlSourcesParams | null }).url_sources,
          );
        }
        return resolved;
      });
      return { type: tool.type, default_config: defaults, configs };
    }
    if (tool.type === 'mcp_toolset') {
      const defaults = {
        enabled: tool.default_config?.enabled ?? true,
        permission_policy: (tool.default_config?.permission_policy ?? { type: 'always_ask' }) as Policy,
      };
      return {
        type: tool.type,
        mcp_server_name: tool.mcp_server_name,
        default_config: defaults,
        configs: (tool.configs ?? []).map((config) => ({
          name: config.name,
          enabled: config.enabled ?? defaults.enabled,
          permission_policy: (config.permission_policy ?? defaults.permission_policy) as Policy,
        })),
      };
    }
    return tool;
  });
}

/** Refuses a multi-agent configuration: Berth runs one agent per session so far. */
function checkMultiagent(multiagent: unknown) {
  if (multiagent !== undefined && multiagent !== null) {
    throw invalidRequest(
      'multiagent: multi-agent sessions are not supported by Berth yet; omit multiagent (or send null)',
    );
  }
}

/** Refuses tool settings Berth cannot honour (checked on input only, never on stored bodies). */
function checkToolInput(tools: readonly ToolParams[] | null | undefined) {
  for (const tool of tools ?? []) {
    if (tool.type !== 'agent_toolset_20260401') continue;
    if (tool.configs?.some((config) => config.name === 'web_search' && config.enabled === true)) {
      throw invalidRequest(
        'web_search is not supported by Berth yet (it has no search backend): leave it disabled',
      );
    }
  }
}

/**
 * An agent body as the API shows it. Bodies stored before a resolved field existed get it here
 * (`web_fetch.url_sources`; `web_search` shown disabled, as the model was never offered it).
 */
export function presentAgent(body: Record<string, unknown>): Record<string, unknown> {
  const tools = body.tools as { type: string; configs?: Record<string, unknown>[] }[] | undefined;
  if (!tools?.some((tool) => tool.type === 'agent_toolset_20260401')) return body;
  return {
    ...body,
    tools: tools.map((tool) =>
      tool.type !== 'agent_toolset_20260401'
        ? tool
        : {
            ...tool,
            configs: tool.configs?.map((config) =>
              config.name === 'web_fetch'
                ? { ...config, url_sources: config.url_sources ?? null }
                : config.name === 'web_search'
                  ? { ...config, enabled: false }
                  : config,
            ),
          },
    ),
  };
}

function normalizeModel(model: AgentCreate['model']) {
  if (typeof model === 'string') return { id: model };
  const normalized: Record<string, unknown> = { id: model.id };
  if (model.effort)
    normalized.effort = typeof model.effort === 'string' ? { type: model.effort } : model.effort;
  if (model.speed) normalized.speed = model.speed;
  if (model.inference_geo) normalized.inference_geo = model.inference_geo;
  return normalized;
}

function checkReferences(body: Record<string, unknown>) {
  const servers = new Set((body.mcp_servers as { name: string }[]).map((server) => server.name));
  if (servers.size !== (body.mcp_servers as unknown[]).length)
    throw invalidRequest('mcp_servers names must be unique');
  const names = new Set<string>();
  for (const tool of body.tools as { type: string; name?: string; mcp_server_name?: string }[]) {
    if (tool.type === 'mcp_toolset' && !servers.has(tool.mcp_server_name!)) {
      throw invalidRequest(`mcp_toolset references unknown MCP server "${tool.mcp_server_name}"`);
    }
    if (tool.type === 'custom') {
      if (names.has(tool.name!)) throw invalidRequest(`custom tool "${tool.name}" is defined twice`);
      if ((builtinToolNames as readonly string[]).includes(tool.name!)) {
        throw invalidRequest(`custom tool "${tool.name}" clashes with a built-in tool name`);
      }
      if (tool.name === 'skill' && (body.skills as unknown[]).length > 0) {
        throw invalidRequest('custom tool "skill" clashes with the tool that loads the agent\'s skills');
      }
      names.add(tool.name!);
    }
  }
}

function agentBody(
  id: string,
  version: number,
  input: AgentCreate,
  createdAt: string,
  updatedAt: string,
): Record<string, unknown> {
  const body = {
    id,
    type: 'agent',
    name: input.name,
    description: input.description ?? null,
    model: normalizeModel(input.model),
    system: input.system ?? null,
    tools: normalizeTools(input.tools ?? []),
    mcp_servers: input.mcp_servers ?? [],
    skills: (input.skills ?? []).map((skill) => ({ ...skill, version: skill.version ?? 'latest' })),
    metadata: input.metadata ?? {},
    execution_identity: input.execution_identity ?? { type: 'service_account' },
    multiagent: null,
    version,
    created_at: createdAt,
    updated_at: updatedAt,
    archived_at: null as string | null,
  };
  checkReferences(body);
  return body;
}

/** The input that would recreate a stored body (used to apply a partial update). */
function asInput(body: Record<string, unknown>): AgentCreate {
  return {
    name: body.name as string,
    model: body.model as AgentCreate['model'],
    description: body.description as string | null,
    system: body.system as string | null,
    tools: body.tools as AgentCreate['tools'],
    mcp_servers: body.mcp_servers as AgentCreate['mcp_servers'],
    skills: body.skills as AgentCreate['skills'],
    metadata: body.metadata as Record<string, string>,
    execution_identity: body.execution_identity as AgentCreate['execution_identity'],
  };
}

function applyUpdate(current: AgentCreate, update: AgentUpdate): AgentCreate {
  const next: AgentCreate = { ...current };
  if (update.name !== undefined) next.name = update.name;
  if (update.model !== undefined) next.model = update.model;
  if (update.description !== undefined) next.description = update.description;
  if (update.system !== undefined) next.system = update.system;
  if (update.tools !== undefined) next.tools = update.tools ?? [];
  if (update.mcp_servers !== undefined) next.mcp_servers = update.mcp_servers ?? [];
  if (update.skills !== undefined) next.skills = update.skills ?? [];
  if (update.execution_identity !== undefined) next.execution_identity = update.execution_identity;
  if (update.metadata !== undefined) next.metadata = mergeMetadata(current.metadata, update.metadata);
  return next;
}

/**
 * The agent a session created with `agent_with_overrides` runs: the stored version with each
 * given field replaced, normalised and checked like an agent update (same id and version).
 */
export function agentWithOverrides(
  body: Record<string, unknown>,
  overrides: AgentWithOverrides,
): Record<string, unknown> {
  checkToolInput(overrides.tools);
  const input = asInput(body);
  if (overrides.model !== undefined) input.model = overrides.model;
  if (overrides.system !== undefined) input.system = overrides.system;
  if (overrides.tools !== undefined) input.tools = overrides.tools;
  if (overrides.mcp_servers !== undefined) input.mcp_servers = overrides.mcp_servers;
  if (overrides.skills !== undefined) input.skills = overrides.skills;
  const resolved = agentBody(
    body.id as string,
    body.version as number,
    input,
    body.created_at as string,
    body.updated_at as string,
  );
  return { ...resolved, multiagent: body.multiagent ?? null, archived_at: body.archived_at ?? null };
}

const comparable = (body: Record<string, unknown>) =>
  JSON.stringify({ ...body, version: 0, created_at: '', updated_at: '', archived_at: null });

/** `/v1/agents`: create, read, update (a new immutable version), list, versions, archive. */
export function agentRoutes(dependencies: ApiDependencies) {
  const { resources } = dependencies.store;
  const app = new Hono<ApiEnvironment>();

  app.post('/', async (context) => {
    const principal = context.get('principal');
    const input = await readBody(context, agentCreate);
    checkToolInput(input.tools);
    checkMultiagent(input.multiagent);
    const now = nowIso();
    const id = newId('agent');
    const body = agentBody(id, 1, input, now, now);
    await checkSkillReferences(dependencies.store.skills, principal.tenantId, input.skills ?? []);
    const record = newRecord(principal, id, now, body);
    await resources.createAgent(record);
    return context.json(body);
  });

  app.get('/', (context) => listRecords(context, resources, 'agent', presentAgent));

  app.get('/:id', async (context) => {
    const principal = context.get('principal');
    const version = readPositiveInteger(context, 'version');
    const record = await resources.getAgentVersion(principal.tenantId, context.req.param('id'), version);
    if (!record)
      throw notFound(
        'agent',
        version ? `${context.req.param('id')} version ${version}` : context.req.param('id'),
      );
    return context.json(presentAgent(record.body));
  });

  app.post('/:id', async (context) => {
    const principal = context.get('principal');
    const id = context.req.param('id');
    const update = await readBody(context, agentUpdate);
    checkToolInput(update.tools);
    checkMultiagent(update.multiagent);
    const current = await resources.getAgentVersion(principal.tenantId, id);
    if (!current) throw notFound('agent', id);
    if (current.archivedAt) throw invalidRequest(`agent ${id} is archived and cannot be updated`);
    const currentVersion = current.body.version as number;
    if (update.version !== undefined && update.version !== currentVersion) {
      throw conflict(
        `agent ${id} is at version ${currentVersion}, not ${update.version}; fetch it and retry`,
      );
    }
    const now = nowIso();
    const next = agentBody(
      id,
      currentVersion + 1,
      applyUpdate(asInput(current.body), update),
      current.createdAt,
      now,
    );
    // An update that changes nothing creates no version.
    if (comparable(next) === comparable(current.body)) return context.json(presentAgent(current.body));
    if (update.skills)
      await checkSkillReferences(dependencies.store.skills, principal.tenantId, update.skills);
    const record: ResourceRecord = { ...current, updatedAt: now, body: next };
    await resources.addAgentVersion(principal.tenantId, id, currentVersion, record);
    return context.json(next);
  });

  app.get('/:id/versions', async (context) => {
    const principal = context.get('principal');
    const id = context.req.param('id');
    if (!(await resources.getAgentVersion(principal.tenantId, id))) throw notFound('agent', id);
    const { limit, cursor } = readPageQuery(context);
    const page = await resources.listAgentVersions(principal.tenantId, id, { limit, cursor });
    return context.json({
      data: page.items.map((record) => presentAgent(record.body)),
      next_page: page.nextCursor,
    });
  });

  app.post('/:id/archive', async (context) => {
    const principal = context.get('principal');
    const id = context.req.param('id');
    const record = await resources.get('agent', principal.tenantId, id);
    if (!record) throw notFound('agent', id);
    return context.json(presentAgent(await archiveRecord(resources, 'agent', record)));
  });

  return app;
}
