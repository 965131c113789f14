import { existsSync, readdirSync } from 'node:fs';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import Anthropic from '@anthropic-ai/sdk';
import Database from 'better-sqlite3';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type BerthProcess, processesNaming, startBerthProcess } from './support/berth-process.js';
import { type FakeOpenAiServer, startFakeOpenAiServer } from './support/fake-openai-server.js';

/** An event as the API returns it (and as the store keeps it in `events.body`). */
type LoggedEvent = { id: string; type: string; processed_at: string; [field: string]: unknown };

const SESSION_COUNT = 5;
const KILL_COUNT = 25;
/** Tool round trips per turn before the fake model ends the turn with a text. */
const TOOL_ROUND_TRIPS = 3;
const RESTART_NOTICE = 'runtime restarted while this tool was running';
const MARKER_FILE = '/workspace/ran.txt';
/** If a kill trigger does not fire within this time, kill anyway (coverage is asserted later). */
const TRIGGER_TIMEOUT_MS = 8_000;
const SETTLE_TIMEOUT_MS = 30_000;

/** How long, after a kill, everything the server started has to be gone (no next start reaps it). */
const DIE_WITH_SERVER_MS = 10_000;

type KillStrategy = 'tool_running' | 'model_call' | 'random_delay' | 'provisioning' | 'pool_refill';
const STRATEGIES: readonly KillStrategy[] = [
  'tool_running',
  'model_call',
  'random_delay',
  'provisioning',
  'pool_refill',
];
type EventStrategy = Exclude<KillStrategy, 'random_delay' | 'provisioning' | 'pool_refill'>;
const TRIGGER_EVENT: Record<EventStrategy, string> = {
  tool_running: 'agent.tool_use',
  model_call: 'span.model_request_start',
};

/**
 * Resolves when the server `serverPid` is starting a sandbox whose launcher names `workdirPrefix`
 * (a session's workspace, or the warm pool's directory), after a random 0-40 ms more so the kill
 * lands anywhere from the launcher's start to bwrap's set-up. Stops looking once `stopped()`.
 */
async function sandboxStarting(serverPid: number, workdirPrefix: string, stopped: () => boolean) {
  while (!stopped()) {
    const launching = processesNaming([workdirPrefix]).some(
      (found) => found.parentPid === serverPid && found.command.includes('berth-exec --launch'),
    );
    if (launching) {
      await sleep(Math.floor(Math.random() * 40));
      return true;
    }
    await new Promise((done) => setImmediate(done));
  }
  return false;
}

/**
 * A file of a session's workspace on the host: in its working directory, or in its snapshot when
 * a clean stop put the sandbox away (`<dataDir>/snapshots/<tenant>/<session>.<stamp>/workspace`).
 */
function workspaceFile(dataDir: string, sessionId: string, name: string): string {
  const live = join(dataDir, 'sessions', sessionId, 'workspace', name);
  if (existsSync(live)) return live;
  const tenants = join(dataDir, 'snapshots');
  for (const tenant of existsSync(tenants) ? readdirSync(tenants) : []) {
    for (const snapshot of readdirSync(join(tenants, tenant))) {
      if (snapshot.startsWith(`${sessionId}.`)) return join(tenants, tenant, snapshot, 'workspace', name);
    }
  }
  return live;
}

/** One server process's life: from spawn to the moment its exit was observed. */
interface ServerLife {
  startedAt: number;
  endedAt: number;
  strategy: KillStrategy | 'final';
}

const sleep = (milliseconds: number) => new Promise((done) => setTimeout(done, milliseconds));

/**
 * Reads a session's event stream (SSE) from after `afterId`, calling `onEvent` for every event
 * once its whole SSE message has arrived. Errors (the server was killed) just end the stream.
 */
function openEventStream(
  server: BerthProcess,
  sessionId: string,
  afterId: string | undefined,
  onEvent: (event: LoggedEvent) => void,
): { close(): void } {
  const controller = new AbortController();
  const query = afterId === undefined ? '' : `?after_id=${encodeURIComponent(afterId)}`;
  (async () => {
    const response = await fetch(`${server.url}/v1/sessions/${sessionId}/events/stream${query}`, {
      headers: { 'x-api-key': server.apiKey },
      signal: controller.signal,
    });
    if (!response.ok || !response.body) return;
    const decoder = new TextDecoder();
    let buffer = '';
    for await (const chunk of response.body) {
      buffer += decoder.decode(chunk as Uint8Array, { stream: true });
      for (let boundary = buffer.indexOf('\n\n'); boundary >= 0; boundary = buffer.indexOf('\n\n')) {
        const message = buffer.slice(0, boundary);
        buffer = buffer.slice(boundary + 2);
        const data = message
          .split('\n')
          .filter((line) => line.startsWith('data:'))
          .map((line) => line.slice(5).trimStart())
          .join('\n');
        if (data === '') continue;
        const event = JSON.parse(data) as LoggedEvent;
        if (event.type === 'ping') continue;
        onEvent(event);
      }
    }
  })().catch(() => undefined);
  return { close: () => controller.abort() };
}

describe('kill -9 during tool-using turns', () => {
  let model: FakeOpenAiServer;
  let dataDir: string;
  let markerCount = 0;
  /** Every server process this test started, for the cleanup and leftover checks. */
  const servers: BerthProcess[] = [];
  const sessionIds: string[] = [];
  /**
   * What the command line of every process our servers start names: the data directory (servers,
   * launchers, pooled sandboxes), a session id (its sandbox's bwrap), or the marker file (tools).
   */
  const ownProcessNeedles = () => [
    dataDir,
    MARKER_FILE,
    ...sessionIds.map((sessionId) => `BERTH_SESSION_ID ${sessionId}`),
  ];

  beforeAll(async () => {
    dataDir = await mkdtemp(join(tmpdir(), 'berth-crash-'));
    // A turn is TOOL_ROUND_TRIPS bash calls, each appending a unique marker after a short
    // sleep (so kills land while it runs), then a final text. Replies are slow enough that
    // kills land during model calls too.
    model = await startFakeOpenAiServer((request) => {
      const messages = request.body.messages ?? [];
      let lastUser = -1;
      messages.forEach((message, index) => {
        if (message.role === 'user') lastUser = index;
      });
      const toolResults = messages.slice(lastUser + 1).filter((message) => message.role === 'tool').length;
      const delayMs = 100 + Math.floor(Math.random() * 150);
      if (toolResults >= TOOL_ROUND_TRIPS) return { text: 'All steps are done.', delayMs };
      markerCount += 1;
      const marker = `marker-${markerCount}`;
      return {
        delayMs,
        toolCalls: [
          {
            name: 'bash',
            arguments: { command: `sleep 0.3; echo ${marker} >> ${MARKER_FILE}; echo ${marker}` },
          },
        ],
      };
    });
  });

  afterAll(async () => {
    for (const started of servers) await started.kill().catch(() => undefined);
    await model?.close();
    // Anything naming our unique data directory or sessions (a server, a sandbox a kill left
    // behind) was started by this test; the test fails on them, but must not leak them.
    if (dataDir) {
      for (const { pid } of processesNaming(ownProcessNeedles())) {
        try {
          process.kill(pid, 'SIGKILL');
        } catch {
          // Gone already.
        }
      }
      await rm(dataDir, { recursive: true, force: true });
    }
  });

  it('every session reaches idle with a gapless log, no lost acknowledged event, and no tool run twice', async () => {
    const environment = {
      OPENAI_COMPATIBLE_BASE_URL: model.url,
      BERTH_RETRY_BASE_DELAY_MS: '20',
    };
    const start = async () => {
      const started = await startBerthProcess({ dataDir, environment });
      servers.push(started);
      return started;
    };

    // Setup through the official SDK.
    const first = await start();
    const client = new Anthropic({ apiKey: first.apiKey, baseURL: first.url, maxRetries: 0 });
    const agent = await client.beta.agents.create({
      name: 'crash-test',
      model: 'openai-compatible/fake-model',
      system: 'You are a test agent.',
      tools: [{ type: 'agent_toolset_20260401' }],
    });
    const environmentResource = await client.beta.environments.create({
      name: 'crash-env',
      config: { type: 'cloud' },
    });
    const createSession = async (target: BerthProcess) => {
      const targetClient = new Anthropic({ apiKey: target.apiKey, baseURL: target.url, maxRetries: 0 });
      const session = await targetClient.beta.sessions.create({
        agent: agent.id,
        environment_id: environmentResource.id,
      });
      sessionIds.push(session.id);
      return session.id;
    };
    for (let index = 0; index < SESSION_COUNT; index++) await createSession(first);

    /** Events the server acknowledged (POST /events responses), by id. */
    const acknowledged = new Map<string, LoggedEvent>();
    /** Events a client saw on a stream, by id. */
    const seen = new Map<string, LoggedEvent>();
    const lastSeenId = new Map<string, string>();
    /** The idle event each session's newest message answered, so one idle gets one message. */
    const answeredIdle = new Map<string, string>();
    const lives: ServerLife[] = [];
    /** Kills that landed while a sandbox was starting, by what it was started for. */
    const sandboxStartKills = { provisioning: 0, pool_refill: 0 };
    /** Processes that outlived the server that started them, by kill. */
    const outlived: string[] = [];
    /** Ids of events a stream delivered twice with different content. */
    const changedOnReplay: string[] = [];
    let messageCount = 0;

    /** Sends a user.message; only a response counts as an acknowledgement. */
    const sendMessage = async (target: BerthProcess, sessionId: string) => {
      messageCount += 1;
      const response = await fetch(`${target.url}/v1/sessions/${sessionId}/events`, {
        method: 'POST',
        headers: { 'x-api-key': target.apiKey, 'content-type': 'application/json' },
        body: JSON.stringify({
          events: [{ type: 'user.message', content: [{ type: 'text', text: `Do step ${messageCount}.` }] }],
        }),
      });
      if (!response.ok) throw new Error(`send answered ${response.status}: ${await response.text()}`);
      const body = (await response.json()) as { data: LoggedEvent[] };
      for (const event of body.data) acknowledged.set(event.id, event);
    };

    /** Sends a new message to a session whose newest event is this idle event (once per idle). */
    const continueAfterIdle = (target: BerthProcess, sessionId: string, idleId: string) => {
      if (answeredIdle.get(sessionId) === idleId) return;
      answeredIdle.set(sessionId, idleId);
      // A send cut off by a kill is simply not acknowledged.
      sendMessage(target, sessionId).catch(() => undefined);
    };

    const newestEvent = async (target: BerthProcess, sessionId: string) => {
      const response = await fetch(`${target.url}/v1/sessions/${sessionId}/events?order=desc&limit=1`, {
        headers: { 'x-api-key': target.apiKey },
      });
      if (!response.ok) throw new Error(`list answered ${response.status}`);
      return ((await response.json()) as { data: LoggedEvent[] }).data[0];
    };

    const recordSeen = (sessionId: string, event: LoggedEvent) => {
      const earlier = seen.get(event.id);
      if (earlier && JSON.stringify(earlier) !== JSON.stringify(event)) changedOnReplay.push(event.id);
      seen.set(event.id, event);
      lastSeenId.set(sessionId, event.id);
    };

    for (let killIndex = 0; killIndex < KILL_COUNT; killIndex++) {
      const strategy = STRATEGIES[killIndex % STRATEGIES.length]!;
      const current = killIndex === 0 ? first : await start();
      let killed = false;
      let fireTrigger: () => void = () => undefined;
      const triggered = new Promise<void>((done) => {
        fireTrigger = done;
      });
      const killNow = () => {
        if (killed) return;
        killed = true;
        current.child.kill('SIGKILL');
        fireTrigger();
      };
      let armedAt = Number.POSITIVE_INFINITY;
      const triggerType = strategy in TRIGGER_EVENT ? TRIGGER_EVENT[strategy as EventStrategy] : undefined;

      // A new session takes a pooled sandbox at its first tool use, and the pool then starts a
      // replacement: that replacement's start is where a pool_refill kill lands.
      if (strategy === 'pool_refill') await createSession(current);
      const streams = sessionIds.map((sessionId) =>
        openEventStream(current, sessionId, lastSeenId.get(sessionId), (event) => {
          if (killed) return;
          recordSeen(sessionId, event);
          const processedAt = Date.parse(event.processed_at);
          // Only live events count: the history a reconnect replays is already past.
          if (event.type === triggerType && processedAt >= armedAt) {
            killNow();
            return;
          }
          if (event.type === 'session.status_idle' && processedAt >= current.startedAt) {
            continueAfterIdle(current, sessionId, event.id);
          }
        }),
      );
      // Keep turns happening: every idle session gets a new message.
      for (const sessionId of sessionIds) {
        const newest = await newestEvent(current, sessionId);
        if (newest === undefined || newest.type === 'session.status_idle') {
          // A session without events: its first message was cut off by a kill; send it again.
          continueAfterIdle(current, sessionId, newest?.id ?? `created-${killIndex}`);
        }
      }
      armedAt = Date.now();
      if (strategy === 'random_delay') {
        await sleep(Math.floor(Math.random() * 600));
      } else if (strategy === 'provisioning' || strategy === 'pool_refill') {
        // Sessions that ran before this start get their sandbox anew at their next tool use;
        // pooled sandboxes are started for the pool alone.
        const prefix = join(dataDir, strategy === 'provisioning' ? 'sessions' : 'sandbox-pool');
        const giveUpAt = Date.now() + TRIGGER_TIMEOUT_MS;
        if (await sandboxStarting(current.child.pid!, prefix, () => killed || Date.now() > giveUpAt)) {
          sandboxStartKills[strategy] += 1;
        }
      } else {
        await Promise.race([triggered, sleep(TRIGGER_TIMEOUT_MS)]);
      }
      killNow();
      await current.kill();
      for (const stream of streams) stream.close();
      lives.push({ startedAt: current.startedAt, endedAt: Date.now(), strategy });
      // Everything this server started dies with it, before any next start could reap it.
      let left = processesNaming(ownProcessNeedles());
      for (const deadline = Date.now() + DIE_WITH_SERVER_MS; left.length > 0 && Date.now() < deadline; ) {
        await sleep(100);
        left = processesNaming(ownProcessNeedles());
      }
      for (const survivor of left) {
        outlived.push(`kill ${killIndex} (${strategy}): ${survivor.pid}: ${survivor.command.slice(0, 240)}`);
        try {
          process.kill(survivor.pid, 'SIGKILL');
        } catch {
          // Gone already.
        }
      }
    }

    // Restart once more and let every session finish its turn without new messages.
    const last = await start();
    const finalStreams = sessionIds.map((sessionId) =>
      openEventStream(last, sessionId, lastSeenId.get(sessionId), (event) => recordSeen(sessionId, event)),
    );
    // A session created for a pool_refill kill whose first message that kill cut off has not
    // begun: it gets its first turn now.
    for (const sessionId of sessionIds) {
      if ((await newestEvent(last, sessionId)) === undefined) await sendMessage(last, sessionId);
    }
    const deadline = Date.now() + SETTLE_TIMEOUT_MS;
    let unsettled = [...sessionIds];
    while (unsettled.length > 0) {
      const newest = await Promise.all(unsettled.map((sessionId) => newestEvent(last, sessionId)));
      unsettled = unsettled.filter((_, index) => newest[index]?.type !== 'session.status_idle');
      if (unsettled.length === 0) break;
      if (Date.now() > deadline) {
        throw new Error(`sessions never went idle after the last restart: ${unsettled.join(', ')}`);
      }
      await sleep(100);
    }
    const finalClient = new Anthropic({ apiKey: last.apiKey, baseURL: last.url, maxRetries: 0 });
    for (const sessionId of sessionIds) {
      expect((await finalClient.beta.sessions.retrieve(sessionId)).status).toBe('idle');
    }
    // Let the streams deliver the last events before closing them.
    await sleep(200);
    for (const stream of finalStreams) stream.close();
    await last.stop();
    lives.push({ startedAt: last.startedAt, endedAt: Date.now(), strategy: 'final' });
    expect(last.child.exitCode, `clean stop failed: ${last.stderr()}`).toBe(0);

    // The log as the store kept it.
    const database = new Database(join(dataDir, 'berth.db'), { readonly: true, fileMustExist: true });
    const rows = database
      .prepare('SELECT session_id, seq, id, type, processed_at, body FROM events ORDER BY session_id, seq')
      .all() as Array<{
      session_id: string;
      seq: number;
      id: string;
      type: string;
      processed_at: string;
      body: string;
    }>;
    database.close();

    // Event ids are unique across the database.
    expect(new Set(rows.map((row) => row.id)).size).toBe(rows.length);
    const storedById = new Map<string, LoggedEvent>();
    const logs = new Map<string, LoggedEvent[]>();
    for (const row of rows) {
      const event = JSON.parse(row.body) as LoggedEvent;
      expect(event.id).toBe(row.id);
      expect(event.type).toBe(row.type);
      storedById.set(row.id, event);
      const log = logs.get(row.session_id) ?? [];
      // seq is exactly 1..n: nothing duplicated or skipped.
      expect(row.seq, `seq of session ${row.session_id}`).toBe(log.length + 1);
      log.push(event);
      logs.set(row.session_id, log);
    }

    // No acknowledged or seen event is lost or changed.
    expect(changedOnReplay).toEqual([]);
    for (const event of acknowledged.values()) expect(storedById.get(event.id)).toEqual(event);
    for (const event of seen.values()) expect(storedById.get(event.id)).toEqual(event);

    const restartNoticeToolUses: LoggedEvent[] = [];
    const orphanedModelStarts: LoggedEvent[] = [];
    let turnCount = 0;
    let toolRunCount = 0;
    for (const sessionId of sessionIds) {
      const log = logs.get(sessionId) ?? [];
      // The last status is idle (a clean stop then logs its sandbox going into a snapshot).
      expect(log.filter((event) => !event.type.startsWith('berth.')).at(-1)?.type).toBe(
        'session.status_idle',
      );

      // Every turn ended normally: no errors, no retries exhausted.
      const idles = log.filter((event) => event.type === 'session.status_idle');
      for (const idle of idles) expect(idle.stop_reason).toEqual({ type: 'end_turn' });
      expect(log.filter((event) => event.type === 'session.error')).toEqual([]);
      expect(idles.length).toBe(log.filter((event) => event.type === 'session.status_running').length);
      turnCount += idles.length;

      // Every tool use has exactly one result, after it.
      // No file at all when every tool use of the session was cut off before its command ran.
      const markerFile = workspaceFile(dataDir, sessionId, 'ran.txt');
      const ranSomething = log.some((event) => event.type === 'agent.tool_result' && event.is_error !== true);
      // A tool that returned its output surely wrote its marker (a cut-off one may have too).
      if (ranSomething) expect(existsSync(markerFile), `ran.txt of ${sessionId}`).toBe(true);
      const markers = existsSync(markerFile)
        ? (await readFile(markerFile, 'utf8')).split('\n').filter(Boolean)
        : [];
      const markerTimes = new Map<string, number>();
      for (const marker of markers) markerTimes.set(marker, (markerTimes.get(marker) ?? 0) + 1);
      // No tool ran twice.
      for (const [marker, times] of markerTimes) expect(times, `${marker} in ran.txt`).toBe(1);
      const toolUseMarkers = new Set<string>();
      log.forEach((toolUse, position) => {
        if (toolUse.type !== 'agent.tool_use') return;
        const command = (toolUse.input as { command: string }).command;
        const marker = /marker-\d+/.exec(command)![0];
        toolUseMarkers.add(marker);
        const results = log.filter(
          (event) => event.type === 'agent.tool_result' && event.tool_use_id === toolUse.id,
        );
        expect(results, `results of ${toolUse.id}`).toHaveLength(1);
        const result = results[0]!;
        expect(log.indexOf(result)).toBeGreaterThan(position);
        const text = (result.content as Array<{ text: string }>)[0]!.text;
        if (result.is_error === true) {
          // Only a crash may fail a tool here, and it says so.
          expect(text).toContain(RESTART_NOTICE);
          expect(markerTimes.get(marker) ?? 0).toBeLessThanOrEqual(1);
          restartNoticeToolUses.push(toolUse);
        } else {
          expect(text).toContain(marker);
          expect(markerTimes.get(marker), `${marker} of a successful result`).toBe(1);
          toolRunCount += 1;
        }
      });
      // Nothing ran that the log does not know about.
      for (const marker of markerTimes.keys()) expect(toolUseMarkers.has(marker)).toBe(true);
      expect(log.filter((event) => event.type === 'agent.tool_result')).toHaveLength(toolUseMarkers.size);

      // A model call cut off by a kill has a start without an end, and was retried.
      const endedStarts = new Set(
        log
          .filter((event) => event.type === 'span.model_request_end')
          .map((event) => event.model_request_start_id as string),
      );
      log.forEach((event, position) => {
        if (event.type !== 'span.model_request_start' || endedStarts.has(event.id)) return;
        expect(log.slice(position + 1).some((later) => later.type === 'span.model_request_start')).toBe(true);
        orphanedModelStarts.push(event);
      });
    }

    // Where each kill landed, from the log: the life during which the cut-off step began.
    const lifeOf = (event: LoggedEvent) => {
      const time = Date.parse(event.processed_at);
      return lives.findIndex((life) => life.startedAt <= time && time <= life.endedAt);
    };
    const killsDuringTool = new Set(restartNoticeToolUses.map(lifeOf));
    const killsDuringModelCall = new Set(orphanedModelStarts.map(lifeOf));
    // Crash evidence only comes from lives that ended in a kill, never from the clean final one.
    const finalLife = lives.length - 1;
    for (const life of [...killsDuringTool, ...killsDuringModelCall]) {
      expect(life).toBeGreaterThanOrEqual(0);
      expect(life).toBeLessThan(finalLife);
    }
    const elsewhere = lives
      .slice(0, finalLife)
      .filter((_, index) => !killsDuringTool.has(index) && !killsDuringModelCall.has(index)).length;
    console.log(
      `crash test: ${lives.length - 1} kills (between tool_use and tool_result: ${killsDuringTool.size}, ` +
        `during a model call: ${killsDuringModelCall.size}, elsewhere: ${elsewhere}); ` +
        `${sessionIds.length} sessions, ${turnCount} turns, ${toolRunCount} tool runs, ` +
        `${restartNoticeToolUses.length} tool uses and ${orphanedModelStarts.length} model calls cut off; ` +
        `${rows.length} events checked (${acknowledged.size} acknowledged, ${seen.size} seen by clients)`,
    );
    console.log(
      `crash test: kills while a sandbox started: ${sandboxStartKills.provisioning} for a session, ` +
        `${sandboxStartKills.pool_refill} for the warm pool`,
    );
    expect(lives.length - 1).toBeGreaterThanOrEqual(20);
    expect(killsDuringTool.size).toBeGreaterThanOrEqual(3);
    expect(killsDuringModelCall.size).toBeGreaterThanOrEqual(3);
    expect(sandboxStartKills.provisioning).toBeGreaterThanOrEqual(2);
    expect(sandboxStartKills.pool_refill).toBeGreaterThanOrEqual(2);

    // No process a server started survived it: no sandbox (bwrap names the session or the pool),
    // no launcher (it names the workdir) and no tool command, neither after a kill nor at the end.
    expect(outlived, 'processes a killed server had started are still alive').toEqual([]);
    let survivors = processesNaming(ownProcessNeedles());
    for (let attempt = 0; attempt < 50 && survivors.length > 0; attempt++) {
      await sleep(100);
      survivors = processesNaming(ownProcessNeedles());
    }
    expect(
      survivors.map((survivor) => `${survivor.pid}: ${survivor.command.slice(0, 240)}`),
      'processes a stopped server had started are still alive',
    ).toEqual([]);
    // 26 starts at 8-25 s each on a loaded 2-core machine (loading the CLI through tsx alone took
    // 7 s at load 17), plus the kills' triggers: 460 s there, more than 600 s beside two busy loops.
  }, 900_000);
});
