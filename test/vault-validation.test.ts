import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startTestBerth, type TestBerth } from './support/berth-instance.js';

const CANARY = 'canary-validation-3e8b1f27c6';

/**
 * Bad vault and credential bodies: each is a 400 in the Anthropic error shape, names what is
 * wrong without echoing a secret, and writes nothing.
 */
describe('vault API validation', () => {
  let berth: TestBerth;
  let vaultId: string;
  let agentId: string;
  let environmentId: string;

  const request = async (method: string, path: string, body?: unknown) => {
    const response = await fetch(`${berth.url}${path}`, {
      method,
      headers: { 'x-api-key': berth.apiKey, 'content-type': 'application/json' },
      body: body === undefined ? undefined : typeof body === 'string' ? body : JSON.stringify(body),
    });
    return { status: response.status, text: await response.text() };
  };

  /** Everything the store holds about vaults, as the API and the store show it. */
  const snapshot = async () => ({
    vaults: JSON.parse((await request('GET', '/v1/vaults?include_archived=true&limit=1000')).text),
    credentials: (
      await berth.store.vaults.listCredentials('tnt_default', vaultId, { limit: 1000, includeArchived: true })
    ).items,
    sessions: JSON.parse(
      (await request('GET', '/v1/sessions?include_archived=true&limit=1000')).text,
    ).data.map((session: { id: string }) => session.id),
  });

  const expectRefused = async (method: string, path: string, body: unknown, message: RegExp) => {
    const answer = await request(method, path, body);
    expect(answer.status, `${JSON.stringify(body)} → ${answer.text}`).toBe(400);
    const parsed = JSON.parse(answer.text);
    expect(parsed).toEqual({
      type: 'error',
      error: { type: 'invalid_request_error', message: expect.any(String) },
    });
    expect(parsed.error.message).toMatch(message);
    expect(answer.text).not.toContain(CANARY);
  };

  beforeAll(async () => {
    berth = await startTestBerth();
    vaultId = (await berth.client.beta.vaults.create({ display_name: 'validation' })).id;
    agentId = (await berth.client.beta.agents.create({ name: 'v', model: 'scripted/echo' })).id;
    environmentId = (await berth.client.beta.environments.create({ name: 'v' })).id;
  });
  afterAll(async () => berth?.dispose());

  it('refuses bad vault bodies', async () => {
    const before = await snapshot();
    await expectRefused('POST', '/v1/vaults', {}, /display_name/);
    await expectRefused('POST', '/v1/vaults', { display_name: '' }, /display_name/);
    await expectRefused('POST', '/v1/vaults', { display_name: 'x'.repeat(256) }, /display_name/);
    await expectRefused('POST', '/v1/vaults', { display_name: 'x', secrets: CANARY }, /secrets/);
    await expectRefused(
      'POST',
      '/v1/vaults',
      {
        display_name: 'x',
        metadata: Object.fromEntries(Array.from({ length: 17 }, (_, n) => [`k${n}`, 'v'])),
      },
      /at most 16 metadata keys/,
    );
    await expectRefused('POST', `/v1/vaults/${vaultId}`, { display_name: 7 }, /display_name/);
    expect(await snapshot()).toEqual(before);
  });

  it('refuses bad credential bodies without echoing the secret, and stores nothing', async () => {
    const before = await snapshot();
    const path = `/v1/vaults/${vaultId}/credentials`;
    const variable = (overrides: Record<string, unknown>) => ({
      auth: {
        type: 'environment_variable',
        secret_name: 'API_KEY',
        secret_value: CANARY,
        networking: { type: 'unrestricted' },
        ...overrides,
      },
    });
    const bearer = (overrides: Record<string, unknown>) => ({
      auth: { type: 'static_bearer', token: CANARY, mcp_server_url: 'https://mcp.example.com', ...overrides },
    });
    const oauth = (overrides: Record<string, unknown>) => ({
      auth: {
        type: 'mcp_oauth',
        access_token: CANARY,
        mcp_server_url: 'https://mcp.example.com',
        ...overrides,
      },
    });
    const cases: [unknown, RegExp][] = [
      [{}, /auth/],
      [{ auth: { type: 'password', password: CANARY } }, /auth/],
      [`{"auth": {"type": "static_bearer", "token": ${CANARY}}}`, /not valid JSON/],
      [bearer({ token: `${CANARY}\r\nX-Injected: 1` }), /auth.token: must not contain line breaks/],
      [bearer({ token: '' }), /auth.token/],
      [bearer({ token: 'x'.repeat(16_385) }), /auth.token/],
      [bearer({ mcp_server_url: 'ftp://mcp.example.com' }), /mcp_server_url: must be an http\(s\) URL/],
      [bearer({ mcp_server_url: 'not a url' }), /mcp_server_url/],
      [bearer({ mcp_server_url: `https://user:${CANARY}@mcp.example.com` }), /without credentials/],
      [bearer({ secret_value: CANARY }), /secret_value/],
      [variable({ secret_name: '1BAD' }), /secret_name: must be an environment variable name/],
      [variable({ secret_name: 'PATH' }), /secret_name PATH is reserved/],
      [variable({ secret_name: 'LD_PRELOAD' }), /reserved/],
      [variable({ secret_name: 'BERTH_TOKEN' }), /reserved/],
      [variable({ secret_name: 'https_proxy' }), /reserved/],
      [
        variable({ networking: { type: 'limited', allowed_hosts: ['https://api.example.com'] } }),
        /allowed host/,
      ],
      [variable({ networking: { type: 'limited', allowed_hosts: ['api.example.com:443'] } }), /allowed host/],
      [variable({ networking: { type: 'limited', allowed_hosts: ['api.example.com/v1'] } }), /allowed host/],
      [variable({ networking: { type: 'limited', allowed_hosts: ['::1'] } }), /allowed host/],
      [variable({ networking: { type: 'limited', allowed_hosts: ['*.com'] } }), /allowed host/],
      [variable({ networking: { type: 'limited', allowed_hosts: [] } }), /allowed_hosts/],
      [
        variable({
          networking: {
            type: 'limited',
            allowed_hosts: Array.from({ length: 17 }, (_, n) => `h${n}.example.com`),
          },
        }),
        /allowed_hosts/,
      ],
      [variable({ networking: { type: 'limited' } }), /allowed_hosts/],
      [variable({ injection_location: { header: false, body: false } }), /injection_location must enable/],
      [
        variable({ secret_value: `${CANARY}\nline two` }),
        /must not contain line breaks while injection_location.header/,
      ],
      [variable({ token: CANARY }), /token/],
      [oauth({ expires_at: new Date(Date.now() - 1000).toISOString() }), /expires_at must be in the future/],
      [oauth({ expires_at: 'tomorrow' }), /expires_at/],
      [
        oauth({
          refresh: {
            client_id: 'c',
            refresh_token: CANARY,
            token_endpoint: 'https://auth.example.com/token',
            token_endpoint_auth: { type: 'client_secret_basic' },
          },
        }),
        /client_secret/,
      ],
      [
        oauth({
          refresh: {
            client_id: 'c',
            refresh_token: CANARY,
            token_endpoint: 'https://auth.example.com/token',
          },
        }),
        /token_endpoint_auth/,
      ],
    ];
    for (const [body, message] of cases) await expectRefused('POST', path, body, message);
    const missing = await request('POST', '/v1/vaults/vlt_missing/credentials', bearer({}));
    expect(missing.status).toBe(404);
    expect(missing.text).not.toContain(CANARY);
    expect(await snapshot()).toEqual(before);
  });

  it('refuses bad credential updates and leaves the credential and its secret as they were', async () => {
    const { client } = berth;
    const created = await client.beta.vaults.credentials.create(vaultId, {
      auth: {
        type: 'mcp_oauth',
        access_token: `${CANARY}-access`,
        mcp_server_url: 'https://oauth.example.com/mcp',
      },
    });
    const variable = await client.beta.vaults.credentials.create(vaultId, {
      auth: {
        type: 'environment_variable',
        secret_name: 'MULTILINE',
        secret_value: `${CANARY}\nsecond line`,
        networking: { type: 'unrestricted' },
        injection_location: { header: false, body: true },
      },
    });
    const before = await snapshot();
    const path = (id: string) => `/v1/vaults/${vaultId}/credentials/${id}`;
    await expectRefused(
      'POST',
      path(created.id),
      { auth: { type: 'static_bearer', token: CANARY } },
      /type cannot change/,
    );
    await expectRefused(
      'POST',
      path(created.id),
      { auth: { type: 'mcp_oauth', refresh: { refresh_token: CANARY } } },
      /no refresh configuration/,
    );
    await expectRefused(
      'POST',
      path(created.id),
      { auth: { type: 'mcp_oauth', mcp_server_url: 'https://elsewhere.example.com' } },
      /mcp_server_url/,
    );
    await expectRefused(
      'POST',
      path(created.id),
      { auth: { type: 'mcp_oauth', expires_at: '2001-01-01T00:00:00Z' } },
      /in the future/,
    );
    await expectRefused('POST', path(created.id), { display_name: '' }, /display_name/);
    await expectRefused(
      'POST',
      path(variable.id),
      { auth: { type: 'environment_variable', secret_name: 'RENAMED' } },
      /secret_name/,
    );
    // The stored value has a line break: it may not start going into headers.
    await expectRefused(
      'POST',
      path(variable.id),
      { auth: { type: 'environment_variable', injection_location: { header: true } } },
      /line breaks while injection_location.header/,
    );
    expect(await snapshot()).toEqual(before);
  });

  it('refuses session vault_ids that are not strings, too many, unknown or archived, and creates no session', async () => {
    const before = await snapshot();
    const body = (vaultIds: unknown) => ({
      agent: agentId,
      environment_id: environmentId,
      vault_ids: vaultIds,
    });
    await expectRefused('POST', '/v1/sessions', body('vlt_x'), /vault_ids/);
    await expectRefused('POST', '/v1/sessions', body([7]), /vault_ids/);
    await expectRefused('POST', '/v1/sessions', body(Array.from({ length: 33 }, () => vaultId)), /vault_ids/);
    await expectRefused(
      'POST',
      '/v1/sessions',
      body([vaultId, 'vlt_unknown']),
      /vault vlt_unknown not found/,
    );
    const archived = await berth.client.beta.vaults.create({ display_name: 'archived' });
    await berth.client.beta.vaults.archive(archived.id);
    const after = await snapshot();
    await expectRefused('POST', '/v1/sessions', body([archived.id]), /is archived/);
    expect((await snapshot()).sessions).toEqual(before.sessions);
    expect(await snapshot()).toEqual(after);
  });
});
