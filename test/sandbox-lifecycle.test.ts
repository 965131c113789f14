import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import Anthropic from '@anthropic-ai/sdk';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startTestBerth, type TestBerth, UNLIMITED_LIMITS } from './support/berth-instance.js';
import { processesUsing, sandboxProcessesOf, startBerthProcess } from './support/berth-process.js';
import { type StreamEvent, sendAndWaitIdle } from './support/session-stream.js';

type Client = Anthropic;

/** Every event of a session, oldest first (as a client lists them). */
async function eventsOf(client: Client, sessionId: string): Promise<StreamEvent[]> {
  const events: StreamEvent[] = [];
  for await (const event of client.beta.sessions.events.list(sessionId, { limit: 1000 })) {
    events.push(event as unknown as StreamEvent);
  }
  return events;
}

/** Polls until the session's log holds an event of `type`; returns it. */
async function waitForEvent(client: Client, sessionId: string, type: string, timeoutMs = 15_000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const found = (await eventsOf(client, sessionId)).find((event) => event.type === type);
    if (found) return found;
    if (Date.now() > deadline) throw new Error(`no ${type} event within ${timeoutMs} ms`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

const timeOf = (event: StreamEvent) => Date.parse(event.processed_at as string);

async function sandboxState(url: string, key: string, sessionId: string) {
  const response = await fetch(`${url}/v1/sessions/${sessionId}/sandbox`, { headers: { 'x-api-key': key } });
  return ((await response.json()) as { state: string }).state;
}

async function stopSandbox(url: string, key: string, sessionId: string) {
  return fetch(`${url}/v1/sessions/${sessionId}/stop`, { method: 'POST', headers: { 'x-api-key': key } });
}

/** Runs `command` in the session's sandbox through the bash-once agent; returns the tool output. */
async function run(client: Client, sessionId: string, command: string): Promise<string> {
  const seen = await sendAndWaitIdle(client, sessionId, [
    { type: 'user.message', content: [{ type: 'text', text: command }] },
  ]);
  const result = seen.find((event) => event.type === 'agent.tool_result');
  const content = (result?.content as { text?: string }[] | undefined) ?? [];
  return content.map((block) => block.text ?? '').join('');
}

/**
 * Sandbox lifecycle (DESIGN.md §6): idle sandboxes stop into a snapshot at their environment's
 * `idle_timeout_s`, a running command holds the timer, sessions end at `max_lifetime_s`, and a
 * stopped sandbox resumes with its files on the next tool call, after a restart too.
 */
describe('sandbox lifecycle', () => {
  let berth: TestBerth;
  let agentId: string;

  beforeAll(async () => {
    berth = await startTestBerth({ environment: { ...UNLIMITED_LIMITS, BERTH_MIN_LIFECYCLE_S: '1' } });
    agentId = (
      await berth.client.beta.agents.create({
        name: 'lifecycle',
        model: 'scripted/bash-once',
        tools: [{ type: 'agent_toolset_20260401' }],
      })
    ).id;
  });
  afterAll(async () => berth?.dispose());

  const sessionIn = async (lifecycle: { idle_timeout_s: number; max_lifetime_s: number }) => {
    const environment = await berth.client.beta.environments.create({
      name: `lifecycle-${lifecycle.idle_timeout_s}-${lifecycle.max_lifetime_s}-${Date.now()}`,
      config: { type: 'cloud', berth: { lifecycle } } as never,
    });
    return berth.client.beta.sessions.create({ agent: agentId, environment_id: environment.id });
  };

  it('refuses lifecycle settings out of bounds, and changes nothing', async () => {
    const before = (await berth.store.resources.list('environment', { tenantId: 'tnt_default', limit: 100 }))
      .items.length;
    for (const lifecycle of [{ idle_timeout_s: 10, max_lifetime_s: 5 }, { idle_timeout_s: 0 }]) {
      const failure = await berth.client.beta.environments
        .create({ name: 'bad', config: { type: 'cloud', berth: { lifecycle } } as never })
        .catch((error: unknown) => error);
      expect(failure).toBeInstanceOf(Anthropic.BadRequestError);
      expect((failure as InstanceType<typeof Anthropic.BadRequestError>).message).toMatch(
        /idle_timeout_s|max_lifetime_s/,
      );
    }
    const after = (await berth.store.resources.list('environment', { tenantId: 'tnt_default', limit: 100 }))
      .items.length;
    expect(after).toBe(before);
  });

  it('stops an idle sandbox at its idle timeout, and the next tool call finds its files', async () => {
    const session = await sessionIn({ idle_timeout_s: 3, max_lifetime_s: 600 });
    expect(await run(berth.client, session.id, 'echo persisted > kept.txt && echo ok')).toBe('ok\n');
    expect(await sandboxState(berth.url, berth.apiKey, session.id)).toBe('live');
    const idle = (await eventsOf(berth.client, session.id)).findLast(
      (event) => event.type === 'session.status_idle',
    )!;

    const stopped = await waitForEvent(berth.client, session.id, 'berth.sandbox_stopped');
    expect(stopped).toMatchObject({ reason: 'idle_timeout', memory: false });
    // Fires within ±2 s of its setting, counted from the end of the turn.
    expect(Math.abs(timeOf(stopped) - timeOf(idle) - 3000)).toBeLessThanOrEqual(2000);
    expect(await sandboxState(berth.url, berth.apiKey, session.id)).toBe('stopped');
    // Nothing of the sandbox is running, and its files left the host workdir for the snapshot.
    const workdir = berth.sandboxes.workdirOf(session.id);
    expect(processesUsing(workdir)).toEqual([]);
    expect(existsSync(workdir)).toBe(false);
    // The session itself did not change: still idle, ready for the next message.
    expect((await berth.client.beta.sessions.retrieve(session.id)).status).toBe('idle');

    expect(await run(berth.client, session.id, 'cat kept.txt')).toBe('persisted\n');
    const resumed = await waitForEvent(berth.client, session.id, 'berth.sandbox_resumed');
    expect(resumed).toMatchObject({ memory: false });
    expect(await sandboxState(berth.url, berth.apiKey, session.id)).toBe('live');
  });

  it('keeps the sandbox while a command runs past the idle timeout', async () => {
    const session = await sessionIn({ idle_timeout_s: 1, max_lifetime_s: 600 });
    const turn = run(
      berth.client,
      session.id,
      'sleep 3.5 && echo "$(cat /proc/1/cmdline | tr "\\0" " ")" && echo survived',
    );
    // Past the idle timeout (1 s, and a reaper pass of 500 ms) since the command started, while it
    // still runs; meanwhile a client cannot stop the sandbox under it either.
    const started = timeOf(await waitForEvent(berth.client, session.id, 'agent.tool_use'));
    await expect
      .poll(
        async () => Date.now() > started + 1500 && (await sandboxState(berth.url, berth.apiKey, session.id)),
        {
          timeout: 10_000,
          interval: 100,
        },
      )
      .toBe('busy');
    const refused = await stopSandbox(berth.url, berth.apiKey, session.id);
    expect(refused.status).toBe(409);
    expect(((await refused.json()) as { error: { message: string } }).error.message).toMatch(
      /command is running/,
    );
    expect(await turn).toMatch(/survived\n$/);
    const events = await eventsOf(berth.client, session.id);
    const result = events.find((event) => event.type === 'agent.tool_result')!;
    // No stop before the command's result was in.
    const stops = events.filter((event) => event.type === 'berth.sandbox_stopped');
    expect(stops.every((stop) => timeOf(stop) >= timeOf(result))).toBe(true);
  });

  it('stops on request without ending the session, and resumes on the next tool call', async () => {
    const session = await sessionIn({ idle_timeout_s: 600, max_lifetime_s: 3600 });
    await run(
      berth.client,
      session.id,
      'mkdir -p src && echo "int main;" > src/main.c && echo temp > /tmp/scratch',
    );
    const response = await stopSandbox(berth.url, berth.apiKey, session.id);
    expect(response.status).toBe(200);
    expect(await response.json()).toEqual({ type: 'sandbox', session_id: session.id, state: 'stopped' });
    expect(await waitForEvent(berth.client, session.id, 'berth.sandbox_stopped')).toMatchObject({
      reason: 'requested',
    });
    // Stopping again is a no-op.
    expect((await stopSandbox(berth.url, berth.apiKey, session.id)).status).toBe(200);
    expect((await berth.client.beta.sessions.retrieve(session.id)).status).toBe('idle');
    // Workspace files come back; /tmp is per sandbox (bwrap keeps files, not memory).
    expect(
      await run(berth.client, session.id, 'cat src/main.c; cat /tmp/scratch 2>/dev/null || echo no-tmp'),
    ).toBe('int main;\nno-tmp\n');
  });

  it('replaces a sandbox that died on its own, keeping the files', async () => {
    const session = await sessionIn({ idle_timeout_s: 600, max_lifetime_s: 3600 });
    expect(await run(berth.client, session.id, 'echo survivor > kept.txt && echo ok')).toBe('ok\n');
    // Something kills the sandbox from outside (the OOM killer, an operator): its bwrap
    // processes, found by the workspace they mount (the sandbox may have come from the pool).
    const workdir = join(berth.dataDir, 'sessions', session.id, 'workspace');
    const sandboxProcesses = () =>
      sandboxProcessesOf(workdir)
        .filter(({ command }) => command.split(' ')[0]!.endsWith('bwrap'))
        .map(({ pid }) => pid);
    const victims = sandboxProcesses();
    expect(victims.length).toBeGreaterThan(0);
    for (const pid of victims) process.kill(pid, 'SIGKILL');
    await expect.poll(sandboxProcesses, { timeout: 5000 }).toEqual([]);
    // The next tool call may see the dead sandbox once; the one after runs in a new sandbox.
    await run(berth.client, session.id, 'true');
    expect(await run(berth.client, session.id, 'cat kept.txt')).toBe('survivor\n');
    expect(await sandboxState(berth.url, berth.apiKey, session.id)).toBe('live');
  });

  it('terminates a session at its max lifetime, keeping its files downloadable', async () => {
    // The idle stop comes first: the lifetime holds for a stopped sandbox too.
    const session = await sessionIn({ idle_timeout_s: 1, max_lifetime_s: 4 });
    await run(berth.client, session.id, 'echo last words > final.txt');
    await waitForEvent(berth.client, session.id, 'berth.sandbox_stopped');
    const terminated = await waitForEvent(berth.client, session.id, 'session.status_terminated');
    expect(Math.abs(timeOf(terminated) - Date.parse(session.created_at) - 4000)).toBeLessThanOrEqual(2000);
    expect((await berth.client.beta.sessions.retrieve(session.id)).status).toBe('terminated');
    const refused = await berth.client.beta.sessions.events
      .send(session.id, {
        events: [{ type: 'user.message', content: [{ type: 'text', text: 'echo again' }] }],
      })
      .catch((error: unknown) => error);
    expect(refused).toBeInstanceOf(Anthropic.BadRequestError);
    const download = await fetch(`${berth.url}/v1/sessions/${session.id}/files/final.txt`, {
      headers: { 'x-api-key': berth.apiKey },
    });
    expect(await download.text()).toBe('last words\n');
  });
});

/** A stopped or killed server leaves files resumable and nothing running behind it. */
describe('sandbox lifecycle across server restarts', () => {
  let dataDir: string;
  beforeAll(async () => {
    dataDir = await mkdtemp(join(tmpdir(), 'berth-lifecycle-'));
  });
  afterAll(async () => rm(dataDir, { recursive: true, force: true }));

  /** Cgroups of this data dir's server processes still on the host (v1 and v2 layouts). */
  const berthCgroups = (pids: number[]) => {
    const found: string[] = [];
    for (const root of ['/sys/fs/cgroup', '/sys/fs/cgroup/pids', '/sys/fs/cgroup/memory']) {
      const directory = join(root, 'berth');
      if (!existsSync(directory)) continue;
      for (const name of readdirSync(directory)) {
        if (pids.some((pid) => name.includes(`.${pid}.`))) found.push(join(directory, name));
      }
    }
    return found;
  };
  const mountsUsing = (path: string) =>
    readFileSync('/proc/self/mountinfo', 'utf8')
      .split('\n')
      .filter((line) => line.includes(path));

  it('brings files back after a clean restart and after kill -9, leaving no process, cgroup or mount', async () => {
    const environment = { ...UNLIMITED_LIMITS, BERTH_MIN_LIFECYCLE_S: '1' };
    const first = await startBerthProcess({ dataDir, environment });
    const client = new Anthropic({ apiKey: first.apiKey, baseURL: first.url, maxRetries: 0 });
    const agent = await client.beta.agents.create({
      name: 'restart',
      model: 'scripted/bash-once',
      tools: [{ type: 'agent_toolset_20260401' }],
    });
    const env = await client.beta.environments.create({ name: 'restart' });
    const session = await client.beta.sessions.create({ agent: agent.id, environment_id: env.id });
    await run(client, session.id, 'echo one > one.txt; (sleep 1000 &) ; echo started');
    await first.stop();
    const workdir = join(dataDir, 'sessions', session.id, 'workspace');
    expect(processesUsing(workdir)).toEqual([]);

    const second = await startBerthProcess({ dataDir, environment });
    const client2 = new Anthropic({ apiKey: second.apiKey, baseURL: second.url, maxRetries: 0 });
    expect(await sandboxState(second.url, second.apiKey, session.id)).toBe('stopped');
    expect(
      await run(client2, session.id, 'cat one.txt && echo two > two.txt && (sleep 1000 &) ; echo ok'),
    ).toBe('one\nok\n');
    expect(processesUsing(workdir).length).toBeGreaterThan(0);
    await second.kill();

    const third = await startBerthProcess({ dataDir, environment });
    try {
      // The dead server's sandbox, cgroup and mounts are gone before the new one serves.
      expect(processesUsing(workdir)).toEqual([]);
      expect(berthCgroups([second.child.pid!])).toEqual([]);
      expect(mountsUsing(workdir)).toEqual([]);
      const client3 = new Anthropic({ apiKey: third.apiKey, baseURL: third.url, maxRetries: 0 });
      expect(await run(client3, session.id, 'cat one.txt two.txt')).toBe('one\ntwo\n');
    } finally {
      await third.stop();
    }
    expect(processesUsing(workdir)).toEqual([]);
    expect(berthCgroups([first.child.pid!, second.child.pid!, third.child.pid!])).toEqual([]);
  });
});

/** Concurrent first uses of a session share one sandbox (a race once made two over one workdir). */
describe('sandbox provisioning under concurrent first use', () => {
  let berth: TestBerth;
  beforeAll(async () => {
    berth = await startTestBerth({ environment: UNLIMITED_LIMITS });
  });
  afterAll(async () => berth?.dispose());

  /** Mounts stacked on `path` in the host's mount table (each sandbox mounts one workspace disk). */
  const mountsOn = (path: string) =>
    readFileSync('/proc/self/mountinfo', 'utf8')
      .split('\n')
      .filter((line) => line.split(' ')[4] === path);

  it('gives parallel first uses of a session one sandbox, with every file in it', async () => {
    const agent = await berth.client.beta.agents.create({ name: 'parallel', model: 'scripted/echo' });
    const environment = await berth.client.beta.environments.create({ name: 'parallel' });
    const newSession = async () =>
      (await berth.client.beta.sessions.create({ agent: agent.id, environment_id: environment.id })).id;

    const uploaded = await newSession();
    const uploads = await Promise.all(
      Array.from({ length: 6 }, (_, index) =>
        fetch(`${berth.url}/v1/sessions/${uploaded}/files/file-${index}.txt`, {
          method: 'PUT',
          headers: { 'x-api-key': berth.apiKey },
          body: `content ${index}`,
        }),
      ),
    );
    expect(uploads.map((response) => response.status)).toEqual([200, 200, 200, 200, 200, 200]);
    const listing = await fetch(`${berth.url}/v1/sessions/${uploaded}/files`, {
      headers: { 'x-api-key': berth.apiKey },
    });
    const paths = ((await listing.json()) as { data: { path: string }[] }).data
      .map((file) => file.path)
      .sort();
    expect(paths).toEqual(Array.from({ length: 6 }, (_, index) => `file-${index}.txt`));

    // Two MCP stdio servers of one session ask for its sandbox in the same tick.
    const racing = (await berth.store.resources.getSession('tnt_default', await newSession()))!;
    const [first, second] = await Promise.all([
      berth.sandboxes.access(racing).get(),
      berth.sandboxes.access(racing).get(),
    ]);
    expect(second.id).toBe(first.id);
    if (first.enforcedLimits?.diskMb !== undefined) {
      expect(mountsOn(berth.sandboxes.workdirOf(racing.id))).toHaveLength(1);
      expect(mountsOn(berth.sandboxes.workdirOf(uploaded))).toHaveLength(1);
    }
  });
});
