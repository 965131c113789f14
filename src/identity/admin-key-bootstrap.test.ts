import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { openStore } from '../store/open-store.js';
import type { Store } from '../store/resource-store.js';
import { ensureAdminKey, generateApiKey, hashApiKey } from './api-keys.js';

/** The first start's admin key (`ensureAdminKey`), on a real SQLite store and real files. */
describe('the admin key bootstrap', () => {
  let directory: string;
  let store: Store;
  const dataDir = (name: string) => join(directory, name);

  beforeEach(async () => {
    directory = await mkdtemp(join(tmpdir(), 'berth-admin-key-'));
    store = await openStore({ kind: 'sqlite', path: join(directory, 'berth.db') });
    for (const name of ['a', 'b', 'c']) await mkdir(dataDir(name));
  });
  afterEach(async () => {
    await store.close();
    await rm(directory, { recursive: true, force: true });
  });

  it('gives one start of several the key; the others say where it is and write no key file', async () => {
    const outcomes = await Promise.all(
      ['a', 'b', 'c'].map((name) =>
        ensureAdminKey(store.resources, dataDir(name), { label: `node ${name}` }),
      ),
    );
    const creators = outcomes.filter((outcome) => outcome.created);
    expect(creators).toHaveLength(1);
    const creator = creators[0]!;
    const creatorName = ['a', 'b', 'c'][outcomes.indexOf(creator)];
    const key = (await readFile(creator.file!, 'utf8')).trim();
    expect((await store.resources.findApiKeyByHash(hashApiKey(key)))?.role).toBe('admin');
    expect(await store.resources.countApiKeys()).toBe(1);
    for (const [index, outcome] of outcomes.entries()) {
      const name = ['a', 'b', 'c'][index]!;
      expect(existsSync(join(dataDir(name), 'admin.key.new'))).toBe(false);
      if (outcome === creator) continue;
      expect(outcome).toMatchObject({ created: false, file: undefined });
      expect(outcome.createdElsewhere).toBe(`node ${creatorName}`);
      expect(existsSync(join(dataDir(name), 'admin.key'))).toBe(false);
    }
    // A restart of the creator finds its file valid; nothing new is created.
    expect(await ensureAdminKey(store.resources, join(creator.file!, '..'))).toMatchObject({
      created: false,
      file: creator.file,
    });
    expect(await store.resources.countApiKeys()).toBe(1);
  });

  it('finishes a start that crashed after storing the key but before naming the file admin.key', async () => {
    const key = generateApiKey();
    await writeFile(join(dataDir('a'), 'admin.key.new'), `${key}\n`, { mode: 0o600 });
    const now = new Date().toISOString();
    await store.resources.createFirstApiKey({
      tenant: { id: 'tnt_default', name: 'default', createdAt: now, limits: null },
      user: { id: 'user_admin', tenantId: 'tnt_default', name: 'admin', role: 'admin', createdAt: now },
      key: {
        id: 'key_crashed',
        tenantId: 'tnt_default',
        userId: 'user_admin',
        hash: hashApiKey(key),
        name: 'admin',
        createdAt: now,
        expiresAt: null,
        revokedAt: null,
      },
    });
    const outcome = await ensureAdminKey(store.resources, dataDir('a'));
    expect(outcome.file).toBe(join(dataDir('a'), 'admin.key'));
    expect((await readFile(outcome.file!, 'utf8')).trim()).toBe(key);
    expect(existsSync(join(dataDir('a'), 'admin.key.new'))).toBe(false);
    expect(await store.resources.countApiKeys()).toBe(1);
  });

  it('reuses a key file a crash left before storing it, and warns about an admin.key the store does not know', async () => {
    const key = generateApiKey();
    await writeFile(join(dataDir('a'), 'admin.key.new'), `${key}\n`, { mode: 0o600 });
    const outcome = await ensureAdminKey(store.resources, dataDir('a'));
    expect(outcome.created).toBe(true);
    expect((await readFile(outcome.file!, 'utf8')).trim()).toBe(key);
    expect(await store.resources.findApiKeyByHash(hashApiKey(key))).toBeDefined();

    // A data directory holding some other database's key is reported, not trusted.
    await writeFile(join(dataDir('b'), 'admin.key'), `${generateApiKey()}\n`, { mode: 0o600 });
    expect(await ensureAdminKey(store.resources, dataDir('b'))).toMatchObject({
      created: false,
      file: undefined,
      unknownFile: join(dataDir('b'), 'admin.key'),
    });
  });
});
