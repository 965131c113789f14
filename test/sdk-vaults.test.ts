import Anthropic from '@anthropic-ai/sdk';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startTestBerth, type TestBerth } from './support/berth-instance.js';
import { type FakeOAuthServer, startFakeOAuthServer } from './support/fake-oauth-server.js';

type Credential = Anthropic.Beta.Vaults.BetaManagedAgentsCredential;

const BEARER = 'sdk-bearer-5b0f3e0f1c';
const VARIABLE = 'sdk-variable-9c2a81d7e4';
const ACCESS = 'sdk-access-71e0c33a5d';
const REFRESH = 'sdk-refresh-4f9d2b6c18';
const CLIENT_SECRET = 'sdk-client-secret-a83c5e2f07';
const SECRETS = [BEARER, VARIABLE, ACCESS, REFRESH, CLIENT_SECRET];

/** Fails when a response carries a secret value or a secret-bearing field. */
function expectNoSecrets(value: unknown): void {
  const text = JSON.stringify(value);
  for (const secret of SECRETS) expect(text).not.toContain(secret);
  for (const field of ['"token"', '"secret_value"', '"access_token"', '"refresh_token"', '"client_secret"']) {
    expect(text).not.toContain(field);
  }
}

/**
 * The official `@anthropic-ai/sdk` drives `client.beta.vaults` and its credentials against a
 * real Berth: every method, all three credential kinds, cursor pagination, and sessions that
 * name vaults.
 */
describe('official Anthropic SDK: vaults and credentials', () => {
  let berth: TestBerth;
  let oauth: FakeOAuthServer;

  beforeAll(async () => {
    oauth = await startFakeOAuthServer({
      auth: 'client_secret_post',
      clientId: 'berth-sdk',
      clientSecret: CLIENT_SECRET,
      refreshToken: REFRESH,
      accessToken: ACCESS,
      issuedPrefix: 'sdk-issued',
    });
    berth = await startTestBerth();
  });
  afterAll(async () => {
    await berth?.dispose();
    await oauth?.close();
  });

  it('creates, retrieves, updates, lists page by page, archives and deletes vaults', async () => {
    const { client } = berth;
    const created = [];
    for (const name of ['one', 'two', 'three']) {
      created.push(
        await client.beta.vaults.create({ display_name: `vault ${name}`, metadata: { team: name } }),
      );
    }
    const vault = created[0]!;
    expect(vault).toMatchObject({
      type: 'vault',
      display_name: 'vault one',
      metadata: { team: 'one' },
      archived_at: null,
    });
    expect(vault.id).toMatch(/^vlt_/);
    expect(await client.beta.vaults.retrieve(vault.id)).toEqual(vault);

    const updated = await client.beta.vaults.update(vault.id, {
      display_name: 'renamed',
      metadata: { team: null, owner: 'ops' },
    });
    expect(updated).toMatchObject({ display_name: 'renamed', metadata: { owner: 'ops' } });
    expect(Date.parse(updated.updated_at)).toBeGreaterThanOrEqual(Date.parse(vault.updated_at));

    const listed = [];
    for await (const item of client.beta.vaults.list({ limit: 2 })) listed.push(item.id);
    expect(listed).toEqual(expect.arrayContaining(created.map((item) => item.id)));
    const firstPage = await client.beta.vaults.list({ limit: 2 });
    expect(firstPage.data).toHaveLength(2);
    expect(firstPage.hasNextPage()).toBe(true);

    const archived = await client.beta.vaults.archive(created[1]!.id);
    expect(archived.archived_at).not.toBeNull();
    const active = [];
    for await (const item of client.beta.vaults.list()) active.push(item.id);
    expect(active).not.toContain(archived.id);
    const all = [];
    for await (const item of client.beta.vaults.list({ include_archived: true })) all.push(item.id);
    expect(all).toContain(archived.id);
    await expect(client.beta.vaults.update(archived.id, { display_name: 'x' })).rejects.toThrow(/archived/);

    expect(await client.beta.vaults.delete(created[2]!.id)).toEqual({
      id: created[2]!.id,
      type: 'vault_deleted',
    });
    await expect(client.beta.vaults.retrieve(created[2]!.id)).rejects.toBeInstanceOf(Anthropic.NotFoundError);
  });

  it('stores all three kinds of credential and never answers with a secret', async () => {
    const { client } = berth;
    const vault = await client.beta.vaults.create({ display_name: 'kinds' });
    const bearer = await client.beta.vaults.credentials.create(vault.id, {
      display_name: 'Linear',
      auth: { type: 'static_bearer', token: BEARER, mcp_server_url: 'https://mcp.linear.example/mcp' },
    });
    expect(bearer).toMatchObject({
      type: 'vault_credential',
      vault_id: vault.id,
      display_name: 'Linear',
      metadata: {},
      archived_at: null,
      auth: { type: 'static_bearer', mcp_server_url: 'https://mcp.linear.example/mcp' },
    });
    expect(bearer.id).toMatch(/^vcrd_/);

    const variable = await client.beta.vaults.credentials.create(vault.id, {
      auth: {
        type: 'environment_variable',
        secret_name: 'EXAMPLE_API_KEY',
        secret_value: VARIABLE,
        networking: { type: 'limited', allowed_hosts: ['API.example.com', '*.example.org'] },
        injection_location: { header: true, body: true },
      },
      metadata: { purpose: 'tests' },
    });
    expect(variable.auth).toEqual({
      type: 'environment_variable',
      secret_name: 'EXAMPLE_API_KEY',
      networking: { type: 'limited', allowed_hosts: ['api.example.com', '*.example.org'] },
      injection_location: { header: true, body: true },
    });
    expect(variable.display_name).toBeNull();

    const expiresAt = new Date(Date.now() + 3600_000).toISOString();
    const oauthCredential = await client.beta.vaults.credentials.create(vault.id, {
      display_name: 'OAuth MCP',
      auth: {
        type: 'mcp_oauth',
        access_token: ACCESS,
        mcp_server_url: oauth.mcpUrl,
        expires_at: expiresAt,
        refresh: {
          client_id: 'berth-sdk',
          refresh_token: REFRESH,
          token_endpoint: oauth.tokenEndpoint,
          token_endpoint_auth: { type: 'client_secret_post', client_secret: CLIENT_SECRET },
          scope: 'mcp',
        },
      },
    });
    expect(oauthCredential.auth).toEqual({
      type: 'mcp_oauth',
      mcp_server_url: oauth.mcpUrl,
      expires_at: expiresAt,
      refresh: {
        client_id: 'berth-sdk',
        token_endpoint: oauth.tokenEndpoint,
        token_endpoint_auth: { type: 'client_secret_post' },
        resource: null,
        scope: 'mcp',
      },
    });

    const answers: unknown[] = [bearer, variable, oauthCredential];
    for (const credential of [bearer, variable, oauthCredential]) {
      const retrieved = await client.beta.vaults.credentials.retrieve(credential.id, { vault_id: vault.id });
      expect(retrieved).toEqual(credential);
      answers.push(retrieved);
    }
    const listed: Credential[] = [];
    for await (const credential of client.beta.vaults.credentials.list(vault.id, { limit: 2 })) {
      listed.push(credential);
    }
    expect(listed.map((credential) => credential.id).sort()).toEqual(
      [bearer.id, variable.id, oauthCredential.id].sort(),
    );
    answers.push(listed);
    for (const answer of answers) expectNoSecrets(answer);
  });

  it('updates credentials (secrets replaced write-only, type and names immutable), archives and deletes them', async () => {
    const { client } = berth;
    const vault = await client.beta.vaults.create({ display_name: 'updates' });
    const variable = await client.beta.vaults.credentials.create(vault.id, {
      auth: {
        type: 'environment_variable',
        secret_name: 'TOKEN',
        secret_value: VARIABLE,
        networking: { type: 'unrestricted' },
      },
    });
    expect(variable.auth).toMatchObject({ injection_location: { header: true, body: false } });
    const updated = await client.beta.vaults.credentials.update(variable.id, {
      vault_id: vault.id,
      display_name: 'Token',
      metadata: { rotated: 'yes' },
      auth: {
        type: 'environment_variable',
        secret_value: `${VARIABLE}-v2`,
        networking: { type: 'limited', allowed_hosts: ['api.example.com'] },
        injection_location: { body: true },
      },
    });
    expect(updated).toMatchObject({
      display_name: 'Token',
      metadata: { rotated: 'yes' },
      auth: {
        type: 'environment_variable',
        secret_name: 'TOKEN',
        networking: { type: 'limited', allowed_hosts: ['api.example.com'] },
        injection_location: { header: true, body: true },
      },
    });
    expectNoSecrets(updated);
    await expect(
      client.beta.vaults.credentials.update(variable.id, {
        vault_id: vault.id,
        auth: { type: 'static_bearer', token: 'x' },
      }),
    ).rejects.toThrow(/type cannot change/);
    await expect(
      client.beta.vaults.credentials.update(variable.id, {
        vault_id: vault.id,
        auth: { type: 'environment_variable', injection_location: { header: false, body: false } },
      }),
    ).rejects.toThrow(/injection_location must enable/);

    const bearer = await client.beta.vaults.credentials.create(vault.id, {
      auth: { type: 'static_bearer', token: BEARER, mcp_server_url: 'https://mcp.example.com/' },
    });
    // One active credential per MCP server and per variable in a vault.
    await expect(
      client.beta.vaults.credentials.create(vault.id, {
        auth: { type: 'static_bearer', token: BEARER, mcp_server_url: 'https://mcp.example.com/' },
      }),
    ).rejects.toThrow(/already has an active credential for mcp_server_url/);
    const archived = await client.beta.vaults.credentials.archive(bearer.id, { vault_id: vault.id });
    expect(archived.archived_at).not.toBeNull();
    await expect(
      client.beta.vaults.credentials.update(bearer.id, { vault_id: vault.id, display_name: 'x' }),
    ).rejects.toThrow(/archived/);
    // Archived, it no longer holds the server: a replacement is accepted.
    const replacement = await client.beta.vaults.credentials.create(vault.id, {
      auth: { type: 'static_bearer', token: `${BEARER}-new`, mcp_server_url: 'https://mcp.example.com/' },
    });
    const active: string[] = [];
    for await (const credential of client.beta.vaults.credentials.list(vault.id)) active.push(credential.id);
    expect(active.sort()).toEqual([variable.id, replacement.id].sort());
    const everything: string[] = [];
    for await (const credential of client.beta.vaults.credentials.list(vault.id, {
      include_archived: true,
    })) {
      everything.push(credential.id);
    }
    expect(everything).toContain(bearer.id);

    expect(await client.beta.vaults.credentials.delete(replacement.id, { vault_id: vault.id })).toEqual({
      id: replacement.id,
      type: 'vault_credential_deleted',
    });
    await expect(
      client.beta.vaults.credentials.retrieve(replacement.id, { vault_id: vault.id }),
    ).rejects.toBeInstanceOf(Anthropic.NotFoundError);
    // A credential is found only in its own vault.
    const other = await client.beta.vaults.create({ display_name: 'other' });
    await expect(
      client.beta.vaults.credentials.retrieve(variable.id, { vault_id: other.id }),
    ).rejects.toBeInstanceOf(Anthropic.NotFoundError);
    // Deleting the vault deletes its credentials.
    await client.beta.vaults.delete(vault.id);
    await expect(
      client.beta.vaults.credentials.retrieve(variable.id, { vault_id: vault.id }),
    ).rejects.toBeInstanceOf(Anthropic.NotFoundError);
  });

  it('validates an mcp_oauth credential against its MCP server, refreshing through the token endpoint after a 401', async () => {
    const { client } = berth;
    const vault = await client.beta.vaults.create({ display_name: 'oauth' });
    const credential = await client.beta.vaults.credentials.create(vault.id, {
      auth: {
        type: 'mcp_oauth',
        access_token: ACCESS,
        mcp_server_url: oauth.mcpUrl,
        refresh: {
          client_id: 'berth-sdk',
          refresh_token: REFRESH,
          token_endpoint: oauth.tokenEndpoint,
          token_endpoint_auth: { type: 'client_secret_post', client_secret: CLIENT_SECRET },
        },
      },
    });
    const valid = await client.beta.vaults.credentials.mcpOAuthValidate(credential.id, {
      vault_id: vault.id,
    });
    expect(valid).toMatchObject({
      type: 'vault_credential_validation',
      credential_id: credential.id,
      vault_id: vault.id,
      status: 'valid',
      has_refresh_token: true,
      mcp_probe: null,
      refresh: null,
    });
    oauth.validAccessTokens.delete(ACCESS);
    const refreshed = await client.beta.vaults.credentials.mcpOAuthValidate(credential.id, {
      vault_id: vault.id,
    });
    expect(refreshed).toMatchObject({
      status: 'valid',
      refresh: { status: 'succeeded', http_response: null },
    });
    expectNoSecrets(refreshed);
    // The refreshed token was stored: validating again needs no refresh.
    const again = await client.beta.vaults.credentials.mcpOAuthValidate(credential.id, {
      vault_id: vault.id,
    });
    expect(again).toMatchObject({ status: 'valid', refresh: null });

    const bearer = await client.beta.vaults.credentials.create(vault.id, {
      auth: { type: 'static_bearer', token: BEARER, mcp_server_url: 'https://bearer.example.com' },
    });
    await expect(
      client.beta.vaults.credentials.mcpOAuthValidate(bearer.id, { vault_id: vault.id }),
    ).rejects.toThrow(/only mcp_oauth credentials can be validated/);
  });

  it("attaches vaults to a session at creation, shows them on the session, and hands the runtime the session's credentials", async () => {
    const { client } = berth;
    const agent = await client.beta.agents.create({ name: 'vaulted', model: 'scripted/echo' });
    const environment = await client.beta.environments.create({ name: 'vaulted' });
    const first = await client.beta.vaults.create({ display_name: 'first' });
    const second = await client.beta.vaults.create({ display_name: 'second' });
    await client.beta.vaults.credentials.create(first.id, {
      auth: {
        type: 'environment_variable',
        secret_name: 'SESSION_KEY',
        secret_value: VARIABLE,
        networking: { type: 'limited', allowed_hosts: ['api.example.com'] },
      },
    });
    const session = await client.beta.sessions.create({
      agent: agent.id,
      environment_id: environment.id,
      vault_ids: [first.id, second.id],
    });
    expect(session.vault_ids).toEqual([first.id, second.id]);
    expect((await client.beta.sessions.retrieve(session.id)).vault_ids).toEqual([first.id, second.id]);
    const listed = await client.beta.sessions.list();
    expect(listed.data.find((item) => item.id === session.id)?.vault_ids).toEqual([first.id, second.id]);

    const credentials = await berth.vault.credentialsForSession(berth.keyOf(session.id));
    expect(credentials).toHaveLength(1);
    expect(credentials[0]).toMatchObject({ type: 'environment_variable', secretName: 'SESSION_KEY' });
    expect(credentials[0]!.type === 'environment_variable' && credentials[0]!.secretValue.reveal()).toBe(
      VARIABLE,
    );

    await expect(client.beta.sessions.update(session.id, { vault_ids: [first.id] })).rejects.toThrow(
      /vault_ids can only be set when a session is created/,
    );
    const archived = await client.beta.vaults.archive(second.id);
    await expect(
      client.beta.sessions.create({
        agent: agent.id,
        environment_id: environment.id,
        vault_ids: [archived.id],
      }),
    ).rejects.toThrow(/vault_ids: vault .* is archived/);
    await expect(
      client.beta.sessions.create({
        agent: agent.id,
        environment_id: environment.id,
        vault_ids: ['vlt_missing'],
      }),
    ).rejects.toThrow(/vault_ids: vault vlt_missing not found/);
  });
});
