import { randomUUID } from 'node:crypto';
import { createServer, type IncomingHttpHeaders, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { McpServer } from '@modelcontextprotocol/sdk/server/mcp.js';
import { StreamableHTTPServerTransport } from '@modelcontextprotocol/sdk/server/streamableHttp.js';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { z } from 'zod';
import { createModelRegistry } from '../src/models/provider-registry.js';
import { startTestBerth, type TestBerth } from './support/berth-instance.js';
import { type FakeOAuthServer, startFakeOAuthServer } from './support/fake-oauth-server.js';
import { type StreamEvent, sendAndWaitIdle } from './support/session-stream.js';

/**
 * A remote MCP server (the SDK's own server, streamable HTTP) that answers 401 unless the
 * request carries one of `validTokens`, and records the Authorization header of every request.
 */
async function startProtectedMcpServer(validTokens: () => ReadonlySet<string>) {
  const seen: IncomingHttpHeaders[] = [];
  const server: Server = createServer(async (request, response) => {
    seen.push(request.headers);
    const token = /^Bearer (.+)$/.exec(request.headers.authorization ?? '')?.[1] ?? '';
    if (!validTokens().has(token)) {
      response.writeHead(401, { 'content-type': 'application/json', 'www-authenticate': 'Bearer' });
      response.end(JSON.stringify({ error: 'invalid_token' }));
      return;
    }
    const mcp = new McpServer({ name: 'protected', version: '1.0.0' });
    mcp.registerTool(
      'hello',
      { description: 'Greets whoever is allowed in', inputSchema: { name: z.string() } },
      async ({ name }) => ({ content: [{ type: 'text', text: `hello ${name}, from behind the door` }] }),
    );
    const transport = new StreamableHTTPServerTransport({ sessionIdGenerator: undefined });
    response.on('close', () => {
      void transport.close();
      void mcp.close();
    });
    await mcp.connect(transport);
    await transport.handleRequest(request, response);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as AddressInfo).port;
  return {
    url: `http://127.0.0.1:${port}/mcp`,
    address: `127.0.0.1:${port}`,
    seen,
    close: () => new Promise<void>((resolve) => server.close(() => resolve())),
  };
}

const STATIC_TOKEN = `static-canary-${randomUUID()}`;
const STALE_ACCESS = `stale-canary-${randomUUID()}`;

/**
 * Remote MCP servers are reached through Berth's host-side egress client: the session's vault
 * credential for the server goes in `Authorization`, an OAuth token the server refuses is
 * refreshed once, every request is audited on the session, and no token reaches the log.
 */
describe('remote MCP servers with vault credentials', () => {
  let berth: TestBerth;
  let staticServer: Awaited<ReturnType<typeof startProtectedMcpServer>>;
  let oauthServer: Awaited<ReturnType<typeof startProtectedMcpServer>>;
  let oauth: FakeOAuthServer;
  let environmentId: string;

  beforeAll(async () => {
    staticServer = await startProtectedMcpServer(() => new Set([STATIC_TOKEN]));
    oauth = await startFakeOAuthServer({
      auth: 'client_secret_post',
      clientId: 'berth-test',
      clientSecret: 'client-secret',
      refreshToken: 'refresh-1',
      accessToken: 'not-this-one',
      issuedPrefix: `fresh-canary-${randomUUID()}`,
    });
    // Only tokens the token endpoint issued are good: the stored one is stale.
    oauthServer = await startProtectedMcpServer(() => oauth.validAccessTokens);
    berth = await startTestBerth({
      environment: {
        // The servers are on loopback, which Berth reaches only as operator exceptions.
        BERTH_EGRESS_ALLOW_PRIVATE: `${staticServer.address},${oauthServer.address}`,
      },
      models: createModelRegistry({
        environment: {},
        scriptedScripts: {
          greeter: {
            name: 'greeter',
            steps: [
              { toolCalls: [{ toolName: 'door__hello', input: { name: 'berth' } }] },
              { text: 'Got: {{last_tool_result}}' },
            ],
          },
        },
      }),
    });
    environmentId = (await berth.client.beta.environments.create({ name: 'remote-mcp' })).id;
  });
  afterAll(async () => {
    await berth?.dispose();
    await staticServer?.close();
    await oauthServer?.close();
    await oauth?.close();
  });

  async function sessionFor(url: string, vaultIds: string[]) {
    const agent = await berth.client.beta.agents.create({
      name: `door-${randomUUID().slice(0, 8)}`,
      model: 'scripted/greeter',
      mcp_servers: [{ name: 'door', type: 'url', url }],
      tools: [
        {
          type: 'mcp_toolset',
          mcp_server_name: 'door',
          default_config: { permission_policy: { type: 'always_allow' } },
        },
      ],
    });
    const session = await berth.client.beta.sessions.create({
      agent: agent.id,
      environment_id: environmentId,
      vault_ids: vaultIds,
    });
    return session.id;
  }

  const run = (sessionId: string) =>
    sendAndWaitIdle(berth.client, sessionId, [
      { type: 'user.message', content: [{ type: 'text', text: 'knock knock' }] },
    ]);

  const allEvents = async (sessionId: string): Promise<StreamEvent[]> => {
    const events: StreamEvent[] = [];
    for await (const event of berth.client.beta.sessions.events.list(sessionId, { limit: 100 }))
      events.push(event as unknown as StreamEvent);
    return events;
  };

  it('sends the static bearer token of the session vault, audits the requests, and logs no token', async () => {
    const vault = await berth.client.beta.vaults.create({ display_name: 'door keys' });
    await berth.client.beta.vaults.credentials.create(vault.id, {
      display_name: 'Door token',
      auth: { type: 'static_bearer', token: STATIC_TOKEN, mcp_server_url: staticServer.url },
    });
    const sessionId = await sessionFor(staticServer.url, [vault.id]);
    const seen = await run(sessionId);
    const result = seen.find((event) => event.type === 'agent.mcp_tool_result');
    expect(result?.is_error).not.toBe(true);
    expect(JSON.stringify(result?.content)).toContain('hello berth, from behind the door');
    expect(staticServer.seen.length).toBeGreaterThan(0);
    expect(staticServer.seen.every((headers) => headers.authorization === `Bearer ${STATIC_TOKEN}`)).toBe(
      true,
    );

    const events = await allEvents(sessionId);
    const audits = events.filter((event) => event.type === 'berth.egress_request');
    expect(audits.length).toBeGreaterThan(0);
    expect(audits.every((event) => event.purpose === 'mcp:door' && event.decision === 'allowed')).toBe(true);
    expect(audits.some((event) => (event.credentials as string[]).includes('Door token'))).toBe(true);
    expect(JSON.stringify(events)).not.toContain(STATIC_TOKEN);
  });

  it('without a credential the server refuses, and the session says so instead of hanging', async () => {
    const sessionId = await sessionFor(staticServer.url, []);
    const seen = await run(sessionId);
    const error = seen.find((event) => event.type === 'session.error');
    expect(JSON.stringify(error)).toMatch(/door/);
    expect(JSON.stringify(error)).toMatch(/401 Unauthorized and the session.s vaults hold no credential/);
    expect(seen.at(-1)?.type).toBe('session.status_idle');
  });

  it('refreshes an OAuth token the server refuses, once, and goes on', async () => {
    const vault = await berth.client.beta.vaults.create({ display_name: 'oauth keys' });
    await berth.client.beta.vaults.credentials.create(vault.id, {
      display_name: 'Door OAuth',
      auth: {
        type: 'mcp_oauth',
        access_token: STALE_ACCESS,
        mcp_server_url: oauthServer.url,
        // Not yet due: only the server's 401 says the token is no good.
        expires_at: new Date(Date.now() + 3600_000).toISOString(),
        refresh: {
          client_id: 'berth-test',
          refresh_token: 'refresh-1',
          token_endpoint: oauth.tokenEndpoint,
          token_endpoint_auth: { type: 'client_secret_post', client_secret: 'client-secret' },
        },
      },
    });
    const sessionId = await sessionFor(oauthServer.url, [vault.id]);
    const seen = await run(sessionId);
    const result = seen.find((event) => event.type === 'agent.mcp_tool_result');
    expect(JSON.stringify(result?.content)).toContain('hello berth, from behind the door');
    // One refresh: the stale token was tried first, then only the issued one.
    expect(oauth.requests.filter((request) => request.path === '/token')).toHaveLength(1);
    const tokens = oauthServer.seen.map((headers) => headers.authorization);
    expect(tokens[0]).toBe(`Bearer ${STALE_ACCESS}`);
    const issued = [...oauth.validAccessTokens].find((token) => token.startsWith('fresh-canary-'))!;
    expect(tokens.slice(1).every((token) => token === `Bearer ${issued}`)).toBe(true);
    const events = await allEvents(sessionId);
    expect(JSON.stringify(events)).not.toContain(issued);
    expect(JSON.stringify(events)).not.toContain(STALE_ACCESS);
    // The MCP requests and the vault's token request are egress in the metrics too.
    const metrics = await (await fetch(`${berth.url}/metrics`)).text();
    const sample = (series: string) =>
      Number(
        metrics
          .split('\n')
          .find((line) => line.startsWith(`${series} `))
          ?.split(' ')[1] ?? Number.NaN,
      );
    expect(sample('berth_egress_requests_total{source="oauth",decision="allowed"}')).toBe(1);
    expect(sample('berth_egress_requests_total{source="mcp",decision="allowed"}')).toBeGreaterThanOrEqual(2);
    expect(sample('berth_egress_bytes_total{source="oauth",direction="received"}')).toBeGreaterThan(0);
  });

  it('refuses a server on a private address the operator did not allow, naming the rule', async () => {
    const other = await startProtectedMcpServer(() => new Set([STATIC_TOKEN]));
    try {
      const sessionId = await sessionFor(other.url, []);
      const seen = await run(sessionId);
      const error = seen.find((event) => event.type === 'session.error');
      expect(JSON.stringify(error)).toMatch(/private, loopback or link-local/);
      expect(other.seen).toHaveLength(0);
      const audits = (await allEvents(sessionId)).filter((event) => event.type === 'berth.egress_request');
      expect(audits.some((event) => event.decision === 'denied')).toBe(true);
    } finally {
      await other.close();
    }
  });

  it('refuses a server outside the allowed hosts of a limited environment unless allow_mcp_servers', async () => {
    const vault = await berth.client.beta.vaults.create({ display_name: 'limited keys' });
    await berth.client.beta.vaults.credentials.create(vault.id, {
      auth: { type: 'static_bearer', token: STATIC_TOKEN, mcp_server_url: staticServer.url },
    });
    const limited = async (allowMcpServers: boolean) =>
      (
        await berth.client.beta.environments.create({
          name: `limited-${allowMcpServers}`,
          config: {
            type: 'cloud',
            networking: {
              type: 'limited',
              allowed_hosts: ['example.com'],
              allow_mcp_servers: allowMcpServers,
            },
          },
        })
      ).id;
    const agent = await berth.client.beta.agents.create({
      name: 'door-limited',
      model: 'scripted/greeter',
      mcp_servers: [{ name: 'door', type: 'url', url: staticServer.url }],
      tools: [
        {
          type: 'mcp_toolset',
          mcp_server_name: 'door',
          default_config: { permission_policy: { type: 'always_allow' } },
        },
      ],
    });
    const before = staticServer.seen.length;
    const closed = await berth.client.beta.sessions.create({
      agent: agent.id,
      environment_id: await limited(false),
      vault_ids: [vault.id],
    });
    const refused = await run(closed.id);
    expect(JSON.stringify(refused.find((event) => event.type === 'session.error'))).toMatch(/allowed_hosts/);
    expect(staticServer.seen.length).toBe(before);

    const open = await berth.client.beta.sessions.create({
      agent: agent.id,
      environment_id: await limited(true),
      vault_ids: [vault.id],
    });
    const allowed = await run(open.id);
    const result = allowed.find((event) => event.type === 'agent.mcp_tool_result');
    expect(JSON.stringify(result?.content)).toContain('hello berth');
  });
});
