import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startTestBerth, type TestBerth } from './support/berth-instance.js';
import { sendAndWaitIdle } from './support/session-stream.js';

/** Reads one sample of the Prometheus text format, e.g. `berth_sessions{status="idle"}`. */
function sample(text: string, series: string): number | undefined {
  for (const line of text.split('\n')) {
    if (line.startsWith('#')) continue;
    const [name, value] = [line.slice(0, line.lastIndexOf(' ')), line.slice(line.lastIndexOf(' ') + 1)];
    if (name === series) return Number(value);
  }
  return undefined;
}

/** `/metrics` serves Prometheus text with session, sandbox, turn, tool and append metrics. */
describe('Prometheus metrics', () => {
  let berth: TestBerth;
  beforeAll(async () => {
    berth = await startTestBerth();
  });
  afterAll(async () => berth?.dispose());

  it('counts sessions, sandboxes, turns, tools and appends after a tool-using turn, with no ids in it', async () => {
    const agent = await berth.client.beta.agents.create({
      name: 'metered',
      model: 'scripted/bash-once',
      tools: [{ type: 'agent_toolset_20260401' }],
    });
    const environment = await berth.client.beta.environments.create({ name: 'metered' });
    const session = await berth.client.beta.sessions.create({
      agent: agent.id,
      environment_id: environment.id,
    });
    const idle = await berth.client.beta.sessions.create({ agent: agent.id, environment_id: environment.id });
    const seen = await sendAndWaitIdle(berth.client, session.id, [
      { type: 'user.message', content: [{ type: 'text', text: 'echo metered' }] },
    ]);
    expect(seen.some((event) => event.type === 'agent.tool_use')).toBe(true);
    // The supervisor's wake ends just after idle is committed.
    await berth.supervisor.settled(berth.keyOf(session.id));

    const response = await fetch(`${berth.url}/metrics`);
    expect(response.status).toBe(200);
    expect(response.headers.get('content-type')).toMatch(/^text\/plain/);
    const text = await response.text();
    expect(sample(text, 'berth_sessions{status="idle"}')).toBe(2);
    expect(sample(text, 'berth_sessions{status="running"}')).toBe(0);
    expect(sample(text, 'berth_live_sandboxes{driver="bwrap"}')).toBe(1);
    expect(sample(text, 'berth_sandbox_cold_starts_total{driver="bwrap",kind="new"}')).toBe(1);
    expect(sample(text, 'berth_turn_duration_seconds_count{outcome="ok"}')).toBeGreaterThanOrEqual(1);
    expect(sample(text, 'berth_tool_duration_seconds_count{kind="builtin",outcome="ok"}')).toBe(1);
    const log = await berth.store.events.read(berth.keyOf(session.id));
    expect(sample(text, 'berth_events_appended_total')).toBe(log.length);
    expect(text).not.toContain(session.id);
    expect(text).not.toContain(idle.id);
    expect(text).not.toContain('tnt_');

    // A sandbox stopped and resumed from its snapshot counts as a resume, not a new sandbox.
    const stop = await fetch(`${berth.url}/v1/sessions/${session.id}/stop`, {
      method: 'POST',
      headers: { 'x-api-key': berth.apiKey },
    });
    expect(stop.status).toBe(200);
    await sendAndWaitIdle(berth.client, session.id, [
      { type: 'user.message', content: [{ type: 'text', text: 'echo again' }] },
    ]);
    await berth.supervisor.settled(berth.keyOf(session.id));
    const after = await (await fetch(`${berth.url}/metrics`)).text();
    expect(sample(after, 'berth_sandbox_cold_starts_total{driver="bwrap",kind="new"}')).toBe(1);
    expect(sample(after, 'berth_sandbox_cold_starts_total{driver="bwrap",kind="resume"}')).toBe(1);
  });

  it('is not served when turned off', async () => {
    const quiet = await startTestBerth({ environment: { BERTH_METRICS: 'off' } });
    try {
      expect((await fetch(`${quiet.url}/metrics`)).status).toBe(404);
    } finally {
      await quiet.dispose();
    }
  });
});
