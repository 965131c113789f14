import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { openStore } from '../store/open-store.js';
import type { Store } from '../store/resource-store.js';
import { Authenticator, createTenantWithAdmin, hashApiKey } from './api-keys.js';

describe('Authenticator', () => {
  let directory: string;
  let store: Store;

  beforeEach(async () => {
    directory = await mkdtemp(join(tmpdir(), 'berth-keys-'));
    store = await openStore({ kind: 'sqlite', path: join(directory, 'berth.db') });
  });
  afterEach(async () => {
    await store.close();
    await rm(directory, { recursive: true, force: true });
  });

  it('ends a stream that registers just after its key was revoked (the request was authenticated before)', async () => {
    const { key, keyRecord } = await createTenantWithAdmin(store.resources, { name: 'acme' });
    const authenticator = new Authenticator(store.resources);
    const principal = (await authenticator.authenticate(key))!;
    expect(principal).toMatchObject({ role: 'admin', keyId: keyRecord.id });

    const revoked = (await store.resources.revokeApiKey(
      principal.tenantId,
      keyRecord.id,
      new Date().toISOString(),
    ))!;
    authenticator.revoked(revoked);
    let ended = false;
    authenticator.hold(principal, () => {
      ended = true;
    });
    await Promise.resolve();
    expect(ended).toBe(true);
    expect(await authenticator.authenticate(key)).toBeUndefined();
  });

  it('sees a revocation made by another process once its cached entry ages out', async () => {
    const { key, keyRecord } = await createTenantWithAdmin(store.resources, { name: 'acme' });
    const authenticator = new Authenticator(store.resources);
    const now = Date.now();
    expect(await authenticator.authenticate(key, new Date(now))).toBeDefined();
    // Another node revokes it directly in the store: this process does not hear of it.
    await store.resources.revokeApiKey(keyRecord.tenantId, keyRecord.id, new Date(now).toISOString());
    expect(await authenticator.authenticate(key, new Date(now + 5_000))).toBeDefined();
    expect(await authenticator.authenticate(key, new Date(now + 10_001))).toBeUndefined();
    expect((await store.resources.findApiKeyByHash(hashApiKey(key)))?.revokedAt).not.toBeNull();
  });
});
