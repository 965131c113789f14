import { randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { inspect } from 'node:util';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import {
  type FakeOAuthServer,
  startFakeOAuthServer,
  type TokenEndpointAuth,
} from '../../test/support/fake-oauth-server.js';
import { isBerthError } from '../errors.js';
import { newId } from '../ids.js';
import type { SessionRecord, Store } from '../store/resource-store.js';
import { openSqliteStore } from '../store/sqlite/sqlite-store.js';
import type { CredentialRecord } from '../store/vault-store.js';
import {
  type CredentialAuthBody,
  type CredentialSecrets,
  type EnvironmentVariableSessionCredential,
  hostAllowed,
  type McpOAuthSessionCredential,
  PLACEHOLDER_PREFIX,
} from './credentials.js';
import { generateVaultKey, VaultKeyring } from './keyring.js';
import { VaultService } from './vault-service.js';

const TENANT = 'tnt_vault';
const START = Date.parse('2026-03-01T12:00:00.000Z');

let directory: string;
let store: Store;
let clock: number;
let keyA: ReturnType<typeof generateVaultKey>;
let vault: VaultService;

beforeEach(async () => {
  directory = await mkdtemp(join(tmpdir(), 'berth-vault-'));
  store = await openSqliteStore({ path: join(directory, 'berth.db') });
  await store.resources.createTenant({
    id: TENANT,
    name: 'vault',
    createdAt: new Date(START).toISOString(),
    limits: null,
  });
  clock = START;
  keyA = generateVaultKey();
  vault = new VaultService({ store, keyring: new VaultKeyring([keyA]), now: () => clock });
});
afterEach(async () => {
  await store.close();
  await rm(directory, { recursive: true, force: true });
});

const iso = (time: number) => new Date(time).toISOString();

async function newVault(archived = false): Promise<string> {
  const id = newId('vlt');
  const now = iso(clock);
  await store.vaults.createVault({
    id,
    tenantId: TENANT,
    ownerId: 'user_admin',
    createdAt: now,
    updatedAt: now,
    archivedAt: archived ? now : null,
    body: { id, type: 'vault', display_name: id, metadata: {} },
  });
  return id;
}

/** Stores a credential the way the API does: body without secrets, secrets sealed. */
async function newCredential(
  vaultId: string,
  auth: CredentialAuthBody,
  secrets: CredentialSecrets,
  options: { archived?: boolean; name?: string } = {},
): Promise<CredentialRecord> {
  const id = newId('vcrd');
  const now = iso(clock);
  const record: CredentialRecord = {
    id,
    tenantId: TENANT,
    ownerId: 'user_admin',
    createdAt: now,
    updatedAt: now,
    archivedAt: options.archived ? now : null,
    body: {
      id,
      type: 'vault_credential',
      vault_id: vaultId,
      display_name: options.name ?? null,
      metadata: {},
      auth,
      created_at: now,
      updated_at: now,
      archived_at: options.archived ? now : null,
    },
    vaultId,
    secret: vault.sealSecrets(TENANT, id, secrets),
  };
  await store.vaults.createCredential(record);
  return record;
}

function environmentVariable(name: string, value: string, hosts?: string[]) {
  return {
    auth: {
      type: 'environment_variable',
      secret_name: name,
      networking: hosts ? { type: 'limited', allowed_hosts: hosts } : { type: 'unrestricted' },
      injection_location: { header: true, body: false },
    } satisfies CredentialAuthBody,
    secrets: {
      type: 'environment_variable',
      secret_value: value,
      placeholder_key: randomBytes(32).toString('base64url'),
    } satisfies CredentialSecrets,
  };
}

function sessionWith(vaultIds: string[]): SessionRecord {
  const id = newId('sesn');
  const now = iso(clock);
  return {
    id,
    tenantId: TENANT,
    ownerId: 'user_admin',
    createdAt: now,
    updatedAt: now,
    archivedAt: null,
    body: { id, type: 'session', vault_ids: vaultIds },
    agentId: 'agent_x',
    agentVersion: 1,
    environmentId: 'env_x',
    status: 'idle',
    stopReason: null,
    lastSeq: 0,
  };
}

describe('credentials for a session', () => {
  it("hands a session its vaults' credentials in vault order: the first vault wins per variable and MCP server, archived ones are left out", async () => {
    const first = await newVault();
    const second = await newVault();
    const archivedVault = await newVault(true);
    const apiKey = environmentVariable('API_KEY', 'first-value', ['api.example.com', '*.example.org']);
    const apiKeyCredential = await newCredential(first, apiKey.auth, apiKey.secrets, { name: 'Example API' });
    const bearer = await newCredential(
      first,
      { type: 'static_bearer', mcp_server_url: 'https://MCP.Example.com/mcp' },
      { type: 'static_bearer', token: 'bearer-value' },
    );
    const shadowed = environmentVariable('API_KEY', 'second-value');
    await newCredential(second, shadowed.auth, shadowed.secrets);
    const other = environmentVariable('OTHER_KEY', 'other-value');
    const otherCredential = await newCredential(second, other.auth, other.secrets);
    const archived = environmentVariable('ARCHIVED_KEY', 'archived-value');
    await newCredential(second, archived.auth, archived.secrets, { archived: true });
    const inArchivedVault = environmentVariable('GONE_KEY', 'gone-value');
    await newCredential(archivedVault, inArchivedVault.auth, inArchivedVault.secrets);

    const session = sessionWith([first, second, archivedVault, 'vlt_deleted']);
    await store.resources.createSession(session);
    const credentials = await vault.credentialsForSession(session);
    expect(credentials.map((credential) => credential.id)).toEqual([
      apiKeyCredential.id,
      bearer.id,
      otherCredential.id,
    ]);
    const [variable, token] = credentials as [EnvironmentVariableSessionCredential, ...unknown[]];
    expect(variable).toMatchObject({
      type: 'environment_variable',
      vaultId: first,
      name: 'Example API',
      secretName: 'API_KEY',
      allowedHosts: ['api.example.com', '*.example.org'],
      injection: { header: true, body: false },
    });
    expect(variable.secretValue.reveal()).toBe('first-value');
    expect(token).toMatchObject({
      type: 'static_bearer',
      name: bearer.id,
      mcpServerUrl: 'https://MCP.Example.com/mcp',
      allowedHosts: ['mcp.example.com'],
    });
    // A session key (not the record) works too: the session is read from the store.
    expect(
      (await vault.credentialsForSession({ tenantId: TENANT, id: session.id })).map((c) => c.id),
    ).toEqual(credentials.map((credential) => credential.id));
    expect((credentials[2] as EnvironmentVariableSessionCredential).allowedHosts).toBe('unrestricted');
  });

  it('never shows a secret when credentials are printed, serialized or logged', async () => {
    const vaultId = await newVault();
    const canary = `canary-${randomBytes(8).toString('hex')}`;
    const variable = environmentVariable('TOKEN', canary);
    await newCredential(vaultId, variable.auth, variable.secrets);
    await newCredential(
      vaultId,
      { type: 'static_bearer', mcp_server_url: 'https://mcp.example.com' },
      { type: 'static_bearer', token: `${canary}-bearer` },
    );
    const credentials = await vault.credentialsForSession(sessionWith([vaultId]));
    const shown = [
      JSON.stringify(credentials),
      inspect(credentials, { depth: 10 }),
      String(credentials),
    ].join();
    expect(shown).not.toContain(canary);
    expect(shown).toContain('[secret]');
  });

  it('gives each environment variable a placeholder that is stable for a session, differs between sessions, survives secret updates and key rotation, and reveals nothing', async () => {
    const vaultId = await newVault();
    const variable = environmentVariable('TOKEN', 'secret-value-one');
    const credential = await newCredential(vaultId, variable.auth, variable.secrets);
    const session = sessionWith([vaultId]);
    const placeholderOf = async (service: VaultService, of = session) =>
      ((await service.credentialsForSession(of))[0] as EnvironmentVariableSessionCredential).placeholder;

    const placeholder = await placeholderOf(vault);
    expect(placeholder).toMatch(new RegExp(`^${PLACEHOLDER_PREFIX}[0-9a-f]{32}$`));
    expect(placeholder).not.toContain('secret-value');
    expect(await placeholderOf(vault)).toBe(placeholder);
    expect(await placeholderOf(vault, sessionWith([vaultId]))).not.toBe(placeholder);

    // The user replaces the secret: same placeholder (the sandbox keeps its variable).
    const stored = (await store.vaults.getCredential(TENANT, vaultId, credential.id))!;
    const updated = { ...variable.secrets, secret_value: 'secret-value-two' };
    await store.vaults.updateCredential({
      ...stored,
      tenantId: TENANT,
      secret: vault.sealSecrets(TENANT, credential.id, updated),
    });
    expect(await placeholderOf(vault)).toBe(placeholder);

    // A new key, everything re-sealed, the old key gone: same placeholder.
    const keyB = generateVaultKey();
    const rotating = new VaultService({ store, keyring: new VaultKeyring([keyB, keyA]) });
    expect((await rotating.rotate()).resealed).toBe(1);
    const afterRotation = new VaultService({ store, keyring: new VaultKeyring([keyB]) });
    expect(await placeholderOf(afterRotation)).toBe(placeholder);
    const [reopened] = await afterRotation.credentialsForSession(session);
    expect((reopened as EnvironmentVariableSessionCredential).secretValue.reveal()).toBe('secret-value-two');
  });

  it('matches allowed hosts exactly, and *.example.com subdomains but not example.com itself', () => {
    const allowed = ['api.example.com', '*.example.org'];
    expect(hostAllowed(allowed, 'api.example.com')).toBe(true);
    expect(hostAllowed(allowed, 'API.Example.com.')).toBe(true);
    expect(hostAllowed(allowed, 'evil.api.example.com')).toBe(false);
    expect(hostAllowed(allowed, 'api.example.com.evil.net')).toBe(false);
    expect(hostAllowed(allowed, 'a.b.example.org')).toBe(true);
    expect(hostAllowed(allowed, 'example.org')).toBe(false);
    expect(hostAllowed(allowed, 'badexample.org')).toBe(false);
    expect(hostAllowed('unrestricted', 'anything.example')).toBe(true);
  });
});

describe.each<TokenEndpointAuth>(['none', 'client_secret_basic', 'client_secret_post'])(
  'mcp_oauth access tokens (token endpoint auth %s)',
  (authType) => {
    let oauth: FakeOAuthServer;
    const clientSecret = authType === 'none' ? undefined : 'client secret/with:odd&chars';

    beforeEach(async () => {
      oauth = await startFakeOAuthServer({
        auth: authType,
        clientId: 'berth client',
        clientSecret,
        refreshToken: 'refresh-original',
        accessToken: 'access-original',
      });
    });
    afterEach(async () => oauth.close());

    async function oauthCredential(expiresInMs: number | null, withRefresh = true) {
      const vaultId = await newVault();
      const record = await newCredential(
        vaultId,
        {
          type: 'mcp_oauth',
          mcp_server_url: oauth.mcpUrl,
          expires_at: expiresInMs === null ? null : iso(clock + expiresInMs),
          refresh: withRefresh
            ? {
                client_id: 'berth client',
                token_endpoint: oauth.tokenEndpoint,
                token_endpoint_auth: { type: authType },
                resource: oauth.mcpUrl,
                scope: 'tools:read',
              }
            : null,
        },
        {
          type: 'mcp_oauth',
          access_token: 'access-original',
          refresh_token: withRefresh ? 'refresh-original' : null,
          client_secret: clientSecret ?? null,
        },
      );
      const [credential] = await vault.credentialsForSession(sessionWith([vaultId]));
      return { record, credential: credential as McpOAuthSessionCredential };
    }

    it('uses the stored token while it has more than 60 s left, without calling the token endpoint', async () => {
      const { credential } = await oauthCredential(61_000);
      expect((await credential.accessToken()).reveal()).toBe('access-original');
      const { credential: noExpiry } = await oauthCredential(null);
      expect((await noExpiry.accessToken()).reveal()).toBe('access-original');
      expect(oauth.requests).toEqual([]);
    });

    it('refreshes within 60 s of expiry with the refresh_token grant, stores the new tokens sealed, and uses the rotated refresh token next time', async () => {
      const { record, credential } = await oauthCredential(59_000);
      expect((await credential.accessToken()).reveal()).toBe('issued-access-1');
      const [request] = oauth.requests;
      expect(request!.form).toMatchObject({
        grant_type: 'refresh_token',
        refresh_token: 'refresh-original',
        scope: 'tools:read',
        resource: oauth.mcpUrl,
      });
      if (authType === 'client_secret_basic') {
        expect(request!.headers.authorization).toMatch(/^Basic /);
        expect(request!.form.client_secret).toBeUndefined();
      } else {
        expect(request!.headers.authorization).toBeUndefined();
        expect(request!.form.client_id).toBe('berth client');
      }

      const stored = (await store.vaults.getCredential(TENANT, record.vaultId, record.id))!;
      expect(stored.secret.sealed).not.toBe(record.secret.sealed);
      expect(stored.secret.sealed).not.toContain('issued-access-1');
      expect((stored.body.auth as { expires_at: string }).expires_at).toBe(iso(clock + 3600_000));
      // Fresh now: no second request.
      expect((await credential.accessToken()).reveal()).toBe('issued-access-1');
      expect(oauth.requests).toHaveLength(1);

      // An hour on, the rotated refresh token is the one presented.
      clock += 3600_000;
      expect((await credential.accessToken()).reveal()).toBe('issued-access-2');
      expect(oauth.requests[1]!.form.refresh_token).toBe('issued-refresh-1');
      // A new service (a restarted server) reads the refreshed tokens from the store.
      const restarted = new VaultService({ store, keyring: new VaultKeyring([keyA]), now: () => clock });
      const reference = { tenantId: TENANT, vaultId: record.vaultId, id: record.id };
      expect((await restarted.accessToken(reference)).reveal()).toBe('issued-access-2');
      expect(oauth.requests).toHaveLength(2);
    });

    it('shares one refresh among concurrent callers, and refreshes on demand after a 401', async () => {
      const { credential } = await oauthCredential(1_000);
      const tokens = await Promise.all(Array.from({ length: 8 }, () => credential.accessToken()));
      expect(new Set(tokens.map((token) => token.reveal()))).toEqual(new Set(['issued-access-1']));
      expect(oauth.requests).toHaveLength(1);
      expect((await credential.accessToken({ forceRefresh: true })).reveal()).toBe('issued-access-2');
      expect(oauth.requests).toHaveLength(2);
    });

    it('reports a refused refresh with its OAuth error code, keeps the stored tokens, and names no secret', async () => {
      const { record, credential } = await oauthCredential(-1_000);
      oauth.refreshToken = 'refresh-someone-else-got';
      const error = await credential.accessToken().catch((caught: unknown) => caught);
      expect(isBerthError(error, 'vault_failed')).toBe(true);
      const message = (error as Error).message;
      expect(message).toContain(`refreshing credential ${record.id}`);
      expect(message).toContain('answered 400 invalid_grant');
      for (const secret of ['refresh-original', 'access-original', clientSecret ?? 'no-secret']) {
        expect(message).not.toContain(secret);
      }
      expect((await store.vaults.getCredential(TENANT, record.vaultId, record.id))?.secret).toEqual(
        record.secret,
      );
    });

    it('validates against the MCP server: valid as is, or refreshed after a 401, or invalid without a refresh token', async () => {
      const { record } = await oauthCredential(3600_000);
      const reference = { tenantId: TENANT, vaultId: record.vaultId, id: record.id };
      expect(await vault.validateMcpOAuth(reference)).toMatchObject({
        type: 'vault_credential_validation',
        credential_id: record.id,
        status: 'valid',
        has_refresh_token: true,
        mcp_probe: null,
        refresh: null,
      });

      oauth.validAccessTokens.clear();
      const refreshed = await vault.validateMcpOAuth(reference);
      expect(refreshed).toMatchObject({ status: 'valid', refresh: { status: 'succeeded' } });

      const { record: withoutRefresh } = await oauthCredential(3600_000, false);
      oauth.validAccessTokens.clear();
      const invalid = await vault.validateMcpOAuth({
        ...reference,
        vaultId: withoutRefresh.vaultId,
        id: withoutRefresh.id,
      });
      expect(invalid).toMatchObject({
        status: 'invalid',
        has_refresh_token: false,
        refresh: { status: 'no_refresh_token' },
        mcp_probe: { method: 'initialize', http_response: { status_code: 401 } },
      });
      // The server echoed the token in its error: the captured body has it scrubbed.
      expect(JSON.stringify(invalid)).not.toContain('access-original');
      expect(invalid.mcp_probe?.http_response?.body).toContain('[redacted]');
    });
  },
);
