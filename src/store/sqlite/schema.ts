import type Database from 'better-sqlite3';

/**
 * SQLite migrations, applied in order on open; `schema_version` records how many ran.
 * Mirrors `postgres/schema.ts`: same tables, same columns. Never edit a shipped migration;
 * append a new one.
 */
export const SQLITE_MIGRATIONS: readonly string[] = [
  `
  CREATE TABLE agents (
    position INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    tenant_id TEXT NOT NULL,
    owner_id TEXT NOT NULL,
    latest_version INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    archived_at TEXT,
    body TEXT NOT NULL
  );
  CREATE INDEX agents_by_tenant ON agents (tenant_id, position);

  CREATE TABLE agent_versions (
    agent_id TEXT NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    version INTEGER NOT NULL,
    tenant_id TEXT NOT NULL,
    owner_id TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    archived_at TEXT,
    body TEXT NOT NULL,
    PRIMARY KEY (agent_id, version)
  ) WITHOUT ROWID;

  CREATE TABLE environments (
    position INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    tenant_id TEXT NOT NULL,
    owner_id TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    archived_at TEXT,
    body TEXT NOT NULL
  );
  CREATE INDEX environments_by_tenant ON environments (tenant_id, position);

  CREATE TABLE sessions (
    position INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    tenant_id TEXT NOT NULL,
    owner_id TEXT NOT NULL,
    agent_id TEXT NOT NULL,
    agent_version INTEGER NOT NULL,
    environment_id TEXT NOT NULL,
    status TEXT NOT NULL,
    stop_reason TEXT,
    last_seq INTEGER NOT NULL DEFAULT 0,
    writer_token INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    archived_at TEXT,
    body TEXT NOT NULL
  );
  CREATE INDEX sessions_by_tenant ON sessions (tenant_id, position);
  CREATE INDEX sessions_by_status ON sessions (status);

  CREATE TABLE events (
    session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    id TEXT NOT NULL UNIQUE,
    type TEXT NOT NULL,
    processed_at TEXT NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (session_id, seq)
  ) WITHOUT ROWID;

  CREATE TABLE idempotency_keys (
    session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    key TEXT NOT NULL,
    first_seq INTEGER NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (session_id, key)
  ) WITHOUT ROWID;

  CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    role TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    created_at TEXT NOT NULL,
    expires_at TEXT,
    revoked_at TEXT
  );
  `,
  // 2: the per-session columns every append or writer change touches move out of the wide
  // `sessions` row (whose JSON body holds the pinned agent, often several KB) into a narrow
  // `session_heads` row, so an append rewrites ~60 bytes instead of the whole session.
  `
  CREATE TABLE session_heads (
    session_id TEXT PRIMARY KEY REFERENCES sessions (id) ON DELETE CASCADE,
    status TEXT NOT NULL,
    stop_reason TEXT,
    last_seq INTEGER NOT NULL DEFAULT 0,
    writer_token INTEGER NOT NULL DEFAULT 0,
    updated_at TEXT NOT NULL
  ) WITHOUT ROWID;
  INSERT INTO session_heads (session_id, status, stop_reason, last_seq, writer_token, updated_at)
    SELECT id, status, stop_reason, last_seq, writer_token, updated_at FROM sessions;
  CREATE INDEX session_heads_by_status ON session_heads (status);
  DROP INDEX sessions_by_status;
  ALTER TABLE sessions DROP COLUMN status;
  ALTER TABLE sessions DROP COLUMN stop_reason;
  ALTER TABLE sessions DROP COLUMN last_seq;
  ALTER TABLE sessions DROP COLUMN writer_token;
  `,
  // 3: principals (tenants, users; a key's role is its user's) and the tenant on the head row,
  // so every event-store call checks the tenant it was given against the session's own.
  `
  CREATE TABLE tenants (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL,
    limits TEXT
  ) WITHOUT ROWID;
  CREATE TABLE users (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants (id),
    name TEXT NOT NULL,
    role TEXT NOT NULL,
    created_at TEXT NOT NULL,
    UNIQUE (tenant_id, name)
  ) WITHOUT ROWID;
  INSERT INTO tenants (id, name, created_at)
    SELECT tenant_id, CASE tenant_id WHEN 'tnt_default' THEN 'default' ELSE tenant_id END, min(created_at)
    FROM api_keys GROUP BY tenant_id;
  INSERT INTO users (id, tenant_id, name, role, created_at)
    SELECT user_id, tenant_id, CASE user_id WHEN 'user_admin' THEN 'admin' ELSE user_id END, role, min(created_at)
    FROM api_keys GROUP BY user_id;
  ALTER TABLE api_keys DROP COLUMN role;
  CREATE INDEX api_keys_by_tenant ON api_keys (tenant_id, user_id);
  ALTER TABLE session_heads ADD COLUMN tenant_id TEXT NOT NULL DEFAULT '';
  UPDATE session_heads SET tenant_id = (SELECT tenant_id FROM sessions WHERE sessions.id = session_heads.session_id);
  `,
  // 4: vaults and their credentials. A credential's body is what the API shows (no secret);
  // its secret is only ever stored sealed (AES-256-GCM, see vault/cipher.ts), with the id of
  // the key that sealed it beside it so rotation finds what old keys still hold.
  `
  CREATE TABLE vaults (
    position INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    tenant_id TEXT NOT NULL,
    owner_id TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    archived_at TEXT,
    body TEXT NOT NULL
  );
  CREATE INDEX vaults_by_tenant ON vaults (tenant_id, position);
  CREATE TABLE vault_credentials (
    position INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    tenant_id TEXT NOT NULL,
    vault_id TEXT NOT NULL REFERENCES vaults (id) ON DELETE CASCADE,
    owner_id TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    archived_at TEXT,
    body TEXT NOT NULL,
    key_id TEXT NOT NULL,
    sealed_secret TEXT NOT NULL
  );
  CREATE INDEX vault_credentials_by_vault ON vault_credentials (tenant_id, vault_id, position);
  CREATE INDEX vault_credentials_by_key ON vault_credentials (tenant_id, key_id);
  `,
  // 5: skills and their immutable versions. A version keeps its API body and its files as one
  // zip archive; a skill's latest version is not stored but read (its newest version row).
  `
  CREATE TABLE skills (
    position INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    tenant_id TEXT NOT NULL,
    owner_id TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    archived_at TEXT,
    body TEXT NOT NULL
  );
  CREATE INDEX skills_by_tenant ON skills (tenant_id, position);
  CREATE TABLE skill_versions (
    position INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant_id TEXT NOT NULL,
    skill_id TEXT NOT NULL REFERENCES skills (id) ON DELETE CASCADE,
    version TEXT NOT NULL,
    created_at TEXT NOT NULL,
    body TEXT NOT NULL,
    archive BLOB NOT NULL,
    UNIQUE (skill_id, version)
  );
  CREATE INDEX skill_versions_by_skill ON skill_versions (tenant_id, skill_id, position);
  `,
  // 6: the Idempotency-Key of the request that created a session, unique per owner, so a
  // retried create finds the session the first one made instead of making a second.
  `
  ALTER TABLE sessions ADD COLUMN create_key TEXT;
  CREATE UNIQUE INDEX sessions_by_create_key ON sessions (tenant_id, owner_id, create_key)
    WHERE create_key IS NOT NULL;
  `,
];

/** Brings the database up to the newest migration, each in its own write transaction. */
export function migrateSqlite(database: Database.Database): void {
  database.exec('CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)');
  const readVersion = database.prepare('SELECT coalesce(max(version), 0) AS version FROM schema_version');
  const recordVersion = database.prepare('INSERT INTO schema_version (version) VALUES (?)');
  for (let version = 1; version <= SQLITE_MIGRATIONS.length; version++) {
    // Read the version inside the write lock, so two processes opening at once migrate once.
    database
      .transaction(() => {
        const applied = (readVersion.get() as { version: number }).version;
        if (applied >= version) return;
        database.exec(SQLITE_MIGRATIONS[version - 1]!);
        recordVersion.run(version);
      })
      .immediate();
  }
  const applied = (readVersion.get() as { version: number }).version;
  if (applied > SQLITE_MIGRATIONS.length) {
    throw new Error(
      `database schema version ${applied} is newer than this Berth (${SQLITE_MIGRATIONS.length})`,
    );
  }
}
