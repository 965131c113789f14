import Database from 'better-sqlite3';
import { BerthError, conflict, invalidRequest, notFound } from '../../errors.js';
import {
  checkLimit,
  checkWriterSession,
  DEFAULT_READ_LIMIT,
  decodeCursor,
  EventSubscribers,
  encodeCursor,
  eventIdTaken,
  headMoved,
  prepareEvents,
  staleWriter,
  statusChangeOf,
} from '../adapter-support.js';
import type {
  AppendOptions,
  AppendResult,
  EventListener,
  EventStore,
  NewEvent,
  ReadQuery,
  SessionEvent,
  SessionKey,
  SessionStatus,
  StoredEvent,
  WriterToken,
} from '../event-store.js';
import { sessionKeyString } from '../event-store.js';
import {
  type ApiKeyRecord,
  CREATED_AT_OPERATORS,
  type CreatedAtBounds,
  type ListQuery,
  type NewApiKey,
  type Page,
  type ResourceKind,
  type ResourceRecord,
  type ResourceStore,
  type Role,
  type SessionCreateOptions,
  type SessionCreateResult,
  type SessionListQuery,
  type SessionRecord,
  type Store,
  type TenantRecord,
  type UserRecord,
} from '../resource-store.js';
import type { SkillRecord, SkillStore, SkillVersionRecord } from '../skill-store.js';
import type { CredentialRecord, CredentialUpdate, SealedSecret, VaultStore } from '../vault-store.js';
import { migrateSqlite } from './schema.js';

/** Where the SQLite database lives. */
export interface SqliteStoreOptions {
  /** File path of the database (created when missing). */
  path: string;
}

/**
 * Opens (and migrates) a SQLite store: WAL, synchronous=FULL, foreign keys on. Appends are
 * group-committed: every append queued in the same event-loop turn shares one transaction and
 * one fsync, and each caller's promise settles only after that commit.
 */
export async function openSqliteStore(options: SqliteStoreOptions): Promise<Store> {
  const database = new Database(options.path);
  try {
    database.pragma('journal_mode = WAL');
    database.pragma('synchronous = FULL');
    database.pragma('foreign_keys = ON');
    database.pragma('busy_timeout = 5000');
    // Group commits touch one leaf page per session; a bigger cache and rarer checkpoints
    // (every ~40 MiB of WAL instead of 4 MiB) keep that from dominating the append rate.
    database.pragma('cache_size = -65536');
    database.pragma('wal_autocheckpoint = 10000');
    migrateSqlite(database);
  } catch (error) {
    database.close();
    throw error;
  }
  return new SqliteStore(database);
}

class SqliteStore implements Store {
  readonly kind = 'sqlite' as const;
  readonly rowLevelSecurity = {
    enforced: false,
    reason: 'SQLite has no row-level security; tenants are kept apart by the application checks alone',
  };
  readonly events: SqliteEventStore;
  readonly resources: SqliteResourceStore;
  readonly skills: SqliteSkillStore;
  readonly vaults: SqliteVaultStore;
  readonly #database: Database.Database;

  constructor(database: Database.Database) {
    this.#database = database;
    this.events = new SqliteEventStore(database);
    this.resources = new SqliteResourceStore(database);
    this.skills = new SqliteSkillStore(database);
    this.vaults = new SqliteVaultStore(database);
  }

  async close(): Promise<void> {
    if (!this.#database.open) return;
    this.events.doClose();
    this.#database.close();
  }
}

/** Statements are prepared once per SQL text. */
class StatementCache {
  readonly #statements = new Map<string, Database.Statement>();
  constructor(private readonly database: Database.Database) {}

  get(sql: string): Database.Statement {
    let statement = this.#statements.get(sql);
    if (statement === undefined) {
      statement = this.database.prepare(sql);
      this.#statements.set(sql, statement);
    }
    return statement;
  }
}

interface PendingAppend {
  session: SessionKey;
  events: SessionEvent[];
  options: AppendOptions | undefined;
  resolve: (result: AppendResult) => void;
  reject: (error: unknown) => void;
  result?: AppendResult;
  error?: unknown;
}

interface EventRow {
  session_id: string;
  seq: number;
  body: string;
}

function storedEventOf(row: EventRow): StoredEvent {
  return { sessionId: row.session_id, seq: row.seq, event: JSON.parse(row.body) as SessionEvent };
}

function isUniqueViolation(error: unknown): boolean {
  const code = (error as { code?: unknown }).code;
  return code === 'SQLITE_CONSTRAINT_UNIQUE' || code === 'SQLITE_CONSTRAINT_PRIMARYKEY';
}

function storeUnavailable(error: unknown): BerthError {
  return new BerthError('store_unavailable', `SQLite commit failed: ${String(error)}`, {
    retryable: true,
    cause: error,
  });
}

/**
 * The session's id when it belongs to the tenant, else NULL: every event read filters on it,
 * so a key naming the wrong tenant reads nothing. Takes (session id, tenant id).
 */
const OWN_SESSION = '(SELECT session_id FROM session_heads WHERE session_id = ? AND tenant_id = ?)';

/** The statements of the append path, prepared once. */
interface AppendStatements {
  begin: Database.Statement;
  commit: Database.Statement;
  rollback: Database.Statement;
  savepoint: Database.Statement;
  release: Database.Statement;
  rollbackToSavepoint: Database.Statement;
  usedKey: Database.Statement;
  eventsInRange: Database.Statement;
  advanceHead: Database.Statement;
  advanceHeadWithStatus: Database.Statement;
  headToken: Database.Statement;

  headSeq: Database.Statement;
  insertEvent: Database.Statement;
  insertKey: Database.Statement;
}

/** Thrown inside a savepoint-free batch when an append failed after it had written rows. */
class PartialAppend extends Error {}

class SqliteEventStore implements EventStore {
  readonly #database: Database.Database;
  readonly #statements: StatementCache;
  readonly #append: AppendStatements;
  readonly #subscribers = new EventSubscribers();
  #queue: PendingAppend[] = [];
  #flushScheduled = false;
  #closed = false;

  constructor(database: Database.Database) {
    this.#database = database;
    this.#statements = new StatementCache(database);
    const prepare = (sql: string) => database.prepare(sql);
    this.#append = {
      begin: prepare('BEGIN IMMEDIATE'),
      commit: prepare('COMMIT'),
      rollback: prepare('ROLLBACK'),
      savepoint: prepare('SAVEPOINT append'),
      release: prepare('RELEASE append'),
      rollbackToSavepoint: prepare('ROLLBACK TO append'),
      usedKey: prepare(
        `SELECT first_seq, count FROM idempotency_keys WHERE session_id = ${OWN_SESSION} AND key = ?`,
      ),
      eventsInRange: prepare(
        'SELECT session_id, seq, body FROM events WHERE session_id = ? AND seq >= ? AND seq < ? ORDER BY seq',
      ),
      // The writer check and the seq reservation in one statement: no row back means the
      // session is missing or the token is stale, and nothing was written.
      advanceHead: prepare(
        `UPDATE session_heads SET last_seq = last_seq + ?
         WHERE session_id = ? AND tenant_id = ? AND writer_token = coalesce(?, writer_token)
         RETURNING last_seq`,
      ),
      advanceHeadWithStatus: prepare(
        `UPDATE session_heads SET last_seq = last_seq + ?, status = ?, updated_at = ?,
           stop_reason = CASE WHEN ? THEN stop_reason ELSE ? END
         WHERE session_id = ? AND tenant_id = ? AND writer_token = coalesce(?, writer_token)
         RETURNING last_seq`,
      ),
      headToken: prepare('SELECT writer_token FROM session_heads WHERE session_id = ? AND tenant_id = ?'),
      headSeq: prepare('SELECT last_seq FROM session_heads WHERE session_id = ? AND tenant_id = ?'),
      insertEvent: prepare(
        'INSERT INTO events (session_id, seq, id, type, processed_at, body) VALUES (?, ?, ?, ?, ?, ?)',
      ),
      insertKey: prepare(
        'INSERT INTO idempotency_keys (session_id, key, first_seq, count) VALUES (?, ?, ?, ?)',
      ),
    };
  }

  append(session: SessionKey, events: readonly NewEvent[], options?: AppendOptions): Promise<AppendResult> {
    return new Promise<AppendResult>((resolve, reject) => {
      if (this.#closed) throw new BerthError('store_unavailable', 'the store is closed');
      checkWriterSession(session.id, options);
      // processed_at is filled in at commit time, by the batch.
      const prepared = prepareEvents(events, '');
      this.#queue.push({ session, events: prepared, options, resolve, reject });
      if (!this.#flushScheduled) {
        this.#flushScheduled = true;
        setImmediate(() => this.#flush());
      }
    });
  }

  async findByIdempotencyKey(session: SessionKey, key: string): Promise<StoredEvent[] | undefined> {
    return this.#eventsOfKey(session, key);
  }

  /** The events first stored under an idempotency key (synchronous, usable inside a batch). */
  #eventsOfKey(session: SessionKey, key: string): StoredEvent[] | undefined {
    const used = this.#append.usedKey.get(session.id, session.tenantId, key) as
      | { first_seq: number; count: number }
      | undefined;
    if (used === undefined) return undefined;
    const rows = this.#append.eventsInRange.all(
      session.id,
      used.first_seq,
      used.first_seq + used.count,
    ) as EventRow[];
    return rows.map(storedEventOf);
  }

  async read(session: SessionKey, query: ReadQuery = {}): Promise<StoredEvent[]> {
    const conditions = [`session_id = ${OWN_SESSION}`];
    const parameters: unknown[] = [session.id, session.tenantId];
    if (query.afterSeq !== undefined) {
      conditions.push('seq > ?');
      parameters.push(query.afterSeq);
    }
    if (query.beforeSeq !== undefined) {
      conditions.push('seq < ?');
      parameters.push(query.beforeSeq);
    }
    if (query.types !== undefined) {
      conditions.push('type IN (SELECT value FROM json_each(?))');
      parameters.push(JSON.stringify(query.types));
    }
    const order = query.order === 'desc' ? 'DESC' : 'ASC';
    parameters.push(checkLimit(query.limit ?? DEFAULT_READ_LIMIT));
    const sql = `SELECT session_id, seq, body FROM events WHERE ${conditions.join(' AND ')} ORDER BY seq ${order} LIMIT ?`;
    return (this.#statements.get(sql).all(...parameters) as EventRow[]).map(storedEventOf);
  }

  async getEvent(session: SessionKey, eventId: string): Promise<StoredEvent | undefined> {
    const row = this.#statements
      .get(`SELECT session_id, seq, body FROM events WHERE id = ? AND session_id = ${OWN_SESSION}`)
      .get(eventId, session.id, session.tenantId) as EventRow | undefined;
    return row === undefined ? undefined : storedEventOf(row);
  }

  async headSeq(session: SessionKey): Promise<number> {
    const row = this.#append.headSeq.get(session.id, session.tenantId) as { last_seq: number } | undefined;
    if (row === undefined) throw notFound('session', session.id);
    return row.last_seq;
  }

  subscribe(session: SessionKey, listener: EventListener): () => void {
    return this.#subscribers.add(sessionKeyString(session), listener);
  }

  async acquireWriter(session: SessionKey): Promise<WriterToken> {
    const row = this.#statements
      .get(
        `UPDATE session_heads SET writer_token = writer_token + 1 WHERE session_id = ? AND tenant_id = ?
         RETURNING writer_token`,
      )
      .get(session.id, session.tenantId) as { writer_token: number } | undefined;
    if (row === undefined) throw notFound('session', session.id);
    return { sessionId: session.id, token: row.writer_token };
  }

  /** Commits what is queued, then stops accepting appends. Called by `Store.close`. */
  doClose(): void {
    if (this.#queue.length > 0) this.#flush();
    this.#closed = true;
    this.#subscribers.clear();
  }

  /**
   * Group commit: one transaction (one fsync) for every queued append. Each append is first
   * applied without a savepoint: one that fails before writing (unknown session, stale writer)
   * is simply rejected. Only if an append fails after writing (an event id already taken) is
   * the batch rolled back and applied again with a savepoint per append, so the failing append
   * rolls back alone and only its caller is rejected.
   */
  #flush(): void {
    this.#flushScheduled = false;
    const batch = this.#queue;
    this.#queue = [];
    if (batch.length === 0) return;
    const statements = this.#append;
    const processedAt = new Date().toISOString();
    try {
      statements.begin.run();
      try {
        this.#applyBatch(batch, processedAt, false);
      } catch (error) {
        if (!(error instanceof PartialAppend)) throw error;
        statements.rollback.run();
        for (const pending of batch) {
          pending.result = undefined;
          pending.error = undefined;
        }
        statements.begin.run();
        this.#applyBatch(batch, processedAt, true);
      }
      statements.commit.run();
    } catch (error) {
      if (this.#database.inTransaction) this.#database.exec('ROLLBACK');
      const failure = storeUnavailable(error);
      for (const pending of batch) {
        pending.result = undefined;
        pending.error ??= failure;
      }
    }
    for (const pending of batch) {
      if (pending.result !== undefined && !pending.result.duplicate) {
        this.#subscribers.deliver(sessionKeyString(pending.session), pending.result.events);
      }
    }
    for (const pending of batch) {
      if (pending.result !== undefined) pending.resolve(pending.result);
      else pending.reject(pending.error);
    }
  }

  /** Applies every append of a batch inside the open transaction. */
  #applyBatch(batch: readonly PendingAppend[], processedAt: string, savepoints: boolean): void {
    const statements = this.#append;
    for (const pending of batch) {
      if (savepoints) {
        statements.savepoint.run();
        try {
          pending.result = this.#applyAppend(pending, processedAt);
          statements.release.run();
        } catch (error) {
          statements.rollbackToSavepoint.run();
          statements.release.run();
          pending.error = error;
        }
      } else {
        const progress = { wrote: false };
        try {
          pending.result = this.#applyAppend(pending, processedAt, progress);
        } catch (error) {
          if (progress.wrote) throw new PartialAppend();
          pending.error = error;
        }
      }
    }
  }

  #applyAppend(
    pending: PendingAppend,
    processedAt: string,
    progress: { wrote: boolean } = { wrote: false },
  ): AppendResult {
    const { session, options, events } = pending;
    const sessionId = session.id;
    const statements = this.#append;
    const token = options?.writer?.token ?? null;
    const key = options?.idempotencyKey;
    if (key !== undefined) {
      // The writer is checked before the key, as an append without a key would be.
      this.#checkHead(session, token);
      const repeated = this.#eventsOfKey(session, key);
      if (repeated) return { events: repeated, duplicate: true };
    }
    if (options?.expectedHeadSeq !== undefined) {
      // The batch runs in one transaction on this thread: nothing can append in between.
      this.#checkHead(session, token);
      const current = statements.headSeq.get(sessionId, session.tenantId) as { last_seq: number };
      if (current.last_seq !== options.expectedHeadSeq) {
        throw headMoved(sessionId, options.expectedHeadSeq, current.last_seq);
      }
    }
    const change = statusChangeOf(events);
    const head = (
      change === undefined
        ? statements.advanceHead.get(events.length, sessionId, session.tenantId, token)
        : statements.advanceHeadWithStatus.get(
            events.length,
            change.status,
            processedAt,
            change.stopReason === undefined ? 1 : 0,
            change.stopReason == null ? null : JSON.stringify(change.stopReason),
            sessionId,
            session.tenantId,
            token,
          )
    ) as { last_seq: number } | undefined;
    if (head === undefined) {
      this.#checkHead(session, token);
      throw new Error(`session ${sessionId} head did not advance`);
    }
    progress.wrote = true;
    const firstSeq = head.last_seq - events.length + 1;
    const stored: StoredEvent[] = [];
    try {
      for (const event of events) {
        const seq = firstSeq + stored.length;
        event.processed_at = processedAt;
        statements.insertEvent.run(sessionId, seq, event.id, event.type, processedAt, JSON.stringify(event));
        stored.push({ sessionId, seq, event });
      }
    } catch (error) {
      throw isUniqueViolation(error) ? eventIdTaken(error) : error;
    }
    if (key !== undefined) statements.insertKey.run(sessionId, key, firstSeq, stored.length);
    return { events: stored, duplicate: false };
  }

  /** Throws not_found for a missing session, stale_writer when `token` is not the newest. */
  #checkHead(session: SessionKey, token: number | null): void {
    const head = this.#append.headToken.get(session.id, session.tenantId) as
      | { writer_token: number }
      | undefined;
    if (head === undefined) throw notFound('session', session.id);
    if (token !== null && token !== head.writer_token) {
      throw staleWriter(session.id, token, head.writer_token);
    }
  }
}

interface RecordRow {
  position: number;
  id: string;
  tenant_id: string;
  owner_id: string;
  created_at: string;
  updated_at: string;
  archived_at: string | null;
  body: string;
}

interface SessionRow extends RecordRow {
  agent_id: string;
  agent_version: number;
  environment_id: string;
  status: SessionStatus;
  stop_reason: string | null;
  last_seq: number;
}

interface TenantRow {
  id: string;
  name: string;
  created_at: string;
  limits: string | null;
}

interface UserRow {
  id: string;
  tenant_id: string;
  name: string;
  role: 'admin' | 'member';
  created_at: string;
}

function tenantOf(row: TenantRow): TenantRecord {
  return {
    id: row.id,
    name: row.name,
    createdAt: row.created_at,
    limits: row.limits === null ? null : (JSON.parse(row.limits) as TenantRecord['limits']),
  };
}

function userOf(row: UserRow): UserRecord {
  return { id: row.id, tenantId: row.tenant_id, name: row.name, role: row.role, createdAt: row.created_at };
}

/** A key is read with its user's role. */
const API_KEYS_FROM = 'api_keys JOIN users ON users.id = api_keys.user_id';
const API_KEY_COLUMNS = `api_keys.id, api_keys.tenant_id, api_keys.user_id, users.role, api_keys.hash,
  api_keys.name, api_keys.created_at, api_keys.expires_at, api_keys.revoked_at`;

interface ApiKeyRow {
  id: string;
  tenant_id: string;
  user_id: string;
  role: 'admin' | 'member';
  hash: string;
  name: string;
  created_at: string;
  expires_at: string | null;
  revoked_at: string | null;
}

const TABLE_OF_KIND: Record<ResourceKind, string> = {
  agent: 'agents',
  environment: 'environments',
  session: 'sessions',
};

/** A session is its `sessions` row joined with its narrow, often-written `session_heads` row. */
const SESSIONS_FROM = 'sessions JOIN session_heads ON session_heads.session_id = sessions.id';
const SESSION_COLUMNS = `sessions.position, sessions.id, sessions.tenant_id, sessions.owner_id,
  sessions.created_at, session_heads.updated_at, sessions.archived_at, sessions.body,
  sessions.agent_id, sessions.agent_version, sessions.environment_id,
  session_heads.status, session_heads.stop_reason, session_heads.last_seq`;

function recordOf(row: RecordRow): ResourceRecord {
  return {
    id: row.id,
    tenantId: row.tenant_id,
    ownerId: row.owner_id,
    createdAt: row.created_at,
    updatedAt: row.updated_at,
    archivedAt: row.archived_at,
    body: JSON.parse(row.body) as Record<string, unknown>,
  };
}

function sessionOf(row: SessionRow): SessionRecord {
  return {
    ...recordOf(row),
    agentId: row.agent_id,
    agentVersion: row.agent_version,
    environmentId: row.environment_id,
    status: row.status,
    stopReason: row.stop_reason === null ? null : (JSON.parse(row.stop_reason) as Record<string, unknown>),
    lastSeq: row.last_seq,
  };
}

function apiKeyOf(row: ApiKeyRow): ApiKeyRecord {
  return {
    id: row.id,
    tenantId: row.tenant_id,
    userId: row.user_id,
    role: row.role,
    hash: row.hash,
    name: row.name,
    createdAt: row.created_at,
    expiresAt: row.expires_at,
    revokedAt: row.revoked_at,
  };
}

/** The version number an agent body carries; versions are what optimistic updates compare. */
function bodyVersion(record: ResourceRecord): unknown {
  return record.body.version;
}

class SqliteResourceStore implements ResourceStore {
  readonly #database: Database.Database;
  readonly #statements: StatementCache;

  constructor(database: Database.Database) {
    this.#database = database;
    this.#statements = new StatementCache(database);
  }

  async createAgent(record: ResourceRecord): Promise<void> {
    if (bodyVersion(record) !== 1) throw invalidRequest('a new agent body must have version 1');
    this.#database
      .transaction(() => {
        this.#insertRow('agents', record, { latest_version: 1 });
        this.#insertAgentVersion(record, 1);
      })
      .immediate();
  }

  async addAgentVersion(
    tenantId: string,
    agentId: string,
    expectedVersion: number,
    record: ResourceRecord,
  ): Promise<void> {
    const version = expectedVersion + 1;
    if (bodyVersion(record) !== version)
      throw invalidRequest(`the new agent body must have version ${version}`);
    if (record.id !== agentId || record.tenantId !== tenantId)
      throw invalidRequest('record does not match agent');
    this.#database
      .transaction(() => {
        const current = this.#statements
          .get('SELECT latest_version FROM agents WHERE id = ? AND tenant_id = ?')
          .get(agentId, tenantId) as { latest_version: number } | undefined;
        if (current === undefined) throw notFound('agent', agentId);
        if (current.latest_version !== expectedVersion) {
          throw conflict(`agent ${agentId} is at version ${current.latest_version}, not ${expectedVersion}`);
        }
        this.#statements
          .get(
            'UPDATE agents SET latest_version = ?, body = ?, updated_at = ?, archived_at = ? WHERE id = ? AND tenant_id = ?',
          )
          .run(version, JSON.stringify(record.body), record.updatedAt, record.archivedAt, agentId, tenantId);
        this.#insertAgentVersion(record, version);
      })
      .immediate();
  }

  async getAgentVersion(
    tenantId: string,
    agentId: string,
    version?: number,
  ): Promise<ResourceRecord | undefined> {
    if (version === undefined) return this.get('agent', tenantId, agentId);
    const row = this.#statements
      .get(
        `SELECT version AS position, agent_id AS id, tenant_id, owner_id, created_at, updated_at, archived_at, body
         FROM agent_versions WHERE agent_id = ? AND tenant_id = ? AND version = ?`,
      )
      .get(agentId, tenantId, version) as RecordRow | undefined;
    return row === undefined ? undefined : recordOf(row);
  }

  async listAgentVersions(
    tenantId: string,
    agentId: string,
    query: Omit<ListQuery, 'tenantId'>,
  ): Promise<Page<ResourceRecord>> {
    const order = query.order ?? 'desc';
    const limit = checkLimit(query.limit);
    const parameters: unknown[] = [agentId, tenantId];
    let cursorCondition = '';
    if (query.cursor !== undefined) {
      cursorCondition = order === 'desc' ? 'AND version < ?' : 'AND version > ?';
      parameters.push(decodeCursor(query.cursor));
    }
    parameters.push(limit + 1);
    const rows = this.#statements
      .get(
        `SELECT version AS position, agent_id AS id, tenant_id, owner_id, created_at, updated_at, archived_at, body
         FROM agent_versions WHERE agent_id = ? AND tenant_id = ? ${cursorCondition}
         ORDER BY version ${order === 'desc' ? 'DESC' : 'ASC'} LIMIT ?`,
      )
      .all(...parameters) as RecordRow[];
    return pageOf(rows, limit, recordOf);
  }

  async insert(kind: Exclude<ResourceKind, 'session'>, record: ResourceRecord): Promise<void> {
    if (kind === 'agent') return this.createAgent(record);
    this.#insertRow('environments', record, {});
  }

  async get(kind: ResourceKind, tenantId: string, id: string): Promise<ResourceRecord | undefined> {
    if (kind === 'session') return this.getSession(tenantId, id);
    const row = this.#statements
      .get(`SELECT * FROM ${TABLE_OF_KIND[kind]} WHERE id = ? AND tenant_id = ?`)
      .get(id, tenantId) as RecordRow | undefined;
    return row === undefined ? undefined : recordOf(row);
  }

  async update(kind: ResourceKind, record: ResourceRecord): Promise<void> {
    const statement = this.#statements.get(
      `UPDATE ${TABLE_OF_KIND[kind]} SET body = ?, updated_at = ?, archived_at = ? WHERE id = ? AND tenant_id = ?`,
    );
    const parameters = [
      JSON.stringify(record.body),
      record.updatedAt,
      record.archivedAt,
      record.id,
      record.tenantId,
    ];
    if (kind !== 'session') {
      if (statement.run(...parameters).changes === 0) throw notFound(kind, record.id);
      return;
    }
    // A session's updated_at is read from its head, which status changes also stamp.
    this.#database
      .transaction(() => {
        if (statement.run(...parameters).changes === 0) throw notFound(kind, record.id);
        this.#statements
          .get('UPDATE session_heads SET updated_at = ? WHERE session_id = ?')
          .run(record.updatedAt, record.id);
      })
      .immediate();
  }

  async list(kind: Exclude<ResourceKind, 'session'>, query: ListQuery): Promise<Page<ResourceRecord>> {
    const { sql, parameters, limit } = listSql(TABLE_OF_KIND[kind], '*', query, [], []);
    return pageOf(this.#statements.get(sql).all(...parameters) as RecordRow[], limit, recordOf);
  }

  async delete(kind: ResourceKind, tenantId: string, id: string): Promise<boolean> {
    const result = this.#statements
      .get(`DELETE FROM ${TABLE_OF_KIND[kind]} WHERE id = ? AND tenant_id = ?`)
      .run(id, tenantId);
    return result.changes > 0;
  }

  async createSession(
    record: SessionRecord,
    options: SessionCreateOptions = {},
  ): Promise<SessionCreateResult> {
    const key = options.idempotencyKey ?? null;
    const initial = options.initialEvents ?? [];
    const events = initial.length === 0 ? [] : prepareEvents(initial, record.createdAt);
    const change = statusChangeOf(events);
    // IMMEDIATE: the key check and the inserts run under the write lock, so two creates with
    // one key cannot both pass the check.
    return this.#database
      .transaction((): SessionCreateResult => {
        if (key !== null) {
          const existing = this.#sessionIdOfKey(record.tenantId, record.ownerId, key);
          if (existing !== undefined) return { created: false, existingSessionId: existing };
        }
        this.#insertRow('sessions', record, {
          agent_id: record.agentId,
          agent_version: record.agentVersion,
          environment_id: record.environmentId,
          create_key: key,
        });
        const stopReason = change?.stopReason === undefined ? record.stopReason : change.stopReason;
        this.#statements
          .get(
            `INSERT INTO session_heads (session_id, tenant_id, status, stop_reason, last_seq, writer_token, updated_at)
             VALUES (?, ?, ?, ?, ?, 0, ?)`,
          )
          .run(
            record.id,
            record.tenantId,
            change?.status ?? record.status,
            stopReason === null ? null : JSON.stringify(stopReason),
            record.lastSeq + events.length,
            record.updatedAt,
          );
        const stored: StoredEvent[] = [];
        const insertEvent = this.#statements.get(
          'INSERT INTO events (session_id, seq, id, type, processed_at, body) VALUES (?, ?, ?, ?, ?, ?)',
        );
        for (const event of events) {
          const seq = record.lastSeq + stored.length + 1;
          try {
            insertEvent.run(record.id, seq, event.id, event.type, event.processed_at, JSON.stringify(event));
          } catch (error) {
            throw isUniqueViolation(error) ? eventIdTaken(error) : error;
          }
          stored.push({ sessionId: record.id, seq, event });
        }
        return { created: true, events: stored };
      })
      .immediate();
  }

  async findSessionByIdempotencyKey(
    tenantId: string,
    ownerId: string,
    key: string,
  ): Promise<SessionRecord | undefined> {
    const id = this.#sessionIdOfKey(tenantId, ownerId, key);
    return id === undefined ? undefined : this.getSession(tenantId, id);
  }

  #sessionIdOfKey(tenantId: string, ownerId: string, key: string): string | undefined {
    const row = this.#statements
      .get('SELECT id FROM sessions WHERE tenant_id = ? AND owner_id = ? AND create_key = ?')
      .get(tenantId, ownerId, key) as { id: string } | undefined;
    return row?.id;
  }

  async getSession(tenantId: string, id: string): Promise<SessionRecord | undefined> {
    const row = this.#statements
      .get(`SELECT ${SESSION_COLUMNS} FROM ${SESSIONS_FROM} WHERE sessions.id = ? AND sessions.tenant_id = ?`)
      .get(id, tenantId) as SessionRow | undefined;
    return row === undefined ? undefined : sessionOf(row);
  }

  async listSessions(query: SessionListQuery): Promise<Page<SessionRecord>> {
    const conditions: string[] = [];
    const parameters: unknown[] = [];
    if (query.agentId !== undefined) {
      conditions.push('sessions.agent_id = ?');
      parameters.push(query.agentId);
    }
    if (query.agentVersion !== undefined) {
      conditions.push('sessions.agent_version = ?');
      parameters.push(query.agentVersion);
    }
    if (query.statuses !== undefined) {
      conditions.push('session_heads.status IN (SELECT value FROM json_each(?))');
      parameters.push(JSON.stringify(query.statuses));
    }
    for (const [bound, value] of Object.entries(query.createdAt ?? {})) {
      if (value === undefined) continue;
      conditions.push(`sessions.created_at ${CREATED_AT_OPERATORS[bound as keyof CreatedAtBounds]} ?`);
      parameters.push(value);
    }
    const list = listSql(SESSIONS_FROM, SESSION_COLUMNS, query, conditions, parameters, 'sessions.');
    return pageOf(
      this.#statements.get(list.sql).all(...list.parameters) as SessionRow[],
      list.limit,
      sessionOf,
    );
  }

  async findSessionsByStatus(statuses: readonly SessionStatus[]): Promise<SessionRecord[]> {
    const rows = this.#statements
      .get(
        `SELECT ${SESSION_COLUMNS} FROM ${SESSIONS_FROM}
         WHERE session_heads.status IN (SELECT value FROM json_each(?)) ORDER BY sessions.position`,
      )
      .all(JSON.stringify(statuses)) as SessionRow[];
    return rows.map(sessionOf);
  }

  async countSessionsByStatus(): Promise<Partial<Record<SessionStatus, number>>> {
    const rows = this.#statements
      .get('SELECT status, count(*) AS count FROM session_heads GROUP BY status')
      .all() as { status: SessionStatus; count: number }[];
    return Object.fromEntries(rows.map((row) => [row.status, row.count]));
  }

  async createTenant(record: TenantRecord): Promise<void> {
    try {
      this.#statements
        .get('INSERT INTO tenants (id, name, created_at, limits) VALUES (?, ?, ?, ?)')
        .run(
          record.id,
          record.name,
          record.createdAt,
          record.limits === null ? null : JSON.stringify(record.limits),
        );
    } catch (error) {
      if (isUniqueViolation(error))
        throw conflict(`a tenant named ${JSON.stringify(record.name)} already exists`);
      throw error;
    }
  }

  async getTenant(id: string): Promise<TenantRecord | undefined> {
    const row = this.#statements.get('SELECT * FROM tenants WHERE id = ?').get(id) as TenantRow | undefined;
    return row === undefined ? undefined : tenantOf(row);
  }

  async listTenants(): Promise<TenantRecord[]> {
    return (this.#statements.get('SELECT * FROM tenants ORDER BY created_at, id').all() as TenantRow[]).map(
      tenantOf,
    );
  }

  async createUser(record: UserRecord): Promise<void> {
    try {
      this.#statements
        .get('INSERT INTO users (id, tenant_id, name, role, created_at) VALUES (?, ?, ?, ?, ?)')
        .run(record.id, record.tenantId, record.name, record.role, record.createdAt);
    } catch (error) {
      if (isUniqueViolation(error))
        throw conflict(`a user named ${JSON.stringify(record.name)} already exists`);
      throw error;
    }
  }

  async getUser(tenantId: string, id: string): Promise<UserRecord | undefined> {
    const row = this.#statements
      .get('SELECT * FROM users WHERE id = ? AND tenant_id = ?')
      .get(id, tenantId) as UserRow | undefined;
    return row === undefined ? undefined : userOf(row);
  }

  async setUserRole(tenantId: string, id: string, role: Role): Promise<UserRecord | undefined> {
    this.#statements.get('UPDATE users SET role = ? WHERE id = ? AND tenant_id = ?').run(role, id, tenantId);
    return this.getUser(tenantId, id);
  }

  async listUsers(tenantId: string): Promise<UserRecord[]> {
    return (
      this.#statements
        .get('SELECT * FROM users WHERE tenant_id = ? ORDER BY created_at, id')
        .all(tenantId) as UserRow[]
    ).map(userOf);
  }

  async createApiKey(record: NewApiKey): Promise<void> {
    try {
      this.#statements
        .get(
          `INSERT INTO api_keys (id, tenant_id, user_id, hash, name, created_at, expires_at, revoked_at)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?)`,
        )
        .run(
          record.id,
          record.tenantId,
          record.userId,
          record.hash,
          record.name,
          record.createdAt,
          record.expiresAt,
          record.revokedAt,
        );
    } catch (error) {
      if (isUniqueViolation(error)) throw conflict(`API key ${record.id} already exists`);
      throw error;
    }
  }

  async findApiKeyByHash(hash: string): Promise<ApiKeyRecord | undefined> {
    const row = this.#statements
      .get(`SELECT ${API_KEY_COLUMNS} FROM ${API_KEYS_FROM} WHERE api_keys.hash = ?`)
      .get(hash) as ApiKeyRow | undefined;
    return row === undefined ? undefined : apiKeyOf(row);
  }

  async listApiKeys(tenantId: string, userId?: string): Promise<ApiKeyRecord[]> {
    const rows = this.#statements
      .get(
        `SELECT ${API_KEY_COLUMNS} FROM ${API_KEYS_FROM} WHERE api_keys.tenant_id = ?
         AND (? IS NULL OR api_keys.user_id = ?) ORDER BY api_keys.created_at DESC, api_keys.id DESC`,
      )
      .all(tenantId, userId ?? null, userId ?? null) as ApiKeyRow[];
    return rows.map(apiKeyOf);
  }

  async getApiKey(tenantId: string, id: string): Promise<ApiKeyRecord | undefined> {
    const row = this.#statements
      .get(`SELECT ${API_KEY_COLUMNS} FROM ${API_KEYS_FROM} WHERE api_keys.id = ? AND api_keys.tenant_id = ?`)
      .get(id, tenantId) as ApiKeyRow | undefined;
    return row === undefined ? undefined : apiKeyOf(row);
  }

  async revokeApiKey(tenantId: string, id: string, at: string): Promise<ApiKeyRecord | undefined> {
    this.#statements
      .get('UPDATE api_keys SET revoked_at = coalesce(revoked_at, ?) WHERE id = ? AND tenant_id = ?')
      .run(at, id, tenantId);
    return this.getApiKey(tenantId, id);
  }

  async countApiKeys(): Promise<number> {
    return (this.#statements.get('SELECT count(*) AS count FROM api_keys').get() as { count: number }).count;
  }

  async createFirstApiKey(first: {
    tenant: TenantRecord;
    user: UserRecord;
    key: NewApiKey;
  }): Promise<boolean> {
    const { tenant, user, key } = first;
    // IMMEDIATE takes the write lock before the count, so two processes on one file cannot both
    // see an empty key table.
    return this.#database
      .transaction(() => {
        if (
          (this.#statements.get('SELECT count(*) AS count FROM api_keys').get() as { count: number }).count >
          0
        )
          return false;
        this.#statements
          .get('INSERT OR IGNORE INTO tenants (id, name, created_at, limits) VALUES (?, ?, ?, ?)')
          .run(
            tenant.id,
            tenant.name,
            tenant.createdAt,
            tenant.limits === null ? null : JSON.stringify(tenant.limits),
          );
        this.#statements
          .get('INSERT OR IGNORE INTO users (id, tenant_id, name, role, created_at) VALUES (?, ?, ?, ?, ?)')
          .run(user.id, user.tenantId, user.name, user.role, user.createdAt);
        this.#statements
          .get(
            `INSERT INTO api_keys (id, tenant_id, user_id, hash, name, created_at, expires_at, revoked_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?)`,
          )
          .run(
            key.id,
            key.tenantId,
            key.userId,
            key.hash,
            key.name,
            key.createdAt,
            key.expiresAt,
            key.revokedAt,
          );
        return true;
      })
      .immediate();
  }

  #insertRow(table: string, record: ResourceRecord, extra: Record<string, unknown>): void {
    const columns = [
      'id',
      'tenant_id',
      'owner_id',
      'created_at',
      'updated_at',
      'archived_at',
      'body',
      ...Object.keys(extra),
    ];
    const values = [
      record.id,
      record.tenantId,
      record.ownerId,
      record.createdAt,
      record.updatedAt,
      record.archivedAt,
      JSON.stringify(record.body),
      ...Object.values(extra),
    ];
    try {
      this.#statements
        .get(`INSERT INTO ${table} (${columns.join(', ')}) VALUES (${columns.map(() => '?').join(', ')})`)
        .run(...values);
    } catch (error) {
      if (isUniqueViolation(error)) throw conflict(`${record.id} already exists`);
      throw error;
    }
  }

  #insertAgentVersion(record: ResourceRecord, version: number): void {
    this.#statements
      .get(
        `INSERT INTO agent_versions (agent_id, version, tenant_id, owner_id, created_at, updated_at, archived_at, body)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?)`,
      )
      .run(
        record.id,
        version,
        record.tenantId,
        record.ownerId,
        record.createdAt,
        record.updatedAt,
        record.archivedAt,
        JSON.stringify(record.body),
      );
  }
}

interface CredentialRow extends RecordRow {
  vault_id: string;
  key_id: string;
  sealed_secret: string;
}

function credentialOf(row: CredentialRow): CredentialRecord {
  return {
    ...recordOf(row),
    vaultId: row.vault_id,
    secret: { keyId: row.key_id, sealed: row.sealed_secret },
  };
}

class SqliteVaultStore implements VaultStore {
  readonly #statements: StatementCache;

  constructor(database: Database.Database) {
    this.#statements = new StatementCache(database);
  }

  async createVault(record: ResourceRecord): Promise<void> {
    try {
      this.#statements
        .get(
          `INSERT INTO vaults (id, tenant_id, owner_id, created_at, updated_at, archived_at, body)
           VALUES (?, ?, ?, ?, ?, ?, ?)`,
        )
        .run(
          record.id,
          record.tenantId,
          record.ownerId,
          record.createdAt,
          record.updatedAt,
          record.archivedAt,
          JSON.stringify(record.body),
        );
    } catch (error) {
      if (isUniqueViolation(error)) throw conflict(`${record.id} already exists`);
      throw error;
    }
  }

  async getVault(tenantId: string, id: string): Promise<ResourceRecord | undefined> {
    const row = this.#statements
      .get('SELECT * FROM vaults WHERE id = ? AND tenant_id = ?')
      .get(id, tenantId) as RecordRow | undefined;
    return row === undefined ? undefined : recordOf(row);
  }

  async updateVault(record: ResourceRecord): Promise<void> {
    const result = this.#statements
      .get('UPDATE vaults SET body = ?, updated_at = ?, archived_at = ? WHERE id = ? AND tenant_id = ?')
      .run(JSON.stringify(record.body), record.updatedAt, record.archivedAt, record.id, record.tenantId);
    if (result.changes === 0) throw notFound('vault', record.id);
  }

  async listVaults(query: ListQuery): Promise<Page<ResourceRecord>> {
    const { sql, parameters, limit } = listSql('vaults', '*', query, [], []);
    return pageOf(this.#statements.get(sql).all(...parameters) as RecordRow[], limit, recordOf);
  }

  async deleteVault(tenantId: string, id: string): Promise<boolean> {
    // Credentials go with it (ON DELETE CASCADE).
    return (
      this.#statements.get('DELETE FROM vaults WHERE id = ? AND tenant_id = ?').run(id, tenantId).changes > 0
    );
  }

  async createCredential(record: CredentialRecord): Promise<void> {
    try {
      // INSERT … SELECT: no row is written unless the vault is the tenant's.
      const result = this.#statements
        .get(
          `INSERT INTO vault_credentials
             (id, tenant_id, vault_id, owner_id, created_at, updated_at, archived_at, body, key_id, sealed_secret)
           SELECT ?, ?, id, ?, ?, ?, ?, ?, ?, ? FROM vaults WHERE id = ? AND tenant_id = ?`,
        )
        .run(
          record.id,
          record.tenantId,
          record.ownerId,
          record.createdAt,
          record.updatedAt,
          record.archivedAt,
          JSON.stringify(record.body),
          record.secret.keyId,
          record.secret.sealed,
          record.vaultId,
          record.tenantId,
        );
      if (result.changes === 0) throw notFound('vault', record.vaultId);
    } catch (error) {
      if (isUniqueViolation(error)) throw conflict(`${record.id} already exists`);
      throw error;
    }
  }

  async getCredential(tenantId: string, vaultId: string, id: string): Promise<CredentialRecord | undefined> {
    const row = this.#statements
      .get('SELECT * FROM vault_credentials WHERE id = ? AND vault_id = ? AND tenant_id = ?')
      .get(id, vaultId, tenantId) as CredentialRow | undefined;
    return row === undefined ? undefined : credentialOf(row);
  }

  async updateCredential(update: CredentialUpdate): Promise<boolean> {
    const result = this.#statements
      .get(
        `UPDATE vault_credentials SET body = ?, updated_at = ?, archived_at = ?,
           key_id = coalesce(?, key_id), sealed_secret = coalesce(?, sealed_secret)
         WHERE id = ? AND vault_id = ? AND tenant_id = ?
           AND (? IS NULL OR (sealed_secret = ? AND updated_at = ?))`,
      )
      .run(
        JSON.stringify(update.body),
        update.updatedAt,
        update.archivedAt,
        update.secret?.keyId ?? null,
        update.secret?.sealed ?? null,
        update.id,
        update.vaultId,
        update.tenantId,
        update.expected === undefined ? null : 1,
        update.expected?.sealed ?? null,
        update.expected?.updatedAt ?? null,
      );
    if (result.changes > 0) return true;
    if ((await this.getCredential(update.tenantId, update.vaultId, update.id)) === undefined) {
      throw notFound('credential', update.id);
    }
    return false;
  }

  async listCredentials(
    tenantId: string,
    vaultId: string,
    query: Omit<ListQuery, 'tenantId'>,
  ): Promise<Page<CredentialRecord>> {
    const { sql, parameters, limit } = listSql(
      'vault_credentials',
      '*',
      { ...query, tenantId },
      ['vault_id = ?'],
      [vaultId],
    );
    return pageOf(this.#statements.get(sql).all(...parameters) as CredentialRow[], limit, credentialOf);
  }

  async deleteCredential(tenantId: string, vaultId: string, id: string): Promise<boolean> {
    return (
      this.#statements
        .get('DELETE FROM vault_credentials WHERE id = ? AND vault_id = ? AND tenant_id = ?')
        .run(id, vaultId, tenantId).changes > 0
    );
  }

  async listCredentialsSealedWithout(
    tenantId: string,
    keyId: string,
    query: { cursor?: string; limit: number },
  ): Promise<Page<CredentialRecord>> {
    const { sql, parameters, limit } = listSql(
      'vault_credentials',
      '*',
      { tenantId, cursor: query.cursor, limit: query.limit, includeArchived: true },
      ['key_id <> ?'],
      [keyId],
    );
    return pageOf(this.#statements.get(sql).all(...parameters) as CredentialRow[], limit, credentialOf);
  }

  async resealCredential(
    tenantId: string,
    id: string,
    expected: string,
    next: SealedSecret,
  ): Promise<boolean> {
    const result = this.#statements
      .get(
        `UPDATE vault_credentials SET key_id = ?, sealed_secret = ?
         WHERE id = ? AND tenant_id = ? AND sealed_secret = ?`,
      )
      .run(next.keyId, next.sealed, id, tenantId, expected);
    return result.changes > 0;
  }

  async countCredentialsByKey(tenantId: string): Promise<Record<string, number>> {
    const rows = this.#statements
      .get('SELECT key_id, count(*) AS count FROM vault_credentials WHERE tenant_id = ? GROUP BY key_id')
      .all(tenantId) as { key_id: string; count: number }[];
    return Object.fromEntries(rows.map((row) => [row.key_id, row.count]));
  }
}

interface SkillRow extends RecordRow {
  latest_version: string | null;
}

function skillOf(row: SkillRow): SkillRecord {
  return { ...recordOf(row), latestVersion: row.latest_version };
}

/** A skill's columns and its latest version: the version of its newest version row. */
const SKILL_COLUMNS = `skills.*, (SELECT skill_versions.version FROM skill_versions
  WHERE skill_versions.skill_id = skills.id AND skill_versions.tenant_id = skills.tenant_id
  ORDER BY skill_versions.position DESC LIMIT 1) AS latest_version`;

interface SkillVersionRow {
  position: number;
  tenant_id: string;
  skill_id: string;
  version: string;
  created_at: string;
  body: string;
}

interface SkillVersionArchiveRow extends SkillVersionRow {
  archive: Buffer;
}

/** A version row without its archive (what lists return). */
const SKILL_VERSION_COLUMNS = 'position, tenant_id, skill_id, version, created_at, body';

function skillVersionOf(row: SkillVersionRow): Omit<SkillVersionRecord, 'archive'> {
  return {
    tenantId: row.tenant_id,
    skillId: row.skill_id,
    version: row.version,
    createdAt: row.created_at,
    body: JSON.parse(row.body) as Record<string, unknown>,
  };
}

/** better-sqlite3 binds a Buffer as a BLOB; a plain Uint8Array is viewed as one (no copy). */
function blobOf(bytes: Uint8Array): Buffer {
  return Buffer.isBuffer(bytes) ? bytes : Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

class SqliteSkillStore implements SkillStore {
  readonly #database: Database.Database;
  readonly #statements: StatementCache;

  constructor(database: Database.Database) {
    this.#database = database;
    this.#statements = new StatementCache(database);
  }

  async createSkill(skill: ResourceRecord, first: SkillVersionRecord): Promise<void> {
    if (first.skillId !== skill.id || first.tenantId !== skill.tenantId)
      throw invalidRequest('the first version does not belong to the skill');
    try {
      this.#database
        .transaction(() => {
          this.#statements
            .get(
              `INSERT INTO skills (id, tenant_id, owner_id, created_at, updated_at, archived_at, body)
               VALUES (?, ?, ?, ?, ?, ?, ?)`,
            )
            .run(
              skill.id,
              skill.tenantId,
              skill.ownerId,
              skill.createdAt,
              skill.updatedAt,
              skill.archivedAt,
              JSON.stringify(skill.body),
            );
          this.#statements
            .get(
              `INSERT INTO skill_versions (tenant_id, skill_id, version, created_at, body, archive)
               VALUES (?, ?, ?, ?, ?, ?)`,
            )
            .run(
              first.tenantId,
              first.skillId,
              first.version,
              first.createdAt,
              JSON.stringify(first.body),
              blobOf(first.archive),
            );
        })
        .immediate();
    } catch (error) {
      if (isUniqueViolation(error)) throw conflict(`${skill.id} already exists`);
      throw error;
    }
  }

  async getSkill(tenantId: string, id: string): Promise<SkillRecord | undefined> {
    const row = this.#statements
      .get(`SELECT ${SKILL_COLUMNS} FROM skills WHERE skills.id = ? AND skills.tenant_id = ?`)
      .get(id, tenantId) as SkillRow | undefined;
    return row === undefined ? undefined : skillOf(row);
  }

  async listSkills(query: ListQuery): Promise<Page<SkillRecord>> {
    const { sql, parameters, limit } = listSql('skills', SKILL_COLUMNS, query, [], [], 'skills.');
    return pageOf(this.#statements.get(sql).all(...parameters) as SkillRow[], limit, skillOf);
  }

  async addSkillVersion(version: SkillVersionRecord, updatedAt: string): Promise<void> {
    try {
      this.#database
        .transaction(() => {
          // INSERT … SELECT: no row is written unless the skill is the tenant's.
          const result = this.#statements
            .get(
              `INSERT INTO skill_versions (tenant_id, skill_id, version, created_at, body, archive)
               SELECT ?, id, ?, ?, ?, ? FROM skills WHERE id = ? AND tenant_id = ?`,
            )
            .run(
              version.tenantId,
              version.version,
              version.createdAt,
              JSON.stringify(version.body),
              blobOf(version.archive),
              version.skillId,
              version.tenantId,
            );
          if (result.changes === 0) throw notFound('skill', version.skillId);
          this.#statements
            .get('UPDATE skills SET updated_at = ? WHERE id = ? AND tenant_id = ?')
            .run(updatedAt, version.skillId, version.tenantId);
        })
        .immediate();
    } catch (error) {
      if (isUniqueViolation(error))
        throw conflict(`version ${version.version} of skill ${version.skillId} already exists`);
      throw error;
    }
  }

  async getSkillVersion(
    tenantId: string,
    skillId: string,
    version: string,
  ): Promise<SkillVersionRecord | undefined> {
    const row = this.#statements
      .get(
        `SELECT ${SKILL_VERSION_COLUMNS}, archive FROM skill_versions
         WHERE skill_id = ? AND version = ? AND tenant_id = ?`,
      )
      .get(skillId, version, tenantId) as SkillVersionArchiveRow | undefined;
    return row === undefined ? undefined : { ...skillVersionOf(row), archive: row.archive };
  }

  async listSkillVersions(
    tenantId: string,
    skillId: string,
    query: Omit<ListQuery, 'tenantId'>,
  ): Promise<Page<Omit<SkillVersionRecord, 'archive'>>> {
    // Versions have no owner and are never archived: only order, cursor and limit apply.
    const { sql, parameters, limit } = listSql(
      'skill_versions',
      SKILL_VERSION_COLUMNS,
      { tenantId, limit: query.limit, cursor: query.cursor, order: query.order, includeArchived: true },
      ['skill_id = ?'],
      [skillId],
    );
    return pageOf(this.#statements.get(sql).all(...parameters) as SkillVersionRow[], limit, skillVersionOf);
  }

  async deleteSkillVersion(tenantId: string, skillId: string, version: string): Promise<boolean> {
    return (
      this.#statements
        .get('DELETE FROM skill_versions WHERE skill_id = ? AND version = ? AND tenant_id = ?')
        .run(skillId, version, tenantId).changes > 0
    );
  }

  async deleteSkill(tenantId: string, id: string): Promise<boolean> {
    // Its versions go with it (ON DELETE CASCADE).
    return (
      this.#statements.get('DELETE FROM skills WHERE id = ? AND tenant_id = ?').run(id, tenantId).changes > 0
    );
  }
}

/** SQL for one page of a tenant's rows in creation order (one extra row tells if more follow). */
function listSql(
  from: string,
  columns: string,
  query: ListQuery,
  extraConditions: readonly string[],
  extraParameters: readonly unknown[],
  /** Qualifies the record columns when `from` is a join, e.g. `sessions.`. */
  table = '',
): { sql: string; parameters: unknown[]; limit: number } {
  const limit = checkLimit(query.limit);
  const descending = query.order === 'desc';
  const conditions = [`${table}tenant_id = ?`, ...extraConditions];
  const parameters: unknown[] = [query.tenantId, ...extraParameters];
  if (query.ownerId !== undefined) {
    conditions.push(`${table}owner_id = ?`);
    parameters.push(query.ownerId);
  }
  if (query.includeArchived !== true) conditions.push(`${table}archived_at IS NULL`);
  if (query.cursor !== undefined) {
    conditions.push(descending ? `${table}position < ?` : `${table}position > ?`);
    parameters.push(decodeCursor(query.cursor));
  }
  parameters.push(limit + 1);
  const sql = `SELECT ${columns} FROM ${from} WHERE ${conditions.join(' AND ')} ORDER BY ${table}position ${descending ? 'DESC' : 'ASC'} LIMIT ?`;
  return { sql, parameters, limit };
}

function pageOf<Row extends { position: number }, Item>(
  rows: Row[],
  limit: number,
  map: (row: Row) => Item,
): Page<Item> {
  const more = rows.length > limit;
  const pageRows = more ? rows.slice(0, limit) : rows;
  const last = pageRows[pageRows.length - 1];
  return {
    items: pageRows.map(map),
    nextCursor: more && last !== undefined ? encodeCursor(last.position) : null,
  };
}
