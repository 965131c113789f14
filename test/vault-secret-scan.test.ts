import { randomBytes } from 'node:crypto';
import { mkdtemp, readdir, readFile, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type BerthProcess, startBerthProcess } from './support/berth-process.js';
import { type FakeOAuthServer, startFakeOAuthServer } from './support/fake-oauth-server.js';
import { startOtlpReceiver } from './support/otlp-receiver.js';

/** A unique, greppable secret. */
const canary = (label: string) => `canary${label}${randomBytes(12).toString('hex')}`;

const SECRETS = {
  bearer: canary('bearer'),
  bearerUpdated: canary('bearerupdated'),
  variable: canary('variable'),
  variableUpdated: canary('variableupdated'),
  bodyVariable: canary('bodyvariable'),
  access: canary('access'),
  refresh: canary('refresh'),
  clientSecret: canary('clientsecret'),
  postAccess: canary('postaccess'),
  postClientSecret: canary('postclientsecret'),
  refused: canary('refused'),
};
/** Tokens the fake authorization server issues on refresh start with this: they are secrets too. */
const ISSUED_PREFIX = canary('issued');
const CANARIES = [...Object.values(SECRETS), ISSUED_PREFIX];

/** Every file under a directory, with its bytes. */
async function filesUnder(directory: string): Promise<{ path: string; bytes: Buffer }[]> {
  const found: { path: string; bytes: Buffer }[] = [];
  for (const entry of await readdir(directory, { withFileTypes: true, recursive: true })) {
    const path = join(entry.parentPath, entry.name);
    if (entry.isFile()) found.push({ path, bytes: await readFile(path) });
  }
  return found;
}

/** Which canaries a text or byte buffer holds (as UTF-8, base64 or hex, in case something encoded them). */
function canariesIn(data: string | Buffer): string[] {
  const bytes = typeof data === 'string' ? Buffer.from(data) : data;
  return CANARIES.filter((value) =>
    [value, Buffer.from(value).toString('base64'), Buffer.from(value).toString('base64url')].some((form) =>
      bytes.includes(form),
    ),
  );
}

/**
 * Canary secrets go into the vault through every vault, credential and session endpoint
 * (creates, updates, validation with a token refresh, bad requests, a session turn); then every
 * API answer, the session's event log and stream, the server's output, its traces and every byte
 * of its data directory are searched. A canary must be found nowhere: in the database only
 * ciphertext.
 */
describe('vault secrets never leave the vault', () => {
  let dataDir: string;
  let server: BerthProcess;
  let oauth: FakeOAuthServer;
  let otlp: Awaited<ReturnType<typeof startOtlpReceiver>>;
  /** Every answer the API gave: status line, headers and body. */
  const answers: { label: string; text: string }[] = [];

  const call = async (method: string, path: string, body?: unknown) => {
    const response = await fetch(`${server.url}${path}`, {
      method,
      headers: { 'x-api-key': server.apiKey, 'content-type': 'application/json' },
      body: body === undefined ? undefined : typeof body === 'string' ? body : JSON.stringify(body),
    });
    const text = await response.text();
    answers.push({
      label: `${method} ${path} → ${response.status}`,
      text: `${JSON.stringify([...response.headers])}\n${text}`,
    });
    return { status: response.status, json: text ? JSON.parse(text) : undefined };
  };
  const must = async (method: string, path: string, body?: unknown) => {
    const answer = await call(method, path, body);
    if (answer.status !== 200)
      throw new Error(`${method} ${path}: ${answer.status} ${JSON.stringify(answer.json)}`);
    return answer.json;
  };

  beforeAll(async () => {
    dataDir = await mkdtemp(join(tmpdir(), 'berth-secret-scan-'));
    oauth = await startFakeOAuthServer({
      auth: 'client_secret_basic',
      clientId: 'scan-client',
      clientSecret: SECRETS.clientSecret,
      refreshToken: SECRETS.refresh,
      accessToken: SECRETS.access,
      issuedPrefix: ISSUED_PREFIX,
    });
    otlp = await startOtlpReceiver();
    server = await startBerthProcess({
      dataDir,
      environment: {
        OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: `${otlp.endpoint}/v1/traces`,
        OTEL_BSP_SCHEDULE_DELAY: '50',
        BERTH_TRACE_SLOW_APPEND_MS: '0',
        BERTH_SANDBOX_WARM_POOL: '0',
      },
    });

    // Vaults.
    const vault = await must('POST', '/v1/vaults', { display_name: 'scan', metadata: { team: 'scan' } });
    const spare = await must('POST', '/v1/vaults', { display_name: 'spare' });
    await must('GET', '/v1/vaults');
    await must('GET', `/v1/vaults/${vault.id}`);
    await must('POST', `/v1/vaults/${vault.id}`, { display_name: 'scanned', metadata: { team: null } });
    const credentials = `/v1/vaults/${vault.id}/credentials`;

    // One credential of every kind, with every secret field.
    const bearer = await must('POST', credentials, {
      display_name: 'bearer',
      auth: { type: 'static_bearer', token: SECRETS.bearer, mcp_server_url: 'https://mcp.scan.example/mcp' },
    });
    const variable = await must('POST', credentials, {
      auth: {
        type: 'environment_variable',
        secret_name: 'SCAN_TOKEN',
        secret_value: SECRETS.variable,
        networking: { type: 'limited', allowed_hosts: ['api.scan.example'] },
      },
    });
    await must('POST', credentials, {
      auth: {
        type: 'environment_variable',
        secret_name: 'SCAN_BODY',
        secret_value: `${SECRETS.bodyVariable}\nwith a second line`,
        networking: { type: 'unrestricted' },
        injection_location: { header: false, body: true },
      },
    });
    const oauthCredential = await must('POST', credentials, {
      auth: {
        type: 'mcp_oauth',
        access_token: SECRETS.access,
        mcp_server_url: oauth.mcpUrl,
        expires_at: new Date(Date.now() + 3600_000).toISOString(),
        refresh: {
          client_id: 'scan-client',
          refresh_token: SECRETS.refresh,
          token_endpoint: oauth.tokenEndpoint,
          token_endpoint_auth: { type: 'client_secret_basic', client_secret: SECRETS.clientSecret },
        },
      },
    });
    const postCredential = await must('POST', `/v1/vaults/${spare.id}/credentials`, {
      auth: {
        type: 'mcp_oauth',
        access_token: SECRETS.postAccess,
        mcp_server_url: 'https://other-mcp.scan.example/mcp',
        refresh: {
          client_id: 'scan-client',
          refresh_token: SECRETS.refresh,
          token_endpoint: oauth.tokenEndpoint,
          token_endpoint_auth: { type: 'client_secret_post', client_secret: SECRETS.postClientSecret },
        },
      },
    });
    await must('GET', credentials);
    await must('GET', `${credentials}?include_archived=true&limit=1`);
    for (const id of [bearer.id, variable.id, oauthCredential.id]) await must('GET', `${credentials}/${id}`);
    await must('POST', `${credentials}/${bearer.id}`, {
      auth: { type: 'static_bearer', token: SECRETS.bearerUpdated },
      metadata: { rotated: 'yes' },
    });
    await must('POST', `${credentials}/${variable.id}`, {
      auth: {
        type: 'environment_variable',
        secret_value: SECRETS.variableUpdated,
        injection_location: { body: true },
      },
    });
    await must('POST', `/v1/vaults/${spare.id}/credentials/${postCredential.id}`, {
      auth: {
        type: 'mcp_oauth',
        refresh: {
          token_endpoint_auth: { type: 'client_secret_post', client_secret: SECRETS.postClientSecret },
        },
      },
    });

    // Validation: valid, then a 401 that makes the server refresh (new canary tokens issued and stored).
    await must('POST', `${credentials}/${oauthCredential.id}/mcp_oauth_validate`);
    oauth.validAccessTokens.delete(SECRETS.access);
    const refreshed = await must('POST', `${credentials}/${oauthCredential.id}/mcp_oauth_validate`);
    expect(refreshed.status).toBe('valid');
    // A refused refresh: the server's error answer echoes the refresh token it was sent.
    oauth.validAccessTokens.clear();
    oauth.refreshToken = 'not-what-berth-has';
    const refused = await must('POST', `${credentials}/${oauthCredential.id}/mcp_oauth_validate`);
    expect(refused).toMatchObject({ status: 'invalid', refresh: { status: 'failed' } });

    // Bad requests carrying secrets.
    expect(
      (await call('POST', credentials, { auth: { type: 'static_bearer', token: `${SECRETS.refused}\n` } }))
        .status,
    ).toBe(400);
    expect((await call('POST', credentials, `{"auth": {"token": ${SECRETS.refused}}}`)).status).toBe(400);
    expect(
      (
        await call('POST', credentials, {
          auth: {
            type: 'environment_variable',
            secret_name: 'PATH',
            secret_value: SECRETS.refused,
            networking: { type: 'unrestricted' },
          },
        })
      ).status,
    ).toBe(400);

    // A session with the vaults, a turn, its events and stream.
    const agent = await must('POST', '/v1/agents', { name: 'scan', model: 'scripted/echo' });
    const environment = await must('POST', '/v1/environments', { name: 'scan' });
    const session = await must('POST', '/v1/sessions', {
      agent: agent.id,
      environment_id: environment.id,
      vault_ids: [vault.id, spare.id],
    });
    const stream = await fetch(`${server.url}/v1/sessions/${session.id}/events/stream`, {
      headers: { 'x-api-key': server.apiKey },
    });
    const reader = stream.body!.getReader();
    await must('POST', `/v1/sessions/${session.id}/events`, {
      events: [{ type: 'user.message', content: [{ type: 'text', text: 'what do you hold?' }] }],
    });
    let streamed = '';
    while (!streamed.includes('session.status_idle')) {
      const { value, done } = await reader.read();
      if (done) break;
      streamed += Buffer.from(value).toString('utf8');
    }
    await reader.cancel();
    answers.push({ label: 'event stream', text: streamed });
    await must('GET', `/v1/sessions/${session.id}`);
    await must('GET', '/v1/sessions');
    await must('GET', `/v1/sessions/${session.id}/events?limit=1000`);
    await must('POST', `/v1/sessions/${session.id}`, { title: 'scanned' });
    expect((await call('POST', `/v1/sessions/${session.id}`, { vault_ids: [vault.id] })).status).toBe(400);
    await must('POST', `/v1/sessions/${session.id}/archive`);

    // Retire what there is to retire.
    await must('POST', `${credentials}/${variable.id}/archive`);
    await must('DELETE', `${credentials}/${bearer.id}`);
    await must('POST', `/v1/vaults/${spare.id}/archive`);
    await must('DELETE', `/v1/vaults/${spare.id}`);

    // Traces are exported in batches: wait until some arrived, then stop the server cleanly
    // (which flushes the rest) so every byte is on disk.
    const deadline = Date.now() + 10_000;
    while (otlp.spans.length === 0 && Date.now() < deadline)
      await new Promise((done) => setTimeout(done, 50));
    await server.stop();
  });

  afterAll(async () => {
    await server?.kill();
    await oauth?.close();
    await otlp?.close();
    await rm(dataDir, { recursive: true, force: true });
  });

  it('really stored and used the secrets (the scan is not looking at an empty server)', () => {
    // The token endpoint got the stored refresh token and client secret (HTTP Basic).
    const refresh = oauth.requests.find((request) => request.path === '/token')!;
    expect(refresh.form.refresh_token).toBe(SECRETS.refresh);
    expect(Buffer.from(refresh.headers.authorization!.slice(6), 'base64').toString()).toContain(
      SECRETS.clientSecret,
    );
    expect(
      oauth.requests.some((request) => request.headers.authorization === `Bearer ${ISSUED_PREFIX}-access-1`),
    ).toBe(true);
    // Every vault and credential route, and the session routes that show vault_ids, answered.
    const called = new Set(
      answers.map((answer) =>
        answer.label
          .replace(/ → \d+$/, '')
          .replace(/\?.*$/, '')
          .replace(/vlt_\w+/, ':vault')
          .replace(/vcrd_\w+/, ':credential')
          .replace(/sesn_\w+/, ':session'),
      ),
    );
    for (const route of [
      'POST /v1/vaults',
      'GET /v1/vaults',
      'GET /v1/vaults/:vault',
      'POST /v1/vaults/:vault',
      'POST /v1/vaults/:vault/archive',
      'DELETE /v1/vaults/:vault',
      'POST /v1/vaults/:vault/credentials',
      'GET /v1/vaults/:vault/credentials',
      'GET /v1/vaults/:vault/credentials/:credential',
      'POST /v1/vaults/:vault/credentials/:credential',
      'POST /v1/vaults/:vault/credentials/:credential/archive',
      'POST /v1/vaults/:vault/credentials/:credential/mcp_oauth_validate',
      'DELETE /v1/vaults/:vault/credentials/:credential',
      'POST /v1/sessions',
      'GET /v1/sessions',
      'GET /v1/sessions/:session',
      'POST /v1/sessions/:session',
      'POST /v1/sessions/:session/archive',
      'POST /v1/sessions/:session/events',
      'GET /v1/sessions/:session/events',
    ]) {
      expect(called, route).toContain(route);
    }
    expect(otlp.spans.length).toBeGreaterThan(0);
    // The scan finds a canary where there is one.
    expect(canariesIn(`x${SECRETS.variable}x`)).toEqual([SECRETS.variable]);
  });

  it('puts no secret in any API answer, the event log or the event stream', () => {
    const leaks = answers.flatMap((answer) =>
      canariesIn(answer.text).map((found) => `${answer.label}: ${found}`),
    );
    expect(leaks).toEqual([]);
  });

  it("puts no secret in the server's output or its traces", () => {
    expect(server.output().length).toBeGreaterThan(0);
    expect(canariesIn(server.output())).toEqual([]);
    expect(canariesIn(otlp.rawBodies.join('\n'))).toEqual([]);
  });

  it('keeps only ciphertext on disk: no file in the data directory holds a secret', async () => {
    const files = await filesUnder(dataDir);
    const database = files.find((file) => file.path.endsWith('berth.db'))!;
    expect(database).toBeDefined();
    // The sealed envelopes are there (so the secrets are stored, just not readable).
    const keyId = (await readFile(join(dataDir, 'vault.key'), 'utf8'))
      .split('\n')
      .find((line) => /^[\w-]+:/.test(line))!
      .split(':')[0]!;
    const everything = Buffer.concat(files.map((file) => file.bytes));
    expect(everything.includes(`v1.${keyId}.`)).toBe(true);
    const leaks = files.flatMap((file) => canariesIn(file.bytes).map((found) => `${file.path}: ${found}`));
    expect(leaks).toEqual([]);
    expect((await stat(join(dataDir, 'vault.key'))).mode & 0o777).toBe(0o600);
  });
});
