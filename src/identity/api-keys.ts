import { createHash, randomBytes } from 'node:crypto';
import { open, readFile, rename, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { newId } from '../ids.js';
import type {
  ApiKeyRecord,
  PrincipalChange,
  ResourceStore,
  Role,
  TenantRecord,
  UserRecord,
} from '../store/resource-store.js';

/** Who is calling: resolved from the API key on every request. */
export interface Principal {
  tenantId: string;
  userId: string;
  role: Role;
  keyId: string;
  /** When the key stops working (ISO), or null. Open streams close then. */
  expiresAt: string | null;
}

/** The tenant the first admin key belongs to. */
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
 * Cached keys are re-read after this long. With several nodes, changes are also heard from the
 * database at once (`changed`); this bounds how long a change whose notice was lost can go
 * unseen.
 */
const CACHE_MAX_AGE_MS = 10_000;

/** Where an Authenticator hears principal changes made anywhere (a cluster's database). */
export interface PrincipalChangeSource {
  /** Calls the listener on every change (`Store.watchPrincipals`); returns the function that stops. */
  watch(listener: (change: PrincipalChange) => void): () => void;
  /** See `Store.principalAcknowledgements`. */
  acknowledgements(change: Exclude<PrincipalChange, { kind: 'missed' }>): {
    wait(others: number, timeoutMs: number): Promise<void>;
  };
  /** How many other nodes are live (each must acknowledge a change). */
  otherNodes(): Promise<number>;
}

/** Something long-lived held under a key: the principal it was opened as, and how to end it. */
interface Holder {
  principal: Principal;
  end: () => void;
}

/**
 * Authenticates keys with a per-process cache of keys already seen (by hash, with their
 * tenant, user and role), so a request does not pay a database round trip for its key.
 * Expiry is checked on every use. A revocation made through this process applies at once:
 * `revoked` drops the key and ends everything open under it (SSE streams). Changes made
 * anywhere else (another node, the CLI on the store) arrive through `changed`, from the
 * database's notices (PostgreSQL), and apply as soon as they are heard; without notices
 * (SQLite, another process) a cached entry is re-read after 10 s.
 */
export class Authenticator {
  readonly #resources: ResourceStore;
  readonly #known = new Map<string, { record: ApiKeyRecord; readAt: number }>();
  /** What to end when a key stops working: open streams, by key id. */
  readonly #holders = new Map<string, Set<Holder>>();
  /**
   * Keys revoked (through this process, or heard), so a stream or request whose key was read
   * just before the revocation, but registers or answers after it, still ends.
   */
  readonly #revokedIds = new Set<string>();
  /** Counts changes heard; a key read while one arrived is not cached (it may predate it). */
  #generation = 0;
  /** The generation each principal was authenticated in (see `hold`). */
  readonly #authenticatedIn = new WeakMap<Principal, number>();
  /** Where changes are heard from, and how to know the other nodes applied one (`listen`). */
  #source: PrincipalChangeSource | undefined;

  constructor(resources: ResourceStore) {
    this.#resources = resources;
  }

  /**
   * Hears principal changes from the database from now on (every node's and the CLI's); returns
   * the function that stops.
   */
  listen(source: PrincipalChangeSource): () => void {
    this.#source = source;
    const stop = source.watch((change) => this.changed(change));
    return () => {
      this.#source = undefined;
      stop();
    };
  }

  /**
   * A wait for the other nodes to apply `change`, to be made before the change is written:
   * `wait()` resolves once every other live node said it applied it, or after a second; at
   * once on a single node. An API answer that takes rights away waits on it, so the caller's
   * next request is refused on every node.
   */
  heard(change: Exclude<PrincipalChange, { kind: 'missed' }>): { wait(): Promise<void> } {
    const source = this.#source;
    if (!source) return { wait: async () => undefined };
    const acknowledgements = source.acknowledgements(change);
    return {
      wait: async () => {
        const deadline = Date.now() + 1_000;
        const others = await source.otherNodes().catch(() => 0);
        await acknowledgements.wait(others, Math.max(0, deadline - Date.now()));
      },
    };
  }

  /** The principal behind a presented key, or undefined (unknown, revoked or expired). */
  async authenticate(key: string, now = new Date()): Promise<Principal | undefined> {
    const hash = hashApiKey(key);
    let entry = this.#known.get(hash);
    let generation = this.#generation;
    if (!entry || now.getTime() - entry.readAt > CACHE_MAX_AGE_MS) {
      const record = await this.#resources.findApiKeyByHash(hash);
      if (!record) {
        this.#known.delete(hash);
        return undefined;
      }
      entry = { record, readAt: now.getTime() };
      if (generation === this.#generation) {
        // Bounded: an attacker cannot grow it, only valid keys are cached.
        if (this.#known.size >= 10_000) this.#known.clear();
        this.#known.set(hash, entry);
      } else {
        // A change was heard during the read: this record may predate it. Answer this request
        // from it (it was read concurrently with the change), but remember nothing.
        generation = -1;
      }
      if (record.revokedAt) this.#end(record.id);
    }
    const { record } = entry;
    if (record.revokedAt || this.#revokedIds.has(record.id)) return undefined;
    if (record.expiresAt && new Date(record.expiresAt) <= now) return undefined;
    const principal: Principal = {
      tenantId: record.tenantId,
      userId: record.userId,
      role: record.role,
      keyId: record.id,
      expiresAt: record.expiresAt,
    };
    this.#authenticatedIn.set(principal, generation);
    return principal;
  }

  /**
   * Ties something long-lived (an SSE stream) to the principal's key: `end` runs when the key
   * is revoked, when the user's role changes or the user or tenant is removed (on any node), or
   * when the key expires. Returns the function that unties it.
   */
  hold(principal: Principal, end: () => void): () => void {
    if (this.#revokedIds.has(principal.keyId)) {
      queueMicrotask(end);
      return () => undefined;
    }
    let holders = this.#holders.get(principal.keyId);
    if (!holders) {
      holders = new Set();
      this.#holders.set(principal.keyId, holders);
    }
    const holder: Holder = { principal, end: () => end() };
    holders.add(holder);
    // A change heard between authenticating the request and now found nothing to end: look again.
    if (this.#authenticatedIn.get(principal) !== this.#generation) this.#recheck([holder]);
    let timer: NodeJS.Timeout | undefined;
    if (principal.expiresAt !== null) {
      const arm = () => {
        const remaining = Date.parse(principal.expiresAt!) - Date.now();
        if (remaining <= 0) return end();
        // setTimeout holds at most ~24.8 days; re-arm for longer expiries.
        timer = setTimeout(arm, Math.min(remaining, 2_147_483_647));
        timer.unref();
      };
      arm();
    }
    return () => {
      if (timer) clearTimeout(timer);
      holders.delete(holder);
      if (holders.size === 0) this.#holders.delete(principal.keyId);
    };
  }

  /** A key was revoked: forget it and end everything held under it. */
  revoked(record: ApiKeyRecord): void {
    this.#generation++;
    this.#known.delete(record.hash);
    this.#forgetRevoked(record.id);
  }

  /**
   * A change heard from the database (any node's, or the CLI's; see `Store.watchPrincipals`),
   * or made through this process (a role change): forgets what it may have made stale and
   * ends what was held under rights that are gone. A revoked or deleted key ends at once; for a
   * user or tenant, each held key is read again and ends if it no longer works or its role
   * changed.
   */
  changed(change: PrincipalChange): void {
    this.#generation++;
    if (change.kind === 'key') {
      for (const [hash, entry] of this.#known) {
        if (entry.record.id === change.id && entry.record.tenantId === change.tenantId)
          this.#known.delete(hash);
      }
      this.#forgetRevoked(change.id);
      return;
    }
    const affected = (record: { tenantId: string; userId: string }) =>
      change.kind === 'missed' ||
      (record.tenantId === change.tenantId && (change.kind === 'tenant' || record.userId === change.id));
    for (const [hash, entry] of this.#known) if (affected(entry.record)) this.#known.delete(hash);
    const held: Holder[] = [];
    for (const holders of this.#holders.values()) {
      for (const holder of holders) if (affected(holder.principal)) held.push(holder);
    }
    this.#recheck(held);
  }

  /** Reads each holder's key again; ends those whose key no longer works as it did. */
  #recheck(holders: readonly Holder[]): void {
    for (const holder of holders) {
      const { principal } = holder;
      this.#resources.getApiKey(principal.tenantId, principal.keyId).then(
        (record) => {
          const gone =
            !record ||
            record.revokedAt !== null ||
            this.#revokedIds.has(record.id) ||
            record.userId !== principal.userId ||
            record.role !== principal.role;
          if (gone) this.#endHolder(holder);
        },
        // Unable to tell: end it (the client reconnects and is checked afresh).
        () => this.#endHolder(holder),
      );
    }
  }

  #endHolder(holder: Holder): void {
    const holders = this.#holders.get(holder.principal.keyId);
    if (!holders?.delete(holder)) return;
    if (holders.size === 0) this.#holders.delete(holder.principal.keyId);
    holder.end();
  }

  #forgetRevoked(keyId: string): void {
    if (this.#revokedIds.size >= 10_000) this.#revokedIds.clear();
    this.#revokedIds.add(keyId);
    this.#end(keyId);
  }

  #end(keyId: string): void {
    const holders = this.#holders.get(keyId);
    if (!holders) return;
    this.#holders.delete(keyId);
    for (const holder of holders) holder.end();
  }
}

/** A new key for a user: the stored record and the key itself (shown once). */
export async function issueApiKey(
  resources: ResourceStore,
  user: UserRecord,
  options: { name: string; expiresAt?: string | null; key?: string },
): Promise<{ record: ApiKeyRecord; key: string }> {
  const key = options.key ?? generateApiKey();
  const stored = {
    id: newId('key'),
    tenantId: user.tenantId,
    userId: user.id,
    hash: hashApiKey(key),
    name: options.name,
    createdAt: new Date().toISOString(),
    expiresAt: options.expiresAt ?? null,
    revokedAt: null,
  };
  await resources.createApiKey(stored);
  return { record: { ...stored, role: user.role }, key };
}

/**
 * Creates a tenant with its first admin user and that user's key (operators, through
 * `berth tenants create`). The key is returned once and stored only as a hash.
 */
export async function createTenantWithAdmin(
  resources: ResourceStore,
  input: { name: string; limits?: TenantRecord['limits']; adminName?: string },
): Promise<{ tenant: TenantRecord; admin: UserRecord; key: string; keyRecord: ApiKeyRecord }> {
  const now = new Date().toISOString();
  const tenant: TenantRecord = {
    id: newId('tnt'),
    name: input.name,
    createdAt: now,
    limits: input.limits ?? null,
  };
  await resources.createTenant(tenant);
  const admin: UserRecord = {
    id: newId('user'),
    tenantId: tenant.id,
    name: input.adminName ?? 'admin',
    role: 'admin',
    createdAt: now,
  };
  await resources.createUser(admin);
  const { record, key } = await issueApiKey(resources, admin, { name: 'admin' });
  return { tenant, admin, key, keyRecord: record };
}

/** What the first-start bootstrap found or did about the admin key (`ensureAdminKey`). */
export interface AdminKeyStatus {
  /** This start created the admin key and wrote it to `file`. */
  created: boolean;
  /** `<dataDir>/admin.key` when it holds a key the store knows, else undefined. */
  file: string | undefined;
  /**
   * When this data directory has no admin key: where the node that created it wrote it (the
   * label that node stored on the key), or undefined when no record says.
   */
  createdElsewhere: string | undefined;
  /** `<dataDir>/admin.key` when it holds a key the store does not know (another database's). */
  unknownFile: string | undefined;
}

/**
 * On first start with an empty key table, creates the default tenant, its admin user and key,
 * stores only the key's hash and writes the key to `<dataDir>/admin.key` with mode 0600.
 *
 * Safe when several processes start at once on one database (the nodes of a cluster): the key
 * is written to `admin.key.new` (synced) first, then offered to the store, which takes it only
 * while no key exists (`createFirstApiKey`, one serialized transaction). Only the process whose
 * key was taken renames its file to `admin.key`; the others delete theirs and report where the
 * creator wrote it (`label`, stored as the key's name). A crash between the commit and the
 * rename leaves `admin.key.new` holding the stored key: the next start finishes the rename. A
 * crash before the commit leaves a file the next start reuses or deletes, never a stored key
 * that nobody has.
 */
export async function ensureAdminKey(
  resources: ResourceStore,
  dataDir: string,
  options: { label?: string } = {},
): Promise<AdminKeyStatus> {
  const file = join(dataDir, 'admin.key');
  const pending = `${file}.new`;
  const status: AdminKeyStatus = {
    created: false,
    file: undefined,
    createdElsewhere: undefined,
    unknownFile: undefined,
  };
  let candidate = await readKeyFile(pending);
  if (candidate !== undefined && (await resources.findApiKeyByHash(hashApiKey(candidate)))) {
    await rename(pending, file);
    candidate = undefined;
  } else if ((await resources.countApiKeys()) === 0) {
    if (candidate === undefined) {
      candidate = generateApiKey();
      await writeKeyFile(pending, candidate);
    }
    const now = new Date().toISOString();
    const created = await resources.createFirstApiKey({
      tenant: { id: DEFAULT_TENANT_ID, name: 'default', createdAt: now, limits: null },
      user: { id: 'user_admin', tenantId: DEFAULT_TENANT_ID, name: 'admin', role: 'admin', createdAt: now },
      key: {
        id: newId('key'),
        tenantId: DEFAULT_TENANT_ID,
        userId: 'user_admin',
        hash: hashApiKey(candidate),
        name: options.label ?? `admin.key in ${dataDir}`,
        createdAt: now,
        expiresAt: null,
        revokedAt: null,
      },
    });
    if (created) {
      await rename(pending, file);
      return { ...status, created: true, file };
    }
  }
  if (candidate !== undefined) await rm(pending, { force: true });
  const held = await readKeyFile(file);
  if (held !== undefined) {
    const record = await resources.findApiKeyByHash(hashApiKey(held));
    if (record) return { ...status, file };
    return { ...status, unknownFile: file };
  }
  const first = (await resources.listApiKeys(DEFAULT_TENANT_ID, 'user_admin')).at(-1);
  return { ...status, createdElsewhere: first?.name };
}

/** The key in a key file, or undefined when the file is missing or empty. */
async function readKeyFile(path: string): Promise<string | undefined> {
  try {
    const key = (await readFile(path, 'utf8')).trim();
    return key === '' ? undefined : key;
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw error;
  }
}

/** Writes a key file with mode 0600 and syncs it, so a stored key never outlives its file. */
async function writeKeyFile(path: string, key: string): Promise<void> {
  const handle = await open(path, 'w', 0o600);
  try {
    await handle.writeFile(`${key}\n`);
    await handle.chmod(0o600);
    await handle.sync();
  } finally {
    await handle.close();
  }
}
