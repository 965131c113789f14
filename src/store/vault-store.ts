import type { ListQuery, Page, ResourceRecord } from './resource-store.js';

/**
 * The vault port: vaults and the credentials they hold. A credential row keeps its API body
 * (which never holds a secret) apart from its sealed secret: the AES-256-GCM envelope made by
 * `vault/`, and the id of the vault key that sealed it, as a column so key rotation can find
 * what is left under old keys. The store never sees a plaintext secret. Every call names the
 * tenant; credentials are also reached only through their vault.
 */

/** A sealed secret as stored: which vault key sealed it, and the envelope text. */
export interface SealedSecret {
  keyId: string;
  /** `vault/cipher.ts` envelope; opaque to the store. */
  sealed: string;
}

/** One credential row: ownership and timestamps as columns, the API body as JSON, the secret sealed. */
export interface CredentialRecord extends ResourceRecord {
  vaultId: string;
  secret: SealedSecret;
}

/** What an update of a credential changes, and on what condition. */
export interface CredentialUpdate {
  tenantId: string;
  vaultId: string;
  id: string;
  body: Record<string, unknown>;
  updatedAt: string;
  archivedAt: string | null;
  /** A new sealed secret; absent keeps the stored one untouched. */
  secret?: SealedSecret;
  /**
   * Compare-and-set: write only if the row still has this sealed secret and `updated_at`, so a
   * token refresh and a user's update can never overwrite each other's secret unseen.
   */
  expected?: { sealed: string; updatedAt: string };
}

export interface VaultStore {
  /** Inserts a vault row; `conflict` when its id is taken. */
  createVault(record: ResourceRecord): Promise<void>;
  getVault(tenantId: string, id: string): Promise<ResourceRecord | undefined>;
  /** Replaces body, updatedAt and archivedAt; `not_found` when the vault is not the tenant's. */
  updateVault(record: ResourceRecord): Promise<void>;
  /** Pages through a tenant's vaults in creation order. */
  listVaults(query: ListQuery): Promise<Page<ResourceRecord>>;
  /** Deletes a vault and every credential in it. Returns false if it did not exist. */
  deleteVault(tenantId: string, id: string): Promise<boolean>;

  /** Inserts a credential into an existing vault of the tenant (`not_found` otherwise). */
  createCredential(record: CredentialRecord): Promise<void>;
  getCredential(tenantId: string, vaultId: string, id: string): Promise<CredentialRecord | undefined>;
  /**
   * Updates a credential. Returns false (writing nothing) when `expected` was given and the row
   * has changed since; `not_found` when there is no such credential.
   */
  updateCredential(update: CredentialUpdate): Promise<boolean>;
  /** Pages through a vault's credentials in creation order. */
  listCredentials(
    tenantId: string,
    vaultId: string,
    query: Omit<ListQuery, 'tenantId'>,
  ): Promise<Page<CredentialRecord>>;
  /** Deletes a credential. Returns false if it did not exist. */
  deleteCredential(tenantId: string, vaultId: string, id: string): Promise<boolean>;

  /**
   * A tenant's credentials (archived ones too) whose secret was sealed under a key other than
   * `keyId`, in creation order, page by page: what key rotation still has to re-seal.
   */
  listCredentialsSealedWithout(
    tenantId: string,
    keyId: string,
    query: { cursor?: string; limit: number },
  ): Promise<Page<CredentialRecord>>;
  /**
   * Re-seals one credential's secret (rotation): writes `next` only if the row still holds
   * `expected`. Body and timestamps stay as they are. Returns whether it wrote.
   */
  resealCredential(tenantId: string, id: string, expected: string, next: SealedSecret): Promise<boolean>;
  /** How many of a tenant's credentials each vault key sealed. */
  countCredentialsByKey(tenantId: string): Promise<Record<string, number>>;
}
