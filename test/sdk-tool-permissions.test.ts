import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createModelRegistry } from '../src/models/provider-registry.js';
import { startTestBerth, type TestBerth } from './support/berth-instance.js';
import { sendAndWaitIdle } from './support/session-stream.js';

/** `always_ask` tools pause for `user.tool_confirmation`, driven by the official SDK. */
describe('tool permission policies through the official SDK', () => {
  let berth: TestBerth;
  let agentId: string;
  let environmentId: string;

  beforeAll(async () => {
    berth = await startTestBerth({
      models: createModelRegistry({
        environment: {},
        scriptedScripts: {
          'ask-bash-twice': {
            name: 'ask-bash-twice',
            steps: [
              {
                toolCalls: [
                  { toolName: 'bash', input: { command: 'echo one > one.txt' } },
                  { toolName: 'bash', input: { command: 'echo two > two.txt' } },
                ],
              },
              { text: 'both ran' },
            ],
          },
          'ask-bash': {
            name: 'ask-bash',
            steps: [
              { toolCalls: [{ toolName: 'bash', input: { command: 'echo ran > proof.txt && echo done' } }] },
              { text: 'Tool said: {{last_tool_result}}' },
            ],
          },
        },
      }),
    });
    const agent = await berth.client.beta.agents.create({
      name: 'careful',
      model: 'scripted/ask-bash',
      tools: [
        {
          type: 'agent_toolset_20260401',
          configs: [{ name: 'bash', permission_policy: { type: 'always_ask' } }],
        },
      ],
    });
    agentId = agent.id;
    expect(agent.tools[0]).toMatchObject({
      configs: expect.arrayContaining([
        expect.objectContaining({ name: 'bash', permission_policy: { type: 'always_ask' } }),
      ]),
    });
    environmentId = (await berth.client.beta.environments.create({ name: 'careful' })).id;
  });
  afterAll(async () => berth?.dispose());

  /** Sends events and collects the stream until the session goes idle. */
  const run = (sessionId: string, events: Parameters<typeof sendAndWaitIdle>[2]) =>
    sendAndWaitIdle(berth.client, sessionId, events);

  async function pausedSession() {
    const session = await berth.client.beta.sessions.create({
      agent: agentId,
      environment_id: environmentId,
    });
    const seen = await run(session.id, [
      { type: 'user.message', content: [{ type: 'text', text: 'make proof' }] },
    ]);
    const toolUse = seen.find((event) => event.type === 'agent.tool_use')!;
    const idle = seen[seen.length - 1]!;
    return {
      sessionId: session.id,
      toolUse,
      idle,
      proof: join(berth.dataDir, 'sessions', session.id, 'workspace', 'proof.txt'),
    };
  }

  it('pauses before running an always_ask tool and runs it once the client allows', async () => {
    const { sessionId, toolUse, idle, proof } = await pausedSession();
    expect(toolUse.evaluated_permission).toBe('ask');
    expect(toolUse.evaluation).toEqual({ type: 'always_ask' });
    expect(idle.stop_reason).toEqual({ type: 'requires_action', event_ids: [toolUse.id] });
    expect(existsSync(proof)).toBe(false);
    await expect(
      berth.client.beta.sessions.events.send(sessionId, {
        events: [{ type: 'user.message', content: [{ type: 'text', text: 'hurry up' }] }],
      }),
    ).rejects.toThrow(/waiting for the client/);

    const seen = await run(sessionId, [
      { type: 'user.tool_confirmation', tool_use_id: toolUse.id, result: 'allow' },
    ]);
    const result = seen.find((event) => event.type === 'agent.tool_result')!;
    expect(result.tool_use_id).toBe(toolUse.id);
    expect(result.is_error).toBe(false);
    expect(existsSync(proof)).toBe(true);
    expect(JSON.stringify(seen.find((event) => event.type === 'agent.message')?.content)).toContain(
      'Tool said: done',
    );
    expect(seen[seen.length - 1]!.stop_reason).toEqual({ type: 'end_turn' });
    // A second confirmation for the same tool use is refused.
    await expect(
      berth.client.beta.sessions.events.send(sessionId, {
        events: [{ type: 'user.tool_confirmation', tool_use_id: toolUse.id, result: 'allow' }],
      }),
    ).rejects.toThrow(/not waiting/);
  });

  it('refuses a deny_message on an allow, and runs nothing until a valid answer', async () => {
    const { sessionId, toolUse, proof } = await pausedSession();
    await expect(
      berth.client.beta.sessions.events.send(sessionId, {
        events: [
          { type: 'user.tool_confirmation', tool_use_id: toolUse.id, result: 'allow', deny_message: 'why?' },
        ],
      }),
    ).rejects.toThrow(/deny_message: only allowed when result is \W*deny/);
    expect(existsSync(proof)).toBe(false);
    const seen = await run(sessionId, [
      { type: 'user.tool_confirmation', tool_use_id: toolUse.id, result: 'allow', deny_message: null },
    ]);
    expect(seen.find((event) => event.type === 'agent.tool_result')?.is_error).toBe(false);
    expect(existsSync(proof)).toBe(true);
  });

  it('re-emits session.status_idle with the remaining event_ids when only some confirmations are answered', async () => {
    const agent = await berth.client.beta.agents.create({
      name: 'careful twice',
      model: 'scripted/ask-bash-twice',
      tools: [
        {
          type: 'agent_toolset_20260401',
          configs: [{ name: 'bash', permission_policy: { type: 'always_ask' } }],
        },
      ],
    });
    const session = await berth.client.beta.sessions.create({
      agent: agent.id,
      environment_id: environmentId,
    });
    const workspace = join(berth.dataDir, 'sessions', session.id, 'workspace');
    const paused = await run(session.id, [{ type: 'user.message', content: [{ type: 'text', text: 'go' }] }]);
    const [first, second] = paused.filter((event) => event.type === 'agent.tool_use');
    expect(paused.at(-1)!.stop_reason).toEqual({
      type: 'requires_action',
      event_ids: [first!.id, second!.id],
    });

    // One of two answered: the session stays idle and says what it still waits for.
    const partial = await run(session.id, [
      { type: 'user.tool_confirmation', tool_use_id: first!.id, result: 'allow' },
    ]);
    expect(partial.map((event) => event.type)).toEqual([
      'user.tool_confirmation',
      'session.usage',
      'session.status_idle',
    ]);
    expect(partial.at(-1)!.stop_reason).toEqual({ type: 'requires_action', event_ids: [second!.id] });
    expect(existsSync(join(workspace, 'one.txt'))).toBe(false);
    expect((await berth.client.beta.sessions.retrieve(session.id)).status).toBe('idle');

    // The last answer resumes the turn: both tools run.
    const done = await run(session.id, [
      { type: 'user.tool_confirmation', tool_use_id: second!.id, result: 'allow' },
    ]);
    expect(
      done.filter((event) => event.type === 'agent.tool_result').map((event) => event.tool_use_id),
    ).toEqual([first!.id, second!.id]);
    expect(done.at(-1)!.stop_reason).toEqual({ type: 'end_turn' });
    expect(existsSync(join(workspace, 'one.txt'))).toBe(true);
    expect(existsSync(join(workspace, 'two.txt'))).toBe(true);
  });

  it('never runs a denied tool and shows the model the denial message', async () => {
    const { sessionId, toolUse, proof } = await pausedSession();
    const seen = await run(sessionId, [
      {
        type: 'user.tool_confirmation',
        tool_use_id: toolUse.id,
        result: 'deny',
        deny_message: 'not in production',
      },
    ]);
    const result = seen.find((event) => event.type === 'agent.tool_result')!;
    expect(result.is_error).toBe(true);
    expect(JSON.stringify(result.content)).toContain('not in production');
    expect(existsSync(proof)).toBe(false);
    expect(seen[seen.length - 1]!.stop_reason).toEqual({ type: 'end_turn' });
  });

  it('cancels a pending confirmation on user.interrupt', async () => {
    const { sessionId, toolUse, proof } = await pausedSession();
    const seen = await run(sessionId, [{ type: 'user.interrupt' }]);
    const result = seen.find((event) => event.type === 'agent.tool_result')!;
    expect(result.tool_use_id).toBe(toolUse.id);
    expect(result.is_error).toBe(true);
    expect(existsSync(proof)).toBe(false);
    expect(seen[seen.length - 1]!.stop_reason).toEqual({ type: 'end_turn' });
  });
});
