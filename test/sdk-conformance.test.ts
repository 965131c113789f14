import Anthropic from '@anthropic-ai/sdk';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startTestBerth, type TestBerth } from './support/berth-instance.js';
import { type FakeOpenAiServer, startFakeOpenAiServer } from './support/fake-openai-server.js';
import { sendAndWaitIdle } from './support/session-stream.js';

type StreamEvent = { type: string; id?: string; [field: string]: unknown };

/**
 * The official `@anthropic-ai/sdk` drives Berth by pointing `baseURL` at it. The model is an
 * `openai-compatible` one served by a fake that speaks the real Chat Completions wire
 * protocol (streaming + tool calls), so the real provider path runs end to end.
 */
describe('official Anthropic SDK against Berth', () => {
  let berth: TestBerth;
  let model: FakeOpenAiServer;

  beforeAll(async () => {
    model = await startFakeOpenAiServer((request) => {
      const messages = request.body.messages ?? [];
      const last = messages[messages.length - 1];
      if (last?.role === 'tool') {
        return { text: `The sandbox said: ${String(last.content).trim()}` };
      }
      return {
        toolCalls: [{ name: 'bash', arguments: { command: 'echo "hello from $(id -u) in $(pwd)"' } }],
      };
    });
    berth = await startTestBerth({ environment: { OPENAI_COMPATIBLE_BASE_URL: model.url } });
  });
  afterAll(async () => {
    await berth?.dispose();
    await model?.close();
  });

  it('runs a tool-using turn: bash in the sandbox, result, message, idle with end_turn, and list matches the stream', async () => {
    const { client } = berth;
    const agent = await client.beta.agents.create({
      name: 'sdk-test',
      model: 'openai-compatible/fake-model',
      system: 'You are a test agent.',
      tools: [{ type: 'agent_toolset_20260401' }],
    });
    expect(agent.version).toBe(1);
    expect(agent.model.id).toBe('openai-compatible/fake-model');
    const environment = await client.beta.environments.create({ name: 'sdk-env', config: { type: 'cloud' } });
    const session = await client.beta.sessions.create({ agent: agent.id, environment_id: environment.id });
    expect(session.status).toBe('idle');
    expect(session.agent.version).toBe(1);

    const stream = await client.beta.sessions.events.stream(session.id);
    const sent = await client.beta.sessions.events.send(session.id, {
      events: [{ type: 'user.message', content: [{ type: 'text', text: 'Who are you in the sandbox?' }] }],
    });
    expect(sent.data?.[0]?.type).toBe('user.message');

    const streamed: StreamEvent[] = [];
    for await (const event of stream) {
      streamed.push(event as unknown as StreamEvent);
      if (event.type === 'session.status_idle') break;
    }
    const types = streamed.map((event) => event.type);
    expect(types).toEqual([
      'user.message',
      'session.status_running',
      'span.model_request_start',
      'agent.tool_use',
      'span.model_request_end',
      'agent.tool_result',
      'span.model_request_start',
      'agent.message',
      'span.model_request_end',
      // Every idle carries a usage snapshot (the official `session.usage` event).
      'session.usage',
      'session.status_idle',
    ]);
    const toolUse = streamed.find((event) => event.type === 'agent.tool_use')!;
    expect(toolUse.name).toBe('bash');
    const toolResult = streamed.find((event) => event.type === 'agent.tool_result')!;
    expect(toolResult.tool_use_id).toBe(toolUse.id);
    // uid 1000 in /workspace: the command really ran inside the sandbox, not on the host.
    const resultText = (toolResult.content as { text: string }[])[0]!.text;
    expect(resultText).toContain('hello from 1000 in /workspace');
    const message = streamed.find((event) => event.type === 'agent.message')!;
    expect((message.content as { text: string }[])[0]!.text).toContain('hello from 1000 in /workspace');
    const idle = streamed[streamed.length - 1]!;
    expect(idle.stop_reason).toEqual({ type: 'end_turn' });

    // The model saw the tool result paired with its call.
    const secondRequest = model.requests[1]!.body;
    expect(secondRequest.messages?.some((entry) => entry.role === 'tool')).toBe(true);
    expect(secondRequest.tools?.map((tool) => tool.function.name)).toEqual(
      expect.arrayContaining(['bash', 'read', 'write', 'edit', 'glob', 'grep']),
    );

    const listed: StreamEvent[] = [];
    for await (const event of client.beta.sessions.events.list(session.id, { limit: 3 })) {
      listed.push(event as unknown as StreamEvent);
    }
    expect(listed).toEqual(streamed);

    const finished = await client.beta.sessions.retrieve(session.id);
    expect(finished.status).toBe('idle');
    expect(finished.usage.output_tokens).toBeGreaterThan(0);
  });

  it('pins the agent version a session was created with, across agent updates', async () => {
    const { client } = berth;
    const agent = await client.beta.agents.create({ name: 'versioned', model: 'scripted/echo' });
    const updated = await client.beta.agents.update(agent.id, { system: 'Version two.', version: 1 });
    expect(updated.version).toBe(2);
    const unchanged = await client.beta.agents.update(agent.id, { system: 'Version two.' });
    expect(unchanged.version).toBe(2);
    await expect(client.beta.agents.update(agent.id, { system: 'stale', version: 1 })).rejects.toBeInstanceOf(
      Anthropic.APIError,
    );
    const environment = await client.beta.environments.create({ name: 'pin-env' });
    const pinned = await client.beta.sessions.create({
      agent: { type: 'agent', id: agent.id, version: 1 },
      environment_id: environment.id,
    });
    expect(pinned.agent.version).toBe(1);
    expect(pinned.agent.system).toBeNull();
    const versions = [];
    for await (const version of client.beta.agents.versions.list(agent.id)) versions.push(version.version);
    expect(versions).toEqual([2, 1]);
    const archived = await client.beta.agents.archive(agent.id);
    expect(archived.archived_at).not.toBeNull();
    await expect(
      client.beta.sessions.create({ agent: agent.id, environment_id: environment.id }),
    ).rejects.toThrow(/archived/);
  });

  it('streams agent message text as deltas before the stored message when asked', async () => {
    const { client } = berth;
    const agent = await client.beta.agents.create({ name: 'echo', model: 'scripted/echo' });
    const environment = await client.beta.environments.create({ name: 'delta-env' });
    const session = await client.beta.sessions.create({ agent: agent.id, environment_id: environment.id });
    const stream = await client.beta.sessions.events.stream(session.id, { event_deltas: ['agent.message'] });
    await client.beta.sessions.events.send(session.id, {
      events: [
        {
          type: 'user.message',
          content: [{ type: 'text', text: 'a fairly long sentence to echo back in parts' }],
        },
      ],
    });
    const seen: StreamEvent[] = [];
    for await (const event of stream) {
      seen.push(event as unknown as StreamEvent);
      if (event.type === 'session.status_idle') break;
    }
    const message = seen.find((event) => event.type === 'agent.message')!;
    const deltas = seen.filter((event) => event.type === 'event_delta');
    expect(deltas.length).toBeGreaterThan(1);
    const joined = deltas
      .map((event) => (event.delta as { content: { text: string } }).content.text)
      .join('');
    expect(joined).toBe((message.content as { text: string }[])[0]!.text);
    expect(seen.findIndex((event) => event.type === 'event_start')).toBeLessThan(seen.indexOf(message));
    // Deltas are never stored.
    const stored = [];
    for await (const event of client.beta.sessions.events.list(session.id)) stored.push(event.type);
    expect(stored).not.toContain('event_delta');
  });

  it('applies metadata patches like the official API: null removes a key', async () => {
    const { client } = berth;
    const environment = await client.beta.environments.create({
      name: 'meta',
      metadata: { team: 'a', tier: 'x' },
    });
    const patched = await client.beta.environments.update(environment.id, {
      metadata: { tier: null, owner: 'b' },
    });
    expect(patched.metadata).toEqual({ team: 'a', owner: 'b' });
    const agent = await client.beta.agents.create({
      name: 'meta',
      model: 'scripted/echo',
      metadata: { a: '1' },
    });
    const session = await client.beta.sessions.create({
      agent: agent.id,
      environment_id: environment.id,
      metadata: { k: 'v' },
    });
    expect(
      (await client.beta.sessions.update(session.id, { metadata: { k: null, j: 'w' } })).metadata,
    ).toEqual({ j: 'w' });
    expect((await client.beta.agents.update(agent.id, { metadata: { a: null } })).metadata).toEqual({});
  });

  it('filters sessions.list by created_at[gt|gte|lt|lte]', async () => {
    const { client } = berth;
    const agent = await client.beta.agents.create({ name: 'timed', model: 'scripted/echo' });
    const environment = await client.beta.environments.create({ name: 'timed-env' });
    const sessions = [];
    for (let index = 0; index < 3; index++) {
      const previous = sessions[sessions.length - 1];
      // Distinct creation times: wait for the clock to pass the previous session's millisecond.
      while (previous && Date.now() <= Date.parse(previous.created_at)) await Promise.resolve();
      sessions.push(await client.beta.sessions.create({ agent: agent.id, environment_id: environment.id }));
    }
    const [first, second, third] = sessions.map((session) => session!);
    const idsOf = async (filters: Record<string, string>) => {
      const ids = [];
      for await (const session of client.beta.sessions.list({ agent_id: agent.id, order: 'asc', ...filters }))
        ids.push(session.id);
      return ids;
    };
    expect(await idsOf({})).toEqual([first!.id, second!.id, third!.id]);
    expect(await idsOf({ 'created_at[gt]': first!.created_at })).toEqual([second!.id, third!.id]);
    expect(await idsOf({ 'created_at[gte]': second!.created_at })).toEqual([second!.id, third!.id]);
    expect(await idsOf({ 'created_at[lt]': second!.created_at })).toEqual([first!.id]);
    expect(await idsOf({ 'created_at[lte]': second!.created_at })).toEqual([first!.id, second!.id]);
    // Any RFC 3339 offset means the same instant.
    const secondWithOffset = new Date(Date.parse(second!.created_at)).toISOString().replace('Z', '+00:00');
    expect(await idsOf({ 'created_at[gt]': first!.created_at, 'created_at[lt]': third!.created_at })).toEqual(
      [second!.id],
    );
    expect(await idsOf({ 'created_at[gte]': secondWithOffset })).toEqual([second!.id, third!.id]);
    await expect(client.beta.sessions.list({ 'created_at[gt]': 'yesterday' })).rejects.toThrow(/RFC 3339/);
  });

  it('creates a session from agent_with_overrides: the session runs the replaced fields, the agent is unchanged', async () => {
    const { client } = berth;
    const agent = await client.beta.agents.create({
      name: 'overridable',
      model: 'scripted/echo',
      system: 'Original prompt.',
      tools: [{ type: 'agent_toolset_20260401' }],
      metadata: { team: 'a' },
    });
    const environment = await client.beta.environments.create({ name: 'override-env' });
    const session = await client.beta.sessions.create({
      agent: {
        type: 'agent_with_overrides',
        id: agent.id,
        version: 1,
        model: 'scripted/bash-once',
        system: 'Overridden prompt.',
        tools: [
          {
            type: 'agent_toolset_20260401',
            configs: [{ name: 'bash', permission_policy: { type: 'always_allow' } }],
          },
        ],
      },
      environment_id: environment.id,
    });
    expect(session.agent).toMatchObject({
      id: agent.id,
      version: 1,
      model: { id: 'scripted/bash-once' },
      system: 'Overridden prompt.',
      name: 'overridable',
    });
    expect(session.agent.tools[0]).toMatchObject({ type: 'agent_toolset_20260401' });
    // The agent itself did not change (no new version either).
    const unchanged = await client.beta.agents.retrieve(agent.id);
    expect(unchanged).toMatchObject({
      version: 1,
      system: 'Original prompt.',
      model: { id: 'scripted/echo' },
    });

    // The turn runs the overriding model (bash-once runs the message; echo would repeat it).
    const seen = await sendAndWaitIdle(client, session.id, [
      { type: 'user.message', content: [{ type: 'text', text: 'echo overridden-$((6*7))' }] },
    ]);
    const message = seen.find((event) => event.type === 'agent.message')!;
    expect(JSON.stringify(message.content)).toContain('overridden-42');

    // Only the documented fields may be replaced, and references are checked as for agents.
    await expect(
      client.beta.sessions.create({
        agent: { type: 'agent_with_overrides', id: agent.id, name: 'renamed' } as never,
        environment_id: environment.id,
      }),
    ).rejects.toThrow(/name/);
    await expect(
      client.beta.sessions.create({
        agent: {
          type: 'agent_with_overrides',
          id: agent.id,
          tools: [{ type: 'mcp_toolset', mcp_server_name: 'missing' }],
        },
        environment_id: environment.id,
      }),
    ).rejects.toThrow(/unknown MCP server/);
  });

  it('shows web_search disabled, as the model is never offered it, and refuses to enable it', async () => {
    const { client } = berth;
    const agent = await client.beta.agents.create({
      name: 'no-search',
      model: 'openai-compatible/fake-model',
      tools: [{ type: 'agent_toolset_20260401', default_config: { enabled: true } }],
    });
    const toolset = agent.tools[0] as { configs: { name: string; enabled: boolean }[] };
    expect(toolset.configs.find((config) => config.name === 'web_search')?.enabled).toBe(false);
    expect(toolset.configs.find((config) => config.name === 'web_fetch')?.enabled).toBe(true);

    const environment = await client.beta.environments.create({ name: 'no-search-env' });
    const session = await client.beta.sessions.create({ agent: agent.id, environment_id: environment.id });
    const pinned = session.agent.tools[0] as { configs: { name: string; enabled: boolean }[] };
    expect(pinned.configs.find((config) => config.name === 'web_search')?.enabled).toBe(false);
    const before = model.requests.length;
    await sendAndWaitIdle(client, session.id, [
      { type: 'user.message', content: [{ type: 'text', text: 'hi' }] },
    ]);
    const offered = model.requests[before]!.body.tools?.map((tool) => tool.function.name) ?? [];
    expect(offered).toContain('web_fetch');
    expect(offered).not.toContain('web_search');

    await expect(
      client.beta.agents.create({
        name: 'search',
        model: 'scripted/echo',
        tools: [{ type: 'agent_toolset_20260401', configs: [{ name: 'web_search', enabled: true }] }],
      }),
    ).rejects.toThrow(/web_search is not supported by Berth yet/);
    await expect(
      client.beta.agents.update(agent.id, {
        tools: [{ type: 'agent_toolset_20260401', configs: [{ name: 'web_search', enabled: true }] }],
      }),
    ).rejects.toThrow(/web_search is not supported by Berth yet/);
  });
});
