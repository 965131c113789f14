import { createServer, type IncomingMessage, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';

/** How the token endpoint authenticates the client (RFC 6749 §2.3.1). */
export type TokenEndpointAuth = 'none' | 'client_secret_basic' | 'client_secret_post';

/** One request the fake received, as it arrived. */
export interface OAuthRequest {
  path: string;
  headers: IncomingMessage['headers'];
  /** The form fields of a token request; the raw text of anything else. */
  form: Record<string, string>;
  body: string;
}

/**
 * A stand-in for something outside Berth's control: an OAuth 2.0 authorization server's token
 * endpoint (`POST /token`, the real `refresh_token` grant with the configured client
 * authentication, rotating refresh tokens) and an MCP server (`POST /mcp`) that accepts only
 * access tokens the token endpoint issued. Errors echo what they were sent, as careless real
 * servers do, so callers' scrubbing is exercised.
 */
export interface FakeOAuthServer {
  url: string;
  tokenEndpoint: string;
  mcpUrl: string;
  requests: OAuthRequest[];
  /** The refresh token the next refresh must present. */
  refreshToken: string;
  /** Access tokens the MCP endpoint accepts. */
  validAccessTokens: Set<string>;
  /** Seconds the issued tokens live (`expires_in`). */
  expiresIn: number;
  close(): Promise<void>;
}

export async function startFakeOAuthServer(options: {
  auth: TokenEndpointAuth;
  clientId: string;
  clientSecret?: string;
  refreshToken: string;
  accessToken: string;
  /** Prefix of issued tokens (tests use canary prefixes to scan for them). */
  issuedPrefix?: string;
}): Promise<FakeOAuthServer> {
  let issued = 0;
  const state = {
    requests: [] as OAuthRequest[],
    refreshToken: options.refreshToken,
    validAccessTokens: new Set([options.accessToken]),
    expiresIn: 3600,
  };
  const server: Server = createServer(async (request, response) => {
    let body = '';
    for await (const chunk of request) body += String(chunk);
    const path = new URL(request.url ?? '/', 'http://fake').pathname;
    const form = Object.fromEntries(new URLSearchParams(body));
    state.requests.push({ path, headers: request.headers, form, body });
    const answer = (status: number, value: unknown) => {
      response.writeHead(status, { 'content-type': 'application/json' });
      response.end(JSON.stringify(value));
    };
    if (path === '/mcp') {
      const token = /^Bearer (.+)$/.exec(request.headers.authorization ?? '')?.[1] ?? '';
      if (!state.validAccessTokens.has(token)) {
        return answer(401, { error: 'invalid_token', error_description: `token ${token} is not valid` });
      }
      return answer(200, {
        jsonrpc: '2.0',
        id: 1,
        result: {
          protocolVersion: '2025-06-18',
          capabilities: {},
          serverInfo: { name: 'fake', version: '1' },
        },
      });
    }
    if (path !== '/token' || request.method !== 'POST') return answer(404, { error: 'not_found' });
    if (!request.headers['content-type']?.startsWith('application/x-www-form-urlencoded')) {
      return answer(400, { error: 'invalid_request', error_description: 'form body expected' });
    }
    // Client authentication exactly as the configured method says, and no other way.
    const basic = /^Basic (.+)$/.exec(request.headers.authorization ?? '')?.[1];
    let clientId: string | undefined;
    let authenticated = false;
    if (options.auth === 'client_secret_basic') {
      if (basic !== undefined && form.client_secret === undefined) {
        const [id, secret] = Buffer.from(basic, 'base64').toString('utf8').split(':');
        const decode = (part = '') => decodeURIComponent(part.replaceAll('+', ' '));
        clientId = decode(id);
        authenticated = decode(secret) === options.clientSecret;
      }
    } else if (basic === undefined) {
      clientId = form.client_id;
      authenticated =
        options.auth === 'client_secret_post'
          ? form.client_secret === options.clientSecret
          : form.client_secret === undefined;
    }
    if (!authenticated || clientId !== options.clientId) {
      return answer(401, {
        error: 'invalid_client',
        error_description: `client ${clientId} failed to authenticate`,
      });
    }
    if (form.grant_type !== 'refresh_token') return answer(400, { error: 'unsupported_grant_type' });
    if (form.refresh_token !== state.refreshToken) {
      return answer(400, {
        error: 'invalid_grant',
        error_description: `refresh token ${form.refresh_token} is unknown or was used`,
      });
    }
    issued++;
    const prefix = options.issuedPrefix ?? 'issued';
    const accessToken = `${prefix}-access-${issued}`;
    state.refreshToken = `${prefix}-refresh-${issued}`;
    state.validAccessTokens.add(accessToken);
    return answer(200, {
      access_token: accessToken,
      token_type: 'Bearer',
      expires_in: state.expiresIn,
      refresh_token: state.refreshToken,
      ...(form.scope ? { scope: form.scope } : {}),
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  return {
    url,
    tokenEndpoint: `${url}/token`,
    mcpUrl: `${url}/mcp`,
    get requests() {
      return state.requests;
    },
    get refreshToken() {
      return state.refreshToken;
    },
    set refreshToken(value: string) {
      state.refreshToken = value;
    },
    get validAccessTokens() {
      return state.validAccessTokens;
    },
    get expiresIn() {
      return state.expiresIn;
    },
    set expiresIn(value: number) {
      state.expiresIn = value;
    },
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      }),
  };
}
