import { BerthError, notFound } from '../errors.js';
import type { SessionKey } from '../store/event-store.js';
import type { SessionRecord, Store } from '../store/resource-store.js';
import type { CredentialRecord, SealedSecret } from '../store/vault-store.js';
import { open, seal } from './cipher.js';
import {
  type CredentialBody,
  type CredentialSecrets,
  type McpOAuthSessionCredential,
  normalizeHost,
  placeholderOf,
  SecretValue,
  type SessionCredential,
} from './credentials.js';
import type { VaultKeyring } from './keyring.js';
import { type CapturedHttpResponse, probeMcpServer, RefreshFailure, refreshAccessToken } from './oauth.js';

/** How the vault reaches the world and tells time (tests pass their own clock). */
export interface VaultServiceOptions {
  store: Pick<Store, 'vaults' | 'resources'>;
  keyring: VaultKeyring;
  /** For token endpoints and MCP probes (default: the global `fetch`). */
  fetch?: typeof fetch;
  /** Milliseconds since the epoch (default `Date.now`). */
  now?: () => number;
  /** Refresh an access token this long before it expires (default 60 s). */
  refreshMarginMs?: number;
  /** Timeout of one token endpoint or MCP request (default 10 s). */
  requestTimeoutMs?: number;
}

/** Names one credential: the vault it is in, within a tenant. */
export interface CredentialReference {
  tenantId: string;
  vaultId: string;
  id: string;
}

/** What `rotate` reports as it goes, once per tenant. */
export interface RotationProgress {
  tenantId: string;
  tenantName: string;
  resealed: number;
  failed: number;
}

/** A credential rotation could not re-seal, and why (never its secret). */
export interface RotationFailure {
  tenantId: string;
  credentialId: string;
  keyId: string;
  message: string;
}

/** The outcome of `rotate`. */
export interface RotationReport {
  /** The key everything was re-sealed under. */
  keyId: string;
  tenants: number;
  resealed: number;
  /** Credentials that changed while being re-sealed and were found already under the current key. */
  changedMeanwhile: number;
  failures: RotationFailure[];
  /** Credentials per sealing key after the run, across tenants. */
  byKey: Record<string, number>;
}

/** The official `BetaManagedAgentsCredentialValidation`. */
export interface CredentialValidation {
  type: 'vault_credential_validation';
  credential_id: string;
  vault_id: string;
  status: 'valid' | 'invalid' | 'unknown';
  has_refresh_token: boolean;
  mcp_probe: { method: string; http_response: CapturedHttpResponse | null } | null;
  refresh: {
    status: 'succeeded' | 'failed' | 'connect_error' | 'no_refresh_token';
    http_response: CapturedHttpResponse | null;
  } | null;
  validated_at: string;
}

/**
 * The vault: seals and opens credential secrets, hands a session its credentials (for the
 * egress proxy and MCP clients), keeps OAuth access tokens fresh, and re-seals everything
 * under the current key. The only code that sees plaintext secrets.
 */
export class VaultService {
  readonly keyring: VaultKeyring;
  readonly #store: Pick<Store, 'vaults' | 'resources'>;
  readonly #fetch: typeof fetch;
  readonly #now: () => number;
  readonly #refreshMarginMs: number;
  readonly #timeoutMs: number;
  /** Refreshes in flight per tenant/credential, so concurrent callers share one. */
  readonly #refreshing = new Map<string, Promise<SecretValue>>();

  constructor(options: VaultServiceOptions) {
    this.keyring = options.keyring;
    this.#store = options.store;
    this.#fetch = options.fetch ?? fetch;
    this.#now = options.now ?? Date.now;
    this.#refreshMarginMs = options.refreshMarginMs ?? 60_000;
    this.#timeoutMs = options.requestTimeoutMs ?? 10_000;
  }

  /** Seals a credential's secret fields under the current key, bound to the credential. */
  sealSecrets(tenantId: string, credentialId: string, secrets: CredentialSecrets): SealedSecret {
    return seal(this.keyring, { tenantId, recordId: credentialId }, JSON.stringify(secrets));
  }

  /** Opens a credential's secret fields (`vault_failed` when the key is missing or the envelope altered). */
  openSecrets(record: CredentialRecord): CredentialSecrets {
    const text = open(this.keyring, { tenantId: record.tenantId, recordId: record.id }, record.secret.sealed);
    const secrets = JSON.parse(text) as CredentialSecrets;
    const type = (record.body as CredentialBody).auth?.type;
    if (secrets.type !== type) {
      throw new BerthError(
        'vault_failed',
        `the secret of ${record.id} is for a ${secrets.type}, not a ${type}`,
      );
    }
    return secrets;
  }

  /**
   * The credentials a session may use: those of its `vault_ids` in order, skipping archived
   * or deleted vaults and archived credentials. When two vaults hold a credential for the same
   * MCP server URL or the same environment variable, the first vault in `vault_ids` wins.
   */
  async credentialsForSession(session: SessionKey | SessionRecord): Promise<SessionCredential[]> {
    const { record, credentials } = await this.#sessionCredentialRecords(session);
    return credentials.map((credential) => this.#sessionCredential(record, credential));
  }

  /**
   * Every secret value the credentials of a session hold, as stored now (no token is refreshed
   * to get them): an `environment_variable`'s value, a `static_bearer` token, an `mcp_oauth`
   * credential's access and refresh tokens and client secret. The egress proxy scans every
   * response it reads for all of them.
   */
  async secretsForSession(
    session: SessionKey | SessionRecord,
  ): Promise<{ credentialId: string; type: CredentialSecrets['type']; values: SecretValue[] }[]> {
    const { credentials } = await this.#sessionCredentialRecords(session);
    return credentials.map((credential) => {
      const secrets = this.openSecrets(credential);
      const values =
        secrets.type === 'environment_variable'
          ? [secrets.secret_value]
          : secrets.type === 'static_bearer'
            ? [secrets.token]
            : [secrets.access_token, secrets.refresh_token, secrets.client_secret];
      return {
        credentialId: credential.id,
        type: secrets.type,
        values: values.flatMap((value) => (value ? [new SecretValue(value)] : [])),
      };
    });
  }

  /** The session and the records of its credentials (see `credentialsForSession`). */
  async #sessionCredentialRecords(
    session: SessionKey | SessionRecord,
  ): Promise<{ record: SessionRecord; credentials: CredentialRecord[] }> {
    const record =
      'body' in session && typeof session.body === 'object'
        ? (session as SessionRecord)
        : await this.#store.resources.getSession(session.tenantId, session.id);
    if (record === undefined) throw notFound('session', session.id);
    const vaultIds = Array.isArray(record.body.vault_ids) ? (record.body.vault_ids as string[]) : [];
    const credentials: CredentialRecord[] = [];
    const claimed = new Set<string>();
    for (const vaultId of vaultIds) {
      const vault = await this.#store.vaults.getVault(record.tenantId, vaultId);
      if (vault === undefined || vault.archivedAt !== null) continue;
      let cursor: string | undefined;
      do {
        const page = await this.#store.vaults.listCredentials(record.tenantId, vaultId, {
          cursor,
          limit: 100,
        });
        for (const credential of page.items) {
          const body = credential.body as CredentialBody;
          const claim =
            body.auth.type === 'environment_variable'
              ? `env:${body.auth.secret_name}`
              : `mcp:${body.auth.mcp_server_url}`;
          if (claimed.has(claim)) continue;
          claimed.add(claim);
          credentials.push(credential);
        }
        cursor = page.nextCursor ?? undefined;
      } while (cursor !== undefined);
    }
    return { record, credentials };
  }

  #sessionCredential(session: SessionKey, record: CredentialRecord): SessionCredential {
    const body = record.body as CredentialBody;
    const secrets = this.openSecrets(record);
    const base = { id: record.id, vaultId: record.vaultId, name: body.display_name || record.id };
    if (body.auth.type === 'environment_variable' && secrets.type === 'environment_variable') {
      const networking = body.auth.networking;
      return {
        ...base,
        type: 'environment_variable',
        secretName: body.auth.secret_name,
        secretValue: new SecretValue(secrets.secret_value),
        placeholder: placeholderOf(secrets.placeholder_key, session, record.id),
        allowedHosts: networking.type === 'unrestricted' ? 'unrestricted' : [...networking.allowed_hosts],
        injection: { ...body.auth.injection_location },
      };
    }
    if (body.auth.type === 'static_bearer' && secrets.type === 'static_bearer') {
      return {
        ...base,
        type: 'static_bearer',
        mcpServerUrl: body.auth.mcp_server_url,
        token: new SecretValue(secrets.token),
        allowedHosts: [normalizeHost(new URL(body.auth.mcp_server_url).hostname)],
        injection: { header: true, body: false },
      };
    }
    if (body.auth.type === 'mcp_oauth') {
      const reference = { tenantId: record.tenantId, vaultId: record.vaultId, id: record.id };
      const credential: McpOAuthSessionCredential = {
        ...base,
        type: 'mcp_oauth',
        mcpServerUrl: body.auth.mcp_server_url,
        expiresAt: body.auth.expires_at,
        allowedHosts: [normalizeHost(new URL(body.auth.mcp_server_url).hostname)],
        injection: { header: true, body: false },
        accessToken: (options) => this.accessToken(reference, options),
      };
      return credential;
    }
    throw new BerthError('vault_failed', `credential ${record.id} has an unknown type`);
  }

  /**
   * A valid access token of an `mcp_oauth` credential: the stored one unless it expires within
   * the margin (or `forceRefresh`), else a new one from its token endpoint, stored sealed
   * before it is returned. Concurrent callers share one refresh.
   */
  async accessToken(
    reference: CredentialReference,
    options: { forceRefresh?: boolean } = {},
  ): Promise<SecretValue> {
    const record = await this.#loadOAuth(reference);
    const secrets = this.openSecrets(record) as Extract<CredentialSecrets, { type: 'mcp_oauth' }>;
    if (!options.forceRefresh && !this.#due(record)) return new SecretValue(secrets.access_token);
    const key = `${reference.tenantId}/${reference.id}`;
    let refreshing = this.#refreshing.get(key);
    if (refreshing === undefined) {
      refreshing = this.#refresh(reference, record, options.forceRefresh === true).finally(() =>
        this.#refreshing.delete(key),
      );
      this.#refreshing.set(key, refreshing);
    }
    return refreshing;
  }

  async #loadOAuth(reference: CredentialReference): Promise<CredentialRecord> {
    const record = await this.#store.vaults.getCredential(
      reference.tenantId,
      reference.vaultId,
      reference.id,
    );
    if (record === undefined) throw notFound('credential', reference.id);
    if ((record.body as CredentialBody).auth.type !== 'mcp_oauth') {
      throw new BerthError('invalid_request', `credential ${reference.id} is not an mcp_oauth credential`);
    }
    return record;
  }

  /** Whether the stored access token expires within the margin. */
  #due(record: CredentialRecord): boolean {
    const auth = (record.body as CredentialBody).auth;
    if (auth.type !== 'mcp_oauth' || auth.expires_at === null) return false;
    return Date.parse(auth.expires_at) - this.#now() <= this.#refreshMarginMs;
  }

  async #refresh(
    reference: CredentialReference,
    seen: CredentialRecord,
    force: boolean,
  ): Promise<SecretValue> {
    const record = await this.#loadOAuth(reference);
    const secrets = this.openSecrets(record) as Extract<CredentialSecrets, { type: 'mcp_oauth' }>;
    // Another caller (or node) refreshed since this one looked: use its token.
    if (!force && !this.#due(record)) return new SecretValue(secrets.access_token);
    if (force && record.secret.sealed !== seen.secret.sealed) return new SecretValue(secrets.access_token);
    const auth = (record.body as CredentialBody).auth as Extract<
      CredentialBody['auth'],
      { type: 'mcp_oauth' }
    >;
    if (auth.refresh === null || secrets.refresh_token === null) {
      const expired = auth.expires_at !== null && Date.parse(auth.expires_at) <= this.#now();
      if (!force && !expired) return new SecretValue(secrets.access_token);
      throw new BerthError(
        'vault_failed',
        `the access token of credential ${record.id} ${expired ? `expired at ${auth.expires_at}` : 'was refused'} and the credential has no refresh token; update it with a new access_token`,
      );
    }
    const tokens = await refreshAccessToken(
      this.#fetch,
      auth.refresh,
      { refreshToken: secrets.refresh_token, clientSecret: secrets.client_secret },
      { credentialId: record.id, timeoutMs: this.#timeoutMs },
    );
    const refreshed: CredentialSecrets = {
      ...secrets,
      access_token: tokens.accessToken,
      refresh_token: tokens.refreshToken ?? secrets.refresh_token,
    };
    const expiresAt =
      tokens.expiresIn === undefined ? null : new Date(this.#now() + tokens.expiresIn * 1000).toISOString();
    // Store the new tokens; a body-only change (metadata) meanwhile is kept, a secret change wins.
    let current = record;
    for (let attempt = 0; attempt < 5; attempt++) {
      if (current.secret.sealed !== record.secret.sealed) break;
      const body = current.body as CredentialBody;
      const written = await this.#store.vaults.updateCredential({
        tenantId: current.tenantId,
        vaultId: current.vaultId,
        id: current.id,
        body: { ...body, auth: { ...body.auth, expires_at: expiresAt } },
        updatedAt: current.updatedAt,
        archivedAt: current.archivedAt,
        secret: this.sealSecrets(current.tenantId, current.id, refreshed),
        expected: { sealed: current.secret.sealed, updatedAt: current.updatedAt },
      });
      if (written) break;
      const reread = await this.#store.vaults.getCredential(current.tenantId, current.vaultId, current.id);
      if (reread === undefined) break;
      current = reread;
    }
    return new SecretValue(tokens.accessToken);
  }

  /**
   * `mcp_oauth_validate`: probes the credential's MCP server with its access token; on 401/403
   * tries one refresh (stored when it succeeds) and probes again.
   */
  async validateMcpOAuth(reference: CredentialReference): Promise<CredentialValidation> {
    const record = await this.#loadOAuth(reference);
    const secrets = this.openSecrets(record) as Extract<CredentialSecrets, { type: 'mcp_oauth' }>;
    const auth = (record.body as CredentialBody).auth as Extract<
      CredentialBody['auth'],
      { type: 'mcp_oauth' }
    >;
    const hasRefreshToken = auth.refresh !== null && secrets.refresh_token !== null;
    const result = (
      status: CredentialValidation['status'],
      mcpProbe: CredentialValidation['mcp_probe'],
      refresh: CredentialValidation['refresh'],
    ): CredentialValidation => ({
      type: 'vault_credential_validation',
      credential_id: record.id,
      vault_id: record.vaultId,
      status,
      has_refresh_token: hasRefreshToken,
      mcp_probe: mcpProbe,
      refresh,
      validated_at: new Date(this.#now()).toISOString(),
    });
    const probe = await probeMcpServer(
      this.#fetch,
      auth.mcp_server_url,
      secrets.access_token,
      this.#timeoutMs,
    );
    if (probe.outcome === 'accepted') return result('valid', null, null);
    const failedProbe = { method: 'initialize', http_response: probe.response };
    if (probe.outcome === 'failed') return result('unknown', failedProbe, null);
    if (!hasRefreshToken) {
      return result('invalid', failedProbe, { status: 'no_refresh_token', http_response: null });
    }
    let token: SecretValue;
    try {
      token = await this.accessToken(reference, { forceRefresh: true });
    } catch (error) {
      if (!(error instanceof RefreshFailure)) throw error;
      return result(error.outcome === 'connect_error' ? 'unknown' : 'invalid', failedProbe, {
        status: error.outcome,
        http_response: error.response,
      });
    }
    const refreshed = { status: 'succeeded' as const, http_response: null };
    const again = await probeMcpServer(this.#fetch, auth.mcp_server_url, token.reveal(), this.#timeoutMs);
    if (again.outcome === 'accepted') return result('valid', null, refreshed);
    const failedAgain = { method: 'initialize', http_response: again.response };
    return result(again.outcome === 'rejected' ? 'invalid' : 'unknown', failedAgain, refreshed);
  }

  /**
   * Re-seals every credential of every tenant that an older key sealed under the current key.
   * Safe while servers run: each write is a compare-and-set on the old envelope, so a secret
   * changed meanwhile is left as its writer stored it (and checked again). Credentials whose
   * key is missing are reported, not touched.
   */
  async rotate(
    options: { onProgress?: (progress: RotationProgress) => void; batchSize?: number } = {},
  ): Promise<RotationReport> {
    const keyId = this.keyring.currentKeyId;
    const report: RotationReport = {
      keyId,
      tenants: 0,
      resealed: 0,
      changedMeanwhile: 0,
      failures: [],
      byKey: {},
    };
    for (const tenant of await this.#store.resources.listTenants()) {
      report.tenants++;
      let resealed = 0;
      let failed = 0;
      let cursor: string | undefined;
      do {
        const page = await this.#store.vaults.listCredentialsSealedWithout(tenant.id, keyId, {
          cursor,
          limit: options.batchSize ?? 100,
        });
        for (const record of page.items) {
          const outcome = await this.#reseal(record);
          if (outcome === 'resealed') resealed++;
          else if (outcome === 'changed') report.changedMeanwhile++;
          else {
            failed++;
            report.failures.push({
              tenantId: tenant.id,
              credentialId: record.id,
              keyId: record.secret.keyId,
              message: outcome.message,
            });
          }
        }
        cursor = page.nextCursor ?? undefined;
      } while (cursor !== undefined);
      report.resealed += resealed;
      options.onProgress?.({ tenantId: tenant.id, tenantName: tenant.name, resealed, failed });
      for (const [id, count] of Object.entries(await this.#store.vaults.countCredentialsByKey(tenant.id))) {
        report.byKey[id] = (report.byKey[id] ?? 0) + count;
      }
    }
    return report;
  }

  async #reseal(record: CredentialRecord): Promise<'resealed' | 'changed' | BerthError> {
    let current: CredentialRecord | undefined = record;
    for (let attempt = 0; attempt < 5 && current !== undefined; attempt++) {
      if (current.secret.keyId === this.keyring.currentKeyId) return 'changed';
      let plaintext: string;
      try {
        plaintext = open(
          this.keyring,
          { tenantId: current.tenantId, recordId: current.id },
          current.secret.sealed,
        );
      } catch (error) {
        if (error instanceof BerthError) return error;
        throw error;
      }
      const next = seal(this.keyring, { tenantId: current.tenantId, recordId: current.id }, plaintext);
      if (
        await this.#store.vaults.resealCredential(current.tenantId, current.id, current.secret.sealed, next)
      ) {
        return 'resealed';
      }
      current = await this.#store.vaults.getCredential(current.tenantId, current.vaultId, current.id);
    }
    return current === undefined ? 'changed' : new BerthError('conflict', `${record.id} kept changing`);
  }

  /** Credentials per sealing key, across tenants (`berth vault status`). */
  async keyUsage(): Promise<Record<string, number>> {
    const byKey: Record<string, number> = {};
    for (const tenant of await this.#store.resources.listTenants()) {
      for (const [id, count] of Object.entries(await this.#store.vaults.countCredentialsByKey(tenant.id))) {
        byKey[id] = (byKey[id] ?? 0) + count;
      }
    }
    return byKey;
  }
}
