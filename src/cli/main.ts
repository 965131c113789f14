#!/usr/bin/env node
import { existsSync, readFileSync, statSync } from 'node:fs';
import { mkdir } from 'node:fs/promises';
import { join, relative, resolve } from 'node:path';
import Anthropic from '@anthropic-ai/sdk';
import { Argument, Command, Option } from 'commander';
import { type AgentCreate, principalName } from '../api/schemas.js';
import { agentFileName, loadAgentFolder, type Problem, type SkillSummary } from '../config/agent-files.js';
import { type BerthConfig, loadConfig } from '../config/config.js';
import { isBerthError } from '../errors.js';
import { createTenantWithAdmin } from '../identity/api-keys.js';
import { collectUsage } from '../metering/collect.js';
import { isPresetPriceBookId, loadPriceBook, presetPriceBookIds } from '../metering/price-books.js';
import {
  buildUsageReport,
  formatUsageCsv,
  formatUsageJsonTable,
  formatUsageTable,
  type UsageGroupKey,
  type UsageReport,
  type UsageReportJson,
  usageReportToJson,
} from '../metering/report.js';
import type { UsageRecord } from '../metering/usage.js';
import { type RunningBerth, startBerth } from '../server.js';
import { openStore } from '../store/open-store.js';
import type { Store, TenantLimits } from '../store/resource-store.js';
import { formatVaultKey, generateVaultKey, loadVaultKeyring } from '../vault/keyring.js';
import { VaultService } from '../vault/vault-service.js';
import { applyAgent, enabledToolNames } from './apply-agent.js';
import { syncSkills } from './apply-skills.js';
import { dim, renderEvent } from './render.js';

/**
 * The `berth` command: `serve` runs the server; `run` and `demo` drive a session and print
 * it for a person; `sessions` inspects sessions; `validate` checks an agent folder and `apply`
 * creates or updates its agent; `tenants` and `vault` work on the server's own store and keys.
 * Client commands talk to `--url` (or BERTH_URL) with `--api-key` (or BERTH_API_KEY, or the data
 * directory's admin.key); `run`, `apply` and `demo` start an embedded server when no URL is given.
 */
const program = new Command();
program
  .name('berth')
  .description('Berth: a self-hosted, session-first runtime for AI agents')
  .showHelpAfterError();

const dataDirOption = () =>
  new Option('--data-dir <dir>', 'data directory').default(process.env.BERTH_DATA_DIR ?? '.berth');
const urlOption = (description: string, fallback: string | undefined) =>
  new Option('--url <url>', description).default(fallback);
// No commander default: `--help` would print the key.
const apiKeyOption = () =>
  new Option('--api-key <key>', 'API key (default: BERTH_API_KEY or <data-dir>/admin.key)');

program
  .command('serve')
  .description('run the Berth server')
  .option('--port <port>', 'port to listen on', process.env.BERTH_PORT ?? '8080')
  .option('--host <host>', 'address to listen on', process.env.BERTH_HOST ?? '127.0.0.1')
  .addOption(dataDirOption())
  .option('--database <url>', 'postgres:// URL (default: SQLite in the data directory)')
  .option(
    '--cluster <url>',
    'run as one node of a cluster on this shared postgres:// database (BERTH_NODE_ID, BERTH_NODE_URL, BERTH_LEASE_MS)',
  )
  .action(
    async (options: { port: string; host: string; dataDir: string; database?: string; cluster?: string }) => {
      const berth = await start(options);
      if (options.cluster) console.error(`Berth node ${berth.nodeId} joined the cluster`);
      console.error(`Berth is serving on ${berth.url} (data in ${resolve(options.dataDir)})`);
      const { adminKey } = berth;
      if (adminKey.file) console.error(`API key: ${adminKey.file}`);
      else if (!adminKey.unknownFile) {
        // Nodes started together: one created the key; only its data directory holds it.
        console.error(
          `API key: created by another node, not in this data directory (${adminKey.createdElsewhere ?? 'its label is gone'})`,
        );
      }
      stopOnSignals(berth);
    },
  );

program
  .command('run')
  .description('create a session for an agent, send a prompt, and print the session as it runs')
  .argument(
    '<agent>',
    'agent definition: a folder holding AGENTS.md (or agent.json), or a JSON file of agent create params',
  )
  .argument('<prompt>', 'the first user message')
  .addOption(urlOption('a running Berth server (default: start one in-process)', process.env.BERTH_URL))
  .addOption(apiKeyOption())
  .addOption(dataDirOption())
  .action(async (agentPath: string, prompt: string, options: ClientOptions) => {
    const agent = await readAgentFile(agentPath);
    await withClient(options, async (client) => {
      // An agent folder's skills are uploaded first (unchanged ones are reused).
      const folder = resolve(agentPath);
      if (existsSync(join(folder, agentFileName))) {
        const { skills } = await readAgentFolderWithSkills(folder);
        const synced = await syncSkills(client, folder, skills);
        agent.skills = [...(agent.skills ?? []), ...synced.references];
      }
      await runSession(client, agent, prompt);
    });
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
    const agent = await readAgentFile(resolve(import.meta.dirname, '../../examples/demo/agent.json'));
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

program
  .command('validate')
  .description('check an agent folder (AGENTS.md and skills/*/SKILL.md) and print every problem')
  .argument('<dir>', 'the agent folder')
  .action(async (dir: string) => {
    const result = await loadAgentFolder(resolve(dir));
    if (!result.ok) {
      printProblems(dir, result.problems);
      process.exitCode = 1;
      return;
    }
    const { value, skills } = result;
    printProblems(dir, result.warnings, console.log, 'warning: ');
    const model = typeof value.model === 'string' ? value.model : value.model.id;
    const tools = enabledToolNames(value.tools ?? []);
    const count = (n: number, noun: string) => `${n} ${noun}${n === 1 ? '' : 's'}`;
    console.log(
      `${dir}: OK: agent "${value.name}", model ${model}, ${count(tools.length, 'tool')}` +
        `${tools.length > 0 ? ` (${tools.join(', ')})` : ''}, ${count(skills.length, 'skill')}` +
        `${skills.length > 0 ? ` (${skills.map((skill) => skill.name).join(', ')})` : ''}`,
    );
  });

program
  .command('apply')
  .description(
    'create the agent defined by a folder, or update the agent of the same name when the folder changed it',
  )
  .argument('<dir>', 'the agent folder (AGENTS.md and skills/)')
  .addOption(urlOption('a running Berth server (default: start one in-process)', process.env.BERTH_URL))
  .addOption(apiKeyOption())
  .addOption(dataDirOption())
  .action(async (dir: string, options: ClientOptions) => {
    const { value: params, skills } = await readAgentFolderWithSkills(dir);
    await withClient(options, async (client) => {
      const synced = await syncSkills(client, resolve(dir), skills);
      for (const change of synced.changes) console.log(`  ${change}`);
      params.skills = [...(params.skills ?? []), ...synced.references];
      const outcome = await applyAgent(client, params);
      const { agent } = outcome;
      if (outcome.kind === 'created') console.log(`created agent ${agent.id} version ${agent.version}`);
      else if (outcome.kind === 'updated') {
        for (const change of outcome.changes) console.log(`  ${change}`);
        console.log(`updated agent ${agent.id} to version ${agent.version}`);
      } else {
        if (outcome.note) console.log(dim(`  ${outcome.note}`));
        console.log(`agent ${agent.id} unchanged (version ${agent.version})`);
      }
    });
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
    .addOption(urlOption('Berth server URL', process.env.BERTH_URL ?? 'http://127.0.0.1:8080'))
    .addOption(apiKeyOption())
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

const tenants = program
  .command('tenants')
  .description("manage tenants (operators: works on the server's own store, --data-dir or --database)");
tenants
  .command('create')
  .description("create a tenant with its first admin user; prints the admin's API key once")
  .argument('<name>', 'tenant name (lower-case letters, digits, ".", "_", "-")')
  .option('--live-sessions <n>', 'limit: sessions with a turn in flight at once (0 = unlimited)')
  .option('--sessions-per-minute <n>', 'limit: sessions created per minute (0 = unlimited)')
  .option('--events-per-minute <n>', 'limit: client events per minute (0 = unlimited)')
  .option('--json', 'print JSON')
  .addOption(dataDirOption())
  .option('--database <url>', 'postgres:// URL (default: SQLite in the data directory)')
  .action(
    async (
      name: string,
      options: StoreOptions & {
        liveSessions?: string;
        sessionsPerMinute?: string;
        eventsPerMinute?: string;
        json?: boolean;
      },
    ) => {
      const parsed = principalName.safeParse(name);
      if (!parsed.success) throw new UsageError(`tenant name: ${parsed.error.issues[0]?.message}`);
      const limits: TenantLimits = {};
      for (const [field, value] of [
        ['liveSessions', options.liveSessions],
        ['sessionsPerMinute', options.sessionsPerMinute],
        ['eventsPerMinute', options.eventsPerMinute],
      ] as const) {
        if (value === undefined) continue;
        if (!/^\d+$/.test(value)) throw new UsageError(`--${field} must be a whole number`);
        limits[field] = Number(value);
      }
      await withStore(options, async (store) => {
        const created = await createTenantWithAdmin(store.resources, {
          name,
          limits: Object.keys(limits).length > 0 ? limits : null,
        });
        if (options.json) {
          return print({ tenant: created.tenant, admin: created.admin, api_key: created.key });
        }
        console.error(
          `Created tenant ${created.tenant.name} (${created.tenant.id}) with admin user ${created.admin.id}.`,
        );
        console.error('Its admin API key, shown this once:');
        console.log(created.key);
      });
    },
  );
tenants
  .command('list')
  .description('list tenants')
  .option('--json', 'print JSON')
  .addOption(dataDirOption())
  .option('--database <url>', 'postgres:// URL (default: SQLite in the data directory)')
  .action(async (options: StoreOptions & { json?: boolean }) => {
    await withStore(options, async (store) => {
      const list = await store.resources.listTenants();
      if (options.json) return print(list);
      for (const tenant of list) {
        console.log(
          `${tenant.id}  ${tenant.name.padEnd(20)} ${tenant.createdAt}${tenant.limits ? `  limits ${JSON.stringify(tenant.limits)}` : ''}`,
        );
      }
    });
  });

const vaultCommand = program
  .command('vault')
  .description(
    "vault keys (operators: works on the server's own store and keys: --data-dir or --database, BERTH_VAULT_KEYS, BERTH_VAULT_KEY_FILE)",
  );
vaultCommand
  .command('new-key')
  .description(
    'print a new random vault key as "id:base64", to put first in BERTH_VAULT_KEYS or the key file',
  )
  .action(() => {
    console.log(formatVaultKey(generateVaultKey()));
  });
vaultCommand
  .command('status')
  .description('show the configured vault keys and how many stored credentials each one sealed')
  .option('--json', 'print JSON')
  .addOption(dataDirOption())
  .option('--database <url>', 'postgres:// URL (default: SQLite in the data directory)')
  .action(async (options: StoreOptions & { json?: boolean }) => {
    await withStore(options, async (store, config) => {
      const { keyring, source } = await loadVaultKeyring(config.vault, { generate: false });
      const byKey = await new VaultService({ store, keyring }).keyUsage();
      if (options.json)
        return print({ current_key_id: keyring.currentKeyId, key_ids: keyring.keyIds, by_key: byKey });
      console.log(`keys from ${source}`);
      for (const id of new Set([...keyring.keyIds, ...Object.keys(byKey)])) {
        const role = id === keyring.currentKeyId ? 'current' : keyring.has(id) ? 'older' : 'NOT CONFIGURED';
        console.log(`  ${id.padEnd(24)} ${role.padEnd(15)} ${byKey[id] ?? 0} credentials`);
      }
    });
  });
vaultCommand
  .command('rotate-key')
  .description(
    're-seal every stored secret under the current (first) vault key; servers keep running, since older keys still open what is not re-sealed yet',
  )
  .option('--json', 'print the report as JSON')
  .addOption(dataDirOption())
  .option('--database <url>', 'postgres:// URL (default: SQLite in the data directory)')
  .action(async (options: StoreOptions & { json?: boolean }) => {
    await withStore(options, async (store, config) => {
      const { keyring, source } = await loadVaultKeyring(config.vault, { generate: false });
      const older = keyring.keyIds.filter((id) => id !== keyring.currentKeyId);
      console.error(
        `Re-sealing under vault key ${keyring.currentKeyId} (from ${source}; older keys: ${older.join(', ') || 'none'})`,
      );
      const started = Date.now();
      const report = await new VaultService({ store, keyring }).rotate({
        onProgress: (progress) =>
          console.error(
            `  tenant ${progress.tenantName} (${progress.tenantId}): ${progress.resealed} re-sealed${progress.failed > 0 ? `, ${progress.failed} failed` : ''}`,
          ),
      });
      const seconds = ((Date.now() - started) / 1000).toFixed(1);
      if (options.json) print(report);
      else {
        console.log(
          `Re-sealed ${report.resealed} credentials in ${report.tenants} tenants in ${seconds} s` +
            `${report.changedMeanwhile > 0 ? ` (${report.changedMeanwhile} were re-sealed by a server meanwhile)` : ''}; ${report.failures.length} failed.`,
        );
        const counts = Object.entries(report.byKey).map(
          ([id, count]) => `${id}${id === report.keyId ? ' (current)' : ''}: ${count}`,
        );
        console.log(`Credentials per key now: ${counts.join(', ') || 'none stored'}`);
        for (const failure of report.failures) {
          console.log(`  failed ${failure.credentialId} (tenant ${failure.tenantId}): ${failure.message}`);
        }
        const left = Object.keys(report.byKey).filter((id) => id !== report.keyId);
        console.log(
          left.length === 0
            ? `Nothing is sealed under other keys: once every server has ${report.keyId} first, ${older.length > 0 ? `${older.join(', ')} can be removed` : 'no older key is configured'}.`
            : `Still under other keys: ${left.join(', ')} (a server still sealing with an older key? give it ${report.keyId} first and run this again).`,
        );
      }
      if (report.failures.length > 0) process.exitCode = 1;
    });
  });

/** Adds the client options every API command shares. */
function clientCommand(command: Command): Command {
  return command
    .addOption(urlOption('Berth server URL', process.env.BERTH_URL ?? 'http://127.0.0.1:8080'))
    .addOption(apiKeyOption())
    .option('--json', 'print JSON')
    .addOption(dataDirOption());
}

interface ApiUser {
  id: string;
  name: string;
  role: string;
  created_at: string;
}
interface ApiKeyView {
  id: string;
  name: string;
  user_id: string;
  role: string;
  created_at: string;
  expires_at: string | null;
  revoked_at: string | null;
  key?: string;
}

const users = program
  .command('users')
  .description("manage the users of your tenant (admins; uses the server's API)");
clientCommand(
  users
    .command('create')
    .description('create a user and a first API key for them (the key is printed once)')
    .argument('<name>', 'user name, unique in the tenant')
    .addOption(new Option('--role <role>', 'admin or member').choices(['admin', 'member']).default('member'))
    .option('--no-key', 'create the user without an API key'),
).action(async (name: string, options: ClientOptions & { role: string; key: boolean; json?: boolean }) => {
  await withClient(options, async (client) => {
    const user = await client.post<ApiUser>('/v1/users', { body: { name, role: options.role } });
    const key = options.key
      ? await client.post<ApiKeyView>('/v1/api_keys', {
          body: { name: `${name} key`, user_id: user.id },
        })
      : undefined;
    if (options.json) return print({ user, api_key: key });
    console.error(`Created ${user.role} ${user.name} (${user.id}).`);
    if (key) {
      console.error('Their API key, shown this once:');
      console.log(key.key);
    }
  });
});
clientCommand(users.command('list').description('list the users of your tenant')).action(
  async (options: ClientOptions & { json?: boolean }) => {
    await withClient(options, async (client) => {
      const page = await client.get<{ data: ApiUser[] }>('/v1/users');
      if (options.json) return print(page.data);
      for (const user of page.data)
        console.log(`${user.id}  ${user.role.padEnd(7)} ${user.name}  ${user.created_at}`);
    });
  },
);
clientCommand(
  users
    .command('set-role')
    .description(
      "change a user's role; applies at once on every node (their streams under the old role close)",
    )
    .argument('<user id>', 'the user')
    .addArgument(new Argument('<role>', 'admin or member').choices(['admin', 'member'])),
).action(async (id: string, role: string, options: ClientOptions & { json?: boolean }) => {
  await withClient(options, async (client) => {
    const user = await client.post<ApiUser>(`/v1/users/${encodeURIComponent(id)}`, { body: { role } });
    if (options.json) return print(user);
    console.error(`${user.name} (${user.id}) is now ${user.role}.`);
  });
});

const keys = program
  .command('keys')
  .description("manage API keys (uses the server's API; revocation applies at once)");
clientCommand(
  keys
    .command('create')
    .description('create an API key (for yourself, or as an admin for --user); printed once')
    .option('--user <id>', 'the user the key acts as (admins)')
    .option('--name <name>', 'a label for the key', 'cli')
    .option('--expires-in <seconds>', 'the key stops working after this many seconds'),
).action(
  async (options: ClientOptions & { user?: string; name: string; expiresIn?: string; json?: boolean }) => {
    if (options.expiresIn !== undefined && !/^\d+$/.test(options.expiresIn)) {
      throw new UsageError('--expires-in must be a whole number of seconds');
    }
    await withClient(options, async (client) => {
      const key = await client.post<ApiKeyView>('/v1/api_keys', {
        body: {
          name: options.name,
          ...(options.user ? { user_id: options.user } : {}),
          ...(options.expiresIn ? { expires_in_seconds: Number(options.expiresIn) } : {}),
        },
      });
      if (options.json) return print(key);
      console.error(
        `Created key ${key.id} for ${key.user_id}${key.expires_at ? `, expiring ${key.expires_at}` : ''}; shown this once:`,
      );
      console.log(key.key);
    });
  },
);
clientCommand(
  keys
    .command('list')
    .description('list API keys (all of the tenant for admins)')
    .option('--user <id>', "only this user's keys"),
).action(async (options: ClientOptions & { user?: string; json?: boolean }) => {
  await withClient(options, async (client) => {
    const page = await client.get<{ data: ApiKeyView[] }>('/v1/api_keys', {
      query: options.user ? { user_id: options.user } : {},
    });
    if (options.json) return print(page.data);
    for (const key of page.data) {
      const state = key.revoked_at
        ? `revoked ${key.revoked_at}`
        : key.expires_at
          ? `expires ${key.expires_at}`
          : 'active';
      console.log(`${key.id}  ${key.user_id}  ${key.role.padEnd(7)} ${key.name.padEnd(16)} ${state}`);
    }
  });
});
clientCommand(
  keys
    .command('revoke')
    .description('revoke an API key; it stops working at once')
    .argument('<id>', 'key id'),
).action(async (id: string, options: ClientOptions & { json?: boolean }) => {
  await withClient(options, async (client) => {
    const key = await client.post<ApiKeyView>(`/v1/api_keys/${encodeURIComponent(id)}/revoke`);
    if (options.json) return print(key);
    console.error(`Revoked ${key.id} at ${key.revoked_at}.`);
  });
});

program
  .command('usage')
  .description(
    "measured usage and what it would cost under one or more price books, side by side (your sessions over the API; with --store, every tenant from the server's store)",
  )
  .addOption(
    new Option('--by <key>', 'group rows by')
      .choices(['tenant', 'agent', 'session', 'day'])
      .default('session'),
  )
  .option('--since <date>', 'only sessions created on or after this day (YYYY-MM-DD)')
  .option(
    '--price-book <books>',
    `comma-separated price books: presets (${presetPriceBookIds.join(', ')}) or, with --store, YAML files`,
    'anthropic',
  )
  .option('--csv', 'print CSV')
  .option('--json', 'print JSON')
  .option('--store', "read the server's store directly (operators: all tenants; custom price book files)")
  .option('--database <url>', 'with --store: postgres:// URL (default: SQLite in the data directory)')
  .addOption(urlOption('Berth server URL', process.env.BERTH_URL ?? 'http://127.0.0.1:8080'))
  .addOption(apiKeyOption())
  .addOption(dataDirOption())
  .action(
    async (
      options: ClientOptions &
        StoreOptions & {
          by: UsageGroupKey;
          since?: string;
          priceBook: string;
          csv?: boolean;
          json?: boolean;
          store?: boolean;
        },
    ) => {
      if (options.since !== undefined && !/^\d{4}-\d{2}-\d{2}$/.test(options.since)) {
        throw new UsageError('--since must be a day, YYYY-MM-DD');
      }
      const books = options.priceBook
        .split(',')
        .map((book) => book.trim())
        .filter(Boolean);
      const output = (report: UsageReport) =>
        options.csv
          ? process.stdout.write(formatUsageCsv(report))
          : options.json
            ? print(usageReportToJson(report))
            : console.log(formatUsageTable(report));
      if (options.store) {
        await withStore(options, async (store) => {
          const records: UsageRecord[] = [];
          for (const tenant of await store.resources.listTenants()) {
            records.push(
              ...(await collectUsage(store, {
                tenantId: tenant.id,
                since: options.since ? new Date(`${options.since}T00:00:00Z`) : undefined,
              })),
            );
          }
          output(
            buildUsageReport(records, { by: options.by, books: books.map((book) => loadPriceBook(book)) }),
          );
        });
        return;
      }
      for (const book of books) {
        if (!isPresetPriceBookId(book))
          throw new UsageError(`over the API only presets are priced; use --store for ${book}`);
      }
      await withClient(options, async (client) => {
        const query = {
          by: options.by,
          price_book: books.join(','),
          ...(options.since ? { since: options.since } : {}),
        };
        if (options.csv) {
          const response = await client.get('/v1/usage', { query: { ...query, format: 'csv' } }).asResponse();
          process.stdout.write(await response.text());
          return;
        }
        const json = await client.get<UsageReportJson>('/v1/usage', { query });
        if (options.json) return print(json);
        console.log(formatUsageJsonTable(json));
      });
    },
  );

interface StoreOptions {
  dataDir: string;
  database?: string;
}

/** Opens the configured store directly (operator commands), runs `action`, closes it. */
async function withStore(
  options: StoreOptions,
  action: (store: Store, config: BerthConfig) => Promise<unknown>,
) {
  const config = loadConfig({
    flags: { dataDir: options.dataDir, database: options.database },
    environment: process.env,
  });
  if (config.store.kind === 'sqlite') {
    await mkdir(config.dataDir, { recursive: true, mode: 0o700 });
  }
  // Operator commands migrate only when told how (BERTH_DATABASE_MIGRATION_URL): --database is
  // usually the app role, which may not (and should not) change the schema.
  const store = await openStore(
    config.store.kind === 'postgres' ? { ...config.store, migrateAsApp: false } : config.store,
  );
  try {
    await action(store, config);
  } finally {
    await store.close();
  }
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
  cluster?: string;
}): Promise<RunningBerth> {
  const config = loadConfig({
    flags: {
      port: options.port,
      host: options.host,
      dataDir: options.dataDir,
      database: options.database,
      cluster: options.cluster,
    },
    environment: process.env,
  });
  return startBerth(config, {
    logger: {
      info: (message, fields) => {
        if (message === 'created the admin API key')
          console.error(dim(`Created the admin API key in ${fields?.file}`));
        if (message === 'created the vault key')
          console.error(
            dim(`Created the vault key in ${fields?.file} (keep a copy: secrets cannot be read without it)`),
          );
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

/** Reads an agent definition: a folder holding AGENTS.md or agent.json, or a JSON file. */
async function readAgentFile(path: string): Promise<Anthropic.Beta.AgentCreateParams> {
  let file = resolve(path);
  if (existsSync(file) && statSync(file).isDirectory()) {
    if (existsSync(join(file, agentFileName))) {
      return (await readAgentFolder(path)) as Anthropic.Beta.AgentCreateParams;
    }
    file = join(file, 'agent.json');
  }
  if (!existsSync(file)) throw new UsageError(`no agent definition at ${file}`);
  try {
    return JSON.parse(readFileSync(file, 'utf8'));
  } catch (error) {
    throw new UsageError(`${file} is not valid JSON: ${(error as Error).message}`);
  }
}

/** Loads an agent folder, or prints its problems to stderr and fails. */
async function readAgentFolder(dir: string): Promise<AgentCreate> {
  return (await readAgentFolderWithSkills(dir)).value;
}

/** Loads an agent folder with the skills found in it, or prints its problems and fails. */
async function readAgentFolderWithSkills(
  dir: string,
): Promise<{ value: AgentCreate; skills: SkillSummary[] }> {
  const result = await loadAgentFolder(resolve(dir));
  if (result.ok) {
    printProblems(dir, result.warnings, console.error, 'warning: ');
    return { value: result.value, skills: result.skills };
  }
  printProblems(dir, result.problems, console.error);
  const count = result.problems.length;
  throw new UsageError(`${dir} has ${count} problem${count === 1 ? '' : 's'}`);
}

/** Prints problems as `file:line: message`, with paths relative to the working directory. */
function printProblems(dir: string, problems: readonly Problem[], write = console.log, prefix = '') {
  for (const problem of problems) {
    const file = relative(process.cwd(), join(resolve(dir), problem.file)) || '.';
    write(`${file}${problem.line ? `:${problem.line}` : ''}: ${prefix}${problem.message}`);
  }
}

async function withClient(options: ClientOptions, action: (client: Anthropic) => Promise<unknown>) {
  let berth: RunningBerth | undefined;
  let url = options.url;
  if (!url) {
    berth = await start({ port: '0', dataDir: options.dataDir });
    url = berth.url;
  }
  let apiKey = options.apiKey ?? process.env.BERTH_API_KEY;
  const keyFile = join(resolve(options.dataDir), 'admin.key');
  if (!apiKey && existsSync(keyFile)) apiKey = readFileSync(keyFile, 'utf8').trim();
  if (!apiKey)
    throw new UsageError(
      `no API key: pass --api-key, set BERTH_API_KEY, or run from a data directory holding admin.key`,
    );
  const client = new Anthropic({ apiKey, baseURL: url, maxRetries: 0 });
  try {
    await action(client);
  } catch (error) {
    if (error instanceof Anthropic.APIConnectionError) {
      throw new UsageError(`could not reach the Berth server at ${url}: ${connectionFailure(error)}`);
    }
    throw error;
  } finally {
    await berth?.close();
  }
}

/** Why a request never got an answer, from the error's causes (e.g. `connection refused (ECONNREFUSED)`). */
function connectionFailure(error: InstanceType<typeof Anthropic.APIConnectionError>): string {
  if (error instanceof Anthropic.APIConnectionTimeoutError) return 'the request timed out';
  const known: Record<string, string> = {
    ECONNREFUSED: 'connection refused: is `berth serve` running there?',
    ENOTFOUND: 'no such host',
    EAI_AGAIN: 'the host name could not be resolved',
    ECONNRESET: 'the connection was reset',
    ETIMEDOUT: 'the connection timed out',
    EHOSTUNREACH: 'the host is unreachable',
    ENETUNREACH: 'the network is unreachable',
  };
  // fetch wraps the socket error: APIConnectionError → TypeError('fetch failed') → the cause.
  let cause: unknown = error.cause;
  let last = error.message;
  for (let depth = 0; cause !== undefined && cause !== null && depth < 5; depth++) {
    const { code, message } = cause as { code?: unknown; message?: unknown };
    if (typeof code === 'string')
      return `${known[code] ?? (typeof message === 'string' ? message : code)} (${code})`;
    if (typeof message === 'string' && message !== '') last = message;
    cause = (cause as { cause?: unknown }).cause;
  }
  return last;
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
  } else if (error instanceof Anthropic.APIConnectionError) {
    console.error(`berth: no answer from the server: ${connectionFailure(error)}`);
  } else if (error instanceof Anthropic.APIError) {
    console.error(`berth: the server answered ${error.status}: ${error.message}`);
  } else {
    console.error(error);
  }
  process.exit(1);
});
