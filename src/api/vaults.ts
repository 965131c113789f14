import { randomBytes } from 'node:crypto';
import { Hono } from 'hono';
import { conflict, invalidRequest, notFound } from '../errors.js';
import { newId } from '../ids.js';
import type { ResourceRecord } from '../store/resource-store.js';
import type { CredentialRecord } from '../store/vault-store.js';
import type {
  CredentialAuthBody,
  CredentialBody,
  CredentialSecrets,
  McpOAuthRefreshBody,
} from '../vault/credentials.js';
import {
  type ApiDependencies,
  type ApiEnvironment,
  mergeMetadata,
  newRecord,
  nowIso,
  readBody,
  readFlag,
  readOrder,
  readPageQuery,
} from './context.js';
import {
  type CredentialAuthCreate,
  type CredentialAuthUpdate,
  credentialCreate,
  credentialUpdate,
  vaultCreate,
  vaultUpdate,
} from './schemas.js';

/**
 * `/v1/vaults` and `/v1/vaults/{vault_id}/credentials`: the official `client.beta.vaults`
 * API. Vaults are tenant-wide (like agents and environments). A credential's secret fields are
 * sealed by the vault service the moment they arrive and never appear in a response: bodies
 * are stored without them.
 */

/** Names Berth sets in every sandbox, or that change how programs load: not for secrets. */
const RESERVED_SECRET_NAMES = new Set([
  'PATH',
  'HOME',
  'PWD',
  'SHELL',
  'USER',
  'HOSTNAME',
  'HTTP_PROXY',
  'HTTPS_PROXY',
  'NO_PROXY',
  'ALL_PROXY',
  'http_proxy',
  'https_proxy',
  'no_proxy',
  'all_proxy',
]);

function checkSecretName(name: string): void {
  if (RESERVED_SECRET_NAMES.has(name) || /^(BERTH_|LD_)/.test(name)) {
    throw invalidRequest(
      `secret_name ${name} is reserved (Berth sets it in the sandbox, or it changes how programs load); choose another name`,
    );
  }
}

/** An expiry must lie ahead (the official API's rule). */
function checkFuture(expiresAt: string | null | undefined): string | null {
  if (expiresAt === undefined || expiresAt === null) return null;
  if (Date.parse(expiresAt) <= Date.now()) throw invalidRequest('auth.expires_at must be in the future');
  return new Date(expiresAt).toISOString();
}

/** Header injection puts the value in a header line: no line breaks then. */
function checkHeaderSafe(value: string, injection: { header: boolean }): void {
  if (injection.header && /[\r\n]/.test(value)) {
    throw invalidRequest(
      'auth.secret_value must not contain line breaks while injection_location.header is true',
    );
  }
}

function checkInjection(injection: { header: boolean; body: boolean }): void {
  if (!injection.header && !injection.body) {
    throw invalidRequest('auth.injection_location must enable header, body or both');
  }
}

/** The stored auth and sealed-to-be secrets of a new credential. */
function newCredentialAuth(input: CredentialAuthCreate): {
  auth: CredentialAuthBody;
  secrets: CredentialSecrets;
} {
  switch (input.type) {
    case 'static_bearer':
      return {
        auth: { type: 'static_bearer', mcp_server_url: input.mcp_server_url },
        secrets: { type: 'static_bearer', token: input.token },
      };
    case 'environment_variable': {
      checkSecretName(input.secret_name);
      const injection = {
        header: input.injection_location?.header ?? true,
        body: input.injection_location?.body ?? false,
      };
      checkInjection(injection);
      checkHeaderSafe(input.secret_value, injection);
      return {
        auth: {
          type: 'environment_variable',
          secret_name: input.secret_name,
          networking: input.networking,
          injection_location: injection,
        },
        secrets: {
          type: 'environment_variable',
          secret_value: input.secret_value,
          placeholder_key: randomBytes(32).toString('base64url'),
        },
      };
    }
    case 'mcp_oauth': {
      const refresh: McpOAuthRefreshBody | null = input.refresh
        ? {
            client_id: input.refresh.client_id,
            token_endpoint: input.refresh.token_endpoint,
            token_endpoint_auth: { type: input.refresh.token_endpoint_auth.type },
            resource: input.refresh.resource ?? null,
            scope: input.refresh.scope ?? null,
          }
        : null;
      const clientSecret =
        input.refresh && 'client_secret' in input.refresh.token_endpoint_auth
          ? input.refresh.token_endpoint_auth.client_secret
          : null;
      return {
        auth: {
          type: 'mcp_oauth',
          mcp_server_url: input.mcp_server_url,
          expires_at: checkFuture(input.expires_at),
          refresh,
        },
        secrets: {
          type: 'mcp_oauth',
          access_token: input.access_token,
          refresh_token: input.refresh?.refresh_token ?? null,
          client_secret: clientSecret,
        },
      };
    }
  }
}

/**
 * The auth and secrets after an update. `openSecrets` is called only when the change needs the
 * stored secrets (a partial secret change, or a check against the stored value).
 */
function updatedCredentialAuth(
  current: CredentialAuthBody,
  input: CredentialAuthUpdate,
  openSecrets: () => CredentialSecrets,
): { auth: CredentialAuthBody; secrets: CredentialSecrets | undefined } {
  if (input.type !== current.type) {
    throw invalidRequest(`auth.type must stay ${current.type}: a credential's type cannot change`);
  }
  if (input.type === 'static_bearer' && current.type === 'static_bearer') {
    return {
      auth: current,
      secrets: input.token == null ? undefined : { type: 'static_bearer', token: input.token },
    };
  }
  if (input.type === 'environment_variable' && current.type === 'environment_variable') {
    const injection = {
      header: input.injection_location?.header ?? current.injection_location.header,
      body: input.injection_location?.body ?? current.injection_location.body,
    };
    checkInjection(injection);
    let secrets: CredentialSecrets | undefined;
    if (input.secret_value != null) {
      checkHeaderSafe(input.secret_value, injection);
      const stored = openSecrets() as Extract<CredentialSecrets, { type: 'environment_variable' }>;
      // The placeholder key stays: sandboxes keep the placeholder they were given.
      secrets = { ...stored, secret_value: input.secret_value };
    } else if (injection.header && !current.injection_location.header) {
      const stored = openSecrets() as Extract<CredentialSecrets, { type: 'environment_variable' }>;
      checkHeaderSafe(stored.secret_value, injection);
    }
    return {
      auth: {
        ...current,
        networking: input.networking ?? current.networking,
        injection_location: injection,
      },
      secrets,
    };
  }
  if (input.type === 'mcp_oauth' && current.type === 'mcp_oauth') {
    const auth: Extract<CredentialAuthBody, { type: 'mcp_oauth' }> = { ...current };
    if (input.expires_at !== undefined) auth.expires_at = checkFuture(input.expires_at);
    let changesSecrets = input.access_token != null;
    if (input.refresh === null) {
      auth.refresh = null;
      changesSecrets = true;
    } else if (input.refresh !== undefined) {
      if (current.refresh === null) {
        throw invalidRequest(
          'this credential has no refresh configuration (client_id and token_endpoint are set only at creation); create a new credential to add refresh',
        );
      }
      const refresh = { ...current.refresh };
      if (input.refresh.scope != null)
        refresh.scope = input.refresh.scope === '' ? null : input.refresh.scope;
      if (input.refresh.token_endpoint_auth !== undefined && refresh.token_endpoint_auth.type === 'none') {
        throw invalidRequest(
          'token_endpoint_auth can change only the client_secret of a credential that uses client_secret_basic or client_secret_post',
        );
      }
      auth.refresh = refresh;
      changesSecrets ||=
        input.refresh.refresh_token != null || input.refresh.token_endpoint_auth?.client_secret != null;
    }
    if (!changesSecrets) return { auth, secrets: undefined };
    const stored = openSecrets() as Extract<CredentialSecrets, { type: 'mcp_oauth' }>;
    const secrets: CredentialSecrets = {
      type: 'mcp_oauth',
      access_token: input.access_token ?? stored.access_token,
      refresh_token: auth.refresh === null ? null : (input.refresh?.refresh_token ?? stored.refresh_token),
      client_secret:
        auth.refresh === null
          ? null
          : (input.refresh?.token_endpoint_auth?.client_secret ?? stored.client_secret),
    };
    return { auth, secrets };
  }
  throw invalidRequest(`auth.type must stay ${current.type}`);
}

/** What makes two active credentials of a vault the same: one per MCP server, one per variable. */
function claimOf(auth: CredentialAuthBody): string {
  return auth.type === 'environment_variable' ? `env:${auth.secret_name}` : `mcp:${auth.mcp_server_url}`;
}

function describeClaim(auth: CredentialAuthBody): string {
  return auth.type === 'environment_variable'
    ? `secret_name ${auth.secret_name}`
    : `mcp_server_url ${auth.mcp_server_url}`;
}

/** `/v1/vaults`: vaults and their credentials. */
export function vaultRoutes(dependencies: ApiDependencies) {
  const { vaults } = dependencies.store;
  const { vault: vaultService } = dependencies;
  const app = new Hono<ApiEnvironment>();

  const loadVault = async (tenantId: string, id: string) => {
    const record = await vaults.getVault(tenantId, id);
    if (!record) throw notFound('vault', id);
    return record;
  };
  const loadCredential = async (tenantId: string, vaultId: string, id: string) => {
    await loadVault(tenantId, vaultId);
    const record = await vaults.getCredential(tenantId, vaultId, id);
    if (!record) throw notFound('credential', id);
    return record;
  };
  /** Refuses a second active credential for the same MCP server or variable in a vault. */
  const checkUnique = async (tenantId: string, vaultId: string, auth: CredentialAuthBody) => {
    const claim = claimOf(auth);
    let cursor: string | undefined;
    do {
      const page = await vaults.listCredentials(tenantId, vaultId, { cursor, limit: 1000 });
      for (const other of page.items) {
        if (claimOf((other.body as CredentialBody).auth) === claim) {
          throw conflict(
            `vault ${vaultId} already has an active credential for ${describeClaim(auth)} (${other.id}); update or archive it`,
          );
        }
      }
      cursor = page.nextCursor ?? undefined;
    } while (cursor !== undefined);
  };
  const archive = (record: ResourceRecord) => {
    const now = nowIso();
    return { now, body: { ...record.body, archived_at: now, updated_at: now } };
  };

  app.post('/', async (context) => {
    const principal = context.get('principal');
    const input = await readBody(context, vaultCreate);
    const now = nowIso();
    const id = newId('vlt');
    const body = {
      id,
      type: 'vault',
      display_name: input.display_name,
      metadata: input.metadata ?? {},
      created_at: now,
      updated_at: now,
      archived_at: null,
    };
    await vaults.createVault(newRecord(principal, id, now, body));
    return context.json(body);
  });

  app.get('/', async (context) => {
    const { limit, cursor } = readPageQuery(context);
    const page = await vaults.listVaults({
      tenantId: context.get('principal').tenantId,
      limit,
      cursor,
      includeArchived: readFlag(context, 'include_archived'),
      order: readOrder(context, 'desc'),
    });
    return context.json({ data: page.items.map((record) => record.body), next_page: page.nextCursor });
  });

  app.get('/:id', async (context) => {
    const record = await loadVault(context.get('principal').tenantId, context.req.param('id'));
    return context.json(record.body);
  });

  app.post('/:id', async (context) => {
    const record = await loadVault(context.get('principal').tenantId, context.req.param('id'));
    const input = await readBody(context, vaultUpdate);
    if (record.archivedAt) throw invalidRequest(`vault ${record.id} is archived and cannot be updated`);
    const now = nowIso();
    const body: Record<string, unknown> = { ...record.body, updated_at: now };
    if (input.display_name != null) body.display_name = input.display_name;
    if (input.metadata !== undefined) {
      body.metadata = mergeMetadata(body.metadata as Record<string, string>, input.metadata);
    }
    await vaults.updateVault({ ...record, body, updatedAt: now });
    return context.json(body);
  });

  // Archiving a vault takes its credentials away from every session at once.
  app.post('/:id/archive', async (context) => {
    const record = await loadVault(context.get('principal').tenantId, context.req.param('id'));
    if (record.archivedAt) return context.json(record.body);
    const { now, body } = archive(record);
    await vaults.updateVault({ ...record, body, updatedAt: now, archivedAt: now });
    return context.json(body);
  });

  app.delete('/:id', async (context) => {
    const tenantId = context.get('principal').tenantId;
    const id = context.req.param('id');
    await loadVault(tenantId, id);
    await vaults.deleteVault(tenantId, id);
    return context.json({ id, type: 'vault_deleted' });
  });

  app.post('/:id/credentials', async (context) => {
    const principal = context.get('principal');
    const vault = await loadVault(principal.tenantId, context.req.param('id'));
    const input = await readBody(context, credentialCreate);
    if (vault.archivedAt) throw invalidRequest(`vault ${vault.id} is archived; credentials cannot be added`);
    const { auth, secrets } = newCredentialAuth(input.auth);
    await checkUnique(principal.tenantId, vault.id, auth);
    const now = nowIso();
    const id = newId('vcrd');
    const body: CredentialBody = {
      id,
      type: 'vault_credential',
      vault_id: vault.id,
      display_name: input.display_name ?? null,
      metadata: input.metadata ?? {},
      auth,
      created_at: now,
      updated_at: now,
      archived_at: null,
    };
    const record: CredentialRecord = {
      ...newRecord(principal, id, now, body),
      vaultId: vault.id,
      secret: vaultService.sealSecrets(principal.tenantId, id, secrets),
    };
    await vaults.createCredential(record);
    return context.json(body);
  });

  app.get('/:id/credentials', async (context) => {
    const tenantId = context.get('principal').tenantId;
    const vault = await loadVault(tenantId, context.req.param('id'));
    const { limit, cursor } = readPageQuery(context);
    const page = await vaults.listCredentials(tenantId, vault.id, {
      limit,
      cursor,
      includeArchived: readFlag(context, 'include_archived'),
      order: readOrder(context, 'desc'),
    });
    return context.json({ data: page.items.map((record) => record.body), next_page: page.nextCursor });
  });

  app.get('/:vault_id/credentials/:id', async (context) => {
    const { vault_id: vaultId, id } = context.req.param();
    const record = await loadCredential(context.get('principal').tenantId, vaultId, id);
    return context.json(record.body);
  });

  app.post('/:vault_id/credentials/:id', async (context) => {
    const tenantId = context.get('principal').tenantId;
    const { vault_id: vaultId, id } = context.req.param();
    let record = await loadCredential(tenantId, vaultId, id);
    const input = await readBody(context, credentialUpdate);
    // Compare-and-set against the row as read: a token refresh landing meanwhile is never
    // overwritten with older secrets; the update is worked out again on the new row.
    for (let attempt = 0; attempt < 5; attempt++) {
      if (record.archivedAt) throw invalidRequest(`credential ${id} is archived and cannot be updated`);
      const current = record.body as CredentialBody;
      const now = nowIso();
      const body: CredentialBody = { ...current, updated_at: now };
      let secrets: CredentialSecrets | undefined;
      if (input.auth !== undefined) {
        const stored = record;
        const updated = updatedCredentialAuth(current.auth, input.auth, () =>
          vaultService.openSecrets(stored),
        );
        body.auth = updated.auth;
        secrets = updated.secrets;
      }
      if (input.display_name !== undefined) body.display_name = input.display_name;
      if (input.metadata !== undefined) body.metadata = mergeMetadata(current.metadata, input.metadata);
      const written = await vaults.updateCredential({
        tenantId,
        vaultId,
        id,
        body,
        updatedAt: now,
        archivedAt: null,
        secret: secrets === undefined ? undefined : vaultService.sealSecrets(tenantId, id, secrets),
        expected: { sealed: record.secret.sealed, updatedAt: record.updatedAt },
      });
      if (written) return context.json(body);
      record = await loadCredential(tenantId, vaultId, id);
    }
    throw conflict(`credential ${id} kept changing while it was being updated; try again`);
  });

  app.post('/:vault_id/credentials/:id/archive', async (context) => {
    const tenantId = context.get('principal').tenantId;
    const { vault_id: vaultId, id } = context.req.param();
    for (let attempt = 0; attempt < 5; attempt++) {
      const record = await loadCredential(tenantId, vaultId, id);
      if (record.archivedAt) return context.json(record.body);
      const { now, body } = archive(record);
      const written = await vaults.updateCredential({
        tenantId,
        vaultId,
        id,
        body,
        updatedAt: now,
        archivedAt: now,
        expected: { sealed: record.secret.sealed, updatedAt: record.updatedAt },
      });
      if (written) return context.json(body);
    }
    throw conflict(`credential ${id} kept changing while it was being archived; try again`);
  });

  app.delete('/:vault_id/credentials/:id', async (context) => {
    const tenantId = context.get('principal').tenantId;
    const { vault_id: vaultId, id } = context.req.param();
    await loadCredential(tenantId, vaultId, id);
    await vaults.deleteCredential(tenantId, vaultId, id);
    return context.json({ id, type: 'vault_credential_deleted' });
  });

  app.post('/:vault_id/credentials/:id/mcp_oauth_validate', async (context) => {
    const tenantId = context.get('principal').tenantId;
    const { vault_id: vaultId, id } = context.req.param();
    const record = await loadCredential(tenantId, vaultId, id);
    const type = (record.body as CredentialBody).auth.type;
    if (type !== 'mcp_oauth') {
      throw invalidRequest(
        `credential ${id} is a ${type} credential; only mcp_oauth credentials can be validated`,
      );
    }
    return context.json(await vaultService.validateMcpOAuth({ tenantId, vaultId, id }));
  });

  return app;
}
