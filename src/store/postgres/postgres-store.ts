import { randomUUID } from 'node:crypto';
import pg from 'pg';
import { BerthError, conflict, invalidRequest, isBerthError, notFound } from '../../errors.js';
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
  type PrincipalChange,
  type ResourceKind,
  type ResourceRecord,
  type ResourceStore,
  type Role,
  type RowLevelSecurity,
  type SessionCreateOptions,
  type SessionCreateResult,
  type SessionListQuery,
  type SessionRecord,
  type SnapshotArchiveStore,
  type Store,
  type TenantRecord,
  type UserRecord,
} from '../resource-store.js';
import type { SkillRecord, SkillStore, SkillVersionRecord } from '../skill-store.js';
import type { CredentialRecord, CredentialUpdate, SealedSecret, VaultStore } from '../vault-store.js';
import {
  eventsChannel,
  migratePostgres,
  postgresSchemaVersion,
  principalsChannel,
  quoteSchemaName,
} from './schema.js';

/** Where the PostgreSQL store lives. */
export interface PostgresStoreOptions {
  /**
   * Connection string the application uses, e.g. `postgres://berth_app@127.0.0.1:5432/berth`.
   * For row-level security to be a wall, its role must not own the tables, nor be a superuser
   * or BYPASSRLS (`rowLevelSecurity` on the opened store says whether it is).
   */
  url: string;
  /**
   * Connection string of the role that owns the schema and runs migrations (default: `url`).
   * The application role of `url` is granted data rights on open.
   */
  migrationUrl?: string;
  /** Schema holding Berth's tables (default `berth`); tests use a fresh one each. */
  schema?: string;
  /** Most pooled connections (default 10). */
  maxConnections?: number;
  /**
   * Without `migrationUrl`, whether to migrate as `url`'s role (default true: a single-role
   * server). Operator commands pass false: they only check that no migration is pending and
   * say what to set when one is, since `url` is usually the app role, which may not migrate.
   */
  migrateAsApp?: boolean;
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
  let rowLevelSecurity: RowLevelSecurity;
  try {
    const role = await pool.query<{ name: string; superuser: boolean; bypass: boolean }>(
      `SELECT current_user AS name, rolsuper AS superuser, rolbypassrls AS bypass
       FROM pg_catalog.pg_roles WHERE rolname = current_user`,
    );
    const app = role.rows[0]!;
    if (options.migrationUrl !== undefined && options.migrationUrl !== options.url) {
      const owner = new pg.Pool({ connectionString: options.migrationUrl, max: 1 });
      owner.on('error', () => {});
      try {
        await migratePostgres(owner, schema, app.name);
      } finally {
        await owner.end();
      }
    } else if (options.migrateAsApp === false && options.migrationUrl === undefined) {
      const { applied, needed } = await postgresSchemaVersion(pool, schema);
      const fix = `set BERTH_DATABASE_MIGRATION_URL to the URL of the role that owns the database (this command connects as ${app.name})`;
      if (applied === undefined) {
        throw new BerthError(
          'store_unavailable',
          `role ${app.name} may not read Berth's schema "${schema}" (not granted yet?): ${fix}, or start a server that has it`,
        );
      }
      if (applied === 0) {
        throw new BerthError('store_unavailable', `the database has no Berth schema "${schema}" yet: ${fix}`);
      }
      if (applied < needed) {
        throw new BerthError(
          'store_unavailable',
          `the database schema is at version ${applied} and this Berth needs ${needed}: ${fix}`,
        );
      }
      if (applied > needed) {
        throw new BerthError(
          'store_unavailable',
          `the database schema version ${applied} is newer than this Berth (${needed}): use a newer berth`,
        );
      }
    } else {
      await migratePostgres(pool, schema).catch((error: unknown) => {
        if ((error as { code?: unknown }).code !== '42501') throw error;
        throw new BerthError(
          'store_unavailable',
          `role ${app.name} may not migrate the database (${(error as Error).message}): set BERTH_DATABASE_MIGRATION_URL to the URL of the role that owns the database`,
          { cause: error },
        );
      });
    }
    // Owning the tables, or being a member of the owner role (which can SET ROLE to it and is
    // covered by the owner's own policy), makes row-level security no wall.
    const owned = await pool.query<{ owner: string; member: boolean }>(
      `SELECT pg_catalog.pg_get_userbyid(relowner) AS owner,
              pg_catalog.pg_has_role(current_user, relowner, 'MEMBER') AS member
       FROM pg_catalog.pg_class WHERE oid = to_regclass($1)`,
      [`${quoted}.events`],
    );
    rowLevelSecurity = app.superuser
      ? { enforced: false, reason: `role ${app.name} is a superuser, which bypasses row-level security` }
      : app.bypass
        ? { enforced: false, reason: `role ${app.name} has BYPASSRLS` }
        : owned.rows[0]?.member
          ? {
              enforced: false,
              reason:
                owned.rows[0].owner === app.name
                  ? `role ${app.name} owns the tables; give migrations their own role (migration URL)`
                  : `role ${app.name} is a member of ${owned.rows[0].owner}, which owns the tables`,
            }
          : { enforced: true };
  } catch (error) {
    await pool.end();
    throw mapError(error);
  }
  return new PostgresStore(pool, quoted, rowLevelSecurity);
}

class PostgresStore implements Store {
  readonly kind = 'postgres' as const;
  readonly events: PostgresEventStore;
  readonly resources: PostgresResourceStore;
  readonly skills: PostgresSkillStore;
  readonly vaults: PostgresVaultStore;
  readonly snapshotArchives: SnapshotArchiveStore;
  readonly rowLevelSecurity: RowLevelSecurity;
  readonly #pool: pg.Pool;
  #closed = false;

  constructor(pool: pg.Pool, schema: string, rowLevelSecurity: RowLevelSecurity) {
    this.#pool = pool;
    this.rowLevelSecurity = rowLevelSecurity;
    this.events = new PostgresEventStore(pool, schema);
    this.resources = new PostgresResourceStore(pool, schema);
    this.skills = new PostgresSkillStore(pool, schema);
    this.vaults = new PostgresVaultStore(pool, schema);
    this.snapshotArchives = postgresSnapshotArchives(pool, schema);
  }

  listenAcrossNodes(): Promise<void> {
    return this.events.listenAcrossNodes();
  }

  watchPrincipals(listener: (change: PrincipalChange) => void): () => void {
    return this.events.watchPrincipals(listener);
  }

  principalAcknowledgements(change: Exclude<PrincipalChange, { kind: 'missed' }>) {
    return this.events.principalAcknowledgements(change);
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

/**
 * Runs `work` in one transaction on one pooled client, with the transaction's tenant set
 * (`berth.tenant_id`, read by every row-level security policy); rolls back on any error.
 * Every query of the store runs in one of these: the tenant is set per transaction, never per
 * connection, so a pooled connection carries nothing from one tenant's work to the next.
 */
async function inTenant<T>(
  pool: pg.Pool,
  tenantId: string,
  work: (client: pg.PoolClient) => Promise<T>,
): Promise<T> {
  let client: pg.PoolClient;
  try {
    client = await pool.connect();
  } catch (error) {
    throw mapError(error);
  }
  try {
    // One round trip for both (simple protocol); the literal is escaped by the driver.
    await client.query(
      `BEGIN; SELECT set_config('berth.tenant_id', ${client.escapeLiteral(tenantId)}, true)`,
    );
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
 * A call of one of the schema's functions as its own autocommitted statement (one round trip):
 * the hot-path functions set the tenant themselves inside that transaction; the few
 * cross-tenant ones (SECURITY DEFINER) need none.
 */
async function callFunction<Row extends pg.QueryResultRow>(
  pool: pg.Pool,
  sql: string,
  parameters: unknown[],
): Promise<pg.QueryResult<Row>> {
  try {
    return await pool.query<Row>(sql, parameters);
  } catch (error) {
    throw mapError(error);
  }
}

/** One statement in its own transaction scoped to the tenant. */
function queryInTenant<Row extends pg.QueryResultRow>(
  pool: pg.Pool,
  tenantId: string,
  sql: string,
  parameters: unknown[],
): Promise<pg.QueryResult<Row>> {
  return inTenant(pool, tenantId, (client) => client.query<Row>(sql, parameters));
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

/** A principal change as migration 13's trigger announces it. */
function principalPayload(change: Exclude<PrincipalChange, { kind: 'missed' }>): string {
  return change.kind === 'tenant'
    ? `tenant ${change.tenantId}`
    : `${change.kind} ${change.tenantId} ${change.id}`;
}

class PostgresEventStore implements EventStore {
  readonly #pool: pg.Pool;
  readonly #s: string;
  readonly #subscribers = new EventSubscribers();
  /** Tail of each session's in-process append queue. */
  readonly #tails = new Map<string, Promise<unknown>>();
  /**
   * Across nodes (`listenAcrossNodes`) every delivery follows the NOTIFY stream, which is in
   * commit order for all nodes, this one included: the highest seq handed to each session's
   * listeners, this process's own appends waiting for their notice (saves reading them back),
   * and the per-session chain deliveries run on.
   */
  readonly #delivered = new Map<string, number>();
  readonly #own = new Map<string, StoredEvent[]>();
  readonly #deliveries = new Map<string, Promise<void>>();
  #listener: { client: pg.Client | undefined; closed: boolean } | undefined;
  /** Who hears principal changes (the same listening connection carries them). */
  readonly #principalWatchers = new Set<(change: PrincipalChange) => void>();
  /** This process among the listeners, in its acknowledgements of principal changes. */
  readonly #listenerId = randomUUID();
  /** Waits for other processes' acknowledgements, by notice payload. */
  readonly #acknowledgements = new Map<string, Set<{ from: Set<string>; heard: () => void }>>();

  constructor(pool: pg.Pool, schema: string) {
    this.#pool = pool;
    this.#s = schema;
  }

  /** See `Store.watchPrincipals`. */
  watchPrincipals(listener: (change: PrincipalChange) => void): () => void {
    this.#principalWatchers.add(listener);
    return () => this.#principalWatchers.delete(listener);
  }

  /**
   * See `Store.principalAcknowledgements`: acknowledgements are notices on the same channel,
   * "ack <listener id> <the change's notice>", sent by each listener once its watchers ran.
   */
  principalAcknowledgements(change: Exclude<PrincipalChange, { kind: 'missed' }>): {
    wait(others: number, timeoutMs: number): Promise<void>;
  } {
    const payload = principalPayload(change);
    const entry: { from: Set<string>; heard: () => void } = { from: new Set(), heard: () => undefined };
    let waiters = this.#acknowledgements.get(payload);
    if (!waiters) {
      waiters = new Set();
      this.#acknowledgements.set(payload, waiters);
    }
    waiters.add(entry);
    const forget = () => {
      waiters.delete(entry);
      if (waiters.size === 0 && this.#acknowledgements.get(payload) === waiters) {
        this.#acknowledgements.delete(payload);
      }
    };
    // Forgotten after a while even if nobody waits (the write failed, say).
    setTimeout(forget, 5_000).unref();
    return {
      wait: async (others, timeoutMs) => {
        if (entry.from.size < others) {
          let timer: NodeJS.Timeout | undefined;
          await new Promise<void>((resolve) => {
            entry.heard = () => {
              if (entry.from.size >= others) resolve();
            };
            timer = setTimeout(resolve, timeoutMs);
          });
          clearTimeout(timer);
        }
        forget();
      },
    };
  }

  #acknowledged(listenerId: string, payload: string): void {
    if (listenerId === this.#listenerId) return;
    for (const waiter of this.#acknowledgements.get(payload) ?? []) {
      waiter.from.add(listenerId);
      waiter.heard();
    }
  }

  #principalChanged(change: PrincipalChange): void {
    for (const watcher of this.#principalWatchers) {
      try {
        watcher(change);
      } catch {
        // One watcher failing must not keep the change from the others.
      }
    }
  }

  /**
   * Hears other nodes' appends: one connection LISTENs on the schema's channel (migration 8's
   * trigger NOTIFYs on every commit); a notice for a session with listeners here makes this
   * node read the new events and deliver them, after its own, in seq order and once. A lost
   * connection is reopened, and every listened-to session is caught up from the log.
   */
  async listenAcrossNodes(): Promise<void> {
    if (this.#listener) return;
    const state: { client: pg.Client | undefined; closed: boolean } = { client: undefined, closed: false };
    this.#listener = state;
    const options = this.#pool.options;
    const connect = async (): Promise<void> => {
      const client = new pg.Client({ ...options });
      let ended = false;
      client.on('notification', (message) => {
        if (message.channel === principalsChannel(this.#s)) {
          const payload = message.payload ?? '';
          const [kind, tenantId, id] = payload.split(' ');
          if (kind === 'ack') {
            // "ack <listener id> <notice>"
            const listenerId = tenantId;
            if (listenerId) this.#acknowledged(listenerId, payload.slice(`ack ${listenerId} `.length));
            return;
          }
          if (!tenantId) return;
          if (kind === 'tenant') this.#principalChanged({ kind, tenantId });
          else if ((kind === 'key' || kind === 'user') && id) this.#principalChanged({ kind, tenantId, id });
          else return;
          // Told: the process that made the change may answer its caller now.
          this.#pool
            .query('SELECT pg_notify($1, $2)', [
              principalsChannel(this.#s),
              `ack ${this.#listenerId} ${payload}`,
            ])
            .catch(() => undefined);
          return;
        }
        const [tenantId, sessionId, first, last] = (message.payload ?? '').split(' ');
        if (!tenantId || !sessionId) return;
        this.#heard({ tenantId, id: sessionId }, Number(first), Number(last));
      });
      client.on('error', () => undefined);
      client.on('end', () => {
        if (ended) return;
        ended = true;
        if (!state.closed && state.client === client) reopen();
      });
      state.client = client;
      try {
        await client.connect();
        await client.query(`LISTEN "${eventsChannel(this.#s)}"; LISTEN "${principalsChannel(this.#s)}"`);
      } catch (error) {
        ended = true;
        await client.end().catch(() => undefined);
        throw error;
      }
    };
    // After a lost connection: reopen (retrying), then catch up what was committed meanwhile.
    const reopen = () => {
      setTimeout(() => {
        if (state.closed) return;
        connect().then(
          () => {
            // Notices sent while the connection was down are lost: anything may have changed.
            this.#principalChanged({ kind: 'missed' });
            for (const key of this.#delivered.keys()) {
              const [tenantId, id] = key.split('/') as [string, string];
              this.#heard({ tenantId, id }, Number.NaN, Number.NaN);
            }
          },
          () => reopen(),
        );
      }, 200);
    };
    try {
      await connect();
    } catch (error) {
      this.#listener = undefined;
      throw mapError(error);
    }
  }

  /**
   * A notice of `first..last` committed for the session (NaN: catch up after a lost
   * connection). Delivered in notice order per session, from the last delivered seq (filling any
   * gap) or, for a listener that has had nothing yet, from `first`.
   */
  #heard(session: SessionKey, first: number, last: number): void {
    const key = sessionKeyString(session);
    if (!this.#subscribers.has(key)) {
      this.#delivered.delete(key);
      this.#own.delete(key);
      return;
    }
    const previous = this.#deliveries.get(key) ?? Promise.resolve();
    const next = previous
      .then(async () => {
        const delivered = this.#delivered.get(key);
        if (delivered !== undefined && Number.isFinite(last) && last <= delivered) return;
        const from = delivered !== undefined ? delivered + 1 : first;
        if (!Number.isFinite(from)) return;
        const own = this.#own.get(key) ?? [];
        const cached = own.filter(
          (stored) => stored.seq >= from && (!Number.isFinite(last) || stored.seq <= last),
        );
        const complete = Number.isFinite(last) && cached.length === last - from + 1;
        const events = complete ? cached : await this.read(session, { afterSeq: from - 1, limit: 1000 });
        this.#own.set(
          key,
          own.filter((stored) => stored.seq > (events.at(-1)?.seq ?? from - 1)),
        );
        this.#deliver(key, events);
      })
      .catch(() => undefined);
    this.#deliveries.set(key, next);
    void next.then(() => {
      if (this.#deliveries.get(key) === next) this.#deliveries.delete(key);
    });
  }

  /** Hands events to listeners, skipping any already delivered (across nodes). */
  #deliver(key: string, events: readonly StoredEvent[]): void {
    if (!this.#subscribers.has(key)) {
      this.#delivered.delete(key);
      return;
    }
    const delivered = this.#delivered.get(key) ?? 0;
    const fresh = events.filter((stored) => stored.seq > delivered);
    if (fresh.length === 0) return;
    this.#delivered.set(key, fresh.at(-1)!.seq);
    this.#subscribers.deliver(key, fresh);
  }

  async append(
    session: SessionKey,
    events: readonly NewEvent[],
    options?: AppendOptions,
  ): Promise<AppendResult> {
    checkWriterSession(session.id, options);
    const prepared = prepareEvents(events, '');
    const key = sessionKeyString(session);
    return this.#serialized(key, async () => {
      const result = await this.#applyAppend(session, prepared, options);
      if (!result.duplicate) {
        if (this.#listener === undefined) {
          // Still inside this session's queue, so listeners see commits in seq order.
          this.#subscribers.deliver(key, result.events);
        } else if (this.#subscribers.has(key)) {
          // Delivered when its notice comes back, in commit order with other nodes' appends.
          this.#own.set(key, [...(this.#own.get(key) ?? []), ...result.events]);
        }
      }
      return result;
    });
  }

  async findByIdempotencyKey(session: SessionKey, key: string): Promise<StoredEvent[] | undefined> {
    const result = await this.#query<EventRow>(
      session.tenantId,
      `SELECT e.session_id, e.seq, e.body FROM ${this.#s}.idempotency_keys k
       JOIN ${this.#s}.events e ON e.session_id = k.session_id AND e.seq >= k.first_seq AND e.seq < k.first_seq + k.count
       WHERE k.session_id = $1 AND k.key = $2 AND k.tenant_id = $3 ORDER BY e.seq`,
      [session.id, key, session.tenantId],
    );
    return result.rows.length === 0 ? undefined : result.rows.map(storedEventOf);
  }

  async read(session: SessionKey, query: ReadQuery = {}): Promise<StoredEvent[]> {
    // One round trip: the function sets the tenant inside the statement's own transaction.
    const result = await callFunction<EventRow>(
      this.#pool,
      `SELECT * FROM ${this.#s}.read_events($1, $2, $3, $4, $5::text[], $6, $7)`,
      [
        session.tenantId,
        session.id,
        query.afterSeq ?? null,
        query.beforeSeq ?? null,
        query.types === undefined ? null : [...query.types],
        checkLimit(query.limit ?? DEFAULT_READ_LIMIT),
        query.order === 'desc',
      ],
    );
    return result.rows.map(storedEventOf);
  }

  async getEvent(session: SessionKey, eventId: string): Promise<StoredEvent | undefined> {
    const result = await this.#query<EventRow>(
      session.tenantId,
      `SELECT session_id, seq, body FROM ${this.#s}.events WHERE id = $1 AND session_id = $2 AND tenant_id = $3`,
      [eventId, session.id, session.tenantId],
    );
    const row = result.rows[0];
    return row === undefined ? undefined : storedEventOf(row);
  }

  async headSeq(session: SessionKey): Promise<number> {
    const result = await this.#query<{ last_seq: string }>(
      session.tenantId,
      `SELECT last_seq FROM ${this.#s}.session_heads WHERE session_id = $1 AND tenant_id = $2`,
      [session.id, session.tenantId],
    );
    const row = result.rows[0];
    if (row === undefined) throw notFound('session', session.id);
    return Number(row.last_seq);
  }

  subscribe(session: SessionKey, listener: EventListener): () => void {
    const key = sessionKeyString(session);
    // A first listener hears what is committed from now on, not what an earlier one was owed.
    if (!this.#subscribers.has(key)) this.#delivered.delete(key);
    return this.#subscribers.add(key, listener);
  }

  async acquireWriter(session: SessionKey): Promise<WriterToken> {
    const result = await this.#query<{ writer_token: string }>(
      session.tenantId,
      `UPDATE ${this.#s}.session_heads SET writer_token = writer_token + 1
       WHERE session_id = $1 AND tenant_id = $2 RETURNING writer_token`,
      [session.id, session.tenantId],
    );
    const row = result.rows[0];
    if (row === undefined) throw notFound('session', session.id);
    return { sessionId: session.id, token: Number(row.writer_token) };
  }

  /** Waits for queued appends, then drops listeners. Called by `Store.close`. */
  async doClose(): Promise<void> {
    if (this.#listener) {
      this.#listener.closed = true;
      await this.#listener.client?.end().catch(() => undefined);
    }
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
    session: SessionKey,
    events: SessionEvent[],
    options: AppendOptions | undefined,
  ): Promise<AppendResult> {
    const sessionId = session.id;
    const tenantId = session.tenantId;
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
      // One round trip: the function sets the tenant, then reserves the seqs under the head
      // row's lock and inserts the events and the key (see migration 4).
      const result = await callFunction<{ base: string | null }>(
        this.#pool,
        `SELECT ${s}.append_events($1, $2, $3, $4, $5::text[], $6::text[], $7::text[], $8, $9, $10, $11, $12::jsonb, $13) AS base`,
        [
          tenantId,
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
      const returned = result.rows[0]?.base;
      if (returned !== undefined && returned !== null) base = Number(returned);
    } catch (error) {
      const violation = ((BerthError.isInstance(error) ? error.cause : error) ?? {}) as {
        code?: unknown;
        constraint?: unknown;
      };
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
      tenantId,
      `SELECT writer_token, last_seq FROM ${s}.session_heads WHERE session_id = $1 AND tenant_id = $2`,
      [sessionId, tenantId],
    );
    const row = head.rows[0];
    if (row === undefined) throw notFound('session', sessionId);
    const newestToken = Number(row.writer_token);
    if (writerToken !== null && writerToken !== newestToken) {
      throw staleWriter(sessionId, writerToken, newestToken);
    }
    const repeated = key === null ? undefined : await this.findByIdempotencyKey(session, key);
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

  #query<Row extends pg.QueryResultRow>(tenantId: string, sql: string, parameters: unknown[]) {
    return queryInTenant<Row>(this.#pool, tenantId, sql, parameters);
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

interface TenantRow {
  id: string;
  name: string;
  created_at: string;
  limits: TenantRecord['limits'];
}

interface UserRow {
  id: string;
  tenant_id: string;
  name: string;
  role: 'admin' | 'member';
  created_at: string;
}

function tenantOf(row: TenantRow): TenantRecord {
  return { id: row.id, name: row.name, createdAt: row.created_at, limits: row.limits };
}

function userOf(row: UserRow): UserRecord {
  return { id: row.id, tenantId: row.tenant_id, name: row.name, role: row.role, createdAt: row.created_at };
}

/** A key is read with its user's role. */
const apiKeysFrom = (s: string) => `${s}.api_keys JOIN ${s}.users ON users.id = api_keys.user_id`;
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
    await inTenant(this.#pool, record.tenantId, async (client) => {
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
    await inTenant(this.#pool, tenantId, async (client) => {
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
      tenantId,
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
      tenantId,
      `SELECT ${VERSION_COLUMNS} FROM ${this.#s}.agent_versions
       WHERE agent_id = $1 AND tenant_id = $2 ${cursorCondition}
       ORDER BY version ${descending ? 'DESC' : 'ASC'} LIMIT $${parameters.length}`,
      parameters,
    );
    return pageOf(result.rows, limit, recordOf);
  }

  async insert(kind: Exclude<ResourceKind, 'session'>, record: ResourceRecord): Promise<void> {
    if (kind === 'agent') return this.createAgent(record);
    await inTenant(this.#pool, record.tenantId, (client) =>
      this.#insertRow(client, 'environments', record, {}),
    );
  }

  async get(kind: ResourceKind, tenantId: string, id: string): Promise<ResourceRecord | undefined> {
    if (kind === 'session') return this.getSession(tenantId, id);
    const result = await this.#query<RecordRow>(
      tenantId,
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
    const result = await this.#query(record.tenantId, sql, parameters);
    if (result.rowCount === 0) throw notFound(kind, record.id);
  }

  async list(kind: Exclude<ResourceKind, 'session'>, query: ListQuery): Promise<Page<ResourceRecord>> {
    const list = listSql(`${this.#s}.${TABLE_OF_KIND[kind]}`, RECORD_COLUMNS, query, [], []);
    const result = await this.#query<RecordRow>(query.tenantId, list.sql, list.parameters);
    return pageOf(result.rows, list.limit, recordOf);
  }

  async delete(kind: ResourceKind, tenantId: string, id: string): Promise<boolean> {
    const result = await this.#query(
      tenantId,
      `DELETE FROM ${this.#s}.${TABLE_OF_KIND[kind]} WHERE id = $1 AND tenant_id = $2`,
      [id, tenantId],
    );
    return (result.rowCount ?? 0) > 0;
  }

  async createSession(
    record: SessionRecord,
    options: SessionCreateOptions = {},
  ): Promise<SessionCreateResult> {
    const key = options.idempotencyKey ?? null;
    const initial = options.initialEvents ?? [];
    const events = initial.length === 0 ? [] : prepareEvents(initial, record.createdAt);
    const change = statusChangeOf(events);
    const s = this.#s;
    try {
      return await inTenant(this.#pool, record.tenantId, async (client): Promise<SessionCreateResult> => {
        if (key !== null) {
          const existing = await this.#sessionIdOfKey(client, record.tenantId, record.ownerId, key);
          if (existing !== undefined) return { created: false, existingSessionId: existing };
        }
        await this.#insertRow(client, 'sessions', record, {
          agent_id: record.agentId,
          agent_version: record.agentVersion,
          environment_id: record.environmentId,
          create_key: key,
        });
        await client.query(
          `INSERT INTO ${s}.session_heads (session_id, tenant_id, status, stop_reason, last_seq, writer_token, updated_at)
           VALUES ($1, $6, $2, $3::jsonb, $4, 0, $5)`,
          [
            record.id,
            record.status,
            record.stopReason === null ? null : toJsonb(record.stopReason),
            record.lastSeq,
            record.updatedAt,
            record.tenantId,
          ],
        );
        if (events.length === 0) return { created: true, events: [] };
        // The append function inside this transaction: the row, the head and the events
        // commit together (and other nodes hear of the events on commit).
        let base: number;
        try {
          const result = await client.query<{ base: string }>(
            `SELECT ${s}.append_events($1, $2, NULL, $3, $4::text[], $5::text[], $6::text[], NULL, $7, $8, $9, $10::jsonb, NULL) AS base`,
            [
              record.tenantId,
              record.id,
              events.length,
              events.map((event) => event.id),
              events.map((event) => event.type),
              events.map((event) => toJsonb(event)),
              change?.status ?? null,
              record.createdAt,
              change?.stopReason === undefined,
              change?.stopReason == null ? null : toJsonb(change.stopReason),
            ],
          );
          base = Number(result.rows[0]!.base);
        } catch (error) {
          throw (error as { code?: unknown }).code === '23505' ? eventIdTaken(error) : mapError(error);
        }
        return {
          created: true,
          events: events.map((event, index) => ({ sessionId: record.id, seq: base + index + 1, event })),
        };
      });
    } catch (error) {
      // Another request with the same key committed between our check and our insert.
      if (key !== null && isBerthError(error, 'conflict')) {
        const existing = await this.findSessionByIdempotencyKey(record.tenantId, record.ownerId, key);
        if (existing !== undefined) return { created: false, existingSessionId: existing.id };
      }
      throw error;
    }
  }

  async findSessionByIdempotencyKey(
    tenantId: string,
    ownerId: string,
    key: string,
  ): Promise<SessionRecord | undefined> {
    const id = await inTenant(this.#pool, tenantId, (client) =>
      this.#sessionIdOfKey(client, tenantId, ownerId, key),
    );
    return id === undefined ? undefined : this.getSession(tenantId, id);
  }

  async #sessionIdOfKey(
    client: pg.PoolClient,
    tenantId: string,
    ownerId: string,
    key: string,
  ): Promise<string | undefined> {
    const result = await client.query<{ id: string }>(
      `SELECT id FROM ${this.#s}.sessions WHERE tenant_id = $1 AND owner_id = $2 AND create_key = $3`,
      [tenantId, ownerId, key],
    );
    return result.rows[0]?.id;
  }

  async getSession(tenantId: string, id: string): Promise<SessionRecord | undefined> {
    const result = await callFunction<SessionRow>(
      this.#pool,
      `SELECT * FROM ${this.#s}.get_session($1, $2)`,
      [tenantId, id],
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
    for (const [bound, value] of Object.entries(query.createdAt ?? {})) {
      if (value === undefined) continue;
      parameters.push(value);
      conditions.push(
        `sessions.created_at ${CREATED_AT_OPERATORS[bound as keyof CreatedAtBounds]} $${parameters.length + 1}`,
      );
    }
    const list = listSql(sessionsFrom(this.#s), SESSION_COLUMNS, query, conditions, parameters, 'sessions.');
    const result = await this.#query<SessionRow>(query.tenantId, list.sql, list.parameters);
    return pageOf(result.rows, list.limit, sessionOf);
  }

  async findSessionsByStatus(statuses: readonly SessionStatus[]): Promise<SessionRecord[]> {
    const result = await callFunction<SessionRow>(
      this.#pool,
      `SELECT * FROM ${this.#s}.sessions_in_status($1::text[])`,
      [[...statuses]],
    );
    return result.rows.map(sessionOf);
  }

  async countSessionsByStatus(): Promise<Partial<Record<SessionStatus, number>>> {
    const result = await callFunction<{ status: SessionStatus; count: string }>(
      this.#pool,
      `SELECT * FROM ${this.#s}.session_status_counts()`,
      [],
    );
    return Object.fromEntries(result.rows.map((row) => [row.status, Number(row.count)]));
  }

  async createTenant(record: TenantRecord): Promise<void> {
    await this.#query(
      record.id,
      `INSERT INTO ${this.#s}.tenants (id, name, created_at, limits) VALUES ($1, $2, $3, $4::jsonb)`,
      [record.id, record.name, record.createdAt, record.limits === null ? null : toJsonb(record.limits)],
    ).catch((error) => {
      throw isBerthError(error, 'conflict')
        ? conflict(`a tenant named ${JSON.stringify(record.name)} already exists`)
        : error;
    });
  }

  async getTenant(id: string): Promise<TenantRecord | undefined> {
    const result = await this.#query<TenantRow>(id, `SELECT * FROM ${this.#s}.tenants WHERE id = $1`, [id]);
    const row = result.rows[0];
    return row === undefined ? undefined : tenantOf(row);
  }

  async listTenants(): Promise<TenantRecord[]> {
    const result = await callFunction<TenantRow>(this.#pool, `SELECT * FROM ${this.#s}.list_tenants()`, []);
    return result.rows.map(tenantOf);
  }

  async createUser(record: UserRecord): Promise<void> {
    await this.#query(
      record.tenantId,
      `INSERT INTO ${this.#s}.users (id, tenant_id, name, role, created_at) VALUES ($1, $2, $3, $4, $5)`,
      [record.id, record.tenantId, record.name, record.role, record.createdAt],
    ).catch((error) => {
      throw isBerthError(error, 'conflict')
        ? conflict(`a user named ${JSON.stringify(record.name)} already exists`)
        : error;
    });
  }

  async getUser(tenantId: string, id: string): Promise<UserRecord | undefined> {
    const result = await this.#query<UserRow>(
      tenantId,
      `SELECT * FROM ${this.#s}.users WHERE id = $1 AND tenant_id = $2`,
      [id, tenantId],
    );
    const row = result.rows[0];
    return row === undefined ? undefined : userOf(row);
  }

  async setUserRole(tenantId: string, id: string, role: Role): Promise<UserRecord | undefined> {
    const result = await this.#query<UserRow>(
      tenantId,
      `UPDATE ${this.#s}.users SET role = $1 WHERE id = $2 AND tenant_id = $3 RETURNING *`,
      [role, id, tenantId],
    );
    const row = result.rows[0];
    return row === undefined ? undefined : userOf(row);
  }

  async listUsers(tenantId: string): Promise<UserRecord[]> {
    const result = await this.#query<UserRow>(
      tenantId,
      `SELECT * FROM ${this.#s}.users WHERE tenant_id = $1 ORDER BY created_at, id`,
      [tenantId],
    );
    return result.rows.map(userOf);
  }

  async createApiKey(record: NewApiKey): Promise<void> {
    await this.#query(
      record.tenantId,
      `INSERT INTO ${this.#s}.api_keys (id, tenant_id, user_id, hash, name, created_at, expires_at, revoked_at)
       VALUES ($1, $2, $3, $4, $5, $6, $7, $8)`,
      [
        record.id,
        record.tenantId,
        record.userId,
        record.hash,
        record.name,
        record.createdAt,
        record.expiresAt,
        record.revokedAt,
      ],
    );
  }

  async findApiKeyByHash(hash: string): Promise<ApiKeyRecord | undefined> {
    const result = await callFunction<ApiKeyRow>(this.#pool, `SELECT * FROM ${this.#s}.find_api_key($1)`, [
      hash,
    ]);
    const row = result.rows[0];
    return row === undefined ? undefined : apiKeyOf(row);
  }

  async listApiKeys(tenantId: string, userId?: string): Promise<ApiKeyRecord[]> {
    const result = await this.#query<ApiKeyRow>(
      tenantId,
      `SELECT ${API_KEY_COLUMNS} FROM ${apiKeysFrom(this.#s)}
       WHERE api_keys.tenant_id = $1 AND ($2::text IS NULL OR api_keys.user_id = $2::text)
       ORDER BY api_keys.created_at DESC, api_keys.id DESC`,
      [tenantId, userId ?? null],
    );
    return result.rows.map(apiKeyOf);
  }

  async getApiKey(tenantId: string, id: string): Promise<ApiKeyRecord | undefined> {
    const result = await this.#query<ApiKeyRow>(
      tenantId,
      `SELECT ${API_KEY_COLUMNS} FROM ${apiKeysFrom(this.#s)} WHERE api_keys.id = $1 AND api_keys.tenant_id = $2`,
      [id, tenantId],
    );
    const row = result.rows[0];
    return row === undefined ? undefined : apiKeyOf(row);
  }

  async revokeApiKey(tenantId: string, id: string, at: string): Promise<ApiKeyRecord | undefined> {
    await this.#query(
      tenantId,
      `UPDATE ${this.#s}.api_keys SET revoked_at = coalesce(revoked_at, $1) WHERE id = $2 AND tenant_id = $3`,
      [at, id, tenantId],
    );
    return this.getApiKey(tenantId, id);
  }

  async countApiKeys(): Promise<number> {
    const result = await callFunction<{ count: string }>(
      this.#pool,
      `SELECT ${this.#s}.count_api_keys() AS count`,
      [],
    );
    return Number(result.rows[0]?.count ?? 0);
  }

  async createFirstApiKey(first: {
    tenant: TenantRecord;
    user: UserRecord;
    key: NewApiKey;
  }): Promise<boolean> {
    const { tenant, user, key } = first;
    return inTenant(this.#pool, tenant.id, async (client) => {
      // Nodes starting together queue here; each statement after the lock sees what the
      // previous holder committed (READ COMMITTED), so only the first one inserts.
      await client.query("SELECT pg_advisory_xact_lock(hashtext('berth.first-api-key.' || $1))", [this.#s]);
      const count = await client.query<{ count: string }>(`SELECT ${this.#s}.count_api_keys() AS count`);
      if (Number(count.rows[0]?.count ?? 0) > 0) return false;
      await client.query(
        `INSERT INTO ${this.#s}.tenants (id, name, created_at, limits) VALUES ($1, $2, $3, $4::jsonb)
         ON CONFLICT DO NOTHING`,
        [tenant.id, tenant.name, tenant.createdAt, tenant.limits === null ? null : toJsonb(tenant.limits)],
      );
      await client.query(
        `INSERT INTO ${this.#s}.users (id, tenant_id, name, role, created_at) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT DO NOTHING`,
        [user.id, user.tenantId, user.name, user.role, user.createdAt],
      );
      await client.query(
        `INSERT INTO ${this.#s}.api_keys (id, tenant_id, user_id, hash, name, created_at, expires_at, revoked_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)`,
        [key.id, key.tenantId, key.userId, key.hash, key.name, key.createdAt, key.expiresAt, key.revokedAt],
      );
      return true;
    });
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

  #query<Row extends pg.QueryResultRow>(tenantId: string, sql: string, parameters: unknown[]) {
    return queryInTenant<Row>(this.#pool, tenantId, sql, parameters);
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

const CREDENTIAL_COLUMNS = `${RECORD_COLUMNS}, vault_id, key_id, sealed_secret`;

/** Snapshot archives in `sandbox_snapshots` (migration 10), under row-level security. */
function postgresSnapshotArchives(pool: pg.Pool, s: string): SnapshotArchiveStore {
  return {
    async put(session, snapshot) {
      await queryInTenant(
        pool,
        session.tenantId,
        `INSERT INTO ${s}.sandbox_snapshots (tenant_id, session_id, created_at, info, archive)
         VALUES ($1, $2, $3, $4::jsonb, $5)
         ON CONFLICT (tenant_id, session_id) DO UPDATE
           SET created_at = EXCLUDED.created_at, info = EXCLUDED.info, archive = EXCLUDED.archive`,
        [session.tenantId, session.id, snapshot.createdAt, JSON.stringify(snapshot.info), snapshot.archive],
      );
    },
    async newest(session) {
      const result = await queryInTenant<{ created_at: string }>(
        pool,
        session.tenantId,
        `SELECT created_at FROM ${s}.sandbox_snapshots WHERE tenant_id = $1 AND session_id = $2`,
        [session.tenantId, session.id],
      );
      return result.rows[0]?.created_at;
    },
    async get(session) {
      const result = await queryInTenant<{
        created_at: string;
        info: Record<string, unknown>;
        archive: Buffer;
      }>(
        pool,
        session.tenantId,
        `SELECT created_at, info, archive FROM ${s}.sandbox_snapshots WHERE tenant_id = $1 AND session_id = $2`,
        [session.tenantId, session.id],
      );
      const row = result.rows[0];
      return row ? { createdAt: row.created_at, info: row.info, archive: row.archive } : undefined;
    },
    async delete(session) {
      await queryInTenant(
        pool,
        session.tenantId,
        `DELETE FROM ${s}.sandbox_snapshots WHERE tenant_id = $1 AND session_id = $2`,
        [session.tenantId, session.id],
      );
    },
  };
}

class PostgresVaultStore implements VaultStore {
  readonly #pool: pg.Pool;
  readonly #s: string;

  constructor(pool: pg.Pool, schema: string) {
    this.#pool = pool;
    this.#s = schema;
  }

  async createVault(record: ResourceRecord): Promise<void> {
    await this.#query(
      record.tenantId,
      `INSERT INTO ${this.#s}.vaults (id, tenant_id, owner_id, created_at, updated_at, archived_at, body)
       VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb)`,
      [
        record.id,
        record.tenantId,
        record.ownerId,
        record.createdAt,
        record.updatedAt,
        record.archivedAt,
        toJsonb(record.body),
      ],
    ).catch((error) => {
      throw isBerthError(error, 'conflict') ? conflict(`${record.id} already exists`) : error;
    });
  }

  async getVault(tenantId: string, id: string): Promise<ResourceRecord | undefined> {
    const result = await this.#query<RecordRow>(
      tenantId,
      `SELECT ${RECORD_COLUMNS} FROM ${this.#s}.vaults WHERE id = $1 AND tenant_id = $2`,
      [id, tenantId],
    );
    const row = result.rows[0];
    return row === undefined ? undefined : recordOf(row);
  }

  async updateVault(record: ResourceRecord): Promise<void> {
    const result = await this.#query(
      record.tenantId,
      `UPDATE ${this.#s}.vaults SET body = $1::jsonb, updated_at = $2, archived_at = $3
       WHERE id = $4 AND tenant_id = $5`,
      [toJsonb(record.body), record.updatedAt, record.archivedAt, record.id, record.tenantId],
    );
    if (result.rowCount === 0) throw notFound('vault', record.id);
  }

  async listVaults(query: ListQuery): Promise<Page<ResourceRecord>> {
    const list = listSql(`${this.#s}.vaults`, RECORD_COLUMNS, query, [], []);
    const result = await this.#query<RecordRow>(query.tenantId, list.sql, list.parameters);
    return pageOf(result.rows, list.limit, recordOf);
  }

  async deleteVault(tenantId: string, id: string): Promise<boolean> {
    // Credentials go with it (ON DELETE CASCADE).
    const result = await this.#query(
      tenantId,
      `DELETE FROM ${this.#s}.vaults WHERE id = $1 AND tenant_id = $2`,
      [id, tenantId],
    );
    return (result.rowCount ?? 0) > 0;
  }

  async createCredential(record: CredentialRecord): Promise<void> {
    // INSERT … SELECT: no row is written unless the vault is the tenant's.
    const result = await this.#query(
      record.tenantId,
      `INSERT INTO ${this.#s}.vault_credentials
         (id, tenant_id, vault_id, owner_id, created_at, updated_at, archived_at, body, key_id, sealed_secret)
       SELECT $1, $2, id, $3, $4, $5, $6, $7::jsonb, $8, $9 FROM ${this.#s}.vaults
       WHERE id = $10 AND tenant_id = $2`,
      [
        record.id,
        record.tenantId,
        record.ownerId,
        record.createdAt,
        record.updatedAt,
        record.archivedAt,
        toJsonb(record.body),
        record.secret.keyId,
        record.secret.sealed,
        record.vaultId,
      ],
    ).catch((error) => {
      throw isBerthError(error, 'conflict') ? conflict(`${record.id} already exists`) : error;
    });
    if (result.rowCount === 0) throw notFound('vault', record.vaultId);
  }

  async getCredential(tenantId: string, vaultId: string, id: string): Promise<CredentialRecord | undefined> {
    const result = await this.#query<CredentialRow>(
      tenantId,
      `SELECT ${CREDENTIAL_COLUMNS} FROM ${this.#s}.vault_credentials
       WHERE id = $1 AND vault_id = $2 AND tenant_id = $3`,
      [id, vaultId, tenantId],
    );
    const row = result.rows[0];
    return row === undefined ? undefined : credentialOf(row);
  }

  async updateCredential(update: CredentialUpdate): Promise<boolean> {
    const result = await this.#query(
      update.tenantId,
      `UPDATE ${this.#s}.vault_credentials SET body = $1::jsonb, updated_at = $2, archived_at = $3,
         key_id = coalesce($4, key_id), sealed_secret = coalesce($5, sealed_secret)
       WHERE id = $6 AND vault_id = $7 AND tenant_id = $8
         AND ($9::text IS NULL OR (sealed_secret = $9::text AND updated_at = $10::text))`,
      [
        toJsonb(update.body),
        update.updatedAt,
        update.archivedAt,
        update.secret?.keyId ?? null,
        update.secret?.sealed ?? null,
        update.id,
        update.vaultId,
        update.tenantId,
        update.expected?.sealed ?? null,
        update.expected?.updatedAt ?? null,
      ],
    );
    if ((result.rowCount ?? 0) > 0) return true;
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
    // listSql numbers its own parameters after these, starting at $2 (tenant is $1).
    const list = listSql(
      `${this.#s}.vault_credentials`,
      CREDENTIAL_COLUMNS,
      { ...query, tenantId },
      ['vault_id = $2'],
      [vaultId],
    );
    const result = await this.#query<CredentialRow>(tenantId, list.sql, list.parameters);
    return pageOf(result.rows, list.limit, credentialOf);
  }

  async deleteCredential(tenantId: string, vaultId: string, id: string): Promise<boolean> {
    const result = await this.#query(
      tenantId,
      `DELETE FROM ${this.#s}.vault_credentials WHERE id = $1 AND vault_id = $2 AND tenant_id = $3`,
      [id, vaultId, tenantId],
    );
    return (result.rowCount ?? 0) > 0;
  }

  async listCredentialsSealedWithout(
    tenantId: string,
    keyId: string,
    query: { cursor?: string; limit: number },
  ): Promise<Page<CredentialRecord>> {
    const list = listSql(
      `${this.#s}.vault_credentials`,
      CREDENTIAL_COLUMNS,
      { tenantId, cursor: query.cursor, limit: query.limit, includeArchived: true },
      ['key_id <> $2'],
      [keyId],
    );
    const result = await this.#query<CredentialRow>(tenantId, list.sql, list.parameters);
    return pageOf(result.rows, list.limit, credentialOf);
  }

  async resealCredential(
    tenantId: string,
    id: string,
    expected: string,
    next: SealedSecret,
  ): Promise<boolean> {
    const result = await this.#query(
      tenantId,
      `UPDATE ${this.#s}.vault_credentials SET key_id = $1, sealed_secret = $2
       WHERE id = $3 AND tenant_id = $4 AND sealed_secret = $5`,
      [next.keyId, next.sealed, id, tenantId, expected],
    );
    return (result.rowCount ?? 0) > 0;
  }

  async countCredentialsByKey(tenantId: string): Promise<Record<string, number>> {
    const result = await this.#query<{ key_id: string; count: string }>(
      tenantId,
      `SELECT key_id, count(*) AS count FROM ${this.#s}.vault_credentials WHERE tenant_id = $1 GROUP BY key_id`,
      [tenantId],
    );
    return Object.fromEntries(result.rows.map((row) => [row.key_id, Number(row.count)]));
  }

  #query<Row extends pg.QueryResultRow>(tenantId: string, sql: string, parameters: unknown[]) {
    return queryInTenant<Row>(this.#pool, tenantId, sql, parameters);
  }
}

interface SkillRow extends RecordRow {
  latest_version: string | null;
}

function skillOf(row: SkillRow): SkillRecord {
  return { ...recordOf(row), latestVersion: row.latest_version };
}

/** A skill's columns and its latest version: the version of its newest version row. */
const skillColumns = (s: string) => `skills.position, skills.id, skills.tenant_id, skills.owner_id,
  skills.created_at, skills.updated_at, skills.archived_at, skills.body,
  (SELECT skill_versions.version FROM ${s}.skill_versions
   WHERE skill_versions.skill_id = skills.id AND skill_versions.tenant_id = skills.tenant_id
   ORDER BY skill_versions.position DESC LIMIT 1) AS latest_version`;

interface SkillVersionRow {
  position: string;
  tenant_id: string;
  skill_id: string;
  version: string;
  created_at: string;
  body: Record<string, unknown>;
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
    body: row.body,
  };
}

/** The driver sends a Buffer as bytea; a plain Uint8Array is viewed as one (no copy). */
function byteaOf(bytes: Uint8Array): Buffer {
  return Buffer.isBuffer(bytes) ? bytes : Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

class PostgresSkillStore implements SkillStore {
  readonly #pool: pg.Pool;
  readonly #s: string;

  constructor(pool: pg.Pool, schema: string) {
    this.#pool = pool;
    this.#s = schema;
  }

  async createSkill(skill: ResourceRecord, first: SkillVersionRecord): Promise<void> {
    if (first.skillId !== skill.id || first.tenantId !== skill.tenantId)
      throw invalidRequest('the first version does not belong to the skill');
    const s = this.#s;
    await inTenant(this.#pool, skill.tenantId, async (client) => {
      await client.query(
        `INSERT INTO ${s}.skills (id, tenant_id, owner_id, created_at, updated_at, archived_at, body)
         VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb)`,
        [
          skill.id,
          skill.tenantId,
          skill.ownerId,
          skill.createdAt,
          skill.updatedAt,
          skill.archivedAt,
          toJsonb(skill.body),
        ],
      );
      await client.query(
        `INSERT INTO ${s}.skill_versions (tenant_id, skill_id, version, created_at, body, archive)
         VALUES ($1, $2, $3, $4, $5::jsonb, $6)`,
        [
          first.tenantId,
          first.skillId,
          first.version,
          first.createdAt,
          toJsonb(first.body),
          byteaOf(first.archive),
        ],
      );
    }).catch((error) => {
      throw isBerthError(error, 'conflict') ? conflict(`${skill.id} already exists`) : error;
    });
  }

  async getSkill(tenantId: string, id: string): Promise<SkillRecord | undefined> {
    const result = await this.#query<SkillRow>(
      tenantId,
      `SELECT ${skillColumns(this.#s)} FROM ${this.#s}.skills WHERE skills.id = $1 AND skills.tenant_id = $2`,
      [id, tenantId],
    );
    const row = result.rows[0];
    return row === undefined ? undefined : skillOf(row);
  }

  async listSkills(query: ListQuery): Promise<Page<SkillRecord>> {
    const list = listSql(`${this.#s}.skills`, skillColumns(this.#s), query, [], [], 'skills.');
    const result = await this.#query<SkillRow>(query.tenantId, list.sql, list.parameters);
    return pageOf(result.rows, list.limit, skillOf);
  }

  async addSkillVersion(version: SkillVersionRecord, updatedAt: string): Promise<void> {
    const s = this.#s;
    await inTenant(this.#pool, version.tenantId, async (client) => {
      // INSERT … SELECT: no row is written unless the skill is the tenant's.
      const inserted = await client.query(
        `INSERT INTO ${s}.skill_versions (tenant_id, skill_id, version, created_at, body, archive)
         SELECT $1, id, $2, $3, $4::jsonb, $5 FROM ${s}.skills WHERE id = $6 AND tenant_id = $1`,
        [
          version.tenantId,
          version.version,
          version.createdAt,
          toJsonb(version.body),
          byteaOf(version.archive),
          version.skillId,
        ],
      );
      if (inserted.rowCount === 0) throw notFound('skill', version.skillId);
      await client.query(`UPDATE ${s}.skills SET updated_at = $1 WHERE id = $2 AND tenant_id = $3`, [
        updatedAt,
        version.skillId,
        version.tenantId,
      ]);
    }).catch((error) => {
      throw isBerthError(error, 'conflict')
        ? conflict(`version ${version.version} of skill ${version.skillId} already exists`)
        : error;
    });
  }

  async getSkillVersion(
    tenantId: string,
    skillId: string,
    version: string,
  ): Promise<SkillVersionRecord | undefined> {
    const result = await this.#query<SkillVersionArchiveRow>(
      tenantId,
      `SELECT ${SKILL_VERSION_COLUMNS}, archive FROM ${this.#s}.skill_versions
       WHERE skill_id = $1 AND version = $2 AND tenant_id = $3`,
      [skillId, version, tenantId],
    );
    const row = result.rows[0];
    return row === undefined ? undefined : { ...skillVersionOf(row), archive: row.archive };
  }

  async listSkillVersions(
    tenantId: string,
    skillId: string,
    query: Omit<ListQuery, 'tenantId'>,
  ): Promise<Page<Omit<SkillVersionRecord, 'archive'>>> {
    // Versions have no owner and are never archived: only order, cursor and limit apply.
    // listSql numbers its own parameters after these, starting at $2 (tenant is $1).
    const list = listSql(
      `${this.#s}.skill_versions`,
      SKILL_VERSION_COLUMNS,
      { tenantId, limit: query.limit, cursor: query.cursor, order: query.order, includeArchived: true },
      ['skill_id = $2'],
      [skillId],
    );
    const result = await this.#query<SkillVersionRow>(tenantId, list.sql, list.parameters);
    return pageOf(result.rows, list.limit, skillVersionOf);
  }

  async deleteSkillVersion(tenantId: string, skillId: string, version: string): Promise<boolean> {
    const result = await this.#query(
      tenantId,
      `DELETE FROM ${this.#s}.skill_versions WHERE skill_id = $1 AND version = $2 AND tenant_id = $3`,
      [skillId, version, tenantId],
    );
    return (result.rowCount ?? 0) > 0;
  }

  async deleteSkill(tenantId: string, id: string): Promise<boolean> {
    // Its versions go with it (ON DELETE CASCADE).
    const result = await this.#query(
      tenantId,
      `DELETE FROM ${this.#s}.skills WHERE id = $1 AND tenant_id = $2`,
      [id, tenantId],
    );
    return (result.rowCount ?? 0) > 0;
  }

  #query<Row extends pg.QueryResultRow>(tenantId: string, sql: string, parameters: unknown[]) {
    return queryInTenant<Row>(this.#pool, tenantId, sql, parameters);
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
