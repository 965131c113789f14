import { notFound } from '../errors.js';
import type { SessionRecord, Store } from '../store/resource-store.js';
import type { Principal } from './api-keys.js';

/**
 * The one ownership rule for sessions, used by every path that reaches one (REST, streams,
 * events, wakes caused by a request, and anything added later): a session is visible to its
 * creator and to its tenant's admins, and to no one else. Everything else in a tenant (agents,
 * environments, users, keys) is scoped by the tenant id every store call requires.
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
