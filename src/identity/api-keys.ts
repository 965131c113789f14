import { createHash, randomBytes } from 'node:crypto';
import { chmod, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { newId } from '../ids.js';
import type { ApiKeyRecord, ResourceStore } from '../store/resource-store.js';

/** Who is calling: resolved from the API key on every request. */
export interface Principal {
  tenantId: string;
  userId: string;
  role: 'admin' | 'member';
  keyId: string;
}

/** The tenant the first admin key belongs to (multi-tenancy builds on it later). */
export const DEFAULT_TENANT_ID = 'tnt_default';

/** SHA-256 of a key: the only form in which keys are stored. */
export function hashApiKey(key: string): string {
  return createHash('sha256').update(key, 'utf8').digest('hex');
}

/** A new random key; shown once, then only its hash exists. */
export function generateApiKey(): string {
  return `berth_sk_${randomBytes(24).toString('base64url')}`;
}

/**
 * Authenticates keys with a per-process cache of keys already seen (by hash), so a request
 * does not pay a database round trip for its key. Expiry is checked on every use. Keys cannot
 * be revoked yet; when revocation lands (issue 5) it must call `forget` here and, with several
 * nodes, broadcast it (LISTEN/NOTIFY) so every node forgets at once.
 */
export class Authenticator {
  readonly #resources: ResourceStore;
  readonly #known = new Map<string, ApiKeyRecord>();

  constructor(resources: ResourceStore) {
    this.#resources = resources;
  }

  /** The principal behind a presented key, or undefined (unknown, revoked or expired). */
  async authenticate(key: string, now = new Date()): Promise<Principal | undefined> {
    const hash = hashApiKey(key);
    let record = this.#known.get(hash);
    if (!record) {
      record = await this.#resources.findApiKeyByHash(hash);
      if (!record) return undefined;
      // Bounded: an attacker cannot grow it, only valid keys are cached.
      if (this.#known.size >= 10_000) this.#known.clear();
      this.#known.set(hash, record);
    }
    if (record.revokedAt) return undefined;
    if (record.expiresAt && new Date(record.expiresAt) <= now) return undefined;
    return { tenantId: record.tenantId, userId: record.userId, role: record.role, keyId: record.id };
  }

  /** Drops a key from the cache (after it was revoked or changed). */
  forget(hash: string): void {
    this.#known.delete(hash);
  }
}

/**
 * On first start with an empty key table, creates the admin key, stores only its hash and
 * writes the key to `<dataDir>/admin.key` with mode 0600. Returns the file path when it did.
 */
export async function ensureAdminKey(resources: ResourceStore, dataDir: string): Promise<string | undefined> {
  if ((await resources.countApiKeys()) > 0) return undefined;
  const key = generateApiKey();
  const record: ApiKeyRecord = {
    id: newId('key'),
    tenantId: DEFAULT_TENANT_ID,
    userId: 'user_admin',
    role: 'admin',
    hash: hashApiKey(key),
    name: 'admin',
    createdAt: new Date().toISOString(),
    expiresAt: null,
    revokedAt: null,
  };
  const path = join(dataDir, 'admin.key');
  await writeFile(path, `${key}\n`, { mode: 0o600 });
  await chmod(path, 0o600);
  await resources.createApiKey(record);
  return path;
}
