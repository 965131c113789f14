import type { HostFetch } from '../egress/host-fetch.js';
import { mcpModelToolName } from '../harness/context.js';
import type { HarnessTool, SessionToolbox } from '../harness/harness.js';
import { createMcpFetch } from '../mcp/mcp-fetch.js';
import { mcpPackagesMount } from '../mcp/mcp-packages.js';
import { createMcpSession, type McpServerSpec, type McpSession, type McpTool } from '../mcp/mcp-session.js';
import { SessionSkills, type SkillPin, skillToolDefinition } from '../skills/session-skills.js';
import { type SessionKey, sessionKeyString } from '../store/event-store.js';
import type { SessionRecord } from '../store/resource-store.js';
import type { SkillStore } from '../store/skill-store.js';
import { builtinToolDefinitions, createBuiltinToolExecutor } from '../tools/builtin-tools.js';
import { createWebFetch, type WebFetchConfig, webFetchDefinition } from '../tools/web-fetch.js';
import type { SessionCredential } from '../vault/credentials.js';
import type { SandboxManager } from './sandbox-manager.js';

interface AgentToolEntry {
  type: string;
  name?: string;
  description?: string;
  input_schema?: Record<string, unknown>;
  mcp_server_name?: string;
  configs?: {
    name: string;
    enabled: boolean;
    permission_policy?: { type: string };
    allowed_domains?: string[];
    blocked_domains?: string[];
    max_content_tokens?: number | null;
  }[];
  default_config?: { enabled: boolean; permission_policy?: { type: string } };
}

/**
 * The tools a session's pinned agent version offers the model: the enabled built-in tools
 * that Berth implements (run in the sandbox) and the agent's custom tools (run by the client).
 */
export function toolsOfAgent(agentTools: readonly AgentToolEntry[]): HarnessTool[] {
  const tools: HarnessTool[] = [];
  for (const entry of agentTools) {
    if (entry.type === 'agent_toolset_20260401') {
      for (const definition of builtinToolDefinitions) {
        const config = entry.configs?.find((candidate) => candidate.name === definition.name);
        if (!(config?.enabled ?? entry.default_config?.enabled ?? true)) continue;
        tools.push({
          name: definition.name,
          description: definition.description,
          inputSchema: definition.inputSchema as Record<string, unknown>,
          kind: 'builtin',
          readOnly: definition.readOnly,
          permission: permissionOf(config, entry, 'allow'),
        });
      }
      const webFetch = entry.configs?.find((candidate) => candidate.name === 'web_fetch');
      if (webFetch?.enabled ?? entry.default_config?.enabled ?? true) {
        tools.push({
          name: webFetchDefinition.name,
          description: webFetchDefinition.description,
          inputSchema: webFetchDefinition.inputSchema as Record<string, unknown>,
          kind: 'builtin',
          readOnly: webFetchDefinition.readOnly,
          permission: permissionOf(webFetch, entry, 'allow'),
        });
      }
    } else if (entry.type === 'custom') {
      tools.push({
        name: entry.name!,
        description: entry.description ?? '',
        inputSchema: entry.input_schema ?? { type: 'object' },
        kind: 'custom',
        readOnly: false,
        permission: 'allow',
      });
    }
  }
  return tools;
}

/** Permission of a tool from its config, falling back to the toolset default, then `fallback`. */
function permissionOf(
  config: { permission_policy?: { type: string } } | undefined,
  entry: AgentToolEntry,
  fallback: 'allow' | 'ask',
): 'allow' | 'ask' {
  // `auto` (a model-evaluated policy upstream) runs like `always_allow` in Berth.
  const type = (config?.permission_policy ?? entry.default_config?.permission_policy)?.type;
  if (type === undefined) return fallback;
  return type === 'always_ask' ? 'ask' : 'allow';
}

/** The MCP tools an agent's `mcp_toolset` entries enable, from the servers' tool lists. */
export function mcpToolsOfAgent(
  agentTools: readonly AgentToolEntry[],
  listed: readonly McpTool[],
): HarnessTool[] {
  const tools: HarnessTool[] = [];
  for (const entry of agentTools) {
    if (entry.type !== 'mcp_toolset') continue;
    for (const tool of listed) {
      if (tool.serverName !== entry.mcp_server_name) continue;
      const config = entry.configs?.find((candidate) => candidate.name === tool.name);
      if (!(config?.enabled ?? entry.default_config?.enabled ?? true)) continue;
      tools.push({
        name: mcpModelToolName(tool.serverName, tool.name),
        description: tool.description,
        inputSchema: tool.inputSchema,
        kind: 'mcp',
        mcp: { serverName: tool.serverName, toolName: tool.name },
        readOnly: false,
        // MCP tools ask first unless the agent says otherwise, as in the official API.
        permission: permissionOf(config, entry, 'ask'),
      });
    }
  }
  return tools;
}

/** The `web_fetch` settings of an agent's toolset, if it has one. */
function webFetchConfigOf(agentTools: readonly AgentToolEntry[]): WebFetchConfig {
  const config = agentTools
    .find((entry) => entry.type === 'agent_toolset_20260401')
    ?.configs?.find((candidate) => candidate.name === 'web_fetch');
  return {
    allowedDomains: config?.allowed_domains,
    blockedDomains: config?.blocked_domains,
    maxContentTokens: config?.max_content_tokens,
  };
}

interface SessionEntry {
  session: SessionKey;
  toolbox: SessionToolbox;
  mcp: McpSession | undefined;
  /** Closes the session's host-side egress client, if one was made. */
  closeClient(): Promise<void>;
}

/**
 * The toolboxes of this process's sessions: built-in tools run in the session's sandbox
 * (provisioned on first use); MCP servers are connected on first need and kept for the
 * session (stdio servers run inside its sandbox, with Berth's `node_modules` mounted
 * read-only so the bundled servers are there).
 */
export class Toolboxes {
  readonly #entries = new Map<string, SessionEntry>();
  readonly #sandboxes: SandboxManager;
  readonly #projectRoot: string;
  readonly #mcpTimeoutMs: number | undefined;
  readonly #traceHeaders: ((session: SessionKey) => Record<string, string>) | undefined;
  readonly #hostFetchFor: ((session: SessionRecord) => Promise<HostFetch>) | undefined;
  readonly #credentialsFor: ((session: SessionRecord) => Promise<readonly SessionCredential[]>) | undefined;
  readonly #skills: SkillStore | undefined;

  constructor(options: {
    sandboxes: SandboxManager;
    projectRoot: string;
    mcpTimeoutMs?: number;
    /** A session's current trace context as W3C headers, passed on to MCP servers (tracing on). */
    traceHeaders?: (session: SessionKey) => Record<string, string>;
    /**
     * The session's client for Berth's own requests (`web_fetch`, remote MCP servers), under its
     * environment's egress rules. Without it, `web_fetch` fails and remote MCP servers are
     * reached with the plain global fetch (unit tests only).
     */
    hostFetchFor?: (session: SessionRecord) => Promise<HostFetch>;
    /** The session's vault credentials (remote MCP servers' tokens). */
    credentialsFor?: (session: SessionRecord) => Promise<readonly SessionCredential[]>;
    /** Where the sessions' skills are stored (without it, skills are not offered). */
    skills?: SkillStore;
  }) {
    this.#sandboxes = options.sandboxes;
    this.#projectRoot = options.projectRoot;
    this.#mcpTimeoutMs = options.mcpTimeoutMs;
    this.#traceHeaders = options.traceHeaders;
    this.#hostFetchFor = options.hostFetchFor;
    this.#credentialsFor = options.credentialsFor;
    this.#skills = options.skills;
  }

  /** The session's toolbox (made once per session and process). */
  for(session: SessionRecord): SessionToolbox {
    const key = sessionKeyString(session);
    const existing = this.#entries.get(key);
    if (existing) return existing.toolbox;
    const agent = session.body.agent as {
      tools?: AgentToolEntry[];
      mcp_servers?: McpServerSpec[];
      skills?: SkillPin[];
    };
    const agentTools = agent.tools ?? [];
    const skills = new SessionSkills({
      store: this.#skills,
      tenantId: session.tenantId,
      pins: agent.skills ?? [],
    });
    const builtin = [...toolsOfAgent(agentTools), ...skills.tools()];
    const servers = (agent.mcp_servers ?? []).filter((server) =>
      agentTools.some((tool) => tool.type === 'mcp_toolset' && tool.mcp_server_name === server.name),
    );
    const needsPackages = servers.some((server) => server.type === 'stdio');
    const access = this.#sandboxes.access(
      session,
      needsPackages ? { readOnlyMounts: [mcpPackagesMount(this.#projectRoot)] } : undefined,
    );
    const sandboxes = this.#sandboxes;
    const driverOf = () => {
      const driver = sandboxes.driverOf(session);
      if (!driver) throw new Error("the session's sandbox was released while a tool was starting");
      return driver;
    };
    const hostFetchFor = this.#hostFetchFor;
    const credentialsFor = this.#credentialsFor;
    let client: Promise<HostFetch> | undefined;
    const clientOf = (): Promise<HostFetch> => {
      if (!hostFetchFor) return Promise.reject(new Error('this server makes no requests for sessions'));
      client ??= hostFetchFor(session);
      client.catch(() => {
        client = undefined;
      });
      return client;
    };
    const traceHeaders = this.#traceHeaders ? () => this.#traceHeaders!(session) : undefined;
    const webFetch = createWebFetch({ client: clientOf, config: webFetchConfigOf(agentTools) });
    const mcp =
      servers.length === 0
        ? undefined
        : createMcpSession({
            servers,
            requestTimeoutMs: this.#mcpTimeoutMs,
            traceHeaders,
            fetchFor: hostFetchFor
              ? (spec) =>
                  createMcpFetch({
                    serverName: spec.name,
                    serverUrl: spec.url,
                    client: clientOf,
                    credentials: credentialsFor ? () => credentialsFor(session) : undefined,
                    extraHeaders: traceHeaders,
                  })
              : undefined,
            spawnInSandbox: async (argv, env) => {
              const handle = await access.get();
              const driver = driverOf();
              if (!driver.spawn)
                throw new Error(`sandbox driver ${driver.name} cannot run stdio MCP servers`);
              return driver.spawn(handle, argv, { env });
            },
          });
    let listing: Promise<readonly HarnessTool[]> | undefined;
    const toolbox: SessionToolbox = {
      listTools: () => {
        listing ??= (async () => [
          ...builtin,
          ...mcpToolsOfAgent(agentTools, mcp ? await mcp.listTools() : []),
        ])();
        return listing;
      },
      failures: () => mcp?.errors() ?? [],
      instructions: () => skills.instructions(),
      async execute(name, input, options) {
        const tool = (await toolbox.listTools()).find((candidate) => candidate.name === name);
        if (tool?.name === skillToolDefinition.name && !skills.empty) {
          return skills.load(input, async (path, data) => {
            const handle = await access.get();
            await driverOf().writeFile(handle, path, data);
          });
        }
        if (tool?.kind === 'mcp' && mcp) {
          return mcp.callTool(tool.mcp!.serverName, tool.mcp!.toolName, input, options);
        }
        // Needs no sandbox: the request leaves from the host, under the session's egress rules.
        if (tool?.name === webFetchDefinition.name) return webFetch(input, options?.signal);
        const handle = await access.get();
        return createBuiltinToolExecutor(driverOf(), { get: async () => handle }).execute(
          name,
          input,
          options,
        );
      },
    };
    this.#entries.set(key, {
      session: { tenantId: session.tenantId, id: session.id },
      toolbox,
      mcp,
      closeClient: async () => {
        const made = client;
        client = undefined;
        await (await made?.catch(() => undefined))?.close();
      },
    });
    return toolbox;
  }

  /** Closes the session's MCP connections (its sandbox is released separately). */
  async release(session: SessionKey): Promise<void> {
    const key = sessionKeyString(session);
    const entry = this.#entries.get(key);
    this.#entries.delete(key);
    await entry?.mcp?.close();
    await entry?.closeClient();
  }

  /** Closes every session's MCP connections. */
  async releaseAll(): Promise<void> {
    await Promise.all([...this.#entries.values()].map((entry) => this.release(entry.session)));
  }
}
