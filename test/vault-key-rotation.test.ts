import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { isBerthError } from '../src/errors.js';
import { createTenantWithAdmin } from '../src/identity/api-keys.js';
import type { SessionCredential } from '../src/vault/credentials.js';
import { formatVaultKey, generateVaultKey, type VaultKeySpec } from '../src/vault/keyring.js';
import { berthCli } from './support/berth-cli.js';
import { startTestBerth, type TestBerth } from './support/berth-instance.js';
import { type BerthProcess, startBerthProcess } from './support/berth-process.js';
import { createTestDatabase } from './support/postgres-database.js';

const keyA = generateVaultKey(new Date('2025-01-01T00:00:00Z'));
const keyB = generateVaultKey(new Date('2026-01-01T00:00:00Z'));
const keys = (...list: VaultKeySpec[]) => ({
  BERTH_VAULT_KEYS: list.map(formatVaultKey).join(','),
  BERTH_SANDBOX_WARM_POOL: '0',
});
/** Credentials made under key A, so rotation has real work to do. */
const FILLER = 120;

/** The values a session's credentials hand the runtime, by variable name or server URL. */
async function revealed(credentials: SessionCredential[]): Promise<Record<string, string>> {
  const values: Record<string, string> = {};
  for (const credential of credentials) {
    if (credential.type === 'environment_variable')
      values[credential.secretName] = credential.secretValue.reveal();
    else if (credential.type === 'static_bearer') values[credential.mcpServerUrl] = credential.token.reveal();
    else values[credential.mcpServerUrl] = (await credential.accessToken()).reveal();
  }
  return values;
}

/**
 * Key rotation without downtime: secrets sealed under key A; servers restarted with keys B,A
 * keep serving (and sealing under B) while `berth vault rotate-key` re-seals everything; a
 * server with only key B then reads every secret. Without the right key, or with altered
 * ciphertext, the vault says which key and which credential, and never returns garbage.
 */
describe('vault key rotation', () => {
  let dataDir: string;
  let sessionId: string;
  let vaultId: string;
  let variableId: string;
  let oauthId: string;
  const expected: Record<string, string> = {
    ROTATION_TOKEN: 'rotation-value-one',
    'https://mcp.rotation.example/mcp': 'rotation-bearer',
    'https://oauth.rotation.example/mcp': 'rotation-access',
  };

  const api = async (
    server: { url: string; apiKey: string },
    method: string,
    path: string,
    body?: unknown,
  ) => {
    const response = await fetch(`${server.url}${path}`, {
      method,
      headers: { 'x-api-key': server.apiKey, 'content-type': 'application/json' },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const json = (await response.json()) as { id: string; [field: string]: unknown };
    if (response.status !== 200)
      throw new Error(`${method} ${path}: ${response.status} ${JSON.stringify(json)}`);
    return json;
  };

  beforeAll(async () => {
    dataDir = await mkdtemp(join(tmpdir(), 'berth-rotation-'));
    const first = await startBerthProcess({ dataDir, environment: keys(keyA) });
    try {
      vaultId = (await api(first, 'POST', '/v1/vaults', { display_name: 'rotation' })).id;
      const credentials = `/v1/vaults/${vaultId}/credentials`;
      variableId = (
        await api(first, 'POST', credentials, {
          auth: {
            type: 'environment_variable',
            secret_name: 'ROTATION_TOKEN',
            secret_value: expected.ROTATION_TOKEN,
            networking: { type: 'limited', allowed_hosts: ['api.rotation.example'] },
          },
        })
      ).id;
      await api(first, 'POST', credentials, {
        auth: {
          type: 'static_bearer',
          token: 'rotation-bearer',
          mcp_server_url: 'https://mcp.rotation.example/mcp',
        },
      });
      oauthId = (
        await api(first, 'POST', credentials, {
          auth: {
            type: 'mcp_oauth',
            access_token: 'rotation-access',
            mcp_server_url: 'https://oauth.rotation.example/mcp',
          },
        })
      ).id;
      const filler = (await api(first, 'POST', '/v1/vaults', { display_name: 'filler' })).id;
      for (let index = 0; index < FILLER; index++) {
        await api(first, 'POST', `/v1/vaults/${filler}/credentials`, {
          auth: {
            type: 'environment_variable',
            secret_name: `FILLER_${index}`,
            secret_value: `filler-${index}`,
            networking: { type: 'unrestricted' },
          },
        });
      }
      const agent = await api(first, 'POST', '/v1/agents', { name: 'rotation', model: 'scripted/echo' });
      const environment = await api(first, 'POST', '/v1/environments', { name: 'rotation' });
      sessionId = (
        await api(first, 'POST', '/v1/sessions', {
          agent: agent.id,
          environment_id: environment.id,
          vault_ids: [vaultId],
        })
      ).id;
    } finally {
      await first.stop();
    }
  });
  afterAll(async () => rm(dataDir, { recursive: true, force: true }));

  it('re-seals every secret under the new key while a server with both keys keeps serving', async () => {
    const before = await berthCli(
      ['vault', 'status', '--json', '--data-dir', dataDir],
      undefined,
      keys(keyB, keyA),
    );
    expect(JSON.parse(before.stdout)).toMatchObject({
      current_key_id: keyB.id,
      key_ids: [keyB.id, keyA.id],
      by_key: { [keyA.id]: FILLER + 3 },
    });

    const server: BerthProcess = await startBerthProcess({ dataDir, environment: keys(keyB, keyA) });
    try {
      // Traffic that opens and seals secrets, for as long as the rotation runs.
      let rotating = true;
      const failures: string[] = [];
      let served = 0;
      const traffic = (async () => {
        let round = 0;
        while (rotating) {
          round++;
          try {
            await api(server, 'POST', `/v1/vaults/${vaultId}/credentials/${variableId}`, {
              auth: { type: 'environment_variable', secret_value: `rotation-value-${round}` },
            });
            expected.ROTATION_TOKEN = `rotation-value-${round}`;
            await api(server, 'POST', `/v1/vaults/${vaultId}/credentials/${oauthId}`, {
              auth: { type: 'mcp_oauth', access_token: `rotation-access-${round}` },
            });
            expected['https://oauth.rotation.example/mcp'] = `rotation-access-${round}`;
            await api(server, 'GET', `/v1/sessions/${sessionId}`);
            served += 3;
          } catch (error) {
            failures.push(String(error));
          }
        }
      })();
      const rotation = await berthCli(
        ['vault', 'rotate-key', '--data-dir', dataDir],
        undefined,
        keys(keyB, keyA),
      );
      rotating = false;
      await traffic;

      expect(rotation.code, rotation.stderr).toBe(0);
      expect(rotation.stderr).toContain(`Re-sealing under vault key ${keyB.id}`);
      expect(rotation.stderr).toContain(`older keys: ${keyA.id}`);
      expect(rotation.stderr).toMatch(/tenant default \(tnt_default\): \d+ re-sealed/);
      expect(rotation.stdout).toMatch(/Re-sealed \d+ credentials in 1 tenants/);
      expect(rotation.stdout).toContain('0 failed');
      expect(rotation.stdout).toContain(`Credentials per key now: ${keyB.id} (current): ${FILLER + 3}`);
      expect(rotation.stdout).toContain(`${keyA.id} can be removed`);
      expect(failures).toEqual([]);
      expect(served).toBeGreaterThan(0);
    } finally {
      await server.stop();
    }
    const after = await berthCli(['vault', 'status', '--json', '--data-dir', dataDir], undefined, keys(keyB));
    expect(JSON.parse(after.stdout).by_key).toEqual({ [keyB.id]: FILLER + 3 });
  });

  it('serves every secret from a server restarted with only the new key', async () => {
    const berth: TestBerth = await startTestBerth({ dataDir, environment: keys(keyB) });
    try {
      expect(await revealed(await berth.vault.credentialsForSession(berth.keyOf(sessionId)))).toEqual(
        expected,
      );
      // Updates that open the stored secret work too.
      await api(berth, 'POST', `/v1/vaults/${vaultId}/credentials/${oauthId}`, {
        auth: { type: 'mcp_oauth', expires_at: new Date(Date.now() + 3600_000).toISOString() },
      });
    } finally {
      await berth.dispose();
    }
  });

  it('says which key is missing, or which key failed to open which credential, and never returns garbage', async () => {
    const onlyOld = await startTestBerth({ dataDir, environment: keys(keyA) });
    try {
      const error = await onlyOld.vault
        .credentialsForSession(onlyOld.keyOf(sessionId))
        .catch((caught) => caught);
      expect(isBerthError(error, 'vault_failed')).toBe(true);
      expect(error.message).toContain(`sealed with vault key "${keyB.id}", which is not configured here`);
      expect(error.message).toContain(`configured: ${keyA.id}`);
      // Over the API: a clear 500 naming the key, and nothing changed.
      const response = await fetch(`${onlyOld.url}/v1/vaults/${vaultId}/credentials/${variableId}`, {
        method: 'POST',
        headers: { 'x-api-key': onlyOld.apiKey, 'content-type': 'application/json' },
        body: JSON.stringify({ auth: { type: 'environment_variable', secret_value: 'never-stored' } }),
      });
      expect(response.status).toBe(500);
      expect(await response.json()).toMatchObject({
        type: 'error',
        error: { type: 'api_error', message: expect.stringContaining(`vault key "${keyB.id}"`) },
      });
    } finally {
      await onlyOld.dispose();
    }

    const wrongMaterial = { id: keyB.id, material: keyA.material };
    const impostor = await startTestBerth({ dataDir, environment: keys(wrongMaterial) });
    try {
      const error = await impostor.vault
        .credentialsForSession(impostor.keyOf(sessionId))
        .catch((caught) => caught);
      expect(isBerthError(error, 'vault_failed')).toBe(true);
      expect(error.message).toContain(`failed authentication under vault key "${keyB.id}"`);
    } finally {
      await impostor.dispose();
    }

    // The right key again: it all still opens.
    const berth = await startTestBerth({ dataDir, environment: keys(keyB) });
    try {
      expect(await revealed(await berth.vault.credentialsForSession(berth.keyOf(sessionId)))).toEqual(
        expected,
      );
    } finally {
      await berth.dispose();
    }
  });

  it('detects a tampered ciphertext, and one moved from another credential', async () => {
    const database = new Database(join(dataDir, 'berth.db'));
    const sealedOf = (id: string) =>
      (
        database.prepare('SELECT sealed_secret FROM vault_credentials WHERE id = ?').get(id) as {
          sealed_secret: string;
        }
      ).sealed_secret;
    const original = sealedOf(variableId);
    const parts = original.split('.');
    const body = Buffer.from(parts[3]!, 'base64url');
    body[body.length - 20]! ^= 0x01;
    const tampered = [...parts.slice(0, 3), body.toString('base64url')].join('.');
    const write = (id: string, sealed: string) =>
      database.prepare('UPDATE vault_credentials SET sealed_secret = ? WHERE id = ?').run(sealed, id);
    try {
      for (const [label, sealed] of [
        ['a flipped bit', tampered],
        ["another credential's ciphertext", sealedOf(oauthId)],
      ] as const) {
        write(variableId, sealed);
        const berth = await startTestBerth({ dataDir, environment: keys(keyB) });
        try {
          const error = await berth.vault
            .credentialsForSession(berth.keyOf(sessionId))
            .catch((caught) => caught);
          expect(isBerthError(error, 'vault_failed'), label).toBe(true);
          expect(error.message, label).toContain(`the secret of ${variableId} failed authentication`);
        } finally {
          await berth.dispose();
        }
      }
    } finally {
      write(variableId, original);
      database.close();
    }
  });
});

describe('vault key rotation on PostgreSQL', () => {
  it("re-seals every tenant's credentials through row-level security, and a server with only the new key reads them", async () => {
    const database = await createTestDatabase(inject('postgresUrl'));
    const dataDir = await mkdtemp(join(tmpdir(), 'berth-rotation-pg-'));
    const sessions: { tenantId: string; id: string; value: string }[] = [];
    try {
      const first = await startTestBerth({ database, dataDir, environment: keys(keyA) });
      try {
        for (const name of ['north', 'south']) {
          const { tenant, key } = await createTenantWithAdmin(first.store.resources, { name });
          const admin = { url: first.url, apiKey: key };
          const call = async (path: string, body: unknown) => {
            const response = await fetch(`${admin.url}${path}`, {
              method: 'POST',
              headers: { 'x-api-key': admin.apiKey, 'content-type': 'application/json' },
              body: JSON.stringify(body),
            });
            expect(response.status).toBe(200);
            return (await response.json()) as { id: string };
          };
          const vault = await call('/v1/vaults', { display_name: name });
          const value = `${name}-secret`;
          await call(`/v1/vaults/${vault.id}/credentials`, {
            auth: {
              type: 'environment_variable',
              secret_name: 'TENANT_SECRET',
              secret_value: value,
              networking: { type: 'unrestricted' },
            },
          });
          const agent = await call('/v1/agents', { name, model: 'scripted/echo' });
          const environment = await call('/v1/environments', { name });
          const session = await call('/v1/sessions', {
            agent: agent.id,
            environment_id: environment.id,
            vault_ids: [vault.id],
          });
          sessions.push({ tenantId: tenant.id, id: session.id, value });
        }
      } finally {
        await first.dispose();
      }

      const rotation = await berthCli(
        ['vault', 'rotate-key', '--json', '--database', database.url, '--data-dir', dataDir],
        undefined,
        {
          ...keys(keyB, keyA),
          BERTH_DATABASE_MIGRATION_URL: database.migrationUrl,
        },
      );
      expect(rotation.code, rotation.stderr).toBe(0);
      const report = JSON.parse(rotation.stdout);
      expect(report).toMatchObject({ keyId: keyB.id, resealed: 2, failures: [], byKey: { [keyB.id]: 2 } });
      expect(rotation.stderr).toMatch(/tenant north \(tnt_\w+\): 1 re-sealed/);
      expect(rotation.stderr).toMatch(/tenant south \(tnt_\w+\): 1 re-sealed/);

      const restarted = await startTestBerth({ database, dataDir, environment: keys(keyB) });
      try {
        for (const session of sessions) {
          const [credential] = await restarted.vault.credentialsForSession(session);
          expect(credential?.type === 'environment_variable' && credential.secretValue.reveal()).toBe(
            session.value,
          );
        }
      } finally {
        await restarted.dispose();
      }
    } finally {
      await rm(dataDir, { recursive: true, force: true });
    }
  });
});
