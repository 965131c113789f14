/**
 * The `fetch` a remote (streamable HTTP) MCP server is reached with: Berth's host-side egress
 * client (the session's networking and address rules, audited as `berth.egress_request`) plus
 * the session's vault credential for that server. A `static_bearer` or `mcp_oauth` credential
 * whose `mcp_server_url` is the server's URL is sent as `Authorization: Bearer …`, only on
 * requests to that server's host (never on a redirect elsewhere). When the server answers 401
 * to an OAuth token, the token is refreshed once and the request sent again.
 */
import type { HopCredential, HostFetch } from '../egress/host-fetch.js';
import { hostAllowed, type SessionCredential } from '../vault/credentials.js';

/** What the MCP SDK's transport calls (`FetchLike`). */
export type McpFetch = (url: string | URL, init?: RequestInit) => Promise<Response>;

/** Two MCP server URLs name the same server when they match up to a trailing slash and case of the host. */
export function sameServerUrl(a: string, b: string): boolean {
  try {
    const normalize = (value: string) => {
      const url = new URL(value);
      url.hash = '';
      return url.href.replace(/\/$/, '');
    };
    return normalize(a) === normalize(b);
  } catch {
    return false;
  }
}

export interface McpFetchOptions {
  serverName: string;
  serverUrl: string;
  /** The session's host-side egress client. */
  client: () => Promise<HostFetch>;
  /** The session's vault credentials (read per request, so a rotated token is used at once). */
  credentials?: () => Promise<readonly SessionCredential[]>;
  /** Headers added to every request (trace context). */
  extraHeaders?: () => Record<string, string>;
}

export function createMcpFetch(options: McpFetchOptions): McpFetch {
  const credentialOf = async () => {
    const credentials = (await options.credentials?.()) ?? [];
    return credentials.find(
      (credential) =>
        (credential.type === 'static_bearer' || credential.type === 'mcp_oauth') &&
        sameServerUrl(credential.mcpServerUrl, options.serverUrl),
    ) as Extract<SessionCredential, { type: 'static_bearer' | 'mcp_oauth' }> | undefined;
  };

  return async (url, init = {}) => {
    const client = await options.client();
    const credential = await credentialOf();
    const body = init.body;
    if (body !== undefined && body !== null && typeof body !== 'string' && !(body instanceof Uint8Array)) {
      throw new Error('MCP requests must have string or byte bodies');
    }
    const headers = new Headers(init.headers);
    for (const [name, value] of Object.entries(options.extraHeaders?.() ?? {})) headers.set(name, value);
    const send = (forceRefresh: boolean) =>
      client.fetch(url, {
        method: init.method,
        headers,
        body: body ?? undefined,
        signal: init.signal ?? undefined,
        redirect: init.redirect === 'manual' ? 'manual' : 'follow',
        purpose: `mcp:${options.serverName}`,
        credentialFor: async (hop): Promise<HopCredential | undefined> => {
          if (!credential || !hostAllowed(credential.allowedHosts, hop.hostname)) return undefined;
          const token =
            credential.type === 'static_bearer'
              ? credential.token.reveal()
              : (await credential.accessToken({ forceRefresh })).reveal();
          return { authorization: `Bearer ${token}`, name: credential.name };
        },
      });
    let response = await send(false);
    if (response.status === 401 && credential?.type === 'mcp_oauth') {
      // The server no longer takes the stored token (revoked, or expired early): refresh once.
      await response.body?.cancel().catch(() => undefined);
      response = await send(true);
    }
    if (response.status !== 401) return response;
    await response.body?.cancel().catch(() => undefined);
    // Said here because the MCP client would report only the body of the 401.
    throw new Error(
      credential
        ? `the server answered 401 Unauthorized to the credential "${credential.name}" from the session's vaults`
        : `the server answered 401 Unauthorized and the session's vaults hold no credential for ${options.serverUrl}`,
    );
  };
}
