/**
 * MCP server packages installed with Berth, made visible inside sandboxes. Berth's
 * `node_modules` is bound read-only at `/opt/berth/node_modules`, so a stdio server runs inside
 * the sandbox with the sandbox's `/usr/bin/node`, e.g.
 *
 * ```ts
 * { type: 'stdio', name: 'fs', command: 'node',
 *   args: [`${MCP_PACKAGES_INSIDE}/@modelcontextprotocol/server-filesystem/dist/index.js`, '/workspace'] }
 * { type: 'stdio', name: 'memory', command: 'node',
 *   args: [`${MCP_PACKAGES_INSIDE}/@modelcontextprotocol/server-memory/dist/index.js`],
 *   env: { MEMORY_FILE_PATH: '/workspace/.memory.jsonl' } } // its default path is read-only here
 * { type: 'stdio', name: 'everything', command: 'node',
 *   args: [`${MCP_PACKAGES_INSIDE}/@modelcontextprotocol/server-everything/dist/index.js`, 'stdio'] }
 * ```
 *
 * The whole `node_modules` is visible (read-only) to the sandbox: it is public code, but it is
 * Berth's own dependency tree, so nothing secret may ever be installed there.
 */
import { join } from 'node:path';
import type { ReadOnlyMount } from '../sandbox/driver.js';

/** Where Berth's `node_modules` appears inside a sandbox. */
export const MCP_PACKAGES_INSIDE = '/opt/berth/node_modules';

/** Entry points (inside the sandbox) of the MCP servers installed with Berth. */
export const MCP_SERVER_ENTRY_POINTS = {
  everything: `${MCP_PACKAGES_INSIDE}/@modelcontextprotocol/server-everything/dist/index.js`,
  filesystem: `${MCP_PACKAGES_INSIDE}/@modelcontextprotocol/server-filesystem/dist/index.js`,
  memory: `${MCP_PACKAGES_INSIDE}/@modelcontextprotocol/server-memory/dist/index.js`,
} as const;

/**
 * The read-only mount that shows `<projectRoot>/node_modules` at `MCP_PACKAGES_INSIDE`; add it
 * to `SandboxSpec.readOnlyMounts` of sessions that declare stdio MCP servers.
 */
export function mcpPackagesMount(projectRoot: string): ReadOnlyMount {
  return { hostPath: join(projectRoot, 'node_modules'), insidePath: MCP_PACKAGES_INSIDE };
}
