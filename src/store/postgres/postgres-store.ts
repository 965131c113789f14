import pg from 'pg';
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
  SessionStatus,
  StoredEvent,
  WriterToken,
} from '../event-store.js';
import type {
  ApiKeyRecord,
  ListQuery,
  Page,
  ResourceKind,
  ResourceRecord,
  ResourceStore,
  SessionListQuery,
  SessionRecord,
  Store,
} from '../resource-store.js';
import { migratePostgres, quoteSchemaName } from './schema.js';

/** Where the PostgreSQL store lives. */
export interface PostgresStoreOptions {
  /** Connection string, e.g. `postgres://user@127.0.0.1:5432/berth`. */
  url: string;
  /** Schema holding Berth's tables (default `berth`); tests use a fresh one each. */
  schema?: string;
  /** Most pooled connections (default 10). */
  maxConnections?: number;
}

/**
 * Opens (and migrates) a PostgreSQL store on a connection pool. Each append is one
 * autocommitted statement whose UPDATE of the session's head row takes its row lock, so
 * writers on any node serialize per session; within this process appends to one session are
 * also queued, so subscribers see commits in order.
 */
export async function openPostgresStore(options: PostgresStoreOptions): Promise<Store> {
  const schema = options.schema ?? 'berth';
  const quoted = quoteSchemaName(schema);
  const pool = new pg.Pool({ connectionString: options.url, max: options.maxConnections ?? 10 });
  // An idle client losing its connection must not crash the process; the next query reports it.
  pool.on('error', () => {});
  try {
    await migratePostgres(pool, schema);
  } catch (error) {
    await pool.end();
    throw mapError(error);
  }
  return new PostgresStore(pool, quoted);
}

class PostgresStore implements Store {
  readonly kind = 'postgres' as const;
  readonly events: PostgresEventStore;
  readonly resources: PostgresResourceStore;
  readonly #pool: pg.Pool;
  #closed = false;

  constructor(pool: pg.Pool, schema: string) {
    this.#pool = pool;
    this.events = new PostgresEventStore(pool, schema);
    this.resources = new PostgresResourceStore(pool, schema);
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    await this.events.doClose();
    await this.#pool.end();
  }
}

/** Maps driver errors to BerthErrors: unique violations are conflicts, lost connections retryable. */
function mapError(error: unknown): unknown {
  if (BerthError.isInstance(error)) return error;
  const code = (error as { code?: unknown }).code;
  if (code === '23505')
    return new BerthError('conflict', 'a row with this id already exists', { cause: error });
  if (
    typeof code === 'string' &&
    (code.startsWith('08') || code === '57P01' || code === 'ECONNREFUSED' || code === 'ECONNRESET')
  ) {
    return new BerthError('store_unavailable', `PostgreSQL is unavailable: ${String(error)}`, {
      retryable: true,
      cause: error,
    });
  }
  return error;
}

/** Runs `work` in one transaction on one pooled client; rolls back on any error. */
async function inTransaction<T>(pool: pg.Pool, work: (client: pg.PoolClient) => Promise<T>): Promise<T> {
  let client: pg.PoolClient;
  try {
    client = await pool.connect();
  } catch (error) {
    throw mapError(error);
  }
  try {
    await client.query('BEGIN');
    const result = await work(client);
    await client.query('COMMIT');
    client.release();
    return result;
  } catch (error) {
    try {
      await client.query('ROLLBACK');
      client.release();
    } catch (rollbackError) {
      client.release(rollbackError as Error);
    }
    throw mapError(error);
  }
}

/**
 * JSON text for a jsonb column. PostgreSQL text cannot hold NUL, so a NUL inside a string
 * (a tool's binary output, say) becomes U+FFFD instead of failing the whole append.
 */
function toJsonb(value: unknown): string {
  return JSON.stringify(value).replace(/(?<!\\)((?:\\\\)*)\\u0000/g, '$1\\ufffd');
}

interface EventRow {
  session_id: string;
  seq: string;
  body: SessionEvent;
}

function storedEventOf(row: EventRow): StoredEvent {
  // jsonb sorts keys; put the API's leading fields back in front.
  const { id, type, processed_at, ...fields } = row.body;
  return { sessionId: row.session_id, seq: Number(row.seq), event: { id, type, processed_at, ...fields } };
}

class PostgresEventStore implements EventStore {
  readonly #pool: pg.Pool;
  readonly #s: string;
  readonly #subscribers = new EventSubscribers();
  /** Tail of each session's in-process append queue. */
  readonly #tails = new Map<string, Promise<unknown>>();

  constructor(pool: pg.Pool, schema: string) {
    this.#pool = pool;
    this.#s = schema;
  }

  async append(
    sessionId: string,
    events: readonly NewEvent[],
    options?: AppendOptions,
  ): Promise<AppendResult> {
    checkWriterSession(sessionId, options);
    const prepared = prepareEvents(events, '');
    return this.#serialized(sessionId, async () => {
      const result = await this.#applyAppend(sessionId, prepared, options);
      // Still inside this session's queue, so listeners see commits in seq order.
      if (!result.duplicate) this.#subscribers.deliver(sessionId, result.events);
      return result;
    });
  }

  async findByIdempotencyKey(sessionId: string, key: string): Promise<StoredEvent[] | undefined> {
    const result = await this.#query<EventRow>(
      `SELECT e.session_id, e.seq, e.body FROM ${this.#s}.idempotency_keys k
       JOIN ${this.#s}.events e ON e.session_id = k.session_id AND e.seq >= k.first_seq AND e.seq < k.first_seq + k.count
       WHERE k.session_id = $1 AND k.key = $2 ORDER BY e.seq`,
      [sessionId, key],
    );
    return result.rows.length === 0 ? undefined : result.rows.map(storedEventOf);
  }

  async read(sessionId: string, query: ReadQuery = {}): Promise<StoredEvent[]> {
    const conditions = ['session_id = $1'];
    const parameters: unknown[] = [sessionId];
    if (query.afterSeq !== undefined) {
      parameters.push(query.afterSeq);
      conditions.push(`seq > $${parameters.length}`);
    }
    if (query.beforeSeq !== undefined) {
      parameters.push(query.beforeSeq);
      conditions.push(`seq < $${parameters.length}`);
    }
    if (query.types !== undefined) {
      parameters.push([...query.types]);
      conditions.push(`type = ANY($${parameters.length}::text[])`);
    }
    parameters.push(checkLimit(query.limit ?? DEFAULT_READ_LIMIT));
    const order = query.order === 'desc' ? 'DESC' : 'ASC';
    const result = await this.#query<EventRow>(
      `SELECT session_id, seq, body FROM ${this.#s}.events WHERE ${conditions.join(' AND ')}
       ORDER BY seq ${order} LIMIT $${parameters.length}`,
      parameters,
    );
    return result.rows.map(storedEventOf);
  }

  async getEvent(sessionId: string, eventId: string): Promise<StoredEvent | undefined> {
    const result = await this.#query<EventRow>(
      `SELECT session_id, seq, body FROM ${this.#s}.events WHERE id = $1 AND session_id = $2`,
      [eventId, sessionId],
    );
    const row = result.rows[0];
    return row === undefined ? undefined : storedEventOf(row);
  }

  async headSeq(sessionId: string): Promise<number> {
    const result = await this.#query<{ last_seq: string }>(
      `SELECT last_seq FROM ${this.#s}.session_heads WHERE session_id = $1`,
      [sessionId],
    );
    const row = result.rows[0];
    if (row === undefined) throw notFound('session', sessionId);
    return Number(row.last_seq);
  }

  subscribe(sessionId: string, listener: EventListener): () => void {
    return this.#subscribers.add(sessionId, listener);
  }

  async acquireWriter(sessionId: string): Promise<WriterToken> {
    const result = await this.#query<{ writer_token: string }>(
      `UPDATE ${this.#s}.session_heads SET writer_token = writer_token + 1 WHERE session_id = $1
       RETURNING writer_token`,
      [sessionId],
    );
    const row = result.rows[0];
    if (row === undefined) throw notFound('session', sessionId);
    return { sessionId, token: Number(row.writer_token) };
  }

  /** Waits for queued appends, then drops listeners. Called by `Store.close`. */
  async doClose(): Promise<void> {
    await Promise.all([...this.#tails.values()]);
    this.#subscribers.clear();
  }

  /**
   * One append in ONE autocommitted statement (one round trip): the head row's UPDATE checks
   * the writer token and the idempotency key and reserves the seqs under its row lock, and the
   * events and the key are inserted from what it returns. When it updates no row, a follow-up
   * read says why (unknown session, stale writer, or a repeated key).
   */
  async #applyAppend(
    sessionId: string,
    events: SessionEvent[],
    options: AppendOptions | undefined,
  ): Promise<AppendResult> {
    const s = this.#s;
    const key = options?.idempotencyKey ?? null;
    const writerToken = options?.writer?.token ?? null;
    // Appends to one session are serialized in this process, so processed_at never goes
    // backwards within a session on one node.
    const processedAt = new Date().toISOString();
    for (const event of events) event.processed_at = processedAt;
    const change = statusChangeOf(events);
    let base: number | undefined;
    try {
      const result = await this.#query<{ base: string }>(
        `WITH head AS (
           UPDATE ${s}.session_heads SET last_seq = last_seq + $3,
             status = coalesce($8::text, status),
             updated_at = CASE WHEN $8::text IS NULL THEN updated_at ELSE $9 END,
             stop_reason = CASE WHEN $10::boolean THEN stop_reason ELSE $11::jsonb END
           WHERE session_id = $1
             AND ($2::bigint IS NULL OR writer_token = $2::bigint)
             AND ($12::bigint IS NULL OR last_seq = $12::bigint)
             AND ($7::text IS NULL OR NOT EXISTS (
               SELECT 1 FROM ${s}.idempotency_keys k WHERE k.session_id = $1 AND k.key = $7::text))
           RETURNING last_seq - $3 AS base
         ), inserted AS (
           INSERT INTO ${s}.events (session_id, seq, id, type, processed_at, body)
           SELECT $1, head.base + t.ordinal, t.id, t.type, $9, t.body::jsonb
           FROM head, unnest($4::text[], $5::text[], $6::text[]) WITH ORDINALITY AS t (id, type, body, ordinal)
         ), keyed AS (
           INSERT INTO ${s}.idempotency_keys (session_id, key, first_seq, count)
           SELECT $1, $7::text, head.base + 1, $3 FROM head WHERE $7::text IS NOT NULL
         )
         SELECT base FROM head`,
        [
          sessionId,
          writerToken,
          events.length,
          events.map((event) => event.id),
          events.map((event) => event.type),
          events.map((event) => toJsonb(event)),
          key,
          change?.status ?? null,
          processedAt,
          change?.stopReason === undefined,
          change?.stopReason == null ? null : toJsonb(change.stopReason),
          options?.expectedHeadSeq ?? null,
        ],
      );
      if (result.rows[0] !== undefined) base = Number(result.rows[0].base);
    } catch (error) {
      const violation = error as { code?: unknown; constraint?: unknown };
      // Another node stored the same key between our check and insert: answer as a repeat.
      const keyTaken = violation.code === '23505' && String(violation.constraint).includes('idempotency');
      if (!keyTaken) throw violation.code === '23505' ? eventIdTaken(error) : error;
    }
    if (base !== undefined) {
      return {
        events: events.map((event, index) => ({ sessionId, seq: base + index + 1, event })),
        duplicate: false,
      };
    }
    // Nothing was written; find out why, in the order the checks are documented.
    const head = await this.#query<{ writer_token: string; last_seq: string }>(
      `SELECT writer_token, last_seq FROM ${s}.session_heads WHERE session_id = $1`,
      [sessionId],
    );
    const row = head.rows[0];
    if (row === undefined) throw notFound('session', sessionId);
    const newestToken = Number(row.writer_token);
    if (writerToken !== null && writerToken !== newestToken) {
      throw staleWriter(sessionId, writerToken, newestToken);
    }
    const repeated = key === null ? undefined : await this.findByIdempotencyKey(sessionId, key);
    if (repeated) return { events: repeated, duplicate: true };
    const expected = options?.expectedHeadSeq;
    if (expected !== undefined && Number(row.last_seq) !== expected) {
      throw headMoved(sessionId, expected, Number(row.last_seq));
    }
    throw new BerthError('store_unavailable', `append to session ${sessionId} was not applied; retry`, {
      retryable: true,
    });
  }

  /** Runs tasks for one session one after another, in call order. */
  #serialized<T>(sessionId: string, task: () => Promise<T>): Promise<T> {
    const previous = this.#tails.get(sessionId) ?? Promise.resolve();
    const run = previous.then(task);
    const tail = run.then(
      () => {},
      () => {},
    );
    this.#tails.set(sessionId, tail);
    void tail.then(() => {
      if (this.#tails.get(sessionId) === tail) this.#tails.delete(sessionId);
    });
    return run;
  }

  async #query<Row extends pg.QueryResultRow>(
    sql: string,
    parameters: unknown[],
  ): Promise<pg.QueryResult<Row>> {
    try {
      return await this.#pool.query<Row>(sql, parameters);
    } catch (error) {
      throw mapError(error);
    }
  }
}

interface RecordRow {
  position: string;
  id: string;
  tenant_id: string;
  owner_id: string;
  created_at: string;
  updated_at: string;
  archived_at: string | null;
  body: Record<string, unknown>;
}

interface SessionRow extends RecordRow {
  agent_id: string;
  agent_version: number;
  environment_id: string;
  status: SessionStatus;
  stop_reason: Record<string, unknown> | null;
  last_seq: string;
}

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

const RECORD_COLUMNS = 'position, id, tenant_id, owner_id, created_at, updated_at, archived_at, body';
/** A session is its `sessions` row joined with its narrow, often-written `session_heads` row. */
const SESSION_COLUMNS = `sessions.position, sessions.id, sessions.tenant_id, sessions.owner_id,
  sessions.created_at, session_heads.updated_at, sessions.archived_at, sessions.body,
  sessions.agent_id, sessions.agent_version, sessions.environment_id,
  session_heads.status, session_heads.stop_reason, session_heads.last_seq`;
const sessionsFrom = (s: string) =>
  `${s}.sessions JOIN ${s}.session_heads ON session_heads.session_id = sessions.id`;
const VERSION_COLUMNS =
  'version AS position, agent_id AS id, tenant_id, owner_id, created_at, updated_at, archived_at, body';

function recordOf(row: RecordRow): ResourceRecord {
  return {
    id: row.id,
    tenantId: row.tenant_id,
    ownerId: row.owner_id,
    createdAt: row.created_at,
    updatedAt: row.updated_at,
    archivedAt: row.archived_at,
    body: row.body,
  };
}

function sessionOf(row: SessionRow): SessionRecord {
  return {
    ...recordOf(row),
    agentId: row.agent_id,
    agentVersion: row.agent_version,
    environmentId: row.environment_id,
    status: row.status,
    stopReason: row.stop_reason,
    lastSeq: Number(row.last_seq),
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

class PostgresResourceStore implements ResourceStore {
  readonly #pool: pg.Pool;
  readonly #s: string;

  constructor(pool: pg.Pool, schema: string) {
    this.#pool = pool;
    this.#s = schema;
  }

  async createAgent(record: ResourceRecord): Promise<void> {
    if (record.body.version !== 1) throw invalidRequest('a new agent body must have version 1');
    await inTransaction(this.#pool, async (client) => {
      await this.#insertRow(client, 'agents', record, { latest_version: 1 });
      await this.#insertAgentVersion(client, record, 1);
    });
  }

  async addAgentVersion(
    tenantId: string,
    agentId: string,
    expectedVersion: number,
    record: ResourceRecord,
  ): Promise<void> {
    const version = expectedVersion + 1;
    if (record.body.version !== version)
      throw invalidRequest(`the new agent body must have version ${version}`);
    if (record.id !== agentId || record.tenantId !== tenantId)
      throw invalidRequest('record does not match agent');
    const s = this.#s;
    await inTransaction(this.#pool, async (client) => {
      const current = await client.query<{ latest_version: number }>(
        `SELECT latest_version FROM ${s}.agents WHERE id = $1 AND tenant_id = $2 FOR UPDATE`,
        [agentId, tenantId],
      );
      const row = current.rows[0];
      if (row === undefined) throw notFound('agent', agentId);
      if (row.latest_version !== expectedVersion) {
        throw conflict(`agent ${agentId} is at version ${row.latest_version}, not ${expectedVersion}`);
      }
      await client.query(
        `UPDATE ${s}.agents SET latest_version = $1, body = $2::jsonb, updated_at = $3, archived_at = $4
         WHERE id = $5 AND tenant_id = $6`,
        [version, toJsonb(record.body), record.updatedAt, record.archivedAt, agentId, tenantId],
      );
      await this.#insertAgentVersion(client, record, version);
    });
  }

  async getAgentVersion(
    tenantId: string,
    agentId: string,
    version?: number,
  ): Promise<ResourceRecord | undefined> {
    if (version === undefined) return this.get('agent', tenantId, agentId);
    const result = await this.#query<RecordRow>(
      `SELECT ${VERSION_COLUMNS} FROM ${this.#s}.agent_versions WHERE agent_id = $1 AND tenant_id = $2 AND version = $3`,
      [agentId, tenantId, version],
    );
    const row = result.rows[0];
    return row === undefined ? undefined : recordOf(row);
  }

  async listAgentVersions(
    tenantId: string,
    agentId: string,
    query: Omit<ListQuery, 'tenantId'>,
  ): Promise<Page<ResourceRecord>> {
    const descending = (query.order ?? 'desc') === 'desc';
    const limit = checkLimit(query.limit);
    const parameters: unknown[] = [agentId, tenantId];
    let cursorCondition = '';
    if (query.cursor !== undefined) {
      parameters.push(decodeCursor(query.cursor));
      cursorCondition = `AND version ${descending ? '<' : '>'} $${parameters.length}`;
    }
    parameters.push(limit + 1);
    const result = await this.#query<RecordRow>(
      `SELECT ${VERSION_COLUMNS} FROM ${this.#s}.agent_versions
       WHERE agent_id = $1 AND tenant_id = $2 ${cursorCondition}
       ORDER BY version ${descending ? 'DESC' : 'ASC'} LIMIT $${parameters.length}`,
      parameters,
    );
    return pageOf(result.rows, limit, recordOf);
  }

  async insert(kind: Exclude<ResourceKind, 'session'>, record: ResourceRecord): Promise<void> {
    if (kind === 'agent') return this.createAgent(record);
    await this.#insertRow(this.#pool, 'environments', record, {});
  }

  async get(kind: ResourceKind, tenantId: string, id: string): Promise<ResourceRecord | undefined> {
    if (kind === 'session') return this.getSession(tenantId, id);
    const result = await this.#query<RecordRow>(
      `SELECT ${RECORD_COLUMNS} FROM ${this.#s}.${TABLE_OF_KIND[kind]} WHERE id = $1 AND tenant_id = $2`,
      [id, tenantId],
    );
    const row = result.rows[0];
    return row === undefined ? undefined : recordOf(row);
  }

  async update(kind: ResourceKind, record: ResourceRecord): Promise<void> {
    const parameters = [
      toJsonb(record.body),
      record.updatedAt,
      record.archivedAt,
      record.id,
      record.tenantId,
    ];
    // A session's updated_at is read from its head, which status changes also stamp.
    const sql =
      kind === 'session'
        ? `WITH updated AS (
             UPDATE ${this.#s}.sessions SET body = $1::jsonb, updated_at = $2, archived_at = $3
             WHERE id = $4 AND tenant_id = $5 RETURNING id
           )
           UPDATE ${this.#s}.session_heads SET updated_at = $2
           FROM updated WHERE session_heads.session_id = updated.id`
        : `UPDATE ${this.#s}.${TABLE_OF_KIND[kind]} SET body = $1::jsonb, updated_at = $2, archived_at = $3
           WHERE id = $4 AND tenant_id = $5`;
    const result = await this.#query(sql, parameters);
    if (result.rowCount === 0) throw notFound(kind, record.id);
  }

  async list(kind: Exclude<ResourceKind, 'session'>, query: ListQuery): Promise<Page<ResourceRecord>> {
    const list = listSql(`${this.#s}.${TABLE_OF_KIND[kind]}`, RECORD_COLUMNS, query, [], []);
    const result = await this.#query<RecordRow>(list.sql, list.parameters);
    return pageOf(result.rows, list.limit, recordOf);
  }

  async delete(kind: ResourceKind, tenantId: string, id: string): Promise<boolean> {
    const result = await this.#query(
      `DELETE FROM ${this.#s}.${TABLE_OF_KIND[kind]} WHERE id = $1 AND tenant_id = $2`,
      [id, tenantId],
    );
    return (result.rowCount ?? 0) > 0;
  }

  async createSession(record: SessionRecord): Promise<void> {
    await inTransaction(this.#pool, async (client) => {
      await this.#insertRow(client, 'sessions', record, {
        agent_id: record.agentId,
        agent_version: record.agentVersion,
        environment_id: record.environmentId,
      });
      await client.query(
        `INSERT INTO ${this.#s}.session_heads (session_id, status, stop_reason, last_seq, writer_token, updated_at)
         VALUES ($1, $2, $3::jsonb, $4, 0, $5)`,
        [
          record.id,
          record.status,
          record.stopReason === null ? null : toJsonb(record.stopReason),
          record.lastSeq,
          record.updatedAt,
        ],
      );
    });
  }

  async getSession(tenantId: string, id: string): Promise<SessionRecord | undefined> {
    const result = await this.#query<SessionRow>(
      `SELECT ${SESSION_COLUMNS} FROM ${sessionsFrom(this.#s)} WHERE sessions.id = $1 AND sessions.tenant_id = $2`,
      [id, tenantId],
    );
    const row = result.rows[0];
    return row === undefined ? undefined : sessionOf(row);
  }

  async getSessionUnscoped(id: string): Promise<SessionRecord | undefined> {
    const result = await this.#query<SessionRow>(
      `SELECT ${SESSION_COLUMNS} FROM ${sessionsFrom(this.#s)} WHERE sessions.id = $1`,
      [id],
    );
    const row = result.rows[0];
    return row === undefined ? undefined : sessionOf(row);
  }

  async listSessions(query: SessionListQuery): Promise<Page<SessionRecord>> {
    const conditions: string[] = [];
    const parameters: unknown[] = [];
    // listSql numbers its own parameters after these, starting at $2 (tenant is $1).
    if (query.agentId !== undefined) {
      parameters.push(query.agentId);
      conditions.push(`sessions.agent_id = $${parameters.length + 1}`);
    }
    if (query.agentVersion !== undefined) {
      parameters.push(query.agentVersion);
      conditions.push(`sessions.agent_version = $${parameters.length + 1}`);
    }
    if (query.statuses !== undefined) {
      parameters.push([...query.statuses]);
      conditions.push(`session_heads.status = ANY($${parameters.length + 1}::text[])`);
    }
    const list = listSql(sessionsFrom(this.#s), SESSION_COLUMNS, query, conditions, parameters, 'sessions.');
    const result = await this.#query<SessionRow>(list.sql, list.parameters);
    return pageOf(result.rows, list.limit, sessionOf);
  }

  async findSessionsByStatus(statuses: readonly SessionStatus[]): Promise<SessionRecord[]> {
    const result = await this.#query<SessionRow>(
      `SELECT ${SESSION_COLUMNS} FROM ${sessionsFrom(this.#s)}
       WHERE session_heads.status = ANY($1::text[]) ORDER BY sessions.position`,
      [[...statuses]],
    );
    return result.rows.map(sessionOf);
  }

  async createApiKey(record: ApiKeyRecord): Promise<void> {
    await this.#query(
      `INSERT INTO ${this.#s}.api_keys (id, tenant_id, user_id, role, hash, name, created_at, expires_at, revoked_at)
       VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)`,
      [
        record.id,
        record.tenantId,
        record.userId,
        record.role,
        record.hash,
        record.name,
        record.createdAt,
        record.expiresAt,
        record.revokedAt,
      ],
    );
  }

  async findApiKeyByHash(hash: string): Promise<ApiKeyRecord | undefined> {
    const result = await this.#query<ApiKeyRow>(`SELECT * FROM ${this.#s}.api_keys WHERE hash = $1`, [hash]);
    const row = result.rows[0];
    return row === undefined ? undefined : apiKeyOf(row);
  }

  async countApiKeys(): Promise<number> {
    const result = await this.#query<{ count: number }>(
      `SELECT count(*)::int AS count FROM ${this.#s}.api_keys`,
      [],
    );
    return result.rows[0]?.count ?? 0;
  }

  async #insertRow(
    queryable: pg.Pool | pg.PoolClient,
    table: string,
    record: ResourceRecord,
    extra: Record<string, unknown>,
  ): Promise<void> {
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
      toJsonb(record.body),
      ...Object.values(extra),
    ];
    try {
      await queryable.query(
        `INSERT INTO ${this.#s}.${table} (${columns.join(', ')}) VALUES (${columns.map((_, index) => `$${index + 1}`).join(', ')})`,
        values,
      );
    } catch (error) {
      throw mapError(error);
    }
  }

  async #insertAgentVersion(client: pg.PoolClient, record: ResourceRecord, version: number): Promise<void> {
    await client.query(
      `INSERT INTO ${this.#s}.agent_versions (agent_id, version, tenant_id, owner_id, created_at, updated_at, archived_at, body)
       VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb)`,
      [
        record.id,
        version,
        record.tenantId,
        record.ownerId,
        record.createdAt,
        record.updatedAt,
        record.archivedAt,
        toJsonb(record.body),
      ],
    );
  }

  async #query<Row extends pg.QueryResultRow>(
    sql: string,
    parameters: unknown[],
  ): Promise<pg.QueryResult<Row>> {
    try {
      return await this.#pool.query<Row>(sql, parameters);
    } catch (error) {
      throw mapError(error);
    }
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
  const parameters: unknown[] = [query.tenantId, ...extraParameters];
  const conditions = [`${table}tenant_id = $1`, ...extraConditions];
  if (query.ownerId !== undefined) {
    parameters.push(query.ownerId);
    conditions.push(`${table}owner_id = $${parameters.length}`);
  }
  if (query.includeArchived !== true) conditions.push(`${table}archived_at IS NULL`);
  if (query.cursor !== undefined) {
    parameters.push(decodeCursor(query.cursor));
    conditions.push(`${table}position ${descending ? '<' : '>'} $${parameters.length}`);
  }
  parameters.push(limit + 1);
  const sql = `SELECT ${columns} FROM ${from} WHERE ${conditions.join(' AND ')}
    ORDER BY ${table}position ${descending ? 'DESC' : 'ASC'} LIMIT $${parameters.length}`;
  return { sql, parameters, limit };
}

function pageOf<Row extends { position: string | number }, Item>(
  rows: Row[],
  limit: number,
  map: (row: Row) => Item,
): Page<Item> {
  const more = rows.length > limit;
  const pageRows = more ? rows.slice(0, limit) : rows;
  const last = pageRows[pageRows.length - 1];
  return {
    items: pageRows.map(map),
    nextCursor: more && last !== undefined ? encodeCursor(Number(last.position)) : null,
  };
}
