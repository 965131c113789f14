import type { SessionRecord, Store } from '../store/resource-store.js';
import { usageFromLog } from './session-usage.js';
import type { UsageRecord } from './usage.js';

/** The events a session's usage is computed from (never message or tool content). */
const USAGE_EVENT_TYPES = [
  'berth.egress_request',
  'session.usage',
  'span.model_request_end',
  'session.status_running',
  'session.status_idle',
  'session.status_rescheduled',
  'session.status_terminated',
];

/**
 * The usage of a tenant's sessions (or one user's), measured from each session's log as of
 * `now`: the unit reports are built from. Sessions created before `since` are left out.
 */
export async function collectUsage(
  store: Store,
  scope: { tenantId: string; ownerId?: string; since?: Date },
  now = Date.now(),
): Promise<UsageRecord[]> {
  const records: UsageRecord[] = [];
  let cursor: string | undefined;
  do {
    const page = await store.resources.listSessions({
      tenantId: scope.tenantId,
      ownerId: scope.ownerId,
      includeArchived: true,
      limit: 200,
      cursor,
      order: 'asc',
    });
    for (const session of page.items) {
      if (scope.since && Date.parse(session.createdAt) < scope.since.getTime()) continue;
      records.push(await usageRecordOf(store, session, now));
    }
    cursor = page.nextCursor ?? undefined;
  } while (cursor !== undefined);
  return records;
}

async function usageRecordOf(store: Store, session: SessionRecord, now: number): Promise<UsageRecord> {
  const log = await store.events.read(session, { types: USAGE_EVENT_TYPES, limit: Number.MAX_SAFE_INTEGER });
  const usage = usageFromLog(session, log, now);
  // The event count is the whole log's, not the filtered read's.
  usage.events = session.lastSeq;
  return {
    ...usage,
    sessionId: session.id,
    tenantId: session.tenantId,
    agentId: session.agentId,
    day: session.createdAt.slice(0, 10),
  };
}
