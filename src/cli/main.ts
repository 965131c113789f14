#!/usr/bin/env node
import { existsSync, readFileSync, statSync } from 'node:fs';
import { join, resolve } from 'node:path';
import Anthropic from '@anthropic-ai/sdk';
import { Command, Option } from 'commander';
import { loadConfig } from '../config/config.js';
import { isBerthError } from '../errors.js';
import { type RunningBerth, startBerth } from '../server.js';
import { dim, renderEvent } from './render.js';

/**
 * The `berth` command: `serve` runs the server; `run` and `demo` drive a session and print
 * it for a person; `sessions` inspects sessions. Client commands talk to `--url` (or
 * BERTH_URL) with `--api-key` (or BERTH_API_KEY, or the data directory's admin.key); `run`
 * and `demo` start an embedded server when no URL is given.
 */
const program = new Command();
program
  .name('berth')
  .description('Berth: a self-hosted, session-first runtime for AI agents')
  .showHelpAfterError();

const dataDirOption = () =>
  new Option('--data-dir <dir>', 'data directory').default(process.env.BERTH_DATA_DIR ?? '.berth');

program
  .command('serve')
  .description('run the Berth server')
  .option('--port <port>', 'port to listen on', process.env.BERTH_PORT ?? '8080')
  .option('--host <host>', 'address to listen on', process.env.BERTH_HOST ?? '127.0.0.1')
  .addOption(dataDirOption())
  .option('--database <url>', 'postgres:// URL (default: SQLite in the data directory)')
  .action(async (options: { port: string; host: string; dataDir: string; database?: string }) => {
    const berth = await start(options);
    console.error(`Berth is serving on ${berth.url} (data in ${resolve(options.dataDir)})`);
    console.error(`API key: ${join(resolve(options.dataDir), 'admin.key')}`);
    stopOnSignals(berth);
  });

program
  .command('run')
  .description('create a session for an agent, send a prompt, and print the session as it runs')
  .argument('<agent>', 'agent definition: a JSON file of agent create params, or a folder holding agent.json')
  .argument('<prompt>', 'the first user message')
  .option('--url <url>', 'a running Berth server (default: start one in-process)', process.env.BERTH_URL)
  .option(
    '--api-key <key>',
    'API key (default: BERTH_API_KEY or <data-dir>/admin.key)',
    process.env.BERTH_API_KEY,
  )
  .addOption(dataDirOption())
  .action(async (agentPath: string, prompt: string, options: ClientOptions) => {
    const agent = readAgentFile(agentPath);
    await withClient(options, (client) => runSession(client, agent, prompt));
  });

program
  .command('demo')
  .description(
    'run the demo agent offline (scripted model; a real Claude model when ANTHROPIC_API_KEY is set), then keep serving',
  )
  .option('--port <port>', 'port to listen on', process.env.BERTH_PORT ?? '8080')
  .option('--host <host>', 'address to listen on', process.env.BERTH_HOST ?? '127.0.0.1')
  .addOption(dataDirOption())
  .option('--exit', 'stop after the demo session instead of serving')
  .action(async (options: { port: string; host: string; dataDir: string; exit?: boolean }) => {
    const berth = await start(options);
    const key = readFileSync(join(resolve(options.dataDir), 'admin.key'), 'utf8').trim();
    const client = new Anthropic({ apiKey: key, baseURL: berth.url, maxRetries: 0 });
    const agent = readAgentFile(resolve(import.meta.dirname, '../../examples/demo/agent.json'));
    if (process.env.ANTHROPIC_API_KEY) agent.model = 'anthropic/claude-sonnet-4-5';
    console.log(dim(`Berth ${berth.url} · model ${agent.model} · sandbox bwrap\n`));
    await runSession(client, agent, 'Show me what you can do in your sandbox.');
    if (options.exit) {
      await berth.close();
      return;
    }
    console.log(
      `\nBerth keeps serving on ${berth.url}. API key in ${join(resolve(options.dataDir), 'admin.key')}.`,
    );
    console.log(`Try: npx berth run examples/demo "list the files in your workspace" --url ${berth.url}`);
    console.log('Press Ctrl-C to stop.');
    stopOnSignals(berth);
  });

const sessions = program.command('sessions').description('inspect sessions');
for (const [name, description] of [
  ['list', 'list sessions'],
  ['show', 'show one session'],
  ['events', "print a session's events for a person (add --json for raw events)"],
] as const) {
  const command = sessions.command(name).description(description);
  if (name !== 'list') command.argument('<id>', 'session id');
  command
    .option('--url <url>', 'Berth server URL', process.env.BERTH_URL ?? 'http://127.0.0.1:8080')
    .option(
      '--api-key <key>',
      'API key (default: BERTH_API_KEY or <data-dir>/admin.key)',
      process.env.BERTH_API_KEY,
    )
    .option('--json', 'print raw JSON')
    .addOption(dataDirOption())
    .action(async (...args: unknown[]) => {
      const id = name === 'list' ? undefined : (args[0] as string);
      const options = (name === 'list' ? args[0] : args[1]) as ClientOptions & { json?: boolean };
      await withClient(options, async (client) => {
        if (name === 'list') {
          const page = await client.beta.sessions.list({ limit: 50 });
          if (options.json) return print(page.data);
          for (const session of page.data) {
            console.log(
              `${session.id}  ${session.status.padEnd(11)} ${session.agent.name}  ${session.created_at}`,
            );
          }
        } else if (name === 'show') {
          print(await client.beta.sessions.retrieve(id!));
        } else {
          for await (const event of client.beta.sessions.events.list(id!, { limit: 1000 })) {
            if (options.json) console.log(JSON.stringify(event));
            else {
              const line = renderEvent(event as unknown as { type: string });
              if (line) console.log(line);
            }
          }
        }
      });
    });
}

interface ClientOptions {
  url?: string;
  apiKey?: string;
  dataDir: string;
}

function print(value: unknown) {
  console.log(JSON.stringify(value, null, 2));
}

async function start(options: {
  port?: string;
  host?: string;
  dataDir: string;
  database?: string;
}): Promise<RunningBerth> {
  const config = loadConfig({
    flags: { port: options.port, host: options.host, dataDir: options.dataDir, database: options.database },
    environment: process.env,
  });
  return startBerth(config, {
    logger: {
      info: (message, fields) => {
        if (message === 'created the admin API key')
          console.error(dim(`Created the admin API key in ${fields?.file}`));
      },
      warn: (message, fields) => console.error(`warning: ${message} ${fields ? JSON.stringify(fields) : ''}`),
      error: (message, fields) => console.error(`error: ${message} ${fields ? JSON.stringify(fields) : ''}`),
    },
  });
}

function stopOnSignals(berth: RunningBerth) {
  const stop = () => {
    berth.close().then(
      () => process.exit(0),
      () => process.exit(1),
    );
  };
  process.once('SIGINT', stop);
  process.once('SIGTERM', stop);
}

/** Reads an agent definition: a JSON file, or a folder holding agent.json. */
function readAgentFile(path: string): Anthropic.Beta.AgentCreateParams {
  let file = resolve(path);
  if (existsSync(file) && statSync(file).isDirectory()) file = join(file, 'agent.json');
  if (!existsSync(file)) throw new UsageError(`no agent definition at ${file}`);
  try {
    return JSON.parse(readFileSync(file, 'utf8'));
  } catch (error) {
    throw new UsageError(`${file} is not valid JSON: ${(error as Error).message}`);
  }
}

async function withClient(options: ClientOptions, action: (client: Anthropic) => Promise<unknown>) {
  let berth: RunningBerth | undefined;
  let url = options.url;
  if (!url) {
    berth = await start({ port: '0', dataDir: options.dataDir });
    url = berth.url;
  }
  let apiKey = options.apiKey;
  const keyFile = join(resolve(options.dataDir), 'admin.key');
  if (!apiKey && existsSync(keyFile)) apiKey = readFileSync(keyFile, 'utf8').trim();
  if (!apiKey)
    throw new UsageError(
      `no API key: pass --api-key, set BERTH_API_KEY, or run from a data directory holding admin.key`,
    );
  const client = new Anthropic({ apiKey, baseURL: url, maxRetries: 0 });
  try {
    await action(client);
  } finally {
    await berth?.close();
  }
}

/** Creates agent, environment and session, sends the prompt, and prints events until idle. */
async function runSession(client: Anthropic, agentParams: Anthropic.Beta.AgentCreateParams, prompt: string) {
  const started = Date.now();
  const agent = await client.beta.agents.create(agentParams);
  const environment = await client.beta.environments.create({
    name: `${agent.name} environment`,
    config: { type: 'cloud' },
  });
  const session = await client.beta.sessions.create({ agent: agent.id, environment_id: environment.id });
  console.log(dim(`session ${session.id}`));
  const stream = await client.beta.sessions.events.stream(session.id);
  await client.beta.sessions.events.send(session.id, {
    events: [{ type: 'user.message', content: [{ type: 'text', text: prompt }] }],
  });
  for await (const event of stream) {
    const line = renderEvent(event as unknown as { type: string });
    if (line) console.log(line);
    if (event.type === 'session.status_idle' || event.type === 'session.status_terminated') break;
  }
  const finished = await client.beta.sessions.retrieve(session.id);
  const seconds = ((Date.now() - started) / 1000).toFixed(1);
  console.log(
    dim(
      `\n${finished.usage.input_tokens ?? 0} input / ${finished.usage.output_tokens ?? 0} output tokens · ${seconds} s · berth sessions events ${session.id}`,
    ),
  );
}

class UsageError extends Error {}

program.parseAsync(process.argv).catch((error: unknown) => {
  if (error instanceof UsageError || isBerthError(error)) {
    console.error(`berth: ${(error as Error).message}`);
  } else if (error instanceof Anthropic.APIError) {
    console.error(`berth: the server answered ${error.status}: ${error.message}`);
  } else {
    console.error(error);
  }
  process.exit(1);
});
