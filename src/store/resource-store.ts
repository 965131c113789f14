import type { EventStore, SessionStatus } from './event-store.js';

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
}

export interface Page<T> {
  items: T[];
  /** Cursor for the next page, or null at the end. */
  nextCursor: string | null;
}

/** A stored API key: only its SHA-256 hash is kept. */
export interface ApiKeyRecord {
  id: string;
  tenantId: string;
  userId: string;
  role: 'admin' | 'member';
  hash: string;
  name: string;
  createdAt: string;
  expiresAt: string | null;
  revokedAt: string | null;
}

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

  createSession(record: SessionRecord): Promise<void>;
  getSession(tenantId: string, id: string): Promise<SessionRecord | undefined>;
  /** Finds a session by id alone: only for the supervisor, never for request handling. */
  getSessionUnscoped(id: string): Promise<SessionRecord | undefined>;
  listSessions(query: SessionListQuery): Promise<Page<SessionRecord>>;
  /** Sessions in the given statuses across all tenants (crash recovery at start-up). */
  findSessionsByStatus(statuses: readonly SessionStatus[]): Promise<SessionRecord[]>;

  createApiKey(record: ApiKeyRecord): Promise<void>;
  findApiKeyByHash(hash: string): Promise<ApiKeyRecord | undefined>;
  countApiKeys(): Promise<number>;
}

/** An opened database: both ports, plus lifecycle. */
export interface Store {
  readonly kind: 'sqlite' | 'postgres';
  readonly events: EventStore;
  readonly resources: ResourceStore;
  close(): Promise<void>;
}
