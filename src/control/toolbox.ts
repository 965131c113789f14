import type { HarnessTool, SessionToolbox } from '../harness/harness.js';
import type { SessionRecord } from '../store/resource-store.js';
import { builtinToolDefinitions, createBuiltinToolExecutor } from '../tools/builtin-tools.js';
import type { SandboxManager } from './sandbox-manager.js';

interface AgentToolEntry {
  type: string;
  name?: string;
  description?: string;
  input_schema?: Record<string, unknown>;
  configs?: { name: string; enabled: boolean; permission_policy?: { type: string } }[];
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
          // `auto` (a model-evaluated policy upstream) runs like `always_allow` in Berth.
          permission:
            (config?.permission_policy ?? entry.default_config?.permission_policy)?.type === 'always_ask'
              ? 'ask'
              : 'allow',
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

/** Builds a session's toolbox; the sandbox behind it is provisioned on the first built-in call. */
export function createToolbox(session: SessionRecord, sandboxes: SandboxManager): SessionToolbox {
  const agent = session.body.agent as { tools?: AgentToolEntry[] };
  const tools = toolsOfAgent(agent.tools ?? []);
  const access = sandboxes.access(session);
  return {
    listTools: async () => tools,
    async execute(name, input, options) {
      const handle = await access.get();
      const driver = sandboxes.driverOf(session.id);
      if (!driver) throw new Error("the session's sandbox was released while a tool was starting");
      return createBuiltinToolExecutor(driver, { get: async () => handle }).execute(name, input, options);
    },
  };
}
