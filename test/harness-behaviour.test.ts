import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createModelRegistry } from '../src/models/provider-registry.js';
import type { Script } from '../src/models/scripted/script.js';
import { hostProcessesMatching } from '../src/sandbox/driver-contract.test-suite.js';
import type { StoredEvent } from '../src/store/event-store.js';
import { startTestBerth, type TestBerth } from './support/berth-instance.js';

const scripts: Record<string, Script> = {
  'custom-tool': {
    name: 'custom-tool',
    steps: [
      { toolCalls: [{ toolName: 'lookup', input: { query: 'berth' } }] },
      { text: 'The client said: {{last_tool_result}}' },
    ],
  },
  failing: { name: 'failing', steps: [{ error: 'upstream is down' }] },
  'slow-bash': {
    name: 'slow-bash',
    steps: [
      { toolCalls: [{ toolName: 'bash', input: { command: 'sleep 60.5; echo never' } }] },
      { text: 'done' },
    ],
  },
  'slow-model': { name: 'slow-model', steps: [{ delayMs: 10_000, text: 'too late' }] },
  'slow-echo': { name: 'slow-echo', steps: [{ delayMs: 600, text: 'heard: {{last_user_message}}' }] },
};

/** The harness's turn rules, observed through the API a client uses. */
describe('harness turn behaviour', () => {
  let berth: TestBerth;
  let environmentId: string;

  beforeAll(async () => {
    berth = await startTestBerth({
      models: createModelRegistry({ environment: {}, scriptedScripts: scripts }),
    });
    environmentId = (await berth.client.beta.environments.create({ name: 'harness' })).id;
  });
  afterAll(async () => berth?.dispose());

  async function newSession(model: string, tools: unknown[] = [{ type: 'agent_toolset_20260401' }]) {
    const agent = await berth.client.beta.agents.create({ name: model, model, tools: tools as never });
    return (await berth.client.beta.sessions.create({ agent: agent.id, environment_id: environmentId })).id;
  }
  const say = (sessionId: string, text: string) =>
    berth.client.beta.sessions.events.send(sessionId, {
      events: [{ type: 'user.message', content: [{ type: 'text', text }] }],
    });
  const events = (sessionId: string) => berth.store.events.read(berth.keyOf(sessionId), { limit: 10_000 });
  async function waitFor(sessionId: string, predicate: (log: StoredEvent[]) => boolean, timeoutMs = 10_000) {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const log = await events(sessionId);
      if (predicate(log)) return log;
      if (Date.now() > deadline)
        throw new Error(`timed out; log: ${log.map((stored) => stored.event.type).join(', ')}`);
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
  }
  const lastIs = (type: string) => (log: StoredEvent[]) => log[log.length - 1]?.event.type === type;

  it('never provisions a sandbox for a turn that uses no tool', async () => {
    const sessionId = await newSession('scripted/echo');
    await say(sessionId, 'hello');
    await waitFor(sessionId, lastIs('session.status_idle'));
    expect(berth.sandboxes.size).toBe(0);
    expect(existsSync(join(berth.dataDir, 'sessions', sessionId))).toBe(false);
  });

  it('pauses on a custom tool with requires_action and resumes with the client result', async () => {
    const sessionId = await newSession('scripted/custom-tool', [
      {
        type: 'custom',
        name: 'lookup',
        description: 'Looks something up on the client',
        input_schema: { type: 'object', properties: { query: { type: 'string' } } },
      },
    ]);
    await say(sessionId, 'look it up');
    const paused = await waitFor(sessionId, lastIs('session.status_idle'));
    const toolUse = paused.find((stored) => stored.event.type === 'agent.custom_tool_use')!;
    expect(toolUse.event.input).toEqual({ query: 'berth' });
    expect(paused[paused.length - 1]!.event.stop_reason).toEqual({
      type: 'requires_action',
      event_ids: [toolUse.event.id],
    });
    expect((await berth.client.beta.sessions.retrieve(sessionId)).status).toBe('idle');

    await berth.client.beta.sessions.events.send(sessionId, {
      events: [
        {
          type: 'user.custom_tool_result',
          custom_tool_use_id: toolUse.event.id,
          content: [{ type: 'text', text: 'forty-two' }],
        },
      ],
    });
    const done = await waitFor(
      sessionId,
      (log) =>
        lastIs('session.status_idle')(log) && log.some((stored) => stored.event.type === 'agent.message'),
    );
    const message = done.find((stored) => stored.event.type === 'agent.message')!;
    expect(JSON.stringify(message.event.content)).toContain('The client said: forty-two');
    expect(done[done.length - 1]!.event.stop_reason).toEqual({ type: 'end_turn' });
    // A second result for the same tool use is refused.
    await expect(
      berth.client.beta.sessions.events.send(sessionId, {
        events: [{ type: 'user.custom_tool_result', custom_tool_use_id: toolUse.event.id, content: [] }],
      }),
    ).rejects.toThrow(/not waiting for an answer any more/);
  });

  it('ends the turn with retries_exhausted after the model fails three times in a row', async () => {
    const sessionId = await newSession('scripted/failing');
    await say(sessionId, 'hi');
    const log = await waitFor(sessionId, lastIs('session.status_idle'));
    const errors = log.filter((stored) => stored.event.type === 'session.error');
    expect(log.filter((stored) => stored.event.type === 'span.model_request_start')).toHaveLength(3);
    expect(errors.length).toBe(4);
    expect((errors[0]!.event.error as { retry_status: unknown }).retry_status).toEqual({ type: 'retrying' });
    expect((errors[3]!.event.error as { retry_status: unknown }).retry_status).toEqual({ type: 'exhausted' });
    expect(log[log.length - 1]!.event.stop_reason).toEqual({ type: 'retries_exhausted' });
  });

  it('says which variable to set when a model has no API key, without retrying', async () => {
    const sessionId = await newSession('anthropic/claude-sonnet-4-5');
    await say(sessionId, 'hi');
    const log = await waitFor(sessionId, lastIs('session.status_idle'));
    const error = log.find((stored) => stored.event.type === 'session.error')!;
    expect((error.event.error as { message: string }).message).toMatch(/ANTHROPIC_API_KEY/);
    expect(log.filter((stored) => stored.event.type === 'span.model_request_start')).toHaveLength(1);
    expect(log[log.length - 1]!.event.stop_reason).toEqual({ type: 'retries_exhausted' });
  });

  it('returns to idle within 1 s when interrupted during sleep 60 in bash, and kills the command', async () => {
    const sessionId = await newSession('scripted/slow-bash');
    await say(sessionId, 'run it');
    await waitFor(sessionId, (log) => log.some((stored) => stored.event.type === 'agent.tool_use'));
    await waitFor(sessionId, () => hostProcessesMatching('sleep 60.5').length > 0);
    const started = Date.now();
    await berth.client.beta.sessions.events.send(sessionId, { events: [{ type: 'user.interrupt' }] });
    const log = await waitFor(sessionId, lastIs('session.status_idle'), 5_000);
    expect(Date.now() - started).toBeLessThan(1_000);
    const result = log.find((stored) => stored.event.type === 'agent.tool_result')!;
    expect(result.event.is_error).toBe(true);
    expect(log.some((stored) => stored.event.type === 'agent.message')).toBe(false);
    await waitFor(sessionId, () => hostProcessesMatching('sleep 60.5').length === 0, 3_000);
  });

  it('cancels a model call in flight on user.interrupt', async () => {
    const sessionId = await newSession('scripted/slow-model');
    await say(sessionId, 'think hard');
    await waitFor(sessionId, (log) => log.some((stored) => stored.event.type === 'span.model_request_start'));
    const started = Date.now();
    await berth.client.beta.sessions.events.send(sessionId, { events: [{ type: 'user.interrupt' }] });
    const log = await waitFor(sessionId, lastIs('session.status_idle'), 5_000);
    expect(Date.now() - started).toBeLessThan(1_000);
    expect(log.some((stored) => stored.event.type === 'agent.message')).toBe(false);
    expect(log[log.length - 1]!.event.stop_reason).toEqual({ type: 'end_turn' });
  });

  it('answers a message sent while the model was still writing, instead of dropping it', async () => {
    const sessionId = await newSession('scripted/slow-echo', []);
    await say(sessionId, 'first');
    await waitFor(sessionId, (log) => log.some((stored) => stored.event.type === 'span.model_request_start'));
    await say(sessionId, 'second');
    const log = await waitFor(
      sessionId,
      (entries) =>
        lastIs('session.status_idle')(entries) &&
        entries.filter((stored) => stored.event.type === 'agent.message').length === 2,
    );
    const replies = log
      .filter((stored) => stored.event.type === 'agent.message')
      .map((stored) => (stored.event.content as { text: string }[])[0]!.text);
    expect(replies).toEqual(['heard: first', 'heard: second']);
  });

  it('refuses a new message while custom tool results are awaited, and lets an interrupt cancel the wait', async () => {
    const sessionId = await newSession('scripted/custom-tool', [
      { type: 'custom', name: 'lookup', description: 'Looks up', input_schema: { type: 'object' } },
    ]);
    await say(sessionId, 'look it up');
    const paused = await waitFor(sessionId, lastIs('session.status_idle'));
    const toolUse = paused.find((stored) => stored.event.type === 'agent.custom_tool_use')!;
    await expect(say(sessionId, 'never mind')).rejects.toThrow(/waiting for the client on/);
    await expect(
      berth.client.beta.sessions.events.send(sessionId, {
        events: [
          { type: 'user.custom_tool_result', custom_tool_use_id: toolUse.event.id, content: [] },
          { type: 'user.custom_tool_result', custom_tool_use_id: toolUse.event.id, content: [] },
        ],
      }),
    ).rejects.toThrow(/answered twice/);
    await berth.client.beta.sessions.events.send(sessionId, { events: [{ type: 'user.interrupt' }] });
    const cancelled = await waitFor(
      sessionId,
      (log) => log.length > paused.length + 1 && lastIs('session.status_idle')(log),
    );
    // Closed with the event the SDK pairs with custom tools, never an agent.tool_result.
    const closing = cancelled.find(
      (stored) =>
        stored.event.type === 'user.custom_tool_result' &&
        stored.event.custom_tool_use_id === toolUse.event.id,
    )!;
    expect(closing.event.is_error).toBe(true);
    expect(JSON.stringify(closing.event.content)).toMatch(/Interrupted/);
    expect(cancelled.some((stored) => stored.event.type === 'agent.tool_result')).toBe(false);
    expect(cancelled[cancelled.length - 1]!.event.stop_reason).toEqual({ type: 'end_turn' });
    // The session is usable again.
    await say(sessionId, 'again');
    await waitFor(
      sessionId,
      (log) => log.filter((stored) => stored.event.type === 'agent.custom_tool_use').length === 2,
    );
  });

  it('redirects: an interrupt followed by a new message stops the turn and answers the new message', async () => {
    const sessionId = await newSession('scripted/slow-echo', []);
    await say(sessionId, 'first');
    await waitFor(sessionId, (log) => log.some((stored) => stored.event.type === 'span.model_request_start'));
    await berth.client.beta.sessions.events.send(sessionId, {
      events: [
        { type: 'user.interrupt' },
        { type: 'user.message', content: [{ type: 'text', text: 'second' }] },
      ],
    });
    const log = await waitFor(
      sessionId,
      (entries) =>
        lastIs('session.status_idle')(entries) &&
        entries.some((stored) => stored.event.type === 'agent.message'),
    );
    const replies = log
      .filter((stored) => stored.event.type === 'agent.message')
      .map((stored) => (stored.event.content as { text: string }[])[0]!.text);
    expect(replies).toEqual(['heard: second']);
  });

  it('does not run a turn whose message came with an interrupt', async () => {
    const sessionId = await newSession('scripted/echo', []);
    await berth.client.beta.sessions.events.send(sessionId, {
      events: [{ type: 'user.message', content: [{ type: 'text', text: 'hi' }] }, { type: 'user.interrupt' }],
    });
    const log = await waitFor(sessionId, lastIs('session.status_idle'));
    expect(log.map((stored) => stored.event.type)).toEqual([
      'user.message',
      'user.interrupt',
      'session.usage',
      'session.status_idle',
    ]);
  });

  it('answers a repeated custom tool result with the same Idempotency-Key as the first time', async () => {
    const sessionId = await newSession('scripted/custom-tool', [
      { type: 'custom', name: 'lookup', description: 'Looks up', input_schema: { type: 'object' } },
    ]);
    await say(sessionId, 'look it up');
    const paused = await waitFor(sessionId, lastIs('session.status_idle'));
    const toolUse = paused.find((stored) => stored.event.type === 'agent.custom_tool_use')!;
    const send = () =>
      fetch(`${berth.url}/v1/sessions/${sessionId}/events`, {
        method: 'POST',
        headers: {
          'x-api-key': berth.apiKey,
          'content-type': 'application/json',
          'idempotency-key': 'result-1',
        },
        body: JSON.stringify({
          events: [{ type: 'user.custom_tool_result', custom_tool_use_id: toolUse.event.id, content: [] }],
        }),
      });
    const first = await send();
    const second = await send();
    expect(second.status).toBe(200);
    expect(await second.json()).toEqual(await first.json());
  });

  it('deleting a session destroys its sandbox and its files, and the id is gone everywhere', async () => {
    const sessionId = await newSession('scripted/bash-once');
    await say(sessionId, 'echo kept > file.txt && sleep 600 & echo started');
    await waitFor(sessionId, lastIs('session.status_idle'));
    const workspace = join(berth.dataDir, 'sessions', sessionId, 'workspace');
    expect(existsSync(join(workspace, 'file.txt'))).toBe(true);
    expect(hostProcessesMatching('sleep 600').length).toBeGreaterThan(0);
    const live = berth.sandboxes.size;
    await berth.client.beta.sessions.delete(sessionId);
    expect(berth.sandboxes.size).toBe(live - 1);
    expect(existsSync(join(berth.dataDir, 'sessions', sessionId))).toBe(false);
    await waitFor(sessionId, () => hostProcessesMatching('sleep 600').length === 0, 3_000);
    await expect(berth.client.beta.sessions.retrieve(sessionId)).rejects.toThrow(/not found/);
    await expect(berth.client.beta.sessions.events.list(sessionId)).rejects.toThrow(/not found/);
  });

  it('after a crash, re-runs an open read-only tool but never re-runs a tool with effects', async () => {
    const sessionId = await newSession('scripted/echo');
    // The log a process leaves when it dies while two tools run.
    const marker = 'crash-marker.txt';
    const [, , , bash, read] = (
      await berth.store.events.append(berth.keyOf(sessionId), [
        { type: 'user.message', content: [{ type: 'text', text: 'go' }] },
        { type: 'session.status_running' },
        { type: 'span.model_request_start' },
        { type: 'agent.tool_use', name: 'bash', input: { command: `echo ran > ${marker}` } },
        { type: 'agent.tool_use', name: 'read', input: { file_path: 'notes.txt' } },
        { type: 'span.model_request_end', is_error: false, model_usage: {} },
      ])
    ).events;
    berth.supervisor.notify(berth.keyOf(sessionId));
    const log = await waitFor(sessionId, lastIs('session.status_idle'));
    const resultOf = (toolUse: StoredEvent) =>
      log.find(
        (stored) =>
          stored.event.type === 'agent.tool_result' && stored.event.tool_use_id === toolUse.event.id,
      )!;
    expect(resultOf(bash!).event.is_error).toBe(true);
    expect(JSON.stringify(resultOf(bash!).event.content)).toMatch(/restarted/);
    expect(existsSync(join(berth.dataDir, 'sessions', sessionId, 'workspace', marker))).toBe(false);
    // The read ran again (and reports the missing file as a normal tool error).
    expect(JSON.stringify(resultOf(read!).event.content)).not.toMatch(/restarted/);
    expect(log[log.length - 1]!.event.stop_reason).toEqual({ type: 'end_turn' });
  });
});
