import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startTestBerth, type TestBerth } from './support/berth-instance.js';
import { type FakeOpenAiServer, startFakeOpenAiServer } from './support/fake-openai-server.js';

/** With many tools declared, the model request carries only the few that fit the request. */
describe('tool search for agents with many tools', () => {
  let berth: TestBerth;
  let model: FakeOpenAiServer;

  beforeAll(async () => {
    model = await startFakeOpenAiServer(() => ({ text: 'ok' }));
    berth = await startTestBerth({ environment: { OPENAI_COMPATIBLE_BASE_URL: model.url } });
  });
  afterAll(async () => {
    await berth?.dispose();
    await model?.close();
  });

  it('sends the built-in tools plus a dozen relevant ones out of 200', async () => {
    const topics = [
      'invoice',
      'calendar',
      'ticket',
      'inventory',
      'payroll',
      'shipment',
      'contract',
      'survey',
    ];
    const tools = Array.from({ length: 199 }, (_, index) => ({
      type: 'custom' as const,
      name: `${topics[index % topics.length]}_action_${index}`,
      description: `Performs action ${index} on the ${topics[index % topics.length]} system.`,
      input_schema: { type: 'object' as const },
    }));
    tools.push({
      type: 'custom',
      name: 'get_weather',
      description: 'Get the current weather forecast for a city.',
      input_schema: { type: 'object' },
    });
    const agent = await berth.client.beta.agents.create({
      name: 'many-tools',
      model: 'openai-compatible/fake-model',
      tools: [{ type: 'agent_toolset_20260401' }, ...tools],
    });
    const environment = await berth.client.beta.environments.create({ name: 'many-tools' });
    const session = await berth.client.beta.sessions.create({
      agent: agent.id,
      environment_id: environment.id,
    });
    const stream = await berth.client.beta.sessions.events.stream(session.id);
    await berth.client.beta.sessions.events.send(session.id, {
      events: [{ type: 'user.message', content: [{ type: 'text', text: 'What is the weather in Paris?' }] }],
    });
    for await (const event of stream) if (event.type === 'session.status_idle') break;

    const offered = (model.requests[0]!.body.tools ?? []).map((tool) => tool.function.name);
    expect(offered).toEqual(
      expect.arrayContaining(['bash', 'read', 'write', 'edit', 'glob', 'grep', 'get_weather']),
    );
    expect(offered.length).toBeLessThanOrEqual(6 + 12);
    expect(offered.some((name) => name.startsWith('payroll_'))).toBe(false);
  });
});
