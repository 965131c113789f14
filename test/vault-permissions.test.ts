import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startTestBerth, type TestBerth } from './support/berth-instance.js';

/**
 * Who may change a vault or a credential (`identity/access.ts` `mayChangeVaultItem`): the
 * tenant's admins and the item's creator. Other members use vaults (attach them to their own
 * sessions) but never rewrite where someone else's secret may go, nor archive or delete it.
 * The attack of issue 14: a member turns another member's credential to `unrestricted` with
 * body injection, attaches the vault to a session of their own (so the secret could be sent
 * anywhere from that sandbox) and archives it to cover the trail.
 */
describe('who may change a vault or a credential', () => {
  let berth: TestBerth;
  let agentId: string;
  let environmentId: string;

  const request = (key: string, method: string, path: string, body?: unknown) =>
    fetch(`${berth.url}${path}`, {
      method,
      headers: { 'x-api-key': key, 'content-type': 'application/json' },
      body: body === undefined ? undefined : JSON.stringify(body),
    });

  async function json<T = Record<string, unknown>>(response: Response, status = 200): Promise<T> {
    const text = await response.text();
    expect(response.status, text).toBe(status);
    return JSON.parse(text) as T;
  }

  async function newMember(name: string): Promise<{ id: string; key: string }> {
    const user = await json<{ id: string }>(
      await request(berth.apiKey, 'POST', '/v1/users', { name, role: 'member' }),
    );
    const key = await json<{ key: string }>(
      await request(berth.apiKey, 'POST', '/v1/api_keys', { name, user_id: user.id }),
    );
    return { id: user.id, key: key.key };
  }

  /** A 403 in the Anthropic error shape. */
  async function expectForbidden(response: Response): Promise<void> {
    const body = await json<{ type: string; error: { type: string; message: string } }>(response, 403);
    expect(body.type).toBe('error');
    expect(body.error.type).toBe('permission_error');
  }

  beforeAll(async () => {
    berth = await startTestBerth();
    agentId = (await berth.client.beta.agents.create({ name: 'vault-user', model: 'scripted/echo' })).id;
    environmentId = (await berth.client.beta.environments.create({ name: 'vault-user' })).id;
  });
  afterAll(async () => berth?.dispose());

  const limitedCredential = {
    display_name: 'deploy token',
    auth: {
      type: 'environment_variable',
      secret_name: 'DEPLOY_TOKEN',
      secret_value: 'alice-secret-value',
      networking: { type: 'limited', allowed_hosts: ['api.example.com'] },
      injection_location: { header: true, body: false },
    },
  };

  it("refuses a member re-pointing, archiving or deleting another member's credential or vault; nothing changes", async () => {
    const alice = await newMember('alice');
    const mallory = await newMember('mallory');
    const vault = await json<{ id: string }>(
      await request(alice.key, 'POST', '/v1/vaults', { display_name: 'alice vault' }),
    );
    const credential = await json<{ id: string }>(
      await request(alice.key, 'POST', `/v1/vaults/${vault.id}/credentials`, limitedCredential),
    );
    const path = `/v1/vaults/${vault.id}/credentials/${credential.id}`;
    const storedBefore = await berth.store.vaults.getCredential('tnt_default', vault.id, credential.id);

    // The attack: send the secret anywhere, in request bodies too.
    await expectForbidden(
      await request(mallory.key, 'POST', path, {
        auth: {
          type: 'environment_variable',
          networking: { type: 'unrestricted' },
          injection_location: { header: true, body: true },
        },
      }),
    );
    // A new secret value, or only metadata: refused as well (any change is a change).
    await expectForbidden(
      await request(mallory.key, 'POST', path, {
        auth: { type: 'environment_variable', secret_value: 'mallory-controlled' },
      }),
    );
    await expectForbidden(await request(mallory.key, 'POST', path, { metadata: { owner: 'mallory' } }));
    await expectForbidden(await request(mallory.key, 'POST', `${path}/archive`));
    await expectForbidden(await request(mallory.key, 'DELETE', path));
    // Nor can the vault itself be renamed, archived, deleted, or given a credential that would
    // take the place of Alice's in a session (a second one is refused; Mallory's own vault listed
    // first in vault_ids wins anyway, and is Mallory's to fill).
    await expectForbidden(
      await request(mallory.key, 'POST', `/v1/vaults/${vault.id}`, { display_name: 'mallory vault' }),
    );
    await expectForbidden(await request(mallory.key, 'POST', `/v1/vaults/${vault.id}/archive`));
    await expectForbidden(await request(mallory.key, 'DELETE', `/v1/vaults/${vault.id}`));
    await expectForbidden(
      await request(mallory.key, 'POST', `/v1/vaults/${vault.id}/credentials`, {
        auth: {
          type: 'static_bearer',
          token: 'mallory-token',
          mcp_server_url: 'https://mcp.example.com/mcp',
        },
      }),
    );
    // Bad input from someone who may not write is still a 403: nothing is parsed for them.
    await expectForbidden(await request(mallory.key, 'POST', path, { auth: { type: 'nonsense' } }));

    const storedAfter = await berth.store.vaults.getCredential('tnt_default', vault.id, credential.id);
    expect(storedAfter).toEqual(storedBefore);
    const vaultAfter = await json<{ display_name: string; archived_at: string | null }>(
      await request(alice.key, 'GET', `/v1/vaults/${vault.id}`),
    );
    expect(vaultAfter).toMatchObject({ display_name: 'alice vault', archived_at: null });
    const listed = await json<{ data: { id: string }[] }>(
      await request(alice.key, 'GET', `/v1/vaults/${vault.id}/credentials`),
    );
    expect(listed.data.map((item) => item.id)).toEqual([credential.id]);

    // Members use vaults: Mallory still reads the (secret-free) credential and attaches the
    // vault to a session of her own, where the secret goes only to api.example.com.
    const seen = await json<{ auth: { networking: unknown } }>(await request(mallory.key, 'GET', path));
    expect(seen.auth.networking).toEqual({ type: 'limited', allowed_hosts: ['api.example.com'] });
    await json(
      await request(mallory.key, 'POST', '/v1/sessions', {
        agent: agentId,
        environment_id: environmentId,
        vault_ids: [vault.id],
      }),
    );
  });

  it("lets the creator and the tenant's admins change a credential, and keeps the vault's creator off an admin's credential", async () => {
    const bob = await newMember('bob');
    const vault = await json<{ id: string }>(
      await request(bob.key, 'POST', '/v1/vaults', { display_name: 'bob vault' }),
    );
    const own = await json<{ id: string }>(
      await request(bob.key, 'POST', `/v1/vaults/${vault.id}/credentials`, limitedCredential),
    );
    // The creator changes their own; an admin changes anyone's.
    await json(
      await request(bob.key, 'POST', `/v1/vaults/${vault.id}/credentials/${own.id}`, {
        metadata: { by: 'bob' },
      }),
    );
    await json(
      await request(berth.apiKey, 'POST', `/v1/vaults/${vault.id}/credentials/${own.id}`, {
        metadata: { by: 'admin' },
      }),
    );
    // A credential an admin put in Bob's vault is the admin's: Bob cannot re-point it.
    const admins = await json<{ id: string }>(
      await request(berth.apiKey, 'POST', `/v1/vaults/${vault.id}/credentials`, {
        auth: {
          type: 'environment_variable',
          secret_name: 'ADMIN_TOKEN',
          secret_value: 'admin-secret-value',
          networking: { type: 'limited', allowed_hosts: ['internal.example.com'] },
        },
      }),
    );
    await expectForbidden(
      await request(bob.key, 'POST', `/v1/vaults/${vault.id}/credentials/${admins.id}`, {
        auth: { type: 'environment_variable', networking: { type: 'unrestricted' } },
      }),
    );
    await expectForbidden(
      await request(bob.key, 'POST', `/v1/vaults/${vault.id}/credentials/${admins.id}/archive`),
    );
    // Bob's own vault stays his: he archives it.
    await json(await request(bob.key, 'POST', `/v1/vaults/${vault.id}/archive`));
  });
});
