import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { createTenantWithAdmin } from '../src/identity/api-keys.js';
import { type IdPrefix, newId } from '../src/ids.js';
import { startTestBerth, type TestBerth } from './support/berth-instance.js';
import { type FakeOAuthServer, startFakeOAuthServer } from './support/fake-oauth-server.js';
import { createTestDatabase } from './support/postgres-database.js';

/** What an `:id` in a route names, by the collection it sits under. */
type Kind = 'agent' | 'environment' | 'session' | 'user' | 'api_key' | 'vault' | 'credential' | 'skill';

const collectionOf: Record<Kind, string> = {
  agent: 'agents',
  environment: 'environments',
  session: 'sessions',
  user: 'users',
  api_key: 'api_keys',
  vault: 'vaults',
  credential: 'credentials',
  skill: 'skills',
};

const kindByCollection = Object.fromEntries(
  Object.entries(collectionOf).map(([kind, collection]) => [collection, kind as Kind]),
) as Record<string, Kind | undefined>;

const idPrefixByKind: Record<Kind, IdPrefix> = {
  agent: 'agent',
  environment: 'env',
  session: 'sesn',
  user: 'user',
  api_key: 'key',
  vault: 'vlt',
  credential: 'vcrd',
  skill: 'skill',
};

/** Someone holding a key: a tenant's admin or one of its members. */
interface Party {
  name: string;
  tenantId: string;
  userId: string;
  role: 'admin' | 'member';
  key: string;
  keyId: string;
}

/** A resource some party may or may not reach. `ownerId` is null for tenant-wide resources. */
interface Resource {
  kind: Kind;
  id: string;
  tenantId: string;
  ownerId: string | null;
  label: string;
  /** The vault a credential is in (its routes name both). */
  parentId?: string;
  /** Who made it, for resources the whole tenant sees but only admins and their creator change. */
  creatorId?: string;
}

/** One tenant as the test built it. */
interface World {
  name: string;
  tenantId: string;
  admin: Party;
  members: [Party, Party];
  agentId: string;
  environmentId: string;
  vaultId: string;
  skillId: string;
}

type JsonObject = Record<string, unknown>;

/** A body that sends another party's id: which kind of id, and the body around it. */
interface Reference {
  kind: Kind;
  body: (foreignId: string, home: World) => JsonObject;
  /** A body field naming a missing id is a 400 (vault_ids), not a 404; foreign ids must read the same. */
  refusedWith?: 400;
}

/**
 * How the matrix covers each route, keyed by `"METHOD path"`. Every route the server has must
 * be here, so a new route cannot escape the matrix.
 */
type RouteRule =
  /**
   * A route about one resource (`:id`): a valid body, whether it retires its target, and who
   * among those who see the target may use it (default: all of them): `admins` only, or
   * `admins and creator` (vaults and credentials: `identity/access.ts` `mayChangeVaultItem`).
   * The others get 403 permission_error.
   */
  | {
      type: 'by-id';
      body?: (target: Resource) => unknown;
      retires?: true;
      writers?: 'admins' | 'admins and creator';
    }
  /** A listing: must show nothing the caller may not see; `filters` take ids as query parameters. */
  | { type: 'listing'; lists: Kind; adminOnly?: true; filters?: { parameter: string; kind: Kind }[] }
  /** A creation: a valid body, and bodies that name other resources' ids. */
  | { type: 'create'; body: (home: World) => JsonObject; adminOnly?: true; references?: Reference[] }
  /** About the caller or the server: no ids at all. */
  | { type: 'caller' };

interface Answer {
  status: number;
  contentType: string;
  body: JsonObject | undefined;
}

/** One generated case: a caller, a route, and the resource its `:id` names. */
interface MatrixCase {
  caller: Party;
  method: string;
  path: string;
  rule: Extract<RouteRule, { type: 'by-id' }>;
  target: Resource;
  /** Whether the caller may see the target, or must be told it does not exist (404). */
  visible: boolean;
  /** Whether the caller may use the route on it (2xx); visible but not allowed is a 403. */
  allowed: boolean;
}

const userMessage = { type: 'user.message', content: [{ type: 'text', text: 'hi' }] };

/** A skill upload (multipart), as `client.beta.skills.create` sends it. */
function skillUpload(): FormData {
  const form = new FormData();
  const text = '---\nname: matrix-skill\ndescription: A skill the isolation matrix uploads.\n---\nSteps.\n';
  form.append('files[]', new File([text], 'matrix-skill/SKILL.md'));
  return form;
}

/**
 * A matrix generated from the server's own route list: every key of two tenants (admin and
 * two members each) against every `:id` route and stream, filled with every resource of the
 * matching kind. What the key may not see answers 404 exactly as a missing id would and
 * changes nothing; what it may see succeeds. Run on both stores.
 */
describe.each(['sqlite', 'postgres'] as const)('tenant isolation (%s store)', (storeKind) => {
  let berth: TestBerth;
  let worlds: [World, World];
  let parties: Party[];
  let resources: Resource[];
  let matrix: MatrixCase[];
  let before: unknown;
  let probe = 0;
  /** The MCP server (and token endpoint) the matrix's mcp_oauth credentials belong to. */
  let oauth: FakeOAuthServer;

  const request = async (key: string | undefined, method: string, path: string, body?: unknown) => {
    const controller = new AbortController();
    const headers: Record<string, string> = {};
    if (key !== undefined) headers['x-api-key'] = key;
    const form = body instanceof FormData;
    if (body !== undefined && !form) headers['content-type'] = 'application/json';
    const response = await fetch(`${berth.url}${path}`, {
      method,
      headers,
      body: body === undefined ? undefined : form ? body : JSON.stringify(body),
      signal: controller.signal,
    });
    const contentType = response.headers.get('content-type') ?? '';
    if (contentType.startsWith('text/event-stream')) {
      // A stream never ends by itself: the status and headers are the answer.
      controller.abort();
      return { status: response.status, contentType, body: undefined } satisfies Answer;
    }
    if (
      contentType.startsWith('text/plain') ||
      contentType.startsWith('application/octet-stream') ||
      contentType.startsWith('application/zip')
    ) {
      // Prometheus metrics: aggregates only; scanned as text for ids like any body.
      const text = await response.text();
      return { status: response.status, contentType, body: { text } as JsonObject };
    }
    return { status: response.status, contentType, body: (await response.json()) as JsonObject };
  };

  /** A request that must succeed (setup and snapshots). */
  const must = async (key: string, method: string, path: string, body?: unknown) => {
    const answer = await request(key, method, path, body);
    if (answer.status !== 200) {
      throw new Error(`${method} ${path} answered ${answer.status}: ${JSON.stringify(answer.body)}`);
    }
    return answer.body!;
  };

  const worldOf = (tenantId: string) => worlds.find((world) => world.tenantId === tenantId)!;
  const partyOf = (userId: string) => parties.find((party) => party.userId === userId)!;
  const fill = (path: string, id: string, parentId = '') =>
    path
      .replace(':vault_id', encodeURIComponent(parentId))
      .replace(':id', encodeURIComponent(id))
      .replace(':version', 'latest')
      .replace('*', 'matrix.txt');

  /** The one visibility rule the API promises: own tenant, and (for members) own or tenant-wide. */
  const canSee = (caller: Party, resource: Resource) =>
    resource.tenantId === caller.tenantId &&
    (caller.role === 'admin' || resource.ownerId === null || resource.ownerId === caller.userId);

  /** Whether a caller who sees the target may use the route on it (the route's `writers`). */
  const mayUse = (caller: Party, target: Resource, rule: Extract<RouteRule, { type: 'by-id' }>) =>
    rule.writers === undefined ||
    caller.role === 'admin' ||
    (rule.writers === 'admins and creator' && target.creatorId === caller.userId);

  const routeRules: Record<string, RouteRule> = {
    'GET /health': { type: 'caller' },
    'GET /metrics': { type: 'caller' },
    // Checked like a listing of sessions below (its rows by session are the caller's sessions).
    'GET /v1/usage': { type: 'caller' },
    'GET /v1/me': { type: 'caller' },

    'GET /v1/users': { type: 'listing', lists: 'user', adminOnly: true },
    'POST /v1/users': {
      type: 'create',
      adminOnly: true,
      body: () => ({ name: `extra-${++probe}`, role: 'member' }),
    },
    'GET /v1/users/:id': { type: 'by-id' },
    // The user's current role: a no-op change (an admin cannot change their own role).
    'POST /v1/users/:id': {
      type: 'by-id',
      writers: 'admins',
      body: (target) => ({ role: partyOf(target.ownerId!).role }),
    },

    'GET /v1/api_keys': {
      type: 'listing',
      lists: 'api_key',
      filters: [{ parameter: 'user_id', kind: 'user' }],
    },
    'POST /v1/api_keys': {
      type: 'create',
      body: () => ({ name: `extra-${++probe}` }),
      references: [{ kind: 'user', body: (userId) => ({ name: `extra-${++probe}`, user_id: userId }) }],
    },
    'GET /v1/api_keys/:id': { type: 'by-id' },
    'POST /v1/api_keys/:id/revoke': { type: 'by-id', retires: true },

    'GET /v1/agents': { type: 'listing', lists: 'agent' },
    'POST /v1/agents': {
      type: 'create',
      body: () => ({ name: `extra-${++probe}`, model: 'scripted/echo' }),
      references: [
        {
          kind: 'skill',
          body: (skillId) => ({
            name: `extra-${++probe}`,
            model: 'scripted/echo',
            skills: [{ type: 'custom', skill_id: skillId }],
          }),
          refusedWith: 400,
        },
      ],
    },
    'GET /v1/agents/:id': { type: 'by-id' },
    'POST /v1/agents/:id': {
      type: 'by-id',
      // The current version (read by its owner), and a change that would make a new one.
      body: async (target) => ({
        version: (await must(worldOf(target.tenantId).admin.key, 'GET', `/v1/agents/${target.id}`)).version,
        metadata: { probe: String(++probe) },
      }),
    },
    'GET /v1/agents/:id/versions': { type: 'by-id' },
    'POST /v1/agents/:id/archive': { type: 'by-id', retires: true },

    'GET /v1/environments': { type: 'listing', lists: 'environment' },
    'POST /v1/environments': { type: 'create', body: () => ({ name: `extra-${++probe}` }) },
    'GET /v1/environments/:id': { type: 'by-id' },
    'POST /v1/environments/:id': { type: 'by-id', body: () => ({ metadata: { probe: String(++probe) } }) },
    'POST /v1/environments/:id/archive': { type: 'by-id', retires: true },
    'DELETE /v1/environments/:id': { type: 'by-id', retires: true },

    'GET /v1/vaults': { type: 'listing', lists: 'vault' },
    'POST /v1/vaults': { type: 'create', body: () => ({ display_name: `extra-${++probe}` }) },
    'GET /v1/vaults/:id': { type: 'by-id' },
    'POST /v1/vaults/:id': {
      type: 'by-id',
      writers: 'admins and creator',
      body: () => ({ metadata: { probe: String(++probe) } }),
    },
    'POST /v1/vaults/:id/archive': { type: 'by-id', retires: true, writers: 'admins and creator' },
    'DELETE /v1/vaults/:id': { type: 'by-id', retires: true, writers: 'admins and creator' },
    'GET /v1/vaults/:id/credentials': { type: 'by-id' },
    'POST /v1/vaults/:id/credentials': {
      type: 'by-id',
      writers: 'admins and creator',
      body: () => ({
        auth: {
          type: 'environment_variable',
          secret_name: `PROBE_${++probe}`,
          secret_value: 'matrix-secret',
          networking: { type: 'unrestricted' },
        },
      }),
    },
    'GET /v1/vaults/:vault_id/credentials/:id': { type: 'by-id' },
    'POST /v1/vaults/:vault_id/credentials/:id': {
      type: 'by-id',
      writers: 'admins and creator',
      body: () => ({ metadata: { probe: String(++probe) } }),
    },
    'POST /v1/vaults/:vault_id/credentials/:id/mcp_oauth_validate': {
      type: 'by-id',
      writers: 'admins and creator',
    },
    'POST /v1/vaults/:vault_id/credentials/:id/archive': {
      type: 'by-id',
      retires: true,
      writers: 'admins and creator',
    },
    'DELETE /v1/vaults/:vault_id/credentials/:id': {
      type: 'by-id',
      retires: true,
      writers: 'admins and creator',
    },

    'GET /v1/skills': { type: 'listing', lists: 'skill' },
    'POST /v1/skills': { type: 'create', body: () => skillUpload() as unknown as JsonObject },
    'GET /v1/skills/:id': { type: 'by-id' },
    'DELETE /v1/skills/:id': { type: 'by-id', retires: true },
    'GET /v1/skills/:id/versions': { type: 'by-id' },
    'POST /v1/skills/:id/versions': { type: 'by-id', body: () => skillUpload() },
    'GET /v1/skills/:id/versions/:version': { type: 'by-id' },
    'GET /v1/skills/:id/versions/:version/content': { type: 'by-id' },
    'DELETE /v1/skills/:id/versions/:version': { type: 'by-id', retires: true },

    'GET /v1/sessions': {
      type: 'listing',
      lists: 'session',
      filters: [{ parameter: 'agent_id', kind: 'agent' }],
    },
    'POST /v1/sessions': {
      type: 'create',
      body: (home) => ({ agent: home.agentId, environment_id: home.environmentId }),
      references: [
        { kind: 'agent', body: (agentId, home) => ({ agent: agentId, environment_id: home.environmentId }) },
        {
          kind: 'agent',
          body: (agentId, home) => ({
            agent: { type: 'agent', id: agentId, version: 1 },
            environment_id: home.environmentId,
          }),
        },
        {
          kind: 'environment',
          body: (environmentId, home) => ({ agent: home.agentId, environment_id: environmentId }),
        },
        {
          kind: 'vault',
          body: (vaultId, home) => ({
            agent: home.agentId,
            environment_id: home.environmentId,
            vault_ids: [home.vaultId, vaultId],
          }),
          refusedWith: 400,
        },
      ],
    },
    'GET /v1/sessions/:id': { type: 'by-id' },
    'POST /v1/sessions/:id': { type: 'by-id', body: () => ({ metadata: { probe: String(++probe) } }) },
    'POST /v1/sessions/:id/archive': { type: 'by-id', retires: true },
    'DELETE /v1/sessions/:id': { type: 'by-id', retires: true },
    'GET /v1/sessions/:id/events': { type: 'by-id' },
    'POST /v1/sessions/:id/events': { type: 'by-id', body: () => ({ events: [userMessage] }) },
    'GET /v1/sessions/:id/events/stream': { type: 'by-id' },
    'GET /v1/sessions/:id/files': { type: 'by-id' },
    // Runs before the GET below on each session, so the file is there to read.
    'PUT /v1/sessions/:id/files/*': { type: 'by-id', body: () => 'matrix file' },
    'GET /v1/sessions/:id/files/*': { type: 'by-id' },
    'DELETE /v1/sessions/:id/files/*': { type: 'by-id' },
    'GET /v1/sessions/:id/sandbox': { type: 'by-id' },
    'POST /v1/sessions/:id/stop': { type: 'by-id' },
  };

  const ruleOf = (method: string, path: string) => routeRules[`${method} ${path}`];
  /** The kind `:id` names: the collection right before it (`/v1/vaults/:vault_id/credentials/:id`). */
  const kindOfPath = (path: string) => {
    const segments = path.split('/');
    const index = segments.indexOf(':id');
    return kindByCollection[(index > 0 ? segments[index - 1] : segments[2]) ?? ''];
  };

  /** Creates a tenant with its admin, two members with a key each, an agent and an environment. */
  async function buildWorld(name: string): Promise<World> {
    const created = await createTenantWithAdmin(berth.store.resources, { name });
    const admin: Party = {
      name: `${name} admin`,
      tenantId: created.tenant.id,
      userId: created.admin.id,
      role: 'admin',
      key: created.key,
      keyId: created.keyRecord.id,
    };
    const members = [] as Party[];
    for (const number of [1, 2]) {
      const user = await must(admin.key, 'POST', '/v1/users', { name: `member-${number}`, role: 'member' });
      const key = await must(admin.key, 'POST', '/v1/api_keys', {
        name: `member-${number}`,
        user_id: user.id,
      });
      members.push({
        name: `${name} member ${number}`,
        tenantId: admin.tenantId,
        userId: user.id as string,
        role: 'member',
        key: key.key as string,
        keyId: key.id as string,
      });
    }
    const agent = await must(admin.key, 'POST', '/v1/agents', {
      name: `${name}-agent`,
      model: 'scripted/echo',
    });
    const environment = await must(admin.key, 'POST', '/v1/environments', { name: `${name}-environment` });
    // Made by a member: the whole tenant sees and uses it; admins and that member change it.
    const vault = await must(members[0]!.key, 'POST', '/v1/vaults', { display_name: `${name}-vault` });
    // Uploaded by a member: skills are the whole tenant's, like agents.
    const skill = await must(members[0]!.key, 'POST', '/v1/skills', skillUpload());
    return {
      name,
      tenantId: admin.tenantId,
      admin,
      members: members as [Party, Party],
      agentId: agent.id as string,
      environmentId: environment.id as string,
      vaultId: vault.id as string,
      skillId: skill.id as string,
    };
  }

  /** Creates a session owned by `owner`; with a first message (and its turn run) when `talk`. */
  async function sessionOf(owner: Party, talk: boolean): Promise<string> {
    const world = worldOf(owner.tenantId);
    const session = await must(owner.key, 'POST', '/v1/sessions', {
      agent: world.agentId,
      environment_id: world.environmentId,
      ...(talk ? { initial_events: [userMessage] } : {}),
    });
    const id = session.id as string;
    await settle(owner, id);
    return id;
  }

  /** Waits until the session has no turn running. */
  async function settle(owner: Party, sessionId: string): Promise<void> {
    await berth.supervisor.settled({ tenantId: owner.tenantId, id: sessionId });
    for (let attempt = 0; attempt < 200; attempt++) {
      const current = await must(owner.key, 'GET', `/v1/sessions/${sessionId}`);
      if (current.status === 'idle') return;
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
    throw new Error(`session ${sessionId} never went idle`);
  }

  /** An mcp_oauth credential the fake MCP server accepts (each for its own URL: one per server and vault). */
  async function credentialIn(key: string, vaultId: string, label: string): Promise<string> {
    const credential = await must(key, 'POST', `/v1/vaults/${vaultId}/credentials`, {
      display_name: label,
      auth: {
        type: 'mcp_oauth',
        access_token: 'matrix-access',
        mcp_server_url: `${oauth.mcpUrl}?probe=${++probe}`,
      },
    });
    return credential.id as string;
  }

  /** A fresh resource like `resource` (same tenant and owner), for routes that retire their target. */
  async function throwawayLike(resource: Resource): Promise<Resource> {
    const world = worldOf(resource.tenantId);
    const fresh = { ...resource, label: `throwaway ${resource.label}` };
    if (resource.kind === 'session') {
      const owner = partyOf(resource.ownerId!);
      fresh.id = (
        await must(owner.key, 'POST', '/v1/sessions', {
          agent: world.agentId,
          environment_id: world.environmentId,
        })
      ).id as string;
    } else if (resource.kind === 'api_key') {
      fresh.id = (
        await must(world.admin.key, 'POST', '/v1/api_keys', { name: 'throwaway', user_id: resource.ownerId })
      ).id as string;
    } else if (resource.kind === 'agent') {
      fresh.id = (
        await must(world.admin.key, 'POST', '/v1/agents', { name: 'throwaway', model: 'scripted/echo' })
      ).id as string;
    } else if (resource.kind === 'environment') {
      fresh.id = (await must(world.admin.key, 'POST', '/v1/environments', { name: 'throwaway' }))
        .id as string;
    } else if (resource.kind === 'vault') {
      // Made by the same user, so the same callers may change it.
      fresh.id = (
        await must(partyOf(resource.creatorId!).key, 'POST', '/v1/vaults', { display_name: 'throwaway' })
      ).id as string;
    } else if (resource.kind === 'credential') {
      fresh.id = await credentialIn(partyOf(resource.creatorId!).key, resource.parentId!, 'throwaway');
    } else if (resource.kind === 'skill') {
      fresh.id = (await must(world.admin.key, 'POST', '/v1/skills', skillUpload())).id as string;
    } else {
      throw new Error(`no throwaway for ${resource.kind}`);
    }
    return fresh;
  }

  /**
   * Everything observable about the resources the attacks named, read by their rightful
   * admins: bodies, event counts, agent versions, and every id each tenant lists.
   */
  async function snapshot() {
    const seen: Record<string, unknown> = {};
    for (const resource of resources) {
      const admin = worldOf(resource.tenantId).admin.key;
      const path =
        resource.kind === 'credential'
          ? `/v1/vaults/${resource.parentId}/credentials/${resource.id}`
          : `/v1/${collectionOf[resource.kind]}/${resource.id}`;
      const body = await must(admin, 'GET', path);
      if (resource.kind === 'credential') {
        // The sealed secret too: a refused request must not have replaced it.
        const stored = await berth.store.vaults.getCredential(
          resource.tenantId,
          resource.parentId!,
          resource.id,
        );
        seen[resource.label] = { ...body, secret: stored?.secret };
      } else if (resource.kind === 'vault') {
        const credentials = await must(admin, 'GET', `${path}/credentials?limit=1000&include_archived=true`);
        seen[resource.label] = {
          ...body,
          credentials: (credentials.data as JsonObject[]).map((item) => item.id).sort(),
        };
      } else if (resource.kind === 'session') {
        const { stats: _stats, ...stable } = body;
        const events = await must(admin, 'GET', `${path}/events?limit=1000`);
        seen[resource.label] = { ...stable, eventCount: (events.data as unknown[]).length };
      } else if (resource.kind === 'skill') {
        const versions = await must(admin, 'GET', `${path}/versions?limit=1000`);
        seen[resource.label] = { ...body, versions: (versions.data as JsonObject[]).map((item) => item.id) };
      } else if (resource.kind === 'agent') {
        const versions = await must(admin, 'GET', `${path}/versions?limit=1000`);
        seen[resource.label] = { ...body, versionCount: (versions.data as unknown[]).length };
      } else {
        seen[resource.label] = body;
      }
    }
    for (const world of worlds) {
      for (const listing of [
        '/v1/users',
        '/v1/api_keys',
        '/v1/agents?limit=1000&include_archived=true',
        '/v1/environments?limit=1000&include_archived=true',
        '/v1/vaults?limit=1000&include_archived=true',
        '/v1/skills?limit=1000',
        '/v1/sessions?limit=1000&include_archived=true',
      ]) {
        const listed = await must(world.admin.key, 'GET', listing);
        seen[`${world.name} ${listing}`] = (listed.data as JsonObject[]).map((item) => item.id).sort();
      }
    }
    return seen;
  }

  /** Why an answer is not the plain 404 a missing resource gets, or undefined when it is. */
  async function notFoundProblem(
    answer: Answer,
    caller: Party,
    method: string,
    path: string,
    target: Resource,
    body: unknown,
  ): Promise<string | undefined> {
    const error = answer.body?.error as JsonObject | undefined;
    if (answer.status !== 404 || answer.body?.type !== 'error' || error?.type !== 'not_found_error') {
      return `${answer.status} ${JSON.stringify(answer.body ?? answer.contentType).slice(0, 160)}`;
    }
    // Indistinguishable from an id that never existed: same status, type and message.
    const missingId = newId(idPrefixByKind[target.kind]);
    const missing = await request(caller.key, method, fill(path, missingId, target.parentId), body);
    const expected = String((missing.body?.error as JsonObject | undefined)?.message).replaceAll(
      missingId,
      target.id,
    );
    if (missing.status !== 404 || error.message !== expected) {
      return `404 "${String(error.message)}" differs from a missing id's ${missing.status} "${expected}"`;
    }
    return undefined;
  }

  /** Why a 2xx was expected and not given (streams must open as SSE), or undefined. */
  function successProblem(answer: Answer, path: string): string | undefined {
    if (path.endsWith('/stream')) {
      if (answer.status === 200 && answer.contentType.startsWith('text/event-stream')) return undefined;
      return `${answer.status} ${answer.contentType} ${JSON.stringify(answer.body ?? '').slice(0, 160)}`;
    }
    if (answer.status >= 200 && answer.status < 300 && answer.body?.type !== 'error') return undefined;
    return `${answer.status} ${JSON.stringify(answer.body).slice(0, 160)}`;
  }

  const describeCase = (caller: Party, method: string, path: string, target?: Resource) =>
    `${caller.name}: ${method} ${path}${target ? ` on ${target.label}` : ''}`;

  /** Runs cases that must answer 404 and returns every one that did not. */
  async function runRefused(cases: MatrixCase[]): Promise<string[]> {
    const problems: string[] = [];
    for (const { caller, method, path, rule, target } of cases) {
      const body = await rule.body?.(target);
      const answer = await request(caller.key, method, fill(path, target.id, target.parentId), body);
      const problem = await notFoundProblem(answer, caller, method, path, target, body);
      if (problem) problems.push(`${describeCase(caller, method, path, target)} → ${problem}`);
    }
    return problems;
  }

  beforeAll(async () => {
    oauth = await startFakeOAuthServer({
      auth: 'none',
      clientId: 'matrix',
      refreshToken: 'matrix-refresh',
      accessToken: 'matrix-access',
    });
    berth = await startTestBerth(
      storeKind === 'postgres' ? { database: await createTestDatabase(inject('postgresUrl')) } : {},
    );
    worlds = [await buildWorld('A'), await buildWorld('B')];
    parties = worlds.flatMap((world) => [world.admin, ...world.members]);
    resources = [];
    for (const world of worlds) {
      const tenant = { tenantId: world.tenantId };
      resources.push(
        { ...tenant, kind: 'agent', id: world.agentId, ownerId: null, label: `${world.name} agent` },
        {
          ...tenant,
          kind: 'environment',
          id: world.environmentId,
          ownerId: null,
          label: `${world.name} environment`,
        },
        {
          ...tenant,
          kind: 'vault',
          id: world.vaultId,
          ownerId: null,
          creatorId: world.members[0].userId,
          label: `${world.name} vault`,
        },
        { ...tenant, kind: 'skill', id: world.skillId, ownerId: null, label: `${world.name} skill` },
        {
          ...tenant,
          kind: 'credential',
          // Made by the vault's creator: the whole tenant sees it; admins and that member change it.
          id: await credentialIn(world.members[0].key, world.vaultId, `${world.name} credential`),
          ownerId: null,
          creatorId: world.members[0].userId,
          label: `${world.name} credential`,
          parentId: world.vaultId,
        },
        {
          ...tenant,
          kind: 'credential',
          // Put in the member's vault by the admin: not the vault's creator's to change.
          id: await credentialIn(world.admin.key, world.vaultId, `${world.name} admin's credential`),
          ownerId: null,
          creatorId: world.admin.userId,
          label: `${world.name} admin's credential`,
          parentId: world.vaultId,
        },
      );
      for (const party of [world.admin, ...world.members]) {
        // Sessions of the admin and the first member have a turn behind them, so events exist.
        const talk = party !== world.members[1];
        resources.push(
          {
            ...tenant,
            kind: 'session',
            id: await sessionOf(party, talk),
            ownerId: party.userId,
            label: `${party.name}'s session`,
          },
          { ...tenant, kind: 'user', id: party.userId, ownerId: party.userId, label: `${party.name} (user)` },
          {
            ...tenant,
            kind: 'api_key',
            id: party.keyId,
            ownerId: party.userId,
            label: `${party.name}'s key`,
          },
        );
      }
    }

    matrix = [];
    for (const { method, path } of berth.routes) {
      const rule = ruleOf(method, path);
      if (rule?.type !== 'by-id') continue;
      const kind = kindOfPath(path);
      for (const caller of parties) {
        for (const target of resources.filter((resource) => resource.kind === kind)) {
          const visible = canSee(caller, target);
          matrix.push({
            caller,
            method,
            path,
            rule,
            target,
            visible,
            allowed: visible && mayUse(caller, target, rule),
          });
        }
      }
    }
    before = await snapshot();
  });
  afterAll(async () => {
    await berth?.dispose();
    await oauth?.close();
  });

  it('knows every route of the API, so none escapes the matrix', () => {
    const served = berth.routes.map(({ method, path }) => `${method} ${path}`);
    expect(served.filter((route) => routeRules[route] === undefined)).toEqual([]);
    // Routes with an id name a kind of resource the matrix can fill in, and are rules by id.
    for (const { method, path } of berth.routes.filter((route) => route.path.includes(':id'))) {
      expect(kindOfPath(path), `${method} ${path}`).toBeDefined();
      expect(ruleOf(method, path)?.type, `${method} ${path}`).toBe('by-id');
    }
    // No stale rules: the table describes the server as it is.
    expect(Object.keys(routeRules).filter((route) => !served.includes(route))).toEqual([]);
    // Each id route is tried both ways: refused for strangers and allowed for owners.
    for (const route of served.filter((route) => route.includes(':id'))) {
      const cases = matrix.filter((entry) => `${entry.method} ${entry.path}` === route);
      expect(
        cases.some((entry) => !entry.visible && entry.caller.tenantId !== entry.target.tenantId),
        route,
      ).toBe(true);
      expect(
        cases.some((entry) => entry.visible),
        route,
      ).toBe(true);
    }
  });

  it("answers 404 to every key of one tenant, admin's or member's, on every route and stream naming the other tenant's resources", async () => {
    const cases = matrix.filter((entry) => entry.caller.tenantId !== entry.target.tenantId);
    expect(cases.every((entry) => !entry.visible)).toBe(true);
    expect(await runRefused(cases)).toEqual([]);
  });

  it("answers 404 to a member on every route naming another member's or the admin's sessions, user or keys", async () => {
    const cases = matrix.filter((entry) => entry.caller.tenantId === entry.target.tenantId && !entry.visible);
    expect(cases.every((entry) => entry.caller.role === 'member')).toBe(true);
    expect(cases.some((entry) => entry.target.kind === 'session')).toBe(true);
    expect(await runRefused(cases)).toEqual([]);
  });

  it("refuses a request body naming another tenant's agent, environment or vault, or another user's id, exactly as a missing id", async () => {
    const problems: string[] = [];
    let tried = 0;
    for (const { method, path } of berth.routes) {
      const rule = ruleOf(method, path);
      if (rule?.type !== 'create') continue;
      for (const reference of rule.references ?? []) {
        for (const caller of parties) {
          for (const foreign of resources.filter((resource) => resource.kind === reference.kind)) {
            if (canSee(caller, foreign)) continue;
            tried++;
            const answer = await request(
              caller.key,
              method,
              path,
              reference.body(foreign.id, worldOf(caller.tenantId)),
            );
            const error = answer.body?.error as JsonObject | undefined;
            const status = reference.refusedWith ?? 404;
            const type = status === 404 ? 'not_found_error' : 'invalid_request_error';
            // Exactly what an id that never existed gets.
            const missingId = newId(idPrefixByKind[reference.kind]);
            const missing = await request(
              caller.key,
              method,
              path,
              reference.body(missingId, worldOf(caller.tenantId)),
            );
            const expected = String((missing.body?.error as JsonObject | undefined)?.message).replaceAll(
              missingId,
              foreign.id,
            );
            if (answer.status !== status || error?.type !== type || error?.message !== expected) {
              problems.push(
                `${describeCase(caller, method, path, foreign)} → ${answer.status} ${JSON.stringify(answer.body)}`,
              );
            }
          }
        }
      }
    }
    expect(tried).toBeGreaterThan(0);
    expect(problems).toEqual([]);
  });

  it("lists none of another tenant's or another member's resources, even when filtered by their ids", async () => {
    const problems: string[] = [];
    for (const { method, path } of berth.routes) {
      const rule = ruleOf(method, path);
      if (rule?.type !== 'listing') continue;
      for (const caller of parties) {
        const answer = await request(caller.key, method, `${path}?limit=1000&include_archived=true`);
        if (rule.adminOnly && caller.role !== 'admin') {
          // Not someone else's resource: a collection members may not list at all.
          if (answer.status !== 403 || (answer.body?.error as JsonObject)?.type !== 'permission_error') {
            problems.push(`${describeCase(caller, method, path)} → ${answer.status}, expected 403`);
          }
          continue;
        }
        const listed = new Set(((answer.body?.data ?? []) as JsonObject[]).map((item) => item.id));
        for (const resource of resources.filter((resource) => resource.kind === rule.lists)) {
          if (listed.has(resource.id) !== canSee(caller, resource)) {
            problems.push(
              `${describeCase(caller, method, path)} ${listed.has(resource.id) ? 'shows' : 'hides'} ${resource.label}`,
            );
          }
        }
        for (const filter of rule.filters ?? []) {
          for (const foreign of resources.filter((resource) => resource.kind === filter.kind)) {
            if (canSee(caller, foreign)) continue;
            const filtered = await request(caller.key, method, `${path}?${filter.parameter}=${foreign.id}`);
            const data = filtered.body?.data as unknown[] | undefined;
            if (filtered.status !== 200 || data?.length !== 0) {
              problems.push(
                `${describeCase(caller, method, `${path}?${filter.parameter}=`, foreign)} → ${filtered.status} with ${data?.length} items`,
              );
            }
          }
        }
      }
    }
    // The usage report, grouped by session, covers exactly the sessions the caller may see.
    for (const caller of parties) {
      const answer = await request(caller.key, 'GET', '/v1/usage?by=session');
      const reported = new Set(((answer.body?.rows ?? []) as JsonObject[]).map((row) => row.group));
      for (const session of resources.filter((resource) => resource.kind === 'session')) {
        if (reported.has(session.id) !== canSee(caller, session)) {
          problems.push(
            `${describeCase(caller, 'GET', '/v1/usage?by=session')} ${reported.has(session.id) ? 'reports' : 'omits'} ${session.label}`,
          );
        }
      }
    }
    expect(problems).toEqual([]);
  });

  it('answers 403 permission_error to a member who sees a vault, credential or user but may not change it', async () => {
    const cases = matrix.filter((entry) => entry.visible && !entry.allowed);
    expect(cases.every((entry) => entry.caller.role === 'member')).toBe(true);
    // The attack of issue 14 (another member re-points a member's credential), and the vault's
    // creator re-pointing a credential an admin put in their vault.
    const updates = cases.filter((entry) => entry.path === '/v1/vaults/:vault_id/credentials/:id');
    const firstMember = (entry: MatrixCase) => worldOf(entry.caller.tenantId).members[0].userId;
    expect(updates.some((entry) => entry.target.creatorId === firstMember(entry))).toBe(true);
    expect(updates.some((entry) => entry.caller.userId === firstMember(entry))).toBe(true);
    const problems: string[] = [];
    for (const { caller, method, path, rule, target } of cases) {
      const body = await rule.body?.(target);
      const answer = await request(caller.key, method, fill(path, target.id, target.parentId), body);
      const error = answer.body?.error as JsonObject | undefined;
      if (answer.status !== 403 || answer.body?.type !== 'error' || error?.type !== 'permission_error') {
        problems.push(
          `${describeCase(caller, method, path, target)} → ${answer.status} ${JSON.stringify(answer.body).slice(0, 160)}`,
        );
      }
    }
    expect(problems).toEqual([]);
  });

  it('leaves every session, event log, agent version, environment, user and key the refused requests named unchanged', async () => {
    expect(await snapshot()).toEqual(before);
  });

  it('lets owners and their tenant admins use every route on their own resources, streams included', async () => {
    const problems: string[] = [];
    const allowed = matrix.filter((entry) => entry.allowed);
    // Routes that retire their target run last, each on a fresh resource like the one it names.
    const ordered = [
      ...allowed.filter((entry) => !entry.rule.retires),
      ...allowed.filter((entry) => entry.rule.retires),
    ];
    for (const { caller, method, path, rule, target: named } of ordered) {
      const target = rule.retires ? await throwawayLike(named) : named;
      const answer = await request(
        caller.key,
        method,
        fill(path, target.id, target.parentId),
        await rule.body?.(target),
      );
      const problem = successProblem(answer, path);
      if (problem) problems.push(`${describeCase(caller, method, path, target)} → ${problem}`);
      if (method === 'POST' && path.endsWith('/events') && answer.status === 200) {
        await settle(partyOf(target.ownerId!), target.id);
      }
    }
    expect(problems).toEqual([]);
    // Tenant admins reached their members' sessions; members reached only their own.
    expect(
      allowed.some(
        (entry) =>
          entry.caller.role === 'admin' &&
          entry.target.kind === 'session' &&
          entry.target.ownerId !== entry.caller.userId,
      ),
    ).toBe(true);
  });

  it('lets every key create in, list and describe its own tenant; members get 403 only on admin-only collections', async () => {
    const problems: string[] = [];
    for (const { method, path } of berth.routes) {
      const rule = ruleOf(method, path);
      if (rule === undefined || rule.type === 'by-id') continue;
      for (const caller of parties) {
        const home = worldOf(caller.tenantId);
        const bodies: JsonObject[] = [];
        if (rule.type === 'create') {
          bodies.push(rule.body(home));
          for (const reference of rule.references ?? []) {
            for (const own of resources.filter((resource) => resource.kind === reference.kind)) {
              if (canSee(caller, own)) bodies.push(reference.body(own.id, home));
            }
          }
        }
        for (const body of bodies.length > 0 ? bodies : [undefined]) {
          const answer = await request(
            path === '/health' || path === '/metrics' ? undefined : caller.key,
            method,
            path,
            body,
          );
          if (
            (rule.type === 'create' || rule.type === 'listing') &&
            rule.adminOnly &&
            caller.role !== 'admin'
          ) {
            if (answer.status !== 403 || (answer.body?.error as JsonObject)?.type !== 'permission_error') {
              problems.push(`${describeCase(caller, method, path)} → ${answer.status}, expected 403`);
            }
            continue;
          }
          const problem = successProblem(answer, path);
          if (problem)
            problems.push(`${describeCase(caller, method, path)} ${JSON.stringify(body)} → ${problem}`);
          if (path === '/v1/me') {
            const tenant = answer.body?.tenant as JsonObject;
            const user = answer.body?.user as JsonObject;
            if (tenant?.id !== caller.tenantId || user?.id !== caller.userId) {
              problems.push(`${describeCase(caller, method, path)} describes someone else`);
            }
          }
        }
      }
    }
    expect(problems).toEqual([]);
  });
});
