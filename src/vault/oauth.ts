import { BerthError } from '../errors.js';
import type { McpOAuthRefreshBody } from './credentials.js';

/**
 * OAuth 2.0 on the host side: the `refresh_token` grant (RFC 6749 §6, client authentication
 * per §2.3.1: none, HTTP Basic or the request body; `resource` per RFC 8707), and the probe
 * `mcp_oauth_validate` makes against an MCP server. Errors and captured responses never carry
 * a secret: responses are scrubbed of every value the caller names.
 */

/** Most bytes of a captured response body kept for the caller. */
const CAPTURED_BODY_BYTES = 2048;

/** What a successful refresh returned. */
export interface RefreshedTokens {
  accessToken: string;
  /** A rotated refresh token, when the server issued one. */
  refreshToken: string | undefined;
  /** Seconds until the new access token expires, when the server said. */
  expiresIn: number | undefined;
}

/** An HTTP answer captured for `mcp_oauth_validate` (official `BetaManagedAgentsRefreshHTTPResponse`). */
export interface CapturedHttpResponse {
  body: string;
  body_truncated: boolean;
  content_type: string;
  status_code: number;
}

/** Why a refresh failed, as `mcp_oauth_validate` reports it. */
export class RefreshFailure extends BerthError {
  readonly outcome: 'failed' | 'connect_error';
  readonly response: CapturedHttpResponse | null;

  constructor(
    message: string,
    outcome: 'failed' | 'connect_error',
    response: CapturedHttpResponse | null,
    retryable: boolean,
  ) {
    super('vault_failed', message, { retryable });
    this.outcome = outcome;
    this.response = response;
  }
}

/** Reads at most `CAPTURED_BODY_BYTES` of a response, scrubbing the given secrets. */
async function capture(response: Response, secrets: readonly string[]): Promise<CapturedHttpResponse> {
  let text = '';
  let truncated = false;
  const reader = response.body?.getReader();
  if (reader !== undefined) {
    const decoder = new TextDecoder();
    let bytes = 0;
    try {
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        bytes += value.byteLength;
        text += decoder.decode(value, { stream: true });
        if (bytes > CAPTURED_BODY_BYTES) {
          truncated = true;
          break;
        }
      }
    } finally {
      await reader.cancel().catch(() => undefined);
    }
  }
  if (text.length > CAPTURED_BODY_BYTES) {
    text = text.slice(0, CAPTURED_BODY_BYTES);
    truncated = true;
  }
  return {
    body: scrub(text, secrets),
    body_truncated: truncated,
    content_type: response.headers.get('content-type') ?? '',
    status_code: response.status,
  };
}

/** Replaces every occurrence of the secrets (and of a secret cut off at the end) with `[redacted]`. */
export function scrub(text: string, secrets: readonly string[]): string {
  let scrubbed = text;
  for (const secret of secrets) {
    if (secret.length < 4) continue;
    scrubbed = scrubbed.split(secret).join('[redacted]');
    // A truncated body may end in the first part of a secret.
    for (let length = secret.length - 1; length >= 4; length--) {
      if (scrubbed.endsWith(secret.slice(0, length))) {
        scrubbed = `${scrubbed.slice(0, scrubbed.length - length)}[redacted]`;
        break;
      }
    }
  }
  return scrubbed;
}

/** The host of a URL, for messages (never its query, which could hold a secret). */
function hostOf(url: string): string {
  try {
    return new URL(url).host;
  } catch {
    return 'an invalid URL';
  }
}

/**
 * Exchanges a refresh token for a new access token at the credential's token endpoint.
 * Fails with a `RefreshFailure` (`vault_failed`): `connect_error` when the endpoint could not be
 * reached (retryable), `failed` when it answered with an error (retryable for 5xx and 429).
 */
export async function refreshAccessToken(
  fetchFunction: typeof fetch,
  refresh: McpOAuthRefreshBody,
  secrets: { refreshToken: string; clientSecret: string | null },
  options: { credentialId: string; timeoutMs: number },
): Promise<RefreshedTokens> {
  const form = new URLSearchParams({ grant_type: 'refresh_token', refresh_token: secrets.refreshToken });
  if (refresh.scope) form.set('scope', refresh.scope);
  if (refresh.resource) form.set('resource', refresh.resource);
  const headers: Record<string, string> = {
    'content-type': 'application/x-www-form-urlencoded',
    accept: 'application/json',
  };
  const authType = refresh.token_endpoint_auth.type;
  if (authType === 'client_secret_basic') {
    // RFC 6749 §2.3.1: each part form-encoded, then Basic.
    const user = encodeURIComponent(refresh.client_id).replaceAll('%20', '+');
    const password = encodeURIComponent(secrets.clientSecret ?? '').replaceAll('%20', '+');
    headers.authorization = `Basic ${Buffer.from(`${user}:${password}`).toString('base64')}`;
  } else {
    form.set('client_id', refresh.client_id);
    if (authType === 'client_secret_post') form.set('client_secret', secrets.clientSecret ?? '');
  }
  const where = `the token endpoint at ${hostOf(refresh.token_endpoint)}`;
  const scrubbed = [secrets.refreshToken, ...(secrets.clientSecret ? [secrets.clientSecret] : [])];
  let response: Response;
  try {
    response = await fetchFunction(refresh.token_endpoint, {
      method: 'POST',
      headers,
      body: form.toString(),
      redirect: 'error',
      signal: AbortSignal.timeout(options.timeoutMs),
    });
  } catch (error) {
    const reason = (error as { cause?: { code?: string } }).cause?.code ?? (error as Error).name;
    throw new RefreshFailure(
      `refreshing credential ${options.credentialId}: ${where} could not be reached (${reason})`,
      'connect_error',
      null,
      true,
    );
  }
  if (!response.ok) {
    const captured = await capture(response, scrubbed);
    let code = '';
    try {
      const parsed = JSON.parse(captured.body) as { error?: unknown };
      if (typeof parsed.error === 'string' && /^[\w.-]{1,64}$/.test(parsed.error)) code = ` ${parsed.error}`;
    } catch {
      // Not JSON: the status says enough.
    }
    throw new RefreshFailure(
      `refreshing credential ${options.credentialId}: ${where} answered ${response.status}${code}`,
      'failed',
      captured,
      response.status >= 500 || response.status === 429,
    );
  }
  let parsed: { access_token?: unknown; refresh_token?: unknown; expires_in?: unknown };
  try {
    parsed = (await response.json()) as typeof parsed;
  } catch {
    throw new RefreshFailure(
      `refreshing credential ${options.credentialId}: ${where} answered ${response.status} without a JSON body`,
      'failed',
      null,
      false,
    );
  }
  if (typeof parsed.access_token !== 'string' || parsed.access_token === '') {
    throw new RefreshFailure(
      `refreshing credential ${options.credentialId}: ${where} answered without an access_token`,
      'failed',
      null,
      false,
    );
  }
  const expiresIn = Number(parsed.expires_in);
  return {
    accessToken: parsed.access_token,
    refreshToken:
      typeof parsed.refresh_token === 'string' && parsed.refresh_token !== ''
        ? parsed.refresh_token
        : undefined,
    expiresIn: Number.isFinite(expiresIn) && expiresIn > 0 ? expiresIn : undefined,
  };
}

/** What probing an MCP server with a token found. */
export type McpProbeResult =
  | { outcome: 'accepted' }
  | { outcome: 'rejected'; response: CapturedHttpResponse }
  | { outcome: 'failed'; response: CapturedHttpResponse | null };

/**
 * Sends the MCP `initialize` request (streamable HTTP) with the token: 2xx means the server
 * accepted it, 401/403 that it refused it, anything else (or no answer) tells nothing.
 */
export async function probeMcpServer(
  fetchFunction: typeof fetch,
  url: string,
  token: string,
  timeoutMs: number,
): Promise<McpProbeResult> {
  let response: Response;
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), timeoutMs);
  try {
    response = await fetchFunction(url, {
      method: 'POST',
      headers: {
        authorization: `Bearer ${token}`,
        'content-type': 'application/json',
        accept: 'application/json, text/event-stream',
      },
      body: JSON.stringify({
        jsonrpc: '2.0',
        id: 1,
        method: 'initialize',
        params: {
          protocolVersion: '2025-06-18',
          capabilities: {},
          clientInfo: { name: 'berth-credential-validation', version: '1' },
        },
      }),
      redirect: 'error',
      signal: controller.signal,
    });
    if (response.ok) {
      // The answer's content does not matter (and a stream would never end).
      controller.abort();
      return { outcome: 'accepted' };
    }
    const captured = await capture(response, [token]);
    return response.status === 401 || response.status === 403
      ? { outcome: 'rejected', response: captured }
      : { outcome: 'failed', response: captured };
  } catch {
    return { outcome: 'failed', response: null };
  } finally {
    clearTimeout(timer);
  }
}
