import { openPostgresStore } from './postgres/postgres-store.js';
import type { Store } from './resource-store.js';
import { openSqliteStore } from './sqlite/sqlite-store.js';

/** Which database to open: a SQLite file (one node) or PostgreSQL (one or many nodes). */
export type OpenStoreOptions =
  | { kind: 'sqlite'; path: string }
  | {
      kind: 'postgres';
      url: string;
      /** Role that owns the schema and runs migrations (default: `url`'s). */
      migrationUrl?: string;
      /** Schema holding Berth's tables; default `berth`. */
      schema?: string;
      /** Most pooled connections; default 10. */
      maxConnections?: number;
      /** Without `migrationUrl`, migrate as `url`'s role (default) or only check the version (false). */
      migrateAsApp?: boolean;
    };

/** Opens the configured store, applying pending migrations first. */
export function openStore(options: OpenStoreOptions): Promise<Store> {
  switch (options.kind) {
    case 'sqlite':
      return openSqliteStore({ path: options.path });
    case 'postgres':
      return openPostgresStore(options);
  }
}
