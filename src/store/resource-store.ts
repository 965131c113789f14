import type { EventStore, NewEvent, SessionKey, SessionStatus, StoredEvent } from './event-store.js';
import type { SkillStore } from './skill-store.js';
import type { VaultStore } from './vault-store.js';

/**
 * The resource port: agents (with immutable versions), environments, sessions and API keys.
 * Bodies are stored as the API shows them (JSON); the columns around them are what queries,
 * ownership checks and pagination need. Every lookup is scoped by tenant, so a caller can
 * never reach another tenant's row by id alone.
 */

export type ResourceKind = 'agent' | 'environment' | 'session';

/** One row: ownership and timestamps as columns, the API body as JSON. */
export interface ResourceRecord<Body = Record<string, unknown>> {
  id: string;
  tenantId: string;
  /** The principal that created it (sessions are owned by their creator). */
  ownerId: string;
  createdAt: string;
  updatedAt: string;
  archivedAt: string | null;
  body: Body;
}

/** A session row: the record plus columns the event store keeps in step with the log. */
export interface SessionRecord extends ResourceRecord {
  agentId: string;
  agentVersion: number;
  environmentId: string;
  status: SessionStatus;
  /** The `stop_reason` object of the newest `session.status_idle`, or null. */
  stopReason: Record<string, unknown> | null;
  /** Seq of the newest event in the session's log. */
  lastSeq: number;
}

/** What `createSession` writes besides the row. */
export interface SessionCreateOptions {
  /** Appended as seq 1..n in the same transaction as the row (processed at `createdAt`). */
  initialEvents?: readonly NewEvent[];
  /** The client's `Idempotency-Key`, unique per (tenant, owner). */
  idempotencyKey?: string;
}

/** The outcome of `createSession`: the events it stored, or the session an earlier create made. */
export type SessionCreateResult =
  | { created: true; events: StoredEvent[] }
  | { created: false; existingSessionId: string };

export interface ListQuery {
  tenantId: string;
  /** Only rows created by this principal. */
  ownerId?: string;
  includeArchived?: boolean;
  /** Opaque cursor from a previous page's `nextCursor`. */
  cursor?: string;
  limit: number;
  order?: 'asc' | 'desc';
}

export interface SessionListQuery extends ListQuery {
  agentId?: string;
  agentVersion?: number;
  statuses?: readonly SessionStatus[];
  /** Bounds on `created_at`, as `Date#toISOString()` strings (so they compare as text). */
  createdAt?: CreatedAtBounds;
}

/** Exclusive (`gt`, `lt`) and inclusive (`gte`, `lte`) bounds on a creation time. */
export interface CreatedAtBounds {
  gt?: string;
  gte?: string;
  lt?: string;
  lte?: string;
}

/** The SQL comparison of each bound. */
export const CREATED_AT_OPERATORS: Readonly<Record<keyof CreatedAtBounds, string>> = {
  gt: '>',
  gte: '>=',
  lt: '<',
  lte: '<=',
};

export interface Page<T> {
  items: T[];
  /** Cursor for the next page, or null at the end. */
  nextCursor: string | null;
}

/** What a user may do in its tenant: `admin` manages it, `member` uses it. */
export type Role = 'admin' | 'member';

/** Per-tenant overrides of the configured limits (absent fields keep the defaults). */
export interface TenantLimits {
  liveSessions?: number;
  sessionsPerMinute?: number;
  eventsPerMinute?: number;
}

/** A tenant: the unit of isolation. Every other row belongs to exactly one. */
export interface TenantRecord {
  id: string;
  /** Unique, human-chosen (`acme`). */
  name: string;
  createdAt: string;
  /** Overrides of the tenant-wide limits; null keeps every default. */
  limits: TenantLimits | null;
}

/** A user of a tenant; API keys act as their user. */
export interface UserRecord {
  id: string;
  tenantId: string;
  /** Unique within the tenant. */
  name: string;
  role: Role;
  createdAt: string;
}

/** A stored API key: only its SHA-256 hash is kept. `role` is its user's, read with it. */
export interface ApiKeyRecord {
  id: string;
  tenantId: string;
  userId: string;
  role: Role;
  hash: string;
  name: string;
  createdAt: string;
  expiresAt: string | null;
  revokedAt: string | null;
}

/** An API key as stored (the role lives on the user). */
export type NewApiKey = Omit<ApiKeyRecord, 'role'>;

export interface ResourceStore {
  /** Inserts an agent row and its version 1 (body.version must be 1). */
  createAgent(record: ResourceRecord): Promise<void>;
  /**
   * Stores a new immutable version and makes it the agent's current body. Fails with
   * `conflict` when the agent's current version is not `expectedVersion`.
   */
  addAgentVersion(
    tenantId: string,
    agentId: string,
    expectedVersion: number,
    record: ResourceRecord,
  ): Promise<void>;
  /** One version of an agent's body, or the current one when version is omitted. */
  getAgentVersion(tenantId: string, agentId: string, version?: number): Promise<ResourceRecord | undefined>;
  /** Every version of an agent, newest first. */
  listAgentVersions(
    tenantId: string,
    agentId: string,
    query: Omit<ListQuery, 'tenantId'>,
  ): Promise<Page<ResourceRecord>>;

  /** Inserts an environment or session row (sessions go through `createSession`). */
  insert(kind: Exclude<ResourceKind, 'session'>, record: ResourceRecord): Promise<void>;
  /** A row by id within a tenant. */
  get(kind: ResourceKind, tenantId: string, id: string): Promise<ResourceRecord | undefined>;
  /** Replaces body, updatedAt and archivedAt of an existing row. */
  update(kind: ResourceKind, record: ResourceRecord): Promise<void>;
  /** Pages through a tenant's rows of a kind, in creation order. */
  list(kind: Exclude<ResourceKind, 'session'>, query: ListQuery): Promise<Page<ResourceRecord>>;
  /** Deletes a row (and, for sessions, its events). Returns false if it did not exist. */
  delete(kind: ResourceKind, tenantId: string, id: string): Promise<boolean>;

  /**
   * Inserts a session row, its head and its first events in ONE transaction: either the
   * session exists with every initial event, or nothing was written. With an idempotency key,
   * a second create by the same owner writes nothing and names the session made the first time.
   */
  createSession(record: SessionRecord, options?: SessionCreateOptions): Promise<SessionCreateResult>;
  /** The session an owner created under an idempotency key, if any. */
  findSessionByIdempotencyKey(
    tenantId: string,
    ownerId: string,
    key: string,
  ): Promise<SessionRecord | undefined>;
  getSession(tenantId: string, id: string): Promise<SessionRecord | undefined>;
  listSessions(query: SessionListQuery): Promise<Page<SessionRecord>>;
  /**
   * Sessions in the given statuses across all tenants: crash recovery at start-up only. One
   * of the few deliberately cross-tenant reads (PostgreSQL serves it through a narrow
   * SECURITY DEFINER function, see `postgres/schema.ts`).
   */
  findSessionsByStatus(statuses: readonly SessionStatus[]): Promise<SessionRecord[]>;
  /** How many sessions are in each status, across tenants (aggregate counts for metrics). */
  countSessionsByStatus(): Promise<Partial<Record<SessionStatus, number>>>;

  /** Inserts a tenant; `conflict` when its id or name is taken. */
  createTenant(record: TenantRecord): Promise<void>;
  getTenant(id: string): Promise<TenantRecord | undefined>;
  /** Every tenant (operators only: the CLI on the server's own store). Cross-tenant. */
  listTenants(): Promise<TenantRecord[]>;

  /** Inserts a user; `conflict` when its name is taken in the tenant. */
  createUser(record: UserRecord): Promise<void>;
  getUser(tenantId: string, id: string): Promise<UserRecord | undefined>;
  listUsers(tenantId: string): Promise<UserRecord[]>;
  /** Changes a user's role (their keys carry it from then on). Returns the user, or undefined if unknown. */
  setUserRole(tenantId: string, id: string, role: Role): Promise<UserRecord | undefined>;

  createApiKey(record: NewApiKey): Promise<void>;
  /** The key with this hash and its user's role, in any tenant: authentication only. */
  findApiKeyByHash(hash: string): Promise<ApiKeyRecord | undefined>;
  /** A tenant's keys (or one user's), newest first. */
  listApiKeys(tenantId: string, userId?: string): Promise<ApiKeyRecord[]>;
  getApiKey(tenantId: string, id: string): Promise<ApiKeyRecord | undefined>;
  /** Marks a key revoked (once; the first time stays). Returns it, or undefined if unknown. */
  revokeApiKey(tenantId: string, id: string, at: string): Promise<ApiKeyRecord | undefined>;
  /** Keys in all tenants (0 means first start). Cross-tenant. */
  countApiKeys(): Promise<number>;
  /**
   * The first start's admin key: when no key exists in any tenant, inserts the tenant and the
   * user (each unless it exists) and the key, in one transaction that concurrent callers (nodes
   * of a cluster starting together) serialize on, and returns true. When a key exists already,
   * writes nothing and returns false. Cross-tenant.
   */
  createFirstApiKey(first: { tenant: TenantRecord; user: UserRecord; key: NewApiKey }): Promise<boolean>;
}

/**
 * A change that may take rights away, heard from the database (every node hears every node's,
 * and the CLI's): a key revoked or deleted, a user's role changed or the user deleted, a tenant
 * deleted; `missed` when notices may have been lost (the listening connection was reopened),
 * so anything may have changed.
 */
export type PrincipalChange =
  | { kind: 'key'; tenantId: string; id: string }
  | { kind: 'user'; tenantId: string; id: string }
  | { kind: 'tenant'; tenantId: string }
  | { kind: 'missed' };

/** Whether the database itself keeps tenants apart (PostgreSQL row-level security). */
export interface RowLevelSecurity {
  enforced: boolean;
  /** Why not, when not (SQLite; or connected as the tables' owner or a BYPASSRLS role). */
  reason?: string;
}

/** An opened database: the ports, plus lifecycle. */
/** A session's newest sandbox snapshot, packed (`snapshots/shared-snapshot-store.ts`). */
export interface SnapshotArchive {
  createdAt: string;
  info: Record<string, unknown>;
  archive: Buffer;
}

export interface SnapshotArchiveStore {
  /** Replaces the session's snapshot. */
  put(session: SessionKey, snapshot: SnapshotArchive): Promise<void>;
  /** The session's snapshot's `createdAt` (cheap: no archive), if it has one. */
  newest(session: SessionKey): Promise<string | undefined>;
  get(session: SessionKey): Promise<SnapshotArchive | undefined>;
  delete(session: SessionKey): Promise<void>;
}

export interface Store {
  readonly kind: 'sqlite' | 'postgres';
  /** The second wall under the application's tenant checks, if this store has one. */
  readonly rowLevelSecurity: RowLevelSecurity;
  readonly events: EventStore;
  readonly resources: ResourceStore;
  /** Skills and their versions (`client.beta.skills`). */
  readonly skills: SkillStore;
  /** Vaults and their credentials (secrets sealed by `vault/`). */
  readonly vaults: VaultStore;
  /**
   * Makes `events.subscribe` hear appends made by other processes on the same database too
   * (PostgreSQL LISTEN/NOTIFY), for several nodes sharing one store. Absent on SQLite. A
   * listener may then also hear events committed just before it subscribed: listeners
   * dedupe by seq (the SSE stream and the harness do).
   */
  listenAcrossNodes?(): Promise<void>;
  /**
   * Calls `listener` on every principal change any process makes on the database, once
   * `listenAcrossNodes` listens (PostgreSQL; absent on SQLite). Returns the function that stops.
   */
  watchPrincipals?(listener: (change: PrincipalChange) => void): () => void;
  /**
   * A wait, registered before making `change`, for the other listening processes to say they
   * have applied it (each acknowledges once its watchers ran): `wait(others, timeoutMs)`
   * resolves when `others` of them did, or after the timeout. PostgreSQL only.
   */
  principalAcknowledgements?(change: Exclude<PrincipalChange, { kind: 'missed' }>): {
    wait(others: number, timeoutMs: number): Promise<void>;
  };
  /** Sandbox snapshots as archives every node can read (PostgreSQL only). */
  readonly snapshotArchives?: SnapshotArchiveStore;
  close(): Promise<void>;
}
