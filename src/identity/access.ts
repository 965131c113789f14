import { BerthError, notFound } from '../errors.js';
import type { ResourceRecord, SessionRecord, Store } from '../store/resource-store.js';
import type { Principal } from './api-keys.js';

/**
 * The one ownership rule for sessions, used by every path that reaches one (REST, streams,
 * events, wakes caused by a request, and anything added later): a session is visible to its
 * creator and to its tenant's admins, and to no one else. Everything else in a tenant (agents,
 * environments, users, keys) is scoped by the tenant id every store call requires; vaults and
 * credentials are visible to the whole tenant but changed only as `mayChangeVaultItem` says.
 */
export function canSeeSession(principal: Principal, session: SessionRecord): boolean {
  return (
    session.tenantId === principal.tenantId &&
    (principal.role === 'admin' || session.ownerId === principal.userId)
  );
}

/** The owner filter for listing sessions: members list only their own. */
export function sessionOwnerFilter(principal: Principal): string | undefined {
  return principal.role === 'admin' ? undefined : principal.userId;
}

/**
 * Loads a session for a principal, or fails with 404 (never 403: another user's or tenant's
 * session is indistinguishable from one that does not exist, so ids cannot be probed).
 */
export async function loadSessionFor(store: Store, principal: Principal, id: string): Promise<SessionRecord> {
  const session = await store.resources.getSession(principal.tenantId, id);
  if (!session || !canSeeSession(principal, session)) throw notFound('session', id);
  return session;
}

/**
 * The one rule for changing vaults and credentials: a vault (its name, metadata, archiving,
 * deletion, and adding credentials to it) is changed only by its tenant's admins and the user
 * who created it; a credential (update, archive, delete, `mcp_oauth_validate`, which may store
 * a refreshed token) only by admins and the user who created that credential, so even a
 * vault's creator cannot re-point a credential an admin put in it. Every member of the tenant
 * may read them and attach any vault to a session of their own: members use vaults, they do
 * not rewrite other people's secrets or where those secrets may be sent. `ownerId` is the
 * creator (every vault and credential row has recorded it since vaults exist).
 */
export function mayChangeVaultItem(principal: Principal, record: ResourceRecord): boolean {
  return (
    record.tenantId === principal.tenantId &&
    (principal.role === 'admin' || record.ownerId === principal.userId)
  );
}

/**
 * Checks a change to a vault (`credentialId` absent) or to one of its credentials before any
 * handler runs: 404 (exactly as for a missing id) when it is not the caller's tenant's, 403 when
 * the caller sees it but may not change it (`mayChangeVaultItem`).
 */
export async function authorizeVaultChange(
  store: Store,
  principal: Principal,
  vaultId: string,
  credentialId?: string,
): Promise<void> {
  const vault = await store.vaults.getVault(principal.tenantId, vaultId);
  if (!vault) throw notFound('vault', vaultId);
  if (credentialId === undefined) {
    if (!mayChangeVaultItem(principal, vault)) {
      throw new BerthError(
        'permission',
        `only tenant admins and the vault's creator can change vault ${vaultId}`,
      );
    }
    return;
  }
  const credential = await store.vaults.getCredential(principal.tenantId, vaultId, credentialId);
  if (!credential) throw notFound('credential', credentialId);
  if (!mayChangeVaultItem(principal, credential)) {
    throw new BerthError(
      'permission',
      `only tenant admins and the credential's creator can change credential ${credentialId}`,
    );
  }
}
