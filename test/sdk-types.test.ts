import { type ChildProcess, spawn } from 'node:child_process';
import { rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { dirname, join, resolve } from 'node:path';
import { toFile } from '@anthropic-ai/sdk';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createModelRegistry } from '../src/models/provider-registry.js';
import type { Script } from '../src/models/scripted/script.js';
import { startTestBerth, type TestBerth } from './support/berth-instance.js';
import { type AnswerKind, checkAnswers, type RecordedAnswer } from './support/sdk-type-check.js';

const scripts: Record<string, Script> = {
  // Thinking, text, an always_ask bash call, a custom tool, then a final message: most of the
  // event types a session writes.
  tour: {
    name: 'tour',
    steps: [
      {
        reasoning: 'Run something first.',
        text: 'Running a command.',
        toolCalls: [{ toolName: 'bash', input: { command: 'echo typed' } }],
      },
      { toolCalls: [{ toolName: 'lookup', input: { query: 'berth' } }] },
      { text: 'Done: {{last_tool_result}}' },
    ],
  },
  failing: { name: 'failing', steps: [{ error: 'upstream is down' }] },
  'mcp-echo': {
    name: 'mcp-echo',
    steps: [
      { toolCalls: [{ toolName: 'everything__echo', input: { message: 'typed' } }] },
      { text: '{{last_tool_result}}' },
    ],
  },
};

const projectRoot = resolve(import.meta.dirname, '..');

/** A free loopback port (the MCP reference server takes its port from the environment). */
async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((done) => server.listen(0, '127.0.0.1', done));
  const { port } = server.address() as { port: number };
  await new Promise((done) => server.close(done));
  return port;
}

/** The MCP reference server `server-everything` over streamable HTTP, once it listens. */
async function startMcpServer(port: number): Promise<ChildProcess> {
  const child = spawn(
    process.execPath,
    [
      join(projectRoot, 'node_modules/@modelcontextprotocol/server-everything/dist/index.js'),
      'streamableHttp',
    ],
    { env: { PATH: process.env.PATH, PORT: String(port) }, stdio: ['ignore', 'ignore', 'pipe'] },
  );
  await new Promise<void>((done, fail) => {
    let stderr = '';
    child.stderr!.on('data', (chunk: Buffer) => {
      stderr += chunk.toString('utf8');
      if (stderr.includes('listening on port')) done();
    });
    child.once('exit', () => fail(new Error(`server-everything exited: ${stderr}`)));
  });
  return child;
}

const SKILL_MD = `---
name: typed-skill
description: Checks types. Use in tests.
---
# Typed skill
`;

/**
 * Every `client.beta.*` method Berth implements, called with the official SDK against a real
 * Berth on SQLite; every answer is compiled against the SDK's own declaration files (the type is
 * read off the method's signature), so a missing required field, an unknown field or an enum
 * value the SDK does not know fails this test, whatever the SDK version installed.
 */
describe('Berth answers conform to the official SDK types', () => {
  let berth: TestBerth;
  let mcpServer: ChildProcess;
  let mcpUrl: string;
  const answers: RecordedAnswer[] = [];

  beforeAll(async () => {
    const port = await freePort();
    mcpServer = await startMcpServer(port);
    mcpUrl = `http://127.0.0.1:${port}/mcp`;
    berth = await startTestBerth({
      models: createModelRegistry({ environment: {}, scriptedScripts: scripts }),
      // A one-second max lifetime, to see a session terminated.
      // The MCP server is on loopback, which Berth reaches only as an operator exception.
      environment: { BERTH_MIN_LIFECYCLE_S: '1', BERTH_EGRESS_ALLOW_PRIVATE: `127.0.0.1:${port}` },
    });
  });
  afterAll(async () => {
    await berth?.dispose();
    mcpServer?.kill('SIGKILL');
  });

  const record = (method: string, kind: AnswerKind, value: unknown) => {
    answers.push({ method, kind, value });
  };
  /** Awaits an SDK call and records its parsed answer. */
  async function value<T>(method: string, call: Promise<T>): Promise<T> {
    const answer = await call;
    record(method, 'value', answer);
    return answer;
  }
  /** Records a list call's raw page body (data, next_page, …) exactly as Berth sent it. */
  async function page(method: string, call: { asResponse(): Promise<Response> }): Promise<unknown[]> {
    const body = (await (await call.asResponse()).json()) as { data: unknown[] };
    record(method, 'page', body);
    return body.data;
  }

  it('answers every implemented method with what the SDK types declare', async () => {
    const { client } = berth;
    const beta = client.beta;

    // Environments.
    const environment = await value(
      'environments.create',
      beta.environments.create({
        name: 'typed',
        description: 'type check',
        config: { type: 'cloud', networking: { type: 'limited', allowed_hosts: ['example.com'] } },
        metadata: { team: 'types' },
      }),
    );
    await value('environments.retrieve', beta.environments.retrieve(environment.id));
    await value('environments.update', beta.environments.update(environment.id, { description: 'updated' }));
    await page('environments.list', beta.environments.list());
    const spare = await beta.environments.create({ name: 'spare' });
    await value('environments.archive', beta.environments.archive(spare.id));
    await value('environments.delete', beta.environments.delete(spare.id));

    // Skills and their versions.
    const skillFiles = async () => [await toFile(Buffer.from(SKILL_MD), 'typed-skill/SKILL.md')];
    const skill = await value('skills.create', beta.skills.create({ files: await skillFiles() }));
    await value('skills.retrieve', beta.skills.retrieve(skill.id));
    await page('skills.list', beta.skills.list());
    const version = await value(
      'skills.versions.create',
      beta.skills.versions.create(skill.id, { files: await skillFiles() }),
    );
    await value(
      'skills.versions.retrieve',
      beta.skills.versions.retrieve(version.id, { skill_id: skill.id }),
    );
    await page('skills.versions.list', beta.skills.versions.list(skill.id));

    // Agents: every tool kind, skills, an MCP server.
    const agent = await value(
      'agents.create',
      beta.agents.create({
        name: 'typed',
        model: 'scripted/tour',
        description: 'type check',
        system: 'You are typed.',
        tools: [
          {
            type: 'agent_toolset_20260401',
            configs: [{ name: 'bash', permission_policy: { type: 'always_ask' } }],
          },
          {
            type: 'custom',
            name: 'lookup',
            description: 'Looks something up on the client',
            input_schema: { type: 'object', properties: { query: { type: 'string' } } },
          },
          {
            type: 'mcp_toolset',
            mcp_server_name: 'docs',
            configs: [{ name: 'search', enabled: false }],
            default_config: { permission_policy: { type: 'always_allow' } },
          },
        ],
        mcp_servers: [{ type: 'url', name: 'docs', url: 'https://mcp.example.com/mcp' }],
        skills: [{ type: 'custom', skill_id: skill.id }],
        metadata: { team: 'types' },
      }),
    );
    await value('agents.retrieve', beta.agents.retrieve(agent.id));
    await value('agents.update', beta.agents.update(agent.id, { description: 'v2', version: agent.version }));
    // The model as a config object, and web_fetch's url_sources in shorthand and full form.
    await value(
      'agents.update',
      beta.agents.update(agent.id, {
        model: { id: 'scripted/tour', effort: 'high', speed: 'standard' },
        tools: [
          {
            type: 'agent_toolset_20260401',
            configs: [
              { name: 'bash', permission_policy: { type: 'always_ask' } },
              {
                name: 'web_fetch',
                allowed_domains: ['example.com'],
                max_content_tokens: 1000,
                url_sources: {
                  user_input: 'all',
                  client_tool_results: { type: 'only', tools: [{ type: 'tool_reference', name: 'lookup' }] },
                },
              },
            ],
          },
          ...agent.tools.slice(1),
        ] as never,
      }),
    );
    await page('agents.list', beta.agents.list());
    await page('agents.versions.list', beta.agents.versions.list(agent.id));

    // Vaults and credentials of every kind.
    const vault = await value(
      'vaults.create',
      beta.vaults.create({ display_name: 'typed', metadata: { a: 'b' } }),
    );
    await value('vaults.retrieve', beta.vaults.retrieve(vault.id));
    await value('vaults.update', beta.vaults.update(vault.id, { display_name: 'typed 2' }));
    await page('vaults.list', beta.vaults.list());
    const bearer = await value(
      'vaults.credentials.create',
      beta.vaults.credentials.create(vault.id, {
        display_name: 'bearer',
        auth: { type: 'static_bearer', token: 'secret-token', mcp_server_url: 'https://mcp.example.com/mcp' },
      }),
    );
    await value(
      'vaults.credentials.create',
      beta.vaults.credentials.create(vault.id, {
        auth: {
          type: 'environment_variable',
          secret_name: 'EXAMPLE_KEY',
          secret_value: 'secret-value',
          networking: { type: 'limited', allowed_hosts: ['api.example.com'] },
        },
      }),
    );
    const oauth = await value(
      'vaults.credentials.create',
      beta.vaults.credentials.create(vault.id, {
        auth: {
          type: 'mcp_oauth',
          access_token: 'secret-access',
          mcp_server_url: 'https://mcp.example.com/oauth',
          expires_at: new Date(Date.now() + 3_600_000).toISOString(),
          refresh: {
            client_id: 'typed',
            refresh_token: 'secret-refresh',
            token_endpoint: 'https://auth.example.com/token',
            token_endpoint_auth: { type: 'client_secret_basic', client_secret: 'secret-client' },
          },
        },
      }),
    );
    await value(
      'vaults.credentials.retrieve',
      beta.vaults.credentials.retrieve(bearer.id, { vault_id: vault.id }),
    );
    await value(
      'vaults.credentials.update',
      beta.vaults.credentials.update(bearer.id, { vault_id: vault.id, display_name: 'bearer 2' }),
    );
    await page('vaults.credentials.list', beta.vaults.credentials.list(vault.id));
    await value(
      'vaults.credentials.mcpOAuthValidate',
      beta.vaults.credentials.mcpOAuthValidate(oauth.id, { vault_id: vault.id }),
    );
    await value(
      'vaults.credentials.archive',
      beta.vaults.credentials.archive(bearer.id, { vault_id: vault.id }),
    );
    await value(
      'vaults.credentials.delete',
      beta.vaults.credentials.delete(bearer.id, { vault_id: vault.id }),
    );

    // A session through confirmations, a custom tool, an interrupt and a failing model.
    const session = await value(
      'sessions.create',
      beta.sessions.create({
        agent: agent.id,
        environment_id: environment.id,
        title: 'typed',
        metadata: { k: 'v' },
        vault_ids: [vault.id],
      }),
    );
    const streamed: unknown[] = [];
    const stream = await beta.sessions.events.stream(session.id, {
      event_deltas: ['agent.message', 'agent.thinking'],
    });
    const collecting = (async () => {
      for await (const event of stream) streamed.push(event);
    })();
    const idleCount = () =>
      streamed.filter((event) => (event as { type: string }).type === 'session.status_idle').length;
    const waitForIdle = async (count: number) => {
      const deadline = Date.now() + 20_000;
      while (idleCount() < count) {
        if (Date.now() > deadline) throw new Error(`no idle #${count}: ${JSON.stringify(streamed)}`);
        await new Promise((resolve) => setTimeout(resolve, 20));
      }
      return streamed
        .filter((event) => (event as { type: string }).type === 'session.status_idle')
        .at(-1) as {
        stop_reason: { event_ids?: string[] };
      };
    };
    await value(
      'sessions.events.send',
      beta.sessions.events.send(session.id, {
        events: [{ type: 'user.message', content: [{ type: 'text', text: 'go' }] }],
      }),
    );
    const askIdle = await waitForIdle(1);
    await value(
      'sessions.events.send',
      beta.sessions.events.send(session.id, {
        events: [
          {
            type: 'user.tool_confirmation',
            tool_use_id: askIdle.stop_reason.event_ids![0]!,
            result: 'allow',
          },
        ],
      }),
    );
    const customIdle = await waitForIdle(2);
    await value(
      'sessions.events.send',
      beta.sessions.events.send(session.id, {
        events: [
          {
            type: 'user.custom_tool_result',
            custom_tool_use_id: customIdle.stop_reason.event_ids![0]!,
            content: [{ type: 'text', text: 'forty-two' }],
          },
        ],
      }),
    );
    await waitForIdle(3);
    await value(
      'sessions.events.send',
      beta.sessions.events.send(session.id, { events: [{ type: 'user.interrupt' }] }),
    );
    stream.controller.abort();
    await collecting.catch(() => undefined);
    const streamedTypes = streamed.map((event) => (event as { type: string }).type);
    expect(streamedTypes).toEqual(expect.arrayContaining(['event_start', 'event_delta', 'agent.thinking']));
    for (const event of streamed) record('sessions.events.stream', 'stream', event);
    await page('sessions.events.list', beta.sessions.events.list(session.id, { limit: 1000 }));

    const failing = await beta.agents.create({ name: 'failing', model: 'scripted/failing' });
    const failed = await beta.sessions.create({ agent: failing.id, environment_id: environment.id });
    await beta.sessions.events.send(failed.id, {
      events: [{ type: 'user.message', content: [{ type: 'text', text: 'hi' }] }],
    });
    const deadline = Date.now() + 20_000;
    // `stop_reason` on a session is Berth's addition (the SDK has it on the idle event only).
    const stopReason = async () =>
      ((await beta.sessions.retrieve(failed.id)) as { stop_reason?: { type: string } | null }).stop_reason;
    while ((await stopReason())?.type !== 'retries_exhausted') {
      if (Date.now() > deadline) throw new Error('the failing session never gave up');
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
    await page('sessions.events.list', beta.sessions.events.list(failed.id));

    // MCP tool use and result, confirmed first.
    const mcpAgent = await beta.agents.create({
      name: 'mcp',
      model: 'scripted/mcp-echo',
      mcp_servers: [{ type: 'url', name: 'everything', url: mcpUrl }],
      tools: [{ type: 'mcp_toolset', mcp_server_name: 'everything' }],
    });
    const open = await beta.environments.create({ name: 'unrestricted' });
    const mcpSession = await beta.sessions.create({ agent: mcpAgent.id, environment_id: open.id });
    await beta.sessions.events.send(mcpSession.id, {
      events: [{ type: 'user.message', content: [{ type: 'text', text: 'echo' }] }],
    });
    const idleOf = async (sessionId: string) => {
      const stopBy = Date.now() + 20_000;
      for (;;) {
        const current = (await beta.sessions.retrieve(sessionId)) as {
          status: string;
          stop_reason?: unknown;
        };
        if (current.status === 'idle' && current.stop_reason)
          return current.stop_reason as { type: string; event_ids?: string[] };
        if (Date.now() > stopBy) throw new Error(`session ${sessionId} never went idle`);
        await new Promise((resolve) => setTimeout(resolve, 20));
      }
    };
    const asked = await idleOf(mcpSession.id);
    expect(asked.type).toBe('requires_action');
    await beta.sessions.events.send(mcpSession.id, {
      events: [{ type: 'user.tool_confirmation', tool_use_id: asked.event_ids![0]!, result: 'allow' }],
    });
    const mcpEvents = async () =>
      (await beta.sessions.events.list(mcpSession.id, { limit: 1000 })).data.map((event) => event.type);
    const mcpBy = Date.now() + 20_000;
    while (!(await mcpEvents()).includes('agent.message')) {
      if (Date.now() > mcpBy) throw new Error(`no MCP answer: ${(await mcpEvents()).join(', ')}`);
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
    const mcpLog = await page(
      'sessions.events.list',
      beta.sessions.events.list(mcpSession.id, { limit: 1000 }),
    );
    expect(mcpLog.map((event) => (event as { type: string }).type)).toEqual(
      expect.arrayContaining(['agent.mcp_tool_use', 'agent.mcp_tool_result']),
    );

    // A session terminated at its max lifetime.
    const shortLived = await beta.environments.create({
      name: 'short-lived',
      config: { type: 'cloud', berth: { lifecycle: { idle_timeout_s: 1, max_lifetime_s: 1 } } } as never,
    });
    const bashAgent = await beta.agents.create({
      name: 'bash',
      model: 'scripted/bash-once',
      tools: [{ type: 'agent_toolset_20260401' }],
    });
    const ending = await beta.sessions.create({ agent: bashAgent.id, environment_id: shortLived.id });
    await beta.sessions.events.send(ending.id, {
      events: [{ type: 'user.message', content: [{ type: 'text', text: 'echo hi' }] }],
    });
    const endBy = Date.now() + 30_000;
    while ((await beta.sessions.retrieve(ending.id)).status !== 'terminated') {
      if (Date.now() > endBy) throw new Error('the short-lived session was never terminated');
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    await value('sessions.retrieve', beta.sessions.retrieve(ending.id));
    const endingEvents = await page('sessions.events.list', beta.sessions.events.list(ending.id));
    expect(endingEvents.map((event) => (event as { type: string }).type)).toContain(
      'session.status_terminated',
    );

    await value('sessions.retrieve', beta.sessions.retrieve(session.id));
    await value('sessions.retrieve', beta.sessions.retrieve(failed.id));
    await value(
      'sessions.update',
      beta.sessions.update(session.id, { title: 'typed 2', metadata: { k: null } }),
    );
    await page('sessions.list', beta.sessions.list());
    await value('sessions.archive', beta.sessions.archive(failed.id));
    await value('sessions.delete', beta.sessions.delete(failed.id));

    // Archive and delete last: archived resources are shown too.
    await value('agents.archive', beta.agents.archive(failing.id));
    await value('vaults.archive', beta.vaults.archive(vault.id));
    const emptyVault = await beta.vaults.create({ display_name: 'empty' });
    await value('vaults.delete', beta.vaults.delete(emptyVault.id));
    await value('skills.versions.delete', beta.skills.versions.delete(version.id, { skill_id: skill.id }));
    const spareSkill = await beta.skills.create({
      files: [
        await toFile(Buffer.from(SKILL_MD.replace('typed-skill', 'spare-skill')), 'spare-skill/SKILL.md'),
      ],
    });
    await beta.skills.versions.delete(spareSkill.latest_version_id!, { skill_id: spareSkill.id });
    await value('skills.delete', beta.skills.delete(spareSkill.id));

    const { diagnostics, file } = checkAnswers(answers);
    expect(diagnostics, `Berth's answers (in ${file}) break the SDK types`).toBe('');
  }, 120_000);

  it('checks the answers strictly: a missing field, an unknown field and an unknown enum value all fail', () => {
    const good = { id: 'vlt_1', type: 'vault_deleted' };
    expect(checkAnswers([{ method: 'vaults.delete', kind: 'value', value: good }]).diagnostics).toBe('');
    const broken: RecordedAnswer[] = [
      { method: 'vaults.delete', kind: 'value', value: { id: 'vlt_1' } },
      { method: 'vaults.delete', kind: 'value', value: { ...good, extra: true } },
      { method: 'vaults.delete', kind: 'value', value: { ...good, type: 'vault_gone' } },
    ];
    const { diagnostics, file } = checkAnswers(broken);
    rmSync(dirname(file), { recursive: true, force: true });
    expect(diagnostics).toMatch(/vaults\.delete \(answer 0[^\n]*\n\s*Property 'type' is missing/);
    expect(diagnostics).toMatch(/extra\W* does not exist/);
    expect(diagnostics).toMatch(/"vault_gone"/);
  });

  it('fails on a method the SDK does not have', () => {
    const { diagnostics, file } = checkAnswers([{ method: 'agents.explode', kind: 'value', value: {} }]);
    rmSync(dirname(file), { recursive: true, force: true });
    expect(diagnostics).toMatch(/explode/);
  });
});
