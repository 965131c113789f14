import { createHmac } from 'node:crypto';
import { inspect } from 'node:util';
import type { SessionKey } from '../store/event-store.js';

/**
 * Credential shapes: the body the API shows (and the store keeps as JSON, with no secret in
 * it), the secret fields sealed beside it, and what the runtime gets for a session.
 */

/** Where an `environment_variable` secret may be substituted. */
export type CredentialNetworking = { type: 'unrestricted' } | { type: 'limited'; allowed_hosts: string[] };

/** Refresh settings of an `mcp_oauth` credential (the client secret and refresh token are sealed). */
export interface McpOAuthRefreshBody {
  client_id: string;
  token_endpoint: string;
  token_endpoint_auth: { type: 'none' | 'client_secret_basic' | 'client_secret_post' };
  resource: string | null;
  scope: string | null;
}

/** `auth` of a credential as the API shows it: never a secret value. */
export type CredentialAuthBody =
  | { type: 'static_bearer'; mcp_server_url: string }
  | {
      type: 'environment_variable';
      secret_name: string;
      networking: CredentialNetworking;
      injection_location: { header: boolean; body: boolean };
    }
  | {
      type: 'mcp_oauth';
      mcp_server_url: string;
      expires_at: string | null;
      refresh: McpOAuthRefreshBody | null;
    };

export type CredentialType = CredentialAuthBody['type'];

/** A credential's stored body: the official `BetaManagedAgentsCredential`. */
export interface CredentialBody {
  id: string;
  type: 'vault_credential';
  vault_id: string;
  display_name: string | null;
  metadata: Record<string, string>;
  auth: CredentialAuthBody;
  created_at: string;
  updated_at: string;
  archived_at: string | null;
  [field: string]: unknown;
}

/** The secret fields of a credential: sealed as one JSON document, never stored in the clear. */
export type CredentialSecrets =
  | { type: 'static_bearer'; token: string }
  | {
      type: 'environment_variable';
      secret_value: string;
      /** Random key of this credential's placeholders (kept across secret updates). */
      placeholder_key: string;
    }
  | {
      type: 'mcp_oauth';
      access_token: string;
      refresh_token: string | null;
      client_secret: string | null;
    };

/**
 * A secret in memory. It prints, stringifies and serializes as `[secret]`, so passing one to a
 * logger, an event or a span attribute leaks nothing; `reveal()` is the one way to the value.
 */
export class SecretValue {
  readonly #value: string;

  constructor(value: string) {
    this.#value = value;
  }

  /** The secret itself: only at the moment it is sent where it belongs. */
  reveal(): string {
    return this.#value;
  }

  toString(): string {
    return '[secret]';
  }

  toJSON(): string {
    return '[secret]';
  }

  [inspect.custom](): string {
    return 'SecretValue([secret])';
  }
}

/** Hosts a credential may be injected on: any host the environment allows, or these. */
export type AllowedHosts = 'unrestricted' | readonly string[];

/** What every credential of a session carries. */
interface SessionCredentialBase {
  /** `vcrd_…` */
  id: string;
  vaultId: string;
  /** The display name, or the id when it has none (for audit lines: never the value). */
  name: string;
  /**
   * Hosts the secret may go to: the `limited` list of an `environment_variable` credential
   * (exact names, or `*.example.com` for any subdomain; check with `hostAllowed`), or the MCP
   * server's host for the MCP kinds.
   */
  allowedHosts: AllowedHosts;
  /** Where the secret may be substituted in a request. */
  injection: { header: boolean; body: boolean };
}

/** A static bearer token for one MCP server. */
export interface StaticBearerSessionCredential extends SessionCredentialBase {
  type: 'static_bearer';
  mcpServerUrl: string;
  token: SecretValue;
}

/** A secret the sandbox sees only as `placeholder`; the egress proxy swaps in `secretValue`. */
export interface EnvironmentVariableSessionCredential extends SessionCredentialBase {
  type: 'environment_variable';
  /** The environment variable's name inside the sandbox. */
  secretName: string;
  secretValue: SecretValue;
  /**
   * What the sandbox's variable holds instead: `berth_placeholder_<32 hex>`, an HMAC of the
   * session and credential ids under a random key sealed with the credential. The same for a
   * session across sandbox restarts, key rotations and secret updates; reveals nothing.
   */
  placeholder: string;
}

/** An OAuth access token for one MCP server, refreshed when due. */
export interface McpOAuthSessionCredential extends SessionCredentialBase {
  type: 'mcp_oauth';
  mcpServerUrl: string;
  /** When the stored access token expires (RFC 3339), if known. */
  expiresAt: string | null;
  /**
   * A valid access token: the stored one, or a new one from the token endpoint when it expires
   * within 60 s (or `forceRefresh`, e.g. after the server answered 401), persisted sealed.
   */
  accessToken(options?: { forceRefresh?: boolean }): Promise<SecretValue>;
}

export type SessionCredential =
  | StaticBearerSessionCredential
  | EnvironmentVariableSessionCredential
  | McpOAuthSessionCredential;

/** Prefix of every placeholder, so the egress proxy can spot one. */
export const PLACEHOLDER_PREFIX = 'berth_placeholder_';

/** The placeholder of an `environment_variable` credential in one session. */
export function placeholderOf(placeholderKey: string, session: SessionKey, credentialId: string): string {
  const digest = createHmac('sha256', Buffer.from(placeholderKey, 'base64url'))
    .update(`${session.tenantId}\u0000${session.id}\u0000${credentialId}`)
    .digest('hex');
  return `${PLACEHOLDER_PREFIX}${digest.slice(0, 32)}`;
}

/** A host name as compared: lower case, without a trailing dot. */
export function normalizeHost(host: string): string {
  return host.trim().toLowerCase().replace(/\.$/, '');
}

/**
 * Whether a request to `host` may carry a credential with these allowed hosts: `unrestricted`
 * allows any (the environment's policy is the only boundary), an entry matches the host
 * exactly, and `*.example.com` matches any subdomain of example.com but not example.com itself.
 */
export function hostAllowed(allowed: AllowedHosts, host: string): boolean {
  if (allowed === 'unrestricted') return true;
  const wanted = normalizeHost(host);
  return allowed.some((entry) => {
    const pattern = normalizeHost(entry);
    return pattern.startsWith('*.') ? wanted.endsWith(pattern.slice(1)) : wanted === pattern;
  });
}
