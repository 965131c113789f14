import type pg from 'pg';

/**
 * PostgreSQL migrations, applied in order on open; `schema_version` records how many ran.
 * Mirrors `sqlite/schema.ts`: same tables, same columns. Timestamps are ISO text so they
 * round-trip exactly as the API shows them; bodies are jsonb. Every table lives in one
 * configurable schema (`s` is its quoted name). Never edit a shipped migration; append one.
 */
export const POSTGRES_MIGRATIONS: readonly ((s: string) => string)[] = [
  (s) => `
  CREATE TABLE ${s}.agents (
    position bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id text NOT NULL UNIQUE,
    tenant_id text NOT NULL,
    owner_id text NOT NULL,
    latest_version integer NOT NULL,
    created_at text NOT NULL,
    updated_at text NOT NULL,
    archived_at text,
    body jsonb NOT NULL
  );
  CREATE INDEX agents_by_tenant ON ${s}.agents (tenant_id, position);

  CREATE TABLE ${s}.agent_versions (
    agent_id text NOT NULL REFERENCES ${s}.agents (id) ON DELETE CASCADE,
    version integer NOT NULL,
    tenant_id text NOT NULL,
    owner_id text NOT NULL,
    created_at text NOT NULL,
    updated_at text NOT NULL,
    archived_at text,
    body jsonb NOT NULL,
    PRIMARY KEY (agent_id, version)
  );

  CREATE TABLE ${s}.environments (
    position bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id text NOT NULL UNIQUE,
    tenant_id text NOT NULL,
    owner_id text NOT NULL,
    created_at text NOT NULL,
    updated_at text NOT NULL,
    archived_at text,
    body jsonb NOT NULL
  );
  CREATE INDEX environments_by_tenant ON ${s}.environments (tenant_id, position);

  CREATE TABLE ${s}.sessions (
    position bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id text NOT NULL UNIQUE,
    tenant_id text NOT NULL,
    owner_id text NOT NULL,
    agent_id text NOT NULL,
    agent_version integer NOT NULL,
    environment_id text NOT NULL,
    status text NOT NULL,
    stop_reason jsonb,
    last_seq bigint NOT NULL DEFAULT 0,
    writer_token bigint NOT NULL DEFAULT 0,
    created_at text NOT NULL,
    updated_at text NOT NULL,
    archived_at text,
    body jsonb NOT NULL
  );
  CREATE INDEX sessions_by_tenant ON ${s}.sessions (tenant_id, position);
  CREATE INDEX sessions_by_status ON ${s}.sessions (status);

  CREATE TABLE ${s}.events (
    session_id text NOT NULL REFERENCES ${s}.sessions (id) ON DELETE CASCADE,
    seq bigint NOT NULL,
    id text NOT NULL UNIQUE,
    type text NOT NULL,
    processed_at text NOT NULL,
    body jsonb NOT NULL,
    PRIMARY KEY (session_id, seq)
  );

  CREATE TABLE ${s}.idempotency_keys (
    session_id text NOT NULL REFERENCES ${s}.sessions (id) ON DELETE CASCADE,
    key text NOT NULL,
    first_seq bigint NOT NULL,
    count integer NOT NULL,
    PRIMARY KEY (session_id, key)
  );

  CREATE TABLE ${s}.api_keys (
    id text PRIMARY KEY,
    tenant_id text NOT NULL,
    user_id text NOT NULL,
    role text NOT NULL,
    hash text NOT NULL UNIQUE,
    name text NOT NULL,
    created_at text NOT NULL,
    expires_at text,
    revoked_at text
  );
  `,
  // 2: the per-session columns every append or writer change touches move out of the wide
  // `sessions` row (whose jsonb body holds the pinned agent, often several KB) into a narrow
  // `session_heads` row, so an append locks and rewrites a small tuple.
  (s) => `
  CREATE TABLE ${s}.session_heads (
    session_id text PRIMARY KEY REFERENCES ${s}.sessions (id) ON DELETE CASCADE,
    status text NOT NULL,
    stop_reason jsonb,
    last_seq bigint NOT NULL DEFAULT 0,
    writer_token bigint NOT NULL DEFAULT 0,
    updated_at text NOT NULL
  );
  INSERT INTO ${s}.session_heads (session_id, status, stop_reason, last_seq, writer_token, updated_at)
    SELECT id, status, stop_reason, last_seq, writer_token, updated_at FROM ${s}.sessions;
  CREATE INDEX session_heads_by_status ON ${s}.session_heads (status);
  DROP INDEX ${s}.sessions_by_status;
  ALTER TABLE ${s}.sessions
    DROP COLUMN status,
    DROP COLUMN stop_reason,
    DROP COLUMN last_seq,
    DROP COLUMN writer_token;
  `,
];

/** Quotes a schema name after checking it is a plain identifier. */
export function quoteSchemaName(schema: string): string {
  if (!/^[a-z_][a-z0-9_]{0,62}$/.test(schema)) {
    throw new Error(
      `invalid PostgreSQL schema name ${JSON.stringify(schema)}: use lower-case letters, digits, _`,
    );
  }
  return `"${schema}"`;
}

/**
 * Creates the schema if needed and applies pending migrations in one transaction, under an
 * advisory lock so nodes starting together migrate once.
 */
export async function migratePostgres(pool: pg.Pool, schema: string): Promise<void> {
  const s = quoteSchemaName(schema);
  const client = await pool.connect();
  try {
    await client.query('BEGIN');
    await client.query("SELECT pg_advisory_xact_lock(hashtext('berth.migrate.' || $1))", [schema]);
    await client.query(`CREATE SCHEMA IF NOT EXISTS ${s}`);
    await client.query(`CREATE TABLE IF NOT EXISTS ${s}.schema_version (version integer NOT NULL)`);
    const result = await client.query<{ version: number }>(
      `SELECT coalesce(max(version), 0)::int AS version FROM ${s}.schema_version`,
    );
    const applied = result.rows[0]?.version ?? 0;
    if (applied > POSTGRES_MIGRATIONS.length) {
      throw new Error(
        `database schema version ${applied} is newer than this Berth (${POSTGRES_MIGRATIONS.length})`,
      );
    }
    for (let version = applied + 1; version <= POSTGRES_MIGRATIONS.length; version++) {
      await client.query(POSTGRES_MIGRATIONS[version - 1]!(s));
      await client.query(`INSERT INTO ${s}.schema_version (version) VALUES ($1)`, [version]);
    }
    await client.query('COMMIT');
  } catch (error) {
    await client.query('ROLLBACK').catch(() => {});
    throw error;
  } finally {
    client.release();
  }
}
