import { spawn } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { type BerthProcess, startBerthProcess } from '../test/support/berth-process.js';
import { type Summary, summarize } from './stats.js';

/** A stand-in OTLP collector in its own process: answers 200 to every export and counts them. */
async function startCollectorProcess(): Promise<{ endpoint: string; close(): Promise<number> }> {
  const script = `
    const http = require('node:http');
    let count = 0;
    const server = http.createServer((request, response) => {
      request.resume();
      // An empty export response in the request's encoding (protobuf by default, or JSON).
      request.on('end', () => {
        count++;
        const json = String(request.headers['content-type']).includes('json');
        response.writeHead(200, { 'content-type': json ? 'application/json' : 'application/x-protobuf' }).end(json ? '{}' : '');
      });
    });
    server.listen(0, '127.0.0.1', () => process.stdout.write(server.address().port + '\\n'));
    process.on('message', () => { process.send(count, () => process.exit(0)); });
  `;
  const child = spawn(process.execPath, ['-e', script], { stdio: ['ignore', 'pipe', 'inherit', 'ipc'] });
  const port = await new Promise<string>((resolve, reject) => {
    child.stdout!.once('data', (chunk: Buffer) => resolve(chunk.toString().trim()));
    child.once('exit', () => reject(new Error('the collector process exited')));
  });
  return {
    endpoint: `http://127.0.0.1:${port}`,
    close: () =>
      new Promise<number>((resolve) => {
        child.once('message', (count) => resolve(Number(count)));
        child.send('count');
      }),
  };
}

/** One side of the comparison: a `berth serve` process and what a turn needs. */
async function side(environment: Record<string, string>) {
  const dataDir = await mkdtemp(join(tmpdir(), 'berth-bench-tracing-'));
  const berth: BerthProcess = await startBerthProcess({
    dataDir,
    environment: {
      BERTH_USER_SESSIONS_PER_MINUTE: '0',
      BERTH_TENANT_SESSIONS_PER_MINUTE: '0',
      ...environment,
    },
  });
  const headers = { 'x-api-key': berth.apiKey, 'content-type': 'application/json' };
  const api = async (path: string, body: unknown) => {
    const response = await fetch(`${berth.url}${path}`, {
      method: 'POST',
      headers,
      body: JSON.stringify(body),
    });
    if (!response.ok) throw new Error(`${path}: ${response.status} ${await response.text()}`);
    return (await response.json()) as { id: string };
  };
  const agent = await api('/v1/agents', { name: 'bench', model: 'scripted/echo' });
  const environmentId = (await api('/v1/environments', { name: 'bench' })).id;
  /** A first turn in a new session: ms from sending the message to seeing idle on the stream. */
  const turn = async (index: number): Promise<number> => {
    const session = await api('/v1/sessions', { agent: agent.id, environment_id: environmentId });
    const stream = await fetch(`${berth.url}/v1/sessions/${session.id}/events/stream`, { headers });
    const reader = stream.body!.getReader();
    const started = performance.now();
    await api(`/v1/sessions/${session.id}/events`, {
      events: [{ type: 'user.message', content: [{ type: 'text', text: `turn ${index}` }] }],
    });
    const decoder = new TextDecoder();
    let buffered = '';
    for (;;) {
      const { done, value } = await reader.read();
      if (done) throw new Error('the stream ended before idle');
      buffered += decoder.decode(value, { stream: true });
      if (buffered.includes('event: session.status_idle')) break;
    }
    const elapsed = performance.now() - started;
    await reader.cancel();
    return elapsed;
  };
  return {
    turn,
    close: async () => {
      await berth.stop();
      await rm(dataDir, { recursive: true, force: true });
    },
  };
}

/**
 * Turn overhead of tracing, measured the way it would be paid: two `berth serve` processes,
 * one exporting traces (OTLP/HTTP to a collector process, 50 ms batches) and one with tracing
 * off, driven turn by turn in alternation (which goes first alternates too) so host drift hits
 * both alike. Each turn is a first turn in a new session, timed by the client from sending the
 * message to seeing `session.status_idle` on the stream.
 */
export async function runTracingOverheadBench(options: { turns: number; warmup: number }): Promise<{
  off: Summary;
  on: Summary;
}> {
  const collector = await startCollectorProcess();
  const off = await side({});
  const on = await side({ OTEL_EXPORTER_OTLP_ENDPOINT: collector.endpoint, OTEL_BSP_SCHEDULE_DELAY: '50' });
  try {
    const times = { off: [] as number[], on: [] as number[] };
    for (let index = 0; index < options.warmup + options.turns; index++) {
      const order = index % 2 === 0 ? (['off', 'on'] as const) : (['on', 'off'] as const);
      for (const name of order) {
        const elapsed = await (name === 'off' ? off : on).turn(index);
        if (index >= options.warmup) times[name].push(elapsed);
      }
    }
    return { off: summarize(times.off), on: summarize(times.on) };
  } finally {
    await off.close();
    await on.close();
    await collector.close();
  }
}
