import type Anthropic from '@anthropic-ai/sdk';
import {
  type AgentCreate,
  builtinToolNames,
  resolveUrlSources,
  type UrlSourcesParams,
} from '../api/schemas.js';

type Agent = Anthropic.Beta.Agents.BetaManagedAgentsAgent;

/** What `applyAgent` did, with the changed fields (one line each, e.g. `tools: +grep`). */
export type ApplyOutcome =
  | { kind: 'created'; agent: Agent }
  | { kind: 'updated'; agent: Agent; changes: string[] }
  | { kind: 'unchanged'; agent: Agent; note?: string };

/**
 * Makes the server's agent named `params.name` match `params`: creates it when no
 * non-archived agent has that name, updates it (one new version, guarded by the version it
 * read) when a field differs, and leaves it alone otherwise. When several agents share the
 * name, the most recently created one is used.
 */
export async function applyAgent(client: Anthropic, params: AgentCreate): Promise<ApplyOutcome> {
  const current = await findAgentByName(client, params.name);
  if (!current) {
    const agent = await client.beta.agents.create(params as Anthropic.Beta.AgentCreateParams);
    return { kind: 'created', agent };
  }
  const changes = describeChanges(current, params);
  if (changes.length === 0) return { kind: 'unchanged', agent: current };
  const metadata: Record<string, string | null> = { ...(params.metadata ?? {}) };
  // Metadata updates are patches: keys dropped from the file must be removed explicitly.
  for (const key of Object.keys(current.metadata)) if (!(key in metadata)) metadata[key] = null;
  const agent = await client.beta.agents.update(current.id, {
    version: current.version,
    model: params.model as Anthropic.Beta.AgentUpdateParams['model'],
    description: params.description ?? null,
    system: params.system ?? null,
    tools: (params.tools ?? []) as Anthropic.Beta.AgentUpdateParams['tools'],
    mcp_servers: (params.mcp_servers ?? []) as Anthropic.Beta.AgentUpdateParams['mcp_servers'],
    skills: (params.skills ?? []) as Anthropic.Beta.AgentUpdateParams['skills'],
    metadata,
  });
  // The server has the last word on what counts as a change (it skips no-op updates).
  if (agent.version === current.version) {
    return { kind: 'unchanged', agent, note: `the server found nothing to change (${changes.join('; ')})` };
  }
  return { kind: 'updated', agent, changes };
}

/** The newest non-archived agent with this exact name, if any. */
export async function findAgentByName(client: Anthropic, name: string): Promise<Agent | undefined> {
  let newest: Agent | undefined;
  for await (const agent of client.beta.agents.list({ limit: 100 })) {
    if (agent.name !== name || agent.archived_at) continue;
    if (!newest || agent.created_at > newest.created_at) newest = agent;
  }
  return newest;
}

/**
 * The fields where `desired` differs from the stored agent, one line each: model, system,
 * description, tools, mcp_servers, skills, metadata. Both sides are compared in the shape the
 * server stores (defaults filled in, as in api/agents.ts), so an unchanged file yields none.
 */
export function describeChanges(current: Agent, desired: AgentCreate): string[] {
  const changes: string[] = [];
  const currentModel = normalizeModel(current.model);
  const desiredModel = normalizeModel(desired.model);
  if (!sameValue(currentModel, desiredModel)) {
    changes.push(
      currentModel.id === desiredModel.id
        ? 'model: settings changed'
        : `model: ${String(currentModel.id)} → ${String(desiredModel.id)}`,
    );
  }
  if ((current.system ?? null) !== (desired.system ?? null)) changes.push('system: changed');
  if ((current.description ?? null) !== (desired.description ?? null)) changes.push('description: changed');

  const desiredTools = normalizeTools((desired.tools ?? []) as readonly Record<string, unknown>[]);
  const currentTools = normalizeTools(current.tools as unknown as readonly Record<string, unknown>[]);
  if (!sameValue(currentTools, desiredTools)) {
    changes.push(`tools: ${setChange(toolNames(currentTools), toolNames(desiredTools))}`);
  }
  const desiredServers = desired.mcp_servers ?? [];
  if (!sameValue(current.mcp_servers, desiredServers)) {
    const names = (servers: readonly { name: string }[]) => servers.map((server) => server.name);
    changes.push(`mcp_servers: ${setChange(names(current.mcp_servers), names(desiredServers))}`);
  }
  const desiredSkills = (desired.skills ?? []).map((skill) => ({
    ...skill,
    version: skill.version ?? 'latest',
  }));
  if (!sameValue(current.skills, desiredSkills)) {
    const ids = (skills: readonly { skill_id: string }[]) => skills.map((skill) => skill.skill_id);
    changes.push(`skills: ${setChange(ids(current.skills), ids(desiredSkills))}`);
  }
  const desiredMetadata = desired.metadata ?? {};
  if (!sameValue(current.metadata, desiredMetadata)) {
    const keys = new Set([...Object.keys(current.metadata), ...Object.keys(desiredMetadata)]);
    const parts: string[] = [];
    for (const key of [...keys].sort()) {
      if (!(key in current.metadata)) parts.push(`+${key}`);
      else if (!(key in desiredMetadata)) parts.push(`-${key}`);
      else if (current.metadata[key] !== desiredMetadata[key]) parts.push(`~${key}`);
    }
    changes.push(`metadata: ${parts.join(', ')}`);
  }
  return changes;
}

/** The tools an agent can use, by name: built-in tools, `mcp:<server>` and `custom:<name>`. */
export function enabledToolNames(tools: readonly object[]): string[] {
  return toolNames(normalizeTools(tools as readonly Record<string, unknown>[]));
}

/** `+added, -removed` between two name lists, or `changed` when only settings differ. */
function setChange(before: readonly string[], after: readonly string[]): string {
  const parts = [
    ...after.filter((name) => !before.includes(name)).map((name) => `+${name}`),
    ...before.filter((name) => !after.includes(name)).map((name) => `-${name}`),
  ];
  return parts.length > 0 ? parts.join(', ') : 'changed';
}

/** Enabled built-in tools by name, MCP toolsets as `mcp:<server>`, custom tools as `custom:<name>`. */
function toolNames(tools: readonly Record<string, unknown>[]): string[] {
  const names: string[] = [];
  for (const tool of tools) {
    if (tool.type === 'agent_toolset_20260401') {
      for (const config of tool.configs as { name: string; enabled: boolean }[]) {
        if (config.enabled) names.push(config.name);
      }
    } else if (tool.type === 'mcp_toolset') names.push(`mcp:${String(tool.mcp_server_name)}`);
    else names.push(`custom:${String(tool.name)}`);
  }
  return names;
}

function normalizeModel(model: unknown): Record<string, unknown> {
  if (typeof model === 'string') return { id: model };
  const { id, effort, speed, inference_geo } = model as Record<string, unknown>;
  const normalized: Record<string, unknown> = { id };
  if (effort) normalized.effort = typeof effort === 'string' ? { type: effort } : effort;
  if (speed) normalized.speed = speed;
  if (inference_geo) normalized.inference_geo = inference_geo;
  return normalized;
}

/** Tools with the defaults the server fills in (mirrors `normalizeTools` in api/agents.ts). */
function normalizeTools(tools: readonly Record<string, unknown>[]): Record<string, unknown>[] {
  return tools.map((tool) => {
    const defaultConfig = (tool.default_config ?? {}) as {
      enabled?: boolean | null;
      permission_policy?: unknown;
    };
    const configs = (tool.configs ?? []) as Record<string, unknown>[];
    if (tool.type === 'agent_toolset_20260401') {
      const enabled = defaultConfig.enabled ?? true;
      const policy = defaultConfig.permission_policy ?? { type: 'always_allow' };
      return {
        type: tool.type,
        default_config: { enabled, permission_policy: policy },
        configs: builtinToolNames.map((name) => {
          const {
            type: _type,
            enabled: given,
            permission_policy,
            ...rest
          } = configs.find((config) => config.name === name) ?? {};
          const resolved: Record<string, unknown> = {
            ...rest,
            name,
            // Berth has no web_search backend: the server always shows it disabled.
            enabled: name === 'web_search' ? false : (given ?? enabled),
            permission_policy: permission_policy ?? policy,
          };
          if (name === 'web_fetch') {
            resolved.url_sources = resolveUrlSources(rest.url_sources as UrlSourcesParams | null | undefined);
          }
          return resolved;
        }),
      };
    }
    if (tool.type === 'mcp_toolset') {
      const enabled = defaultConfig.enabled ?? true;
      const policy = defaultConfig.permission_policy ?? { type: 'always_ask' };
      return {
        type: tool.type,
        mcp_server_name: tool.mcp_server_name,
        default_config: { enabled, permission_policy: policy },
        configs: configs.map((config) => ({
          name: config.name,
          enabled: config.enabled ?? enabled,
          permission_policy: config.permission_policy ?? policy,
        })),
      };
    }
    return tool;
  });
}

/** Deep equality that ignores key order (both sides are plain JSON). */
function sameValue(left: unknown, right: unknown): boolean {
  return canonicalJson(left) === canonicalJson(right);
}

function canonicalJson(value: unknown): string {
  return JSON.stringify(value, (_key, item: unknown) => {
    if (typeof item !== 'object' || item === null || Array.isArray(item)) return item;
    return Object.fromEntries(
      Object.entries(item as Record<string, unknown>)
        .filter(([, entry]) => entry !== undefined)
        .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)),
    );
  });
}
