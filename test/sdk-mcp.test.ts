import { type ChildProcess, spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { join, resolve } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { MCP_SERVER_ENTRY_POINTS } from '../src/mcp/mcp-packages.js';
import { createModelRegistry } from '../src/models/provider-registry.js';
import { startTestBerth, type TestBerth } from './support/berth-instance.js';
import { sendAndWaitIdle } from './support/session-stream.js';

const projectRoot = resolve(import.meta.dirname, '..');

async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((done) => server.listen(0, '127.0.0.1', done));
  const { port } = server.address() as { port: number };
  await new Promise((done) => server.close(done));
  return port;
}

/**
 * MCP toolsets end to end, driven by the official SDK: a stdio server (server-filesystem) runs
 * inside the session's sandbox, a remote one (server-everything) is reached over streamable HTTP.
 */
describe('MCP tools in a session', () => {
  let berth: TestBerth;
  let remote: ChildProcess;
  let remoteUrl: string;
  let environmentId: string;

  beforeAll(async () => {
    const port = await freePort();
    remote = spawn(
      process.execPath,
      [
        join(projectRoot, 'node_modules/@modelcontextprotocol/server-everything/dist/index.js'),
        'streamableHttp',
      ],
      { env: { PATH: process.env.PATH, PORT: String(port) }, stdio: ['ignore', 'ignore', 'pipe'] },
    );
    await new Promise<void>((done, fail) => {
      let stderr = '';
      remote.stderr!.on('data', (chunk: Buffer) => {
        stderr += chunk.toString('utf8');
        if (stderr.includes('listening on port')) done();
      });
      remote.once('exit', () => fail(new Error(`server-everything exited: ${stderr}`)));
    });
    remoteUrl = `http://127.0.0.1:${port}/mcp`;
    berth = await startTestBerth({
      // server-everything is on loopback, which Berth reaches only as an operator exception.
      environment: { BERTH_EGRESS_ALLOW_PRIVATE: `127.0.0.1:${port}` },
      models: createModelRegistry({
        environment: {},
        scriptedScripts: {
          'mcp-user': {
            name: 'mcp-user',
            steps: [
              {
                toolCalls: [
                  {
                    toolName: 'fs__write_file',
                    input: { path: '/workspace/note.txt', content: 'written over MCP' },
                  },
                  { toolName: 'everything__echo', input: { message: 'ping over http' } },
                ],
              },
              { text: 'Last result: {{last_tool_result}}' },
            ],
          },
        },
      }),
    });
    environmentId = (await berth.client.beta.environments.create({ name: 'mcp' })).id;
  });
  afterAll(async () => {
    await berth?.dispose();
    remote?.kill('SIGKILL');
  });

  const run = (sessionId: string, events: Parameters<typeof sendAndWaitIdle>[2]) =>
    sendAndWaitIdle(berth.client, sessionId, events);

  async function session(permission: 'always_allow' | 'always_ask') {
    const agent = await berth.client.beta.agents.create({
      name: `mcp-${permission}`,
      model: 'scripted/mcp-user',
      mcp_servers: [
        // Berth's stdio extension: the server runs inside the session's sandbox.
        {
          name: 'fs',
          type: 'stdio',
          command: 'node',
          args: [MCP_SERVER_ENTRY_POINTS.filesystem, '/workspace'],
        } as never,
        { name: 'everything', type: 'url', url: remoteUrl },
      ],
      tools: [
        {
          type: 'mcp_toolset',
          mcp_server_name: 'fs',
          default_config: { permission_policy: { type: permission } },
        },
        {
          type: 'mcp_toolset',
          mcp_server_name: 'everything',
          default_config: { permission_policy: { type: permission } },
        },
      ],
    });
    return (await berth.client.beta.sessions.create({ agent: agent.id, environment_id: environmentId })).id;
  }

  it('calls a stdio server inside the sandbox and a remote server, with mcp events in the log', async () => {
    const sessionId = await session('always_allow');
    const seen = await run(sessionId, [{ type: 'user.message', content: [{ type: 'text', text: 'go' }] }]);
    const uses = seen.filter((event) => event.type === 'agent.mcp_tool_use');
    expect(uses.map((event) => [event.mcp_server_name, event.name])).toEqual([
      ['fs', 'write_file'],
      ['everything', 'echo'],
    ]);
    const results = seen.filter((event) => event.type === 'agent.mcp_tool_result');
    expect(results.map((event) => event.mcp_tool_use_id)).toEqual(uses.map((event) => event.id));
    expect(results.every((event) => event.is_error === false)).toBe(true);
    expect(JSON.stringify(results[1]!.content)).toContain('ping over http');
    // The stdio server wrote into the session's own working directory.
    const note = join(berth.dataDir, 'sessions', sessionId, 'workspace', 'note.txt');
    expect(readFileSync(note, 'utf8')).toBe('written over MCP');
    expect(seen[seen.length - 1]!.stop_reason).toEqual({ type: 'end_turn' });
  });

  it('asks before an always_ask MCP tool runs', async () => {
    const sessionId = await session('always_ask');
    const paused = await run(sessionId, [{ type: 'user.message', content: [{ type: 'text', text: 'go' }] }]);
    const uses = paused.filter((event) => event.type === 'agent.mcp_tool_use');
    expect(uses.every((event) => event.evaluated_permission === 'ask')).toBe(true);
    expect(paused[paused.length - 1]!.stop_reason).toEqual({
      type: 'requires_action',
      event_ids: uses.map((event) => event.id),
    });
    const done = await run(sessionId, [
      { type: 'user.tool_confirmation', tool_use_id: uses[0]!.id, result: 'deny', deny_message: 'no writes' },
      { type: 'user.tool_confirmation', tool_use_id: uses[1]!.id, result: 'allow' },
    ]);
    const results = done.filter((event) => event.type === 'agent.mcp_tool_result');
    expect(results.map((event) => event.is_error)).toEqual([true, false]);
    expect(JSON.stringify(results[0]!.content)).toContain('no writes');
  });

  it('reports an MCP server that fails to start once, and the turn goes on without its tools', async () => {
    const agent = await berth.client.beta.agents.create({
      name: 'mcp-broken',
      model: 'scripted/mcp-user',
      mcp_servers: [
        {
          name: 'fs',
          type: 'stdio',
          command: 'node',
          args: [MCP_SERVER_ENTRY_POINTS.filesystem, '/workspace'],
        } as never,
        { name: 'everything', type: 'stdio', command: 'node', args: ['-e', 'process.exit(3)'] } as never,
      ],
      tools: [
        {
          type: 'mcp_toolset',
          mcp_server_name: 'fs',
          default_config: { permission_policy: { type: 'always_allow' } },
        },
        {
          type: 'mcp_toolset',
          mcp_server_name: 'everything',
          default_config: { permission_policy: { type: 'always_allow' } },
        },
      ],
    });
    const sessionId = (
      await berth.client.beta.sessions.create({ agent: agent.id, environment_id: environmentId })
    ).id;
    const seen = await run(sessionId, [{ type: 'user.message', content: [{ type: 'text', text: 'go' }] }]);
    const errors = seen.filter((event) => event.type === 'session.error');
    expect(errors).toHaveLength(1);
    expect(errors[0]!.error).toMatchObject({
      type: 'mcp_connection_failed_error',
      mcp_server_name: 'everything',
    });
    // The model still got the working server's tool; the broken server's tool is an error result.
    const results = seen.filter(
      (event) => event.type === 'agent.mcp_tool_result' || event.type === 'agent.tool_result',
    );
    expect(results.map((event) => event.is_error)).toEqual([false, true]);
    expect(seen[seen.length - 1]!.stop_reason).toEqual({ type: 'end_turn' });
  });
});
