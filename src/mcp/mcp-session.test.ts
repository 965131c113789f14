/**
 * MCP sessions against the real reference servers (no fakes): stdio servers run inside a bwrap
 * sandbox with Berth's node_modules mounted read-only; the HTTP server is server-everything in
 * its streamable HTTP mode on a loopback port.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { PassThrough } from 'node:stream';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { skipUnlessPresent } from '../../test/support/required-in-ci.js';
import { createBwrapDriver } from '../sandbox/bwrap/bwrap-driver.js';
import type { SandboxHandle, SandboxProcess } from '../sandbox/driver.js';
import { hostProcessesMatching } from '../sandbox/driver-contract.test-suite.js';
import { MCP_SERVER_ENTRY_POINTS, mcpPackagesMount } from './mcp-packages.js';
import { createMcpSession, type McpServerSpec } from './mcp-session.js';

const projectRoot = fileURLToPath(new URL('../../', import.meta.url));
const driver = createBwrapDriver();
const availability = await driver.checkAvailability();
const bwrapMissing = availability.ok ? undefined : `bwrap unavailable: ${availability.reason}`;
const skipReason = skipUnlessPresent('the bwrap sandbox driver', bwrapMissing)
  ? bwrapMissing
  : driver.mode !== 'persistent'
    ? 'spawn needs the persistent bwrap mode (root)'
    : undefined;

const everything: McpServerSpec = {
  name: 'everything',
  type: 'stdio',
  command: 'node',
  args: [MCP_SERVER_ENTRY_POINTS.everything, 'stdio'],
};
const filesystem: McpServerSpec = {
  name: 'fs',
  type: 'stdio',
  command: 'node',
  args: [MCP_SERVER_ENTRY_POINTS.filesystem, '/workspace'],
};
const memory: McpServerSpec = {
  name: 'memory',
  type: 'stdio',
  command: 'node',
  args: [MCP_SERVER_ENTRY_POINTS.memory],
  env: { MEMORY_FILE_PATH: '/workspace/memory.jsonl' },
};

const signal = () => new AbortController().signal;

describe.skipIf(skipReason !== undefined)(
  `MCP servers inside a bwrap sandbox${skipReason ? ` (skipped: ${skipReason})` : ''}`,
  () => {
    let scratch: string;
    let handle: SandboxHandle;

    beforeAll(async () => {
      scratch = mkdtempSync(join(tmpdir(), 'berth-mcp-'));
      handle = await driver.provision({
        sessionId: 'sesn_mcp',
        workdir: join(scratch, 'workspace'),
        readOnlyMounts: [mcpPackagesMount(projectRoot)],
      });
    });

    afterAll(async () => {
      await driver.destroyAll();
      rmSync(scratch, { recursive: true, force: true });
    });

    /** spawnInSandbox that records the JSON-RPC methods the client sends and the processes it starts. */
    const recordingSpawn = () => {
      const methods: string[] = [];
      const processes: SandboxProcess[] = [];
      const spawnInSandbox = async (argv: readonly string[], env?: Record<string, string>) => {
        const real = driver.spawn!(handle, argv, { env });
        processes.push(real);
        const stdin = new PassThrough();
        let pending = '';
        stdin.on('data', (chunk: Buffer) => {
          pending += chunk.toString('utf8');
          const lines = pending.split('\n');
          pending = lines.pop()!;
          for (const line of lines) {
            const method = (JSON.parse(line) as { method?: string }).method;
            if (method) methods.push(method);
          }
        });
        stdin.pipe(real.stdin);
        return { ...real, stdin } satisfies SandboxProcess;
      };
      return { methods, processes, spawnInSandbox };
    };

    it('lists and calls server-everything tools over stdio, listing once per session', async () => {
      const recorder = recordingSpawn();
      const session = createMcpSession({ servers: [everything], spawnInSandbox: recorder.spawnInSandbox });
      try {
        const [tools, again] = await Promise.all([session.listTools(), session.listTools()]);
        expect(tools.map((tool) => tool.name)).toEqual(
          expect.arrayContaining(['echo', 'get-sum', 'get-tiny-image']),
        );
        expect(again).toEqual(tools);
        const echo = tools.find((tool) => tool.name === 'echo')!;
        expect(echo).toMatchObject({ serverName: 'everything', description: 'Echoes back the input string' });
        expect(echo.inputSchema).toMatchObject({
          type: 'object',
          properties: { message: { type: 'string' } },
        });

        expect(
          await session.callTool('everything', 'echo', { message: 'hi from berth' }, { signal: signal() }),
        ).toEqual({ content: 'Echo: hi from berth', isError: false });
        const image = await session.callTool('everything', 'get-tiny-image', {}, { signal: signal() });
        expect(image.isError).toBe(false);
        expect(image.content).toMatch(/\[image: image\/png, \d+ bytes\]/);
        const env = await session.callTool('everything', 'get-env', {}, { signal: signal() });
        // It runs in the sandbox: the sandbox's environment, not the host's.
        expect(env.content).toContain('/home/sandbox');
        expect(env.content).not.toContain(process.env.PATH ?? 'no host path');
        await session.listTools();
        expect(recorder.methods.filter((method) => method === 'tools/list')).toHaveLength(1);
        expect(recorder.methods.filter((method) => method === 'initialize')).toHaveLength(1);
        expect(session.errors()).toEqual([]);
      } finally {
        await session.close();
      }
      expect(await recorder.processes[0]!.exited).toBeDefined();
    });

    it('reports unknown servers, unknown tools and invalid input as tool errors', async () => {
      const session = createMcpSession({
        servers: [everything],
        spawnInSandbox: recordingSpawn().spawnInSandbox,
      });
      try {
        expect(await session.callTool('nope', 'echo', {}, { signal: signal() })).toEqual({
          content: 'unknown MCP server "nope"',
          isError: true,
        });
        expect(await session.callTool('everything', 'nope', {}, { signal: signal() })).toEqual({
          content: 'MCP server "everything" has no tool "nope"',
          isError: true,
        });
        const invalid = await session.callTool('everything', 'echo', { message: 42 }, { signal: signal() });
        expect(invalid.isError).toBe(true);
        expect(invalid.content).toMatch(/message/);
        expect((await session.callTool('everything', 'echo', 'text', { signal: signal() })).isError).toBe(
          true,
        );
      } finally {
        await session.close();
      }
    });

    it('times out a slow tool call and stops one when its abort signal fires', async () => {
      const session = createMcpSession({
        servers: [everything],
        spawnInSandbox: recordingSpawn().spawnInSandbox,
        requestTimeoutMs: 1500,
      });
      try {
        await session.listTools();
        let started = Date.now();
        const slow = await session.callTool(
          'everything',
          'trigger-long-running-operation',
          { duration: 30, steps: 3 },
          { signal: signal() },
        );
        expect(Date.now() - started).toBeLessThan(3000);
        expect(slow).toEqual({
          content: 'MCP server "everything" did not answer within 1500 ms',
          isError: true,
        });

        const controller = new AbortController();
        setTimeout(() => controller.abort(), 200);
        started = Date.now();
        const aborted = await session.callTool(
          'everything',
          'trigger-long-running-operation',
          { duration: 30, steps: 3 },
          { signal: controller.signal },
        );
        expect(Date.now() - started).toBeLessThan(1000);
        expect(aborted).toEqual({ content: 'the tool call was cancelled', isError: true });
        // The connection survives both.
        expect(
          (await session.callTool('everything', 'echo', { message: 'ok' }, { signal: signal() })).content,
        ).toBe('Echo: ok');
      } finally {
        await session.close();
      }
    });

    it('restarts a stdio server that died after listing, on the next call', async () => {
      const recorder = recordingSpawn();
      const session = createMcpSession({ servers: [everything], spawnInSandbox: recorder.spawnInSandbox });
      try {
        await session.listTools();
        recorder.processes[0]!.kill();
        await recorder.processes[0]!.exited;
        const outcome = await session.callTool(
          'everything',
          'echo',
          { message: 'back' },
          { signal: signal() },
        );
        expect(outcome).toEqual({ content: 'Echo: back', isError: false });
        expect(recorder.processes).toHaveLength(2);
        expect(recorder.methods.filter((method) => method === 'tools/list')).toHaveLength(1);
      } finally {
        await session.close();
      }
    });

    it('server-filesystem sees /workspace only', async () => {
      await driver.writeFile(handle, 'notes/hello.txt', 'hello from the workspace\n');
      const session = createMcpSession({
        servers: [filesystem],
        spawnInSandbox: recordingSpawn().spawnInSandbox,
      });
      try {
        const names = (await session.listTools()).map((tool) => tool.name);
        expect(names).toEqual(expect.arrayContaining(['list_directory', 'read_text_file', 'write_file']));
        const listing = await session.callTool(
          'fs',
          'list_directory',
          { path: '/workspace/notes' },
          { signal: signal() },
        );
        expect(listing).toEqual({ content: '[FILE] hello.txt', isError: false });
        const read = await session.callTool(
          'fs',
          'read_text_file',
          { path: '/workspace/notes/hello.txt' },
          {
            signal: signal(),
          },
        );
        expect(read).toEqual({ content: 'hello from the workspace\n', isError: false });
        const written = await session.callTool(
          'fs',
          'write_file',
          { path: '/workspace/out.txt', content: 'made by mcp' },
          {
            signal: signal(),
          },
        );
        expect(written.isError).toBe(false);
        expect(readFileSync(join(scratch, 'workspace', 'out.txt'), 'utf8')).toBe('made by mcp');

        for (const path of [
          '/etc/passwd',
          '/workspace/../etc/passwd',
          '../etc/passwd',
          '/opt/berth/node_modules',
        ]) {
          const attempt = await session.callTool('fs', 'read_text_file', { path }, { signal: signal() });
          expect(attempt.isError, path).toBe(true);
          expect(attempt.content, path).toMatch(/^Access denied - path outside allowed directories/);
          expect(attempt.content, path).not.toContain('root:');
        }
      } finally {
        await session.close();
      }
    });

    it('server-memory creates an entity and reads it back', async () => {
      const session = createMcpSession({
        servers: [memory],
        spawnInSandbox: recordingSpawn().spawnInSandbox,
      });
      try {
        await session.listTools();
        const created = await session.callTool(
          'memory',
          'create_entities',
          {
            entities: [{ name: 'Berth', entityType: 'project', observations: ['runs agents in sandboxes'] }],
          },
          { signal: signal() },
        );
        expect(created.isError).toBe(false);
        const opened = await session.callTool(
          'memory',
          'open_nodes',
          { names: ['Berth'] },
          { signal: signal() },
        );
        expect(opened.isError).toBe(false);
        expect(opened.content).toContain('runs agents in sandboxes');
        expect(existsSync(join(scratch, 'workspace', 'memory.jsonl'))).toBe(true);
      } finally {
        await session.close();
      }
    });

    it('a server that crashes at start loses its tools, says why, and its calls fail at once', async () => {
      const session = createMcpSession({
        servers: [
          {
            name: 'crash',
            type: 'stdio',
            command: 'node',
            args: ['-e', 'console.error("boom at start"); process.exit(1)'],
          },
          everything,
        ],
        spawnInSandbox: recordingSpawn().spawnInSandbox,
        requestTimeoutMs: 5000,
      });
      try {
        const tools = await session.listTools();
        expect(new Set(tools.map((tool) => tool.serverName))).toEqual(new Set(['everything']));
        const [failure] = session.errors();
        expect(failure?.serverName).toBe('crash');
        expect(failure?.message).toMatch(/exited with code 1/);
        expect(failure?.message).toContain('boom at start');
        const started = Date.now();
        const outcome = await session.callTool('crash', 'anything', {}, { signal: signal() });
        expect(Date.now() - started).toBeLessThan(100);
        expect(outcome.isError).toBe(true);
        expect(outcome.content).toMatch(/^MCP server "crash" is unavailable: .*exited with code 1/);
      } finally {
        await session.close();
      }
    });

    it('a server that never speaks MCP is given up on after the timeout and stopped', async () => {
      const marker = `1000.${process.pid}`;
      const session = createMcpSession({
        servers: [{ name: 'silent', type: 'stdio', command: 'sleep', args: [marker] }],
        spawnInSandbox: recordingSpawn().spawnInSandbox,
        requestTimeoutMs: 1000,
      });
      try {
        const started = Date.now();
        expect(await session.listTools()).toEqual([]);
        expect(Date.now() - started).toBeLessThan(3000);
        expect(session.errors()).toEqual([
          {
            serverName: 'silent',
            message: 'did not complete the MCP handshake within 1000 ms (the server process was stopped)',
          },
        ]);
        const outcome = await session.callTool('silent', 'anything', {}, { signal: signal() });
        expect(outcome.isError).toBe(true);
        await expect.poll(() => hostProcessesMatching(`sleep ${marker}`), { timeout: 3000 }).toEqual([]);
      } finally {
        await session.close();
      }
    });

    it('a server that dies during a call turns the call into an error naming the exit', async () => {
      const recorder = recordingSpawn();
      const session = createMcpSession({ servers: [everything], spawnInSandbox: recorder.spawnInSandbox });
      try {
        await session.listTools();
        setTimeout(() => recorder.processes[0]!.kill(), 300);
        const started = Date.now();
        const outcome = await session.callTool(
          'everything',
          'trigger-long-running-operation',
          { duration: 30, steps: 3 },
          { signal: signal() },
        );
        expect(Date.now() - started).toBeLessThan(3000);
        expect(outcome.isError).toBe(true);
        expect(outcome.content).toMatch(
          /^MCP server "everything" closed the connection \(the server process was killed/,
        );
      } finally {
        await session.close();
      }
    });
  },
);

/** A free loopback TCP port (closed again before it is returned). */
async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as { port: number };
  await new Promise((resolve) => server.close(resolve));
  return port;
}

describe('MCP servers over streamable HTTP', () => {
  let server: ChildProcess;
  let url: string;

  beforeAll(async () => {
    const port = await freePort();
    server = spawn(
      process.execPath,
      [
        join(projectRoot, 'node_modules/@modelcontextprotocol/server-everything/dist/index.js'),
        'streamableHttp',
      ],
      { env: { PATH: process.env.PATH, PORT: String(port) }, stdio: ['ignore', 'ignore', 'pipe'] },
    );
    await new Promise<void>((resolve, reject) => {
      let stderr = '';
      server.stderr!.on('data', (chunk: Buffer) => {
        stderr += chunk.toString('utf8');
        if (stderr.includes('listening on port')) resolve();
      });
      server.once('exit', () => reject(new Error(`server-everything exited: ${stderr}`)));
    });
    url = `http://127.0.0.1:${port}/mcp`;
  });

  afterAll(() => {
    server?.kill('SIGKILL');
  });

  const noSandbox = async (): Promise<SandboxProcess> => {
    throw new Error('an HTTP server must not start sandbox processes');
  };

  it('lists and calls server-everything tools from the host', async () => {
    const session = createMcpSession({
      servers: [{ name: 'remote', type: 'url', url, headers: { 'x-berth-test': '1' } }],
      spawnInSandbox: noSandbox,
    });
    try {
      const tools = await session.listTools();
      expect(tools.map((tool) => tool.name)).toEqual(expect.arrayContaining(['echo', 'get-sum']));
      expect(tools.every((tool) => tool.serverName === 'remote')).toBe(true);
      expect(
        await session.callTool('remote', 'echo', { message: 'over http' }, { signal: signal() }),
      ).toEqual({
        content: 'Echo: over http',
        isError: false,
      });
      const sum = await session.callTool('remote', 'get-sum', { a: 2, b: 3 }, { signal: signal() });
      expect(sum).toMatchObject({ isError: false, content: expect.stringContaining('5') });
    } finally {
      await session.close();
    }
  });

  it('an unreachable URL loses its tools and says why, without failing the others', async () => {
    const session = createMcpSession({
      servers: [
        { name: 'gone', type: 'url', url: `http://127.0.0.1:${await freePort()}/mcp` },
        { name: 'remote', type: 'url', url },
      ],
      spawnInSandbox: noSandbox,
      requestTimeoutMs: 5000,
    });
    try {
      const tools = await session.listTools();
      expect(tools.length).toBeGreaterThan(0);
      expect(session.errors()).toEqual([
        {
          serverName: 'gone',
          message: expect.stringMatching(/^could not connect: fetch failed \(.*ECONNREFUSED/),
        },
      ]);
      const outcome = await session.callTool('gone', 'echo', { message: 'x' }, { signal: signal() });
      expect(outcome.isError).toBe(true);
    } finally {
      await session.close();
    }
  });
});
