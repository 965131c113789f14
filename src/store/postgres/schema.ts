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
  // 3: principals (tenants, users; a key's role is its user's), the tenant on every row that
  // lacked it, and row-level security as the second wall under the application's checks.
  (s) => `
  CREATE TABLE ${s}.tenants (
    id text PRIMARY KEY,
    name text NOT NULL UNIQUE,
    created_at text NOT NULL,
    limits jsonb
  );
  CREATE TABLE ${s}.users (
    id text PRIMARY KEY,
    tenant_id text NOT NULL REFERENCES ${s}.tenants (id),
    name text NOT NULL,
    role text NOT NULL,
    created_at text NOT NULL,
    UNIQUE (tenant_id, name)
  );
  INSERT INTO ${s}.tenants (id, name, created_at)
    SELECT tenant_id, CASE tenant_id WHEN 'tnt_default' THEN 'default' ELSE tenant_id END, min(created_at)
    FROM ${s}.api_keys GROUP BY tenant_id;
  INSERT INTO ${s}.users (id, tenant_id, name, role, created_at)
    SELECT user_id, min(tenant_id), CASE user_id WHEN 'user_admin' THEN 'admin' ELSE user_id END, min(role), min(created_at)
    FROM ${s}.api_keys GROUP BY user_id;
  ALTER TABLE ${s}.api_keys DROP COLUMN role;
  CREATE INDEX api_keys_by_tenant ON ${s}.api_keys (tenant_id, user_id);

  ALTER TABLE ${s}.session_heads ADD COLUMN tenant_id text;
  UPDATE ${s}.session_heads h SET tenant_id = x.tenant_id FROM ${s}.sessions x WHERE x.id = h.session_id;
  ALTER TABLE ${s}.session_heads ALTER COLUMN tenant_id SET NOT NULL;
  ALTER TABLE ${s}.events ADD COLUMN tenant_id text;
  UPDATE ${s}.events e SET tenant_id = x.tenant_id FROM ${s}.sessions x WHERE x.id = e.session_id;
  ALTER TABLE ${s}.events ALTER COLUMN tenant_id SET NOT NULL;
  ALTER TABLE ${s}.idempotency_keys ADD COLUMN tenant_id text;
  UPDATE ${s}.idempotency_keys k SET tenant_id = x.tenant_id FROM ${s}.sessions x WHERE x.id = k.session_id;
  ALTER TABLE ${s}.idempotency_keys ALTER COLUMN tenant_id SET NOT NULL;

  ${rowLevelSecuritySql(s, FIRST_TENANT_TABLES)}

  -- The only cross-tenant reads, each narrow, owned by the tables' owner and run with its
  -- rights: authenticating a key (the tenant is not known yet), counting keys (first start),
  -- finding sessions to resume after a crash, and listing tenants for operators.
  CREATE FUNCTION ${s}.find_api_key(key_hash text)
    RETURNS TABLE (id text, tenant_id text, user_id text, role text, hash text, name text,
                   created_at text, expires_at text, revoked_at text)
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $f$
      SELECT k.id, k.tenant_id, k.user_id, u.role, k.hash, k.name, k.created_at, k.expires_at, k.revoked_at
      FROM ${s}.api_keys k JOIN ${s}.users u ON u.id = k.user_id WHERE k.hash = key_hash
    $f$;
  CREATE FUNCTION ${s}.count_api_keys() RETURNS bigint
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $f$
      SELECT count(*) FROM ${s}.api_keys
    $f$;
  CREATE FUNCTION ${s}.sessions_in_status(wanted text[])
    RETURNS TABLE ("position" bigint, id text, tenant_id text, owner_id text, created_at text,
                   updated_at text, archived_at text, body jsonb, agent_id text, agent_version integer,
                   environment_id text, status text, stop_reason jsonb, last_seq bigint)
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $f$
      SELECT x.position, x.id, x.tenant_id, x.owner_id, x.created_at, h.updated_at, x.archived_at, x.body,
             x.agent_id, x.agent_version, x.environment_id, h.status, h.stop_reason, h.last_seq
      FROM ${s}.sessions x JOIN ${s}.session_heads h ON h.session_id = x.id
      WHERE h.status = ANY (wanted) ORDER BY x.position
    $f$;
  CREATE FUNCTION ${s}.list_tenants()
    RETURNS TABLE (id text, name text, created_at text, limits jsonb)
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $f$
      SELECT t.id, t.name, t.created_at, t.limits FROM ${s}.tenants t ORDER BY t.created_at, t.id
    $f$;
  REVOKE ALL ON FUNCTION ${s}.find_api_key(text), ${s}.count_api_keys(),
    ${s}.sessions_in_status(text[]), ${s}.list_tenants() FROM PUBLIC;
  `,
  // 4: the hot paths in one round trip. Each function sets the transaction's tenant and then
  // runs its statement, so a call is one autocommitted transaction with the tenant set inside
  // it (no BEGIN / COMMIT round trips). SECURITY INVOKER: row-level security applies as usual.
  (s) => `
  CREATE FUNCTION ${s}.append_events(
      p_tenant text, p_session text, p_writer bigint, p_count integer, p_ids text[], p_types text[],
      p_bodies text[], p_key text, p_status text, p_processed_at text, p_keep_stop_reason boolean,
      p_stop_reason jsonb, p_expected_head bigint)
    RETURNS bigint LANGUAGE plpgsql SECURITY INVOKER SET search_path = pg_catalog, pg_temp AS $f$
    DECLARE
      v_base bigint;
    BEGIN
      PERFORM set_config('berth.tenant_id', p_tenant, true);
      WITH head AS (
        UPDATE ${s}.session_heads SET last_seq = last_seq + p_count,
          status = coalesce(p_status, status),
          updated_at = CASE WHEN p_status IS NULL THEN updated_at ELSE p_processed_at END,
          stop_reason = CASE WHEN p_keep_stop_reason THEN stop_reason ELSE p_stop_reason END
        WHERE session_id = p_session AND tenant_id = p_tenant
          AND (p_writer IS NULL OR writer_token = p_writer)
          AND (p_expected_head IS NULL OR last_seq = p_expected_head)
          AND (p_key IS NULL OR NOT EXISTS (
            SELECT 1 FROM ${s}.idempotency_keys k WHERE k.session_id = p_session AND k.key = p_key))
        RETURNING last_seq - p_count AS base
      ), inserted AS (
        INSERT INTO ${s}.events (session_id, tenant_id, seq, id, type, processed_at, body)
        SELECT p_session, p_tenant, head.base + t.ordinal, t.id, t.type, p_processed_at, t.body::jsonb
        FROM head, unnest(p_ids, p_types, p_bodies) WITH ORDINALITY AS t (id, type, body, ordinal)
      ), keyed AS (
        INSERT INTO ${s}.idempotency_keys (session_id, tenant_id, key, first_seq, count)
        SELECT p_session, p_tenant, p_key, head.base + 1, p_count FROM head WHERE p_key IS NOT NULL
      )
      SELECT base INTO v_base FROM head;
      RETURN v_base;
    END
    $f$;

  CREATE FUNCTION ${s}.read_events(
      p_tenant text, p_session text, p_after bigint, p_before bigint, p_types text[], p_limit bigint,
      p_descending boolean)
    RETURNS TABLE (session_id text, seq bigint, body jsonb)
    LANGUAGE plpgsql SECURITY INVOKER SET search_path = pg_catalog, pg_temp AS $f$
    BEGIN
      PERFORM set_config('berth.tenant_id', p_tenant, true);
      IF p_descending THEN
        RETURN QUERY SELECT e.session_id, e.seq, e.body FROM ${s}.events e
          WHERE e.session_id = p_session AND e.tenant_id = p_tenant
            AND (p_after IS NULL OR e.seq > p_after) AND (p_before IS NULL OR e.seq < p_before)
            AND (p_types IS NULL OR e.type = ANY (p_types))
          ORDER BY e.seq DESC LIMIT p_limit;
      ELSE
        RETURN QUERY SELECT e.session_id, e.seq, e.body FROM ${s}.events e
          WHERE e.session_id = p_session AND e.tenant_id = p_tenant
            AND (p_after IS NULL OR e.seq > p_after) AND (p_before IS NULL OR e.seq < p_before)
            AND (p_types IS NULL OR e.type = ANY (p_types))
          ORDER BY e.seq ASC LIMIT p_limit;
      END IF;
    END
    $f$;

  CREATE FUNCTION ${s}.get_session(p_tenant text, p_id text)
    RETURNS TABLE ("position" bigint, id text, tenant_id text, owner_id text, created_at text,
                   updated_at text, archived_at text, body jsonb, agent_id text, agent_version integer,
                   environment_id text, status text, stop_reason jsonb, last_seq bigint)
    LANGUAGE plpgsql SECURITY INVOKER SET search_path = pg_catalog, pg_temp AS $f$
    BEGIN
      PERFORM set_config('berth.tenant_id', p_tenant, true);
      RETURN QUERY SELECT x.position, x.id, x.tenant_id, x.owner_id, x.created_at, h.updated_at,
          x.archived_at, x.body, x.agent_id, x.agent_version, x.environment_id, h.status,
          h.stop_reason, h.last_seq
        FROM ${s}.sessions x JOIN ${s}.session_heads h ON h.session_id = x.id
        WHERE x.id = p_id AND x.tenant_id = p_tenant;
    END
    $f$;
  `,
  // 5: aggregate session counts for /metrics: a cross-tenant read of counts only.
  (s) => `
  CREATE FUNCTION ${s}.session_status_counts()
    RETURNS TABLE (status text, count bigint)
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $f$
      SELECT h.status, count(*) FROM ${s}.session_heads h GROUP BY h.status
    $f$;
  REVOKE ALL ON FUNCTION ${s}.session_status_counts() FROM PUBLIC;
  `,
  // 6: vaults and their credentials, tenant tables like the others (row-level security). A
  // credential's body is what the API shows (no secret); its secret is only ever stored sealed
  // (AES-256-GCM, see vault/cipher.ts), with the id of the key that sealed it beside it so
  // rotation finds what old keys still hold.
  (s) => `
  CREATE TABLE ${s}.vaults (
    position bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id text NOT NULL UNIQUE,
    tenant_id text NOT NULL,
    owner_id text NOT NULL,
    created_at text NOT NULL,
    updated_at text NOT NULL,
    archived_at text,
    body jsonb NOT NULL
  );
  CREATE INDEX vaults_by_tenant ON ${s}.vaults (tenant_id, position);
  CREATE TABLE ${s}.vault_credentials (
    position bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id text NOT NULL UNIQUE,
    tenant_id text NOT NULL,
    vault_id text NOT NULL REFERENCES ${s}.vaults (id) ON DELETE CASCADE,
    owner_id text NOT NULL,
    created_at text NOT NULL,
    updated_at text NOT NULL,
    archived_at text,
    body jsonb NOT NULL,
    key_id text NOT NULL,
    sealed_secret text NOT NULL
  );
  CREATE INDEX vault_credentials_by_vault ON ${s}.vault_credentials (tenant_id, vault_id, position);
  CREATE INDEX vault_credentials_by_key ON ${s}.vault_credentials (tenant_id, key_id);
  ${rowLevelSecuritySql(s, VAULT_TENANT_TABLES)}
  `,
  // 7: the cluster's node registry and session leases (src/control/leases.ts). No row-level
  // security: a node renews and lists leases across tenants, and the rows hold only ids.
  (s) => `
  CREATE TABLE ${s}.cluster_nodes (
    node_id text PRIMARY KEY,
    url text NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    draining boolean NOT NULL DEFAULT false
  );
  CREATE TABLE ${s}.session_leases (
    tenant_id text NOT NULL,
    session_id text NOT NULL,
    node_id text NOT NULL,
    writer_token bigint NOT NULL DEFAULT 0,
    acquired_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, session_id)
  );
  CREATE INDEX session_leases_by_node ON ${s}.session_leases (node_id, expires_at);
  `,
  // 8: every append is announced (NOTIFY, delivered on commit) so other nodes' subscribers hear
  // it: "<tenant> <session> <first seq> <last seq>" on the schema's events channel.
  (s) => `
  CREATE FUNCTION ${s}.announce_append() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $f$
    BEGIN
      PERFORM pg_notify(${quoteLiteral(eventsChannel(s))},
        NEW.tenant_id || ' ' || NEW.session_id || ' ' || (OLD.last_seq + 1) || ' ' || NEW.last_seq);
      RETURN NULL;
    END
    $f$;
  CREATE TRIGGER announce_append AFTER UPDATE OF last_seq ON ${s}.session_heads
    FOR EACH ROW WHEN (NEW.last_seq > OLD.last_seq) EXECUTE FUNCTION ${s}.announce_append();
  `,
  // 9: sessions with work left that are orphaned (no live lease: their node died) or held by
  // p_node: a cross-tenant read of ids only, for the cluster's sweep. Work left: a turn in
  // flight, or client input newer than the last turn.
  (s) => `
  CREATE FUNCTION ${s}.sessions_with_work(p_node text, p_limit integer)
    RETURNS TABLE (tenant_id text, session_id text, owner_id text, holder text)
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $f$
      SELECT h.tenant_id, h.session_id, x.owner_id, l.node_id
      FROM ${s}.session_heads h JOIN ${s}.sessions x ON x.id = h.session_id AND x.tenant_id = h.tenant_id
      LEFT JOIN ${s}.session_leases l
        ON l.tenant_id = h.tenant_id AND l.session_id = h.session_id AND l.expires_at > now()
      WHERE (h.status IN ('running', 'rescheduling')
             OR (h.status = 'idle' AND EXISTS (
               SELECT 1 FROM ${s}.events e
               WHERE e.session_id = h.session_id AND e.seq = h.last_seq AND e.type LIKE 'user.%')))
        AND (l.node_id IS NULL OR l.node_id = p_node)
      LIMIT p_limit
    $f$;
  REVOKE ALL ON FUNCTION ${s}.sessions_with_work(text, integer) FROM PUBLIC;
  `,
  // 10: sandbox snapshots every node can read (a session that moves keeps its files).
  (s) => `
  CREATE TABLE ${s}.sandbox_snapshots (
    tenant_id text NOT NULL,
    session_id text NOT NULL,
    created_at text NOT NULL,
    info jsonb NOT NULL,
    archive bytea NOT NULL,
    PRIMARY KEY (tenant_id, session_id)
  );
  ${rowLevelSecuritySql(s, SNAPSHOT_TENANT_TABLES)}
  `,
  // 11: skills and their immutable versions, tenant tables like the others (row-level
  // security). A version keeps its API body and its files as one zip archive; a skill's latest
  // version is not stored but read (its newest version row).
  (s) => `
  CREATE TABLE ${s}.skills (
    position bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id text NOT NULL UNIQUE,
    tenant_id text NOT NULL,
    owner_id text NOT NULL,
    created_at text NOT NULL,
    updated_at text NOT NULL,
    archived_at text,
    body jsonb NOT NULL
  );
  CREATE INDEX skills_by_tenant ON ${s}.skills (tenant_id, position);
  CREATE TABLE ${s}.skill_versions (
    position bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id text NOT NULL,
    skill_id text NOT NULL REFERENCES ${s}.skills (id) ON DELETE CASCADE,
    version text NOT NULL,
    created_at text NOT NULL,
    body jsonb NOT NULL,
    archive bytea NOT NULL,
    UNIQUE (skill_id, version)
  );
  CREATE INDEX skill_versions_by_skill ON ${s}.skill_versions (tenant_id, skill_id, position);
  ${rowLevelSecuritySql(s, SKILL_TENANT_TABLES)}
  `,
  // 12: the Idempotency-Key of the request that created a session, unique per owner, so a
  // retried create finds the session the first one made instead of making a second.
  (s) => `
  ALTER TABLE ${s}.sessions ADD COLUMN create_key text;
  CREATE UNIQUE INDEX sessions_by_create_key ON ${s}.sessions (tenant_id, owner_id, create_key)
    WHERE create_key IS NOT NULL;
  `,
  // 13: every change that takes rights away is announced (NOTIFY, delivered on commit) so every
  // node forgets what it cached and closes streams at once, whoever made the change (any node's
  // API, the CLI on the store, SQL): a key revoked or deleted ("key <tenant> <key id>"), a
  // user's role changed or the user deleted ("user <tenant> <user id>"), a tenant deleted
  // ("tenant <tenant>"), on the schema's principals channel.
  (s) => `
  CREATE FUNCTION ${s}.announce_principal_change() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $f$
    DECLARE
      changed record;
    BEGIN
      IF TG_OP = 'DELETE' THEN changed := OLD; ELSE changed := NEW; END IF;
      IF TG_TABLE_NAME = 'api_keys' THEN
        PERFORM pg_notify(${quoteLiteral(principalsChannel(s))}, 'key ' || changed.tenant_id || ' ' || changed.id);
      ELSIF TG_TABLE_NAME = 'users' THEN
        PERFORM pg_notify(${quoteLiteral(principalsChannel(s))}, 'user ' || changed.tenant_id || ' ' || changed.id);
      ELSE
        PERFORM pg_notify(${quoteLiteral(principalsChannel(s))}, 'tenant ' || changed.id);
      END IF;
      RETURN NULL;
    END
    $f$;
  CREATE TRIGGER announce_key_revoked AFTER UPDATE OF revoked_at ON ${s}.api_keys
    FOR EACH ROW WHEN (OLD.revoked_at IS NULL AND NEW.revoked_at IS NOT NULL)
    EXECUTE FUNCTION ${s}.announce_principal_change();
  CREATE TRIGGER announce_key_deleted AFTER DELETE ON ${s}.api_keys
    FOR EACH ROW EXECUTE FUNCTION ${s}.announce_principal_change();
  CREATE TRIGGER announce_user_changed AFTER UPDATE OF role, tenant_id ON ${s}.users
    FOR EACH ROW WHEN (NEW.role IS DISTINCT FROM OLD.role OR NEW.tenant_id IS DISTINCT FROM OLD.tenant_id)
    EXECUTE FUNCTION ${s}.announce_principal_change();
  CREATE TRIGGER announce_user_deleted AFTER DELETE ON ${s}.users
    FOR EACH ROW EXECUTE FUNCTION ${s}.announce_principal_change();
  CREATE TRIGGER announce_tenant_deleted AFTER DELETE ON ${s}.tenants
    FOR EACH ROW EXECUTE FUNCTION ${s}.announce_principal_change();
  `,
];

/** Tenant tables of migration 10. */
const SNAPSHOT_TENANT_TABLES: readonly (readonly [string, string])[] = [['sandbox_snapshots', 'tenant_id']];

/** The tenant tables migration 11 added (skills). */
const SKILL_TENANT_TABLES: readonly (readonly [table: string, tenantColumn: string])[] = [
  ['skills', 'tenant_id'],
  ['skill_versions', 'tenant_id'],
];

/** The NOTIFY channel of a (quoted) schema's appends. */
export function eventsChannel(quotedSchema: string): string {
  // Channel names are identifiers (at most 63 bytes).
  return `${quotedSchema.replace(/^"|"$/g, '').slice(0, 56)}_events`;
}

/**
 * The NOTIFY channel of a (quoted) schema's principal changes (migration 13): "key <tenant>
 * <key id>", "user <tenant> <user id>" or "tenant <tenant>".
 */
export function principalsChannel(quotedSchema: string): string {
  return `${quotedSchema.replace(/^"|"$/g, '').slice(0, 52)}_principals`;
}

function quoteLiteral(text: string): string {
  return `'${text.replaceAll("'", "''")}'`;
}

/**
 * Row-level security for tenant tables: enabled and forced (so the owner is bound too), a
 * policy comparing the tenant column with the transaction's `berth.tenant_id`, and the owner's
 * maintenance policy the SECURITY DEFINER functions rely on.
 */
function rowLevelSecuritySql(s: string, tables: readonly (readonly [string, string])[]): string {
  return tables
    .map(
      ([table, column]) => `
  ALTER TABLE ${s}.${table} ENABLE ROW LEVEL SECURITY;
  ALTER TABLE ${s}.${table} FORCE ROW LEVEL SECURITY;
  CREATE POLICY tenant_isolation ON ${s}.${table}
    USING (${column} = current_setting('berth.tenant_id', true))
    WITH CHECK (${column} = current_setting('berth.tenant_id', true));
  CREATE POLICY owner_maintenance ON ${s}.${table} TO CURRENT_USER USING (true) WITH CHECK (true);`,
    )
    .join('\n');
}

/** The tenant tables migration 3 put under row-level security (frozen: it has shipped). */
const FIRST_TENANT_TABLES: readonly (readonly [table: string, tenantColumn: string])[] = [
  ['tenants', 'id'],
  ['users', 'tenant_id'],
  ['api_keys', 'tenant_id'],
  ['agents', 'tenant_id'],
  ['agent_versions', 'tenant_id'],
  ['environments', 'tenant_id'],
  ['sessions', 'tenant_id'],
  ['session_heads', 'tenant_id'],
  ['events', 'tenant_id'],
  ['idempotency_keys', 'tenant_id'],
];

/** The tenant tables migration 6 added (vaults). */
const VAULT_TENANT_TABLES: readonly (readonly [table: string, tenantColumn: string])[] = [
  ['vaults', 'tenant_id'],
  ['vault_credentials', 'tenant_id'],
];

/**
 * Every table that holds tenant data, with the column naming its tenant. Each gets row-level
 * security with FORCE (so the owner is bound too) and a policy comparing that column with the
 * transaction's `berth.tenant_id` setting (in the migration that created it).
 */
export const TENANT_TABLES: readonly (readonly [table: string, tenantColumn: string])[] = [
  ...FIRST_TENANT_TABLES,
  ...VAULT_TENANT_TABLES,
  ...SNAPSHOT_TENANT_TABLES,
  ...SKILL_TENANT_TABLES,
];

/**
 * Lets the application role use the tables (never own them): data rights on every table but
 * the migration ledger, the identity sequences, and the narrow cross-tenant functions.
 * Idempotent; runs on every open so a new app role is granted without a migration.
 */
async function grantToAppRole(client: pg.PoolClient, s: string, appRole: string): Promise<void> {
  const role = client.escapeIdentifier(appRole);
  await client.query(`GRANT USAGE ON SCHEMA ${s} TO ${role}`);
  await client.query(`GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA ${s} TO ${role}`);
  await client.query(`REVOKE ALL ON ${s}.schema_version FROM ${role}`);
  // Read-only, so commands connecting as the app role can tell whether migrations are pending.
  await client.query(`GRANT SELECT ON ${s}.schema_version TO ${role}`);
  await client.query(`GRANT USAGE ON ALL SEQUENCES IN SCHEMA ${s} TO ${role}`);
  await client.query(`GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA ${s} TO ${role}`);
}

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
export async function migratePostgres(pool: pg.Pool, schema: string, appRole?: string): Promise<void> {
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
    if (appRole !== undefined) await grantToAppRole(client, s, appRole);
    await client.query('COMMIT');
  } catch (error) {
    await client.query('ROLLBACK').catch(() => {});
    throw error;
  } finally {
    client.release();
  }
}

/**
 * How far the schema is, read without changing anything (for connections that must not
 * migrate): the applied version and the one this Berth needs; `applied` is 0 when there is no
 * schema yet, and undefined when this role may not read it.
 */
export async function postgresSchemaVersion(
  pool: pg.Pool,
  schema: string,
): Promise<{ applied: number | undefined; needed: number }> {
  const needed = POSTGRES_MIGRATIONS.length;
  try {
    const result = await pool.query<{ version: number }>(
      `SELECT coalesce(max(version), 0)::int AS version FROM ${quoteSchemaName(schema)}.schema_version`,
    );
    return { applied: result.rows[0]?.version ?? 0, needed };
  } catch (error) {
    const code = (error as { code?: unknown }).code;
    // undefined_table, invalid_schema_name: nothing migrated yet.
    if (code === '42P01' || code === '3F000') return { applied: 0, needed };
    if (code === '42501') return { applied: undefined, needed };
    throw error;
  }
}
