import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { fileURLToPath } from 'node:url';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { isBerthError } from '../errors.js';
import { newId } from '../ids.js';
import type { SessionKey, StoredEvent } from './event-store.js';
import { type OpenStoreOptions, openStore } from './open-store.js';
import type { ResourceRecord, SessionRecord, Store } from './resource-store.js';
import type { SkillVersionRecord } from './skill-store.js';
import type { CredentialRecord } from './vault-store.js';

/**
 * The one behaviour suite every store adapter passes (Kysely and Hono style: one suite, looped
 * over implementations, against a real database). Each test gets a fresh, empty database.
 */

/** A fresh database for one test: how to open it, and how to throw it away afterwards. */
export interface ContractDatabase {
  options: OpenStoreOptions;
  dispose(): Promise<void>;
}

const REPOSITORY_ROOT = fileURLToPath(new URL('../../', import.meta.url));
const CHILD_SCRIPT = fileURLToPath(new URL('../../test/support/append-until-killed.ts', import.meta.url));
const TENANT = 'tnt_contract';
const OTHER_TENANT = 'tnt_other';
/** A session key no session has. */
const MISSING = { tenantId: TENANT, id: 'sesn_missing' };
const ISO_MILLISECONDS = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$/;

let clock = Date.parse('2026-01-01T00:00:00.000Z');
/** Distinct, increasing timestamps for records. */
function nextTimestamp(): string {
  clock += 1000;
  return new Date(clock).toISOString();
}

function resourceRecord(prefix: 'agent' | 'env', overrides: Partial<ResourceRecord> = {}): ResourceRecord {
  const timestamp = nextTimestamp();
  const id = overrides.id ?? newId(prefix);
  return {
    id,
    tenantId: TENANT,
    ownerId: 'user_alice',
    createdAt: timestamp,
    updatedAt: timestamp,
    archivedAt: null,
    body: prefix === 'agent' ? { id, name: 'helper', version: 1 } : { id, name: 'sandbox' },
    ...overrides,
  };
}

function sessionRecord(overrides: Partial<SessionRecord> = {}): SessionRecord {
  const timestamp = nextTimestamp();
  const id = overrides.id ?? newId('sesn');
  return {
    id,
    tenantId: TENANT,
    ownerId: 'user_alice',
    createdAt: timestamp,
    updatedAt: timestamp,
    archivedAt: null,
    body: { id, type: 'session', metadata: {} },
    agentId: 'agent_one',
    agentVersion: 1,
    environmentId: 'env_one',
    status: 'idle',
    stopReason: null,
    lastSeq: 0,
    ...overrides,
  };
}

function vaultRecord(overrides: Partial<ResourceRecord> = {}): ResourceRecord {
  const timestamp = nextTimestamp();
  const id = overrides.id ?? newId('vlt');
  return {
    id,
    tenantId: TENANT,
    ownerId: 'user_alice',
    createdAt: timestamp,
    updatedAt: timestamp,
    archivedAt: null,
    body: { id, type: 'vault', display_name: 'keys', metadata: {} },
    ...overrides,
  };
}

/** A credential row; the store treats `secret` as opaque text, so any string stands in for an envelope. */
function credentialRecord(vaultId: string, overrides: Partial<CredentialRecord> = {}): CredentialRecord {
  const timestamp = nextTimestamp();
  const id = overrides.id ?? newId('vcrd');
  return {
    id,
    tenantId: TENANT,
    ownerId: 'user_alice',
    createdAt: timestamp,
    updatedAt: timestamp,
    archivedAt: null,
    body: { id, type: 'vault_credential', vault_id: vaultId, auth: { type: 'static_bearer' } },
    vaultId,
    secret: { keyId: 'key-a', sealed: `v1.key-a.${id}.sealed` },
    ...overrides,
  };
}

function skillRecord(overrides: Partial<ResourceRecord> = {}): ResourceRecord {
  const timestamp = nextTimestamp();
  const id = overrides.id ?? `skill_${randomBytes(10).toString('hex')}`;
  return {
    id,
    tenantId: TENANT,
    ownerId: 'user_alice',
    createdAt: timestamp,
    updatedAt: timestamp,
    archivedAt: null,
    body: { id, type: 'skill', display_title: 'PDF tools', source: 'custom' },
    ...overrides,
  };
}

/** Version ids are decimal microsecond timestamps, increasing per skill. */
let versionClock = 1_767_225_600_000_000;

/** A version of `skill` whose archive is random bytes (the store treats it as opaque). */
function skillVersion(
  skill: ResourceRecord,
  overrides: Partial<SkillVersionRecord> = {},
): SkillVersionRecord {
  versionClock += 1000;
  const version = overrides.version ?? String(versionClock);
  return {
    tenantId: skill.tenantId,
    skillId: skill.id,
    version,
    createdAt: nextTimestamp(),
    body: { type: 'skill_version', skill_id: skill.id, version, name: 'pdf', description: 'Reads PDFs' },
    archive: randomBytes(256),
    ...overrides,
  };
}

/** A version as lists return it: everything but the archive. */
function withoutArchive(version: SkillVersionRecord): Omit<SkillVersionRecord, 'archive'> {
  const { archive: _archive, ...rest } = version;
  return rest;
}

/** Whether two byte arrays hold exactly the same bytes (compared without printing 100 KB). */
function sameBytes(left: Uint8Array | undefined, right: Uint8Array): boolean {
  return left !== undefined && Buffer.compare(Buffer.from(left), Buffer.from(right)) === 0;
}

function userMessage(text: string) {
  return { type: 'user.message', content: [{ type: 'text', text }] };
}

/** The BerthError code a promise rejects with (fails the test if it resolves). */
async function rejectionCode(promise: Promise<unknown>): Promise<string> {
  try {
    await promise;
  } catch (error) {
    if (isBerthError(error)) return error.code;
    throw error;
  }
  throw new Error('expected the call to fail');
}

/** Registers the contract suite for one adapter; `createDatabase` gives each test an empty database. */
export function runStoreContract(adapterName: string, createDatabase: () => Promise<ContractDatabase>): void {
  describe(`${adapterName} store contract`, () => {
    let database: ContractDatabase;
    let store: Store;
    const extraStores: Store[] = [];

    beforeEach(async () => {
      database = await createDatabase();
      store = await openStore(database.options);
    });

    afterEach(async () => {
      for (const extra of extraStores.splice(0)) await extra.close();
      await store.close();
      await database.dispose();
    });

    /** Creates a session; returns its key (tenant and id), which every event-store call takes. */
    async function newSession(overrides: Partial<SessionRecord> = {}): Promise<SessionKey> {
      const record = sessionRecord(overrides);
      await store.resources.createSession(record);
      return { tenantId: record.tenantId, id: record.id };
    }

    describe('event log', () => {
      it('numbers events 1, 2, 3… per session and stamps id and processed_at', async () => {
        const sessionId = await newSession();
        const otherSessionId = await newSession();
        const first = await store.events.append(sessionId, [userMessage('a'), userMessage('b')]);
        const second = await store.events.append(sessionId, [
          { id: 'sevt_client_chosen', ...userMessage('c') },
        ]);
        const other = await store.events.append(otherSessionId, [userMessage('x')]);

        expect(first.duplicate).toBe(false);
        expect(first.events.map((stored) => stored.seq)).toEqual([1, 2]);
        expect(second.events.map((stored) => stored.seq)).toEqual([3]);
        expect(other.events.map((stored) => stored.seq)).toEqual([1]);
        expect(second.events[0]!.event.id).toBe('sevt_client_chosen');
        for (const stored of [...first.events, ...second.events]) {
          expect(stored.sessionId).toBe(sessionId.id);
          expect(stored.event.id).toMatch(/^sevt_/);
          expect(stored.event.processed_at).toMatch(ISO_MILLISECONDS);
        }
        const read = await store.events.read(sessionId);
        expect(read).toEqual([...first.events, ...second.events]);
        expect(Object.keys(read[0]!.event).slice(0, 3)).toEqual(['id', 'type', 'processed_at']);
        expect(read[2]!.event.content).toEqual([{ type: 'text', text: 'c' }]);
        expect(await store.events.headSeq(sessionId)).toBe(3);
        expect((await store.resources.getSession(TENANT, sessionId.id))?.lastSeq).toBe(3);
      });

      it('overrides a client-sent processed_at with the store time', async () => {
        const sessionId = await newSession();
        const { events } = await store.events.append(sessionId, [
          { ...userMessage('a'), processed_at: '1999-01-01T00:00:00.000Z' },
        ]);
        expect(events[0]!.event.processed_at).not.toBe('1999-01-01T00:00:00.000Z');
        expect((await store.events.read(sessionId))[0]!.event.processed_at).toBe(
          events[0]!.event.processed_at,
        );
      });

      it('refuses to append to a session that does not exist', async () => {
        expect(await rejectionCode(store.events.append(MISSING, [userMessage('a')]))).toBe('not_found');
        expect(await rejectionCode(store.events.headSeq(MISSING))).toBe('not_found');
        expect(await rejectionCode(store.events.acquireWriter(MISSING))).toBe('not_found');
      });

      it('refuses an empty append', async () => {
        const sessionId = await newSession();
        expect(await rejectionCode(store.events.append(sessionId, []))).toBe('invalid_request');
      });

      it('refuses a reused event id and writes nothing of that append', async () => {
        const sessionId = await newSession();
        const otherSessionId = await newSession();
        await store.events.append(sessionId, [{ id: 'sevt_once', ...userMessage('a') }]);

        const reuse = store.events.append(sessionId, [
          userMessage('b'),
          { id: 'sevt_once', ...userMessage('c') },
        ]);
        expect(await rejectionCode(reuse)).toBe('conflict');
        const reuseElsewhere = store.events.append(otherSessionId, [
          { id: 'sevt_once', ...userMessage('d') },
        ]);
        expect(await rejectionCode(reuseElsewhere)).toBe('conflict');
        const twiceInOne = store.events.append(sessionId, [
          { id: 'sevt_twice', ...userMessage('e') },
          { id: 'sevt_twice', ...userMessage('f') },
        ]);
        expect(await rejectionCode(twiceInOne)).toBe('conflict');

        expect(await store.events.headSeq(sessionId)).toBe(1);
        expect(await store.events.headSeq(otherSessionId)).toBe(0);
        expect((await store.events.read(sessionId)).map((stored) => stored.event.id)).toEqual(['sevt_once']);
        // The log stays gapless after the failures.
        const next = await store.events.append(sessionId, [userMessage('g')]);
        expect(next.events[0]!.seq).toBe(2);
      });

      it('fails only the bad append when many are committed together', async () => {
        const sessions = await Promise.all([newSession(), newSession(), newSession()]);
        await store.events.append(sessions[0]!, [{ id: 'sevt_taken', ...userMessage('a') }]);
        const writer = await store.events.acquireWriter(sessions[1]!);
        await store.events.acquireWriter(sessions[1]!);

        const outcomes = await Promise.allSettled([
          store.events.append(sessions[0]!, [userMessage('ok 1')]),
          store.events.append(sessions[0]!, [{ id: 'sevt_taken', ...userMessage('conflict') }]),
          store.events.append(sessions[1]!, [userMessage('stale')], { writer }),
          store.events.append(MISSING, [userMessage('unknown')]),
          store.events.append(sessions[2]!, [userMessage('ok 2')]),
          store.events.append(sessions[0]!, [userMessage('ok 3')]),
        ]);

        expect(outcomes.map((outcome) => outcome.status)).toEqual([
          'fulfilled',
          'rejected',
          'rejected',
          'rejected',
          'fulfilled',
          'fulfilled',
        ]);
        const codes = outcomes.map((outcome) =>
          outcome.status === 'rejected' && isBerthError(outcome.reason) ? outcome.reason.code : undefined,
        );
        expect(codes.slice(1, 4)).toEqual(['conflict', 'stale_writer', 'not_found']);
        const texts = (await store.events.read(sessions[0]!)).map((stored) => stored.seq);
        expect(texts).toEqual([1, 2, 3]);
        expect(await store.events.headSeq(sessions[1]!)).toBe(0);
        expect(await store.events.headSeq(sessions[2]!)).toBe(1);
      });

      it('keeps the log gapless under many concurrent appenders', async () => {
        const sessions = await Promise.all([newSession(), newSession(), newSession(), newSession()]);
        const appends = [];
        for (let round = 0; round < 50; round++) {
          for (const sessionId of sessions) {
            appends.push(store.events.append(sessionId, [userMessage(`${round}`), userMessage(`${round}b`)]));
          }
        }
        await Promise.all(appends);
        for (const sessionId of sessions) {
          const seqs = (await store.events.read(sessionId)).map((stored) => stored.seq);
          expect(seqs).toEqual(Array.from({ length: 100 }, (_, index) => index + 1));
        }
      });

      it('keeps session status and stop_reason in step with status events', async () => {
        const sessionId = await newSession({ status: 'idle' });
        const statusOf = async () => {
          const session = await store.resources.getSession(TENANT, sessionId.id);
          return { status: session?.status, stopReason: session?.stopReason };
        };

        await store.events.append(sessionId, [{ type: 'session.status_running' }]);
        expect(await statusOf()).toEqual({ status: 'running', stopReason: null });

        const requiresAction = { type: 'requires_action', event_ids: ['sevt_1'] };
        await store.events.append(sessionId, [{ type: 'session.status_idle', stop_reason: requiresAction }]);
        expect(await statusOf()).toEqual({ status: 'idle', stopReason: requiresAction });

        await store.events.append(sessionId, [{ type: 'session.status_running' }, userMessage('working')]);
        expect(await statusOf()).toEqual({ status: 'running', stopReason: null });

        await store.events.append(sessionId, [{ type: 'session.status_rescheduled' }]);
        expect((await statusOf()).status).toBe('rescheduling');

        // The newest status event of one append wins.
        await store.events.append(sessionId, [
          { type: 'session.status_running' },
          { type: 'session.status_idle', stop_reason: { type: 'end_turn' } },
        ]);
        expect(await statusOf()).toEqual({ status: 'idle', stopReason: { type: 'end_turn' } });

        await store.events.append(sessionId, [{ type: 'session.status_terminated' }]);
        expect((await statusOf()).status).toBe('terminated');
        expect((await store.resources.getSession(TENANT, sessionId.id))?.lastSeq).toBe(8);
      });

      it('does not change status when a status append fails', async () => {
        const sessionId = await newSession({ status: 'idle' });
        await store.events.append(sessionId, [{ id: 'sevt_taken', ...userMessage('a') }]);
        const failing = store.events.append(sessionId, [
          { type: 'session.status_running' },
          { id: 'sevt_taken', ...userMessage('b') },
        ]);
        expect(await rejectionCode(failing)).toBe('conflict');
        expect((await store.resources.getSession(TENANT, sessionId.id))?.status).toBe('idle');
      });

      it('answers a repeated idempotency key with the first stored events and writes nothing', async () => {
        const sessionId = await newSession();
        const otherSessionId = await newSession();
        const first = await store.events.append(sessionId, [userMessage('a'), userMessage('b')], {
          idempotencyKey: 'key-1',
        });
        const repeat = await store.events.append(sessionId, [userMessage('different')], {
          idempotencyKey: 'key-1',
        });
        expect(repeat.duplicate).toBe(true);
        expect(repeat.events).toEqual(first.events);
        expect(await store.events.headSeq(sessionId)).toBe(2);

        // Keys are per session.
        const elsewhere = await store.events.append(otherSessionId, [userMessage('c')], {
          idempotencyKey: 'key-1',
        });
        expect(elsewhere.duplicate).toBe(false);
      });

      it('writes once when twenty appends race with the same idempotency key', async () => {
        const sessionId = await newSession();
        const results = await Promise.all(
          Array.from({ length: 20 }, (_, index) =>
            store.events.append(sessionId, [userMessage(`attempt ${index}`)], { idempotencyKey: 'race' }),
          ),
        );
        expect(results.filter((result) => !result.duplicate)).toHaveLength(1);
        const ids = new Set(results.map((result) => result.events[0]!.event.id));
        expect(ids.size).toBe(1);
        expect(await store.events.headSeq(sessionId)).toBe(1);
      });

      it('forgets an idempotency key whose append failed', async () => {
        const sessionId = await newSession();
        await store.events.append(sessionId, [{ id: 'sevt_taken', ...userMessage('a') }]);
        const failing = store.events.append(sessionId, [{ id: 'sevt_taken', ...userMessage('b') }], {
          idempotencyKey: 'retry-me',
        });
        expect(await rejectionCode(failing)).toBe('conflict');
        const retry = await store.events.append(sessionId, [userMessage('b')], {
          idempotencyKey: 'retry-me',
        });
        expect(retry.duplicate).toBe(false);
        expect(retry.events[0]!.seq).toBe(2);
      });

      it('fences off an older writer once a newer one is acquired', async () => {
        const sessionId = await newSession();
        const firstWriter = await store.events.acquireWriter(sessionId);
        const secondWriter = await store.events.acquireWriter(sessionId);
        expect(secondWriter.token).toBeGreaterThan(firstWriter.token);
        expect(secondWriter.sessionId).toBe(sessionId.id);

        await store.events.append(sessionId, [userMessage('current')], { writer: secondWriter });
        expect(
          await rejectionCode(
            store.events.append(sessionId, [userMessage('stale')], { writer: firstWriter }),
          ),
        ).toBe('stale_writer');
        // Client events carry no writer token and are always accepted.
        await store.events.append(sessionId, [userMessage('from a client')]);

        const texts = (await store.events.read(sessionId)).map((stored) => stored.event.content);
        expect(texts).toEqual([
          [{ type: 'text', text: 'current' }],
          [{ type: 'text', text: 'from a client' }],
        ]);
      });

      it('appends on condition of the head seq, and writes nothing once the log has moved on', async () => {
        const sessionId = await newSession();
        const writer = await store.events.acquireWriter(sessionId);
        await store.events.append(sessionId, [userMessage('one')]);
        await store.events.append(sessionId, [{ type: 'session.status_running' }], {
          writer,
          expectedHeadSeq: 1,
        });
        // A client event lands after the harness decided on a log ending at seq 2.
        await store.events.append(sessionId, [userMessage('two')]);
        const idle = { type: 'session.status_idle', stop_reason: { type: 'end_turn' } };
        expect(
          await rejectionCode(store.events.append(sessionId, [idle], { writer, expectedHeadSeq: 2 })),
        ).toBe('head_moved');
        expect(await store.events.headSeq(sessionId)).toBe(3);
        expect((await store.resources.getSession(TENANT, sessionId.id))?.status).toBe('running');
        await store.events.append(sessionId, [idle], { writer, expectedHeadSeq: 3 });
        expect(await store.events.headSeq(sessionId)).toBe(4);
      });

      it('stores strings with NUL characters (binary tool output) without failing the append', async () => {
        const sessionId = await newSession();
        await store.events.append(sessionId, [
          { type: 'agent.tool_result', tool_use_id: 'x', content: [{ type: 'text', text: 'a\u0000b' }] },
        ]);
        const [stored] = await store.events.read(sessionId);
        // PostgreSQL text cannot hold NUL: that adapter stores U+FFFD in its place.
        expect(['a\u0000b', 'a\ufffdb']).toContain((stored!.event.content as { text: string }[])[0]!.text);
      });

      it('refuses a writer token of another session', async () => {
        const sessionId = await newSession();
        const otherSessionId = await newSession();
        const writer = await store.events.acquireWriter(otherSessionId);
        expect(await rejectionCode(store.events.append(sessionId, [userMessage('a')], { writer }))).toBe(
          'invalid_request',
        );
      });

      it('reads ranges, pages, newest first and by type', async () => {
        const sessionId = await newSession();
        await store.events.append(sessionId, [
          userMessage('1'),
          { type: 'agent.message', content: [] },
          userMessage('3'),
          { type: 'session.status_running' },
          userMessage('5'),
        ]);
        const seqsOf = (events: StoredEvent[]) => events.map((stored) => stored.seq);

        expect(seqsOf(await store.events.read(sessionId))).toEqual([1, 2, 3, 4, 5]);
        expect(seqsOf(await store.events.read(sessionId, { afterSeq: 2 }))).toEqual([3, 4, 5]);
        expect(seqsOf(await store.events.read(sessionId, { beforeSeq: 3 }))).toEqual([1, 2]);
        expect(seqsOf(await store.events.read(sessionId, { afterSeq: 1, beforeSeq: 5 }))).toEqual([2, 3, 4]);
        expect(seqsOf(await store.events.read(sessionId, { limit: 2 }))).toEqual([1, 2]);
        // "Everything after" is how the harness reads a tail.
        expect(
          seqsOf(await store.events.read(sessionId, { afterSeq: 3, limit: Number.MAX_SAFE_INTEGER })),
        ).toEqual([4, 5]);
        expect(seqsOf(await store.events.read(sessionId, { order: 'desc', limit: 2 }))).toEqual([5, 4]);
        expect(seqsOf(await store.events.read(sessionId, { order: 'desc', beforeSeq: 4 }))).toEqual([
          3, 2, 1,
        ]);
        expect(seqsOf(await store.events.read(sessionId, { types: ['user.message'] }))).toEqual([1, 3, 5]);
        expect(
          seqsOf(await store.events.read(sessionId, { types: ['agent.message', 'session.status_running'] })),
        ).toEqual([2, 4]);
        expect(await store.events.read(sessionId, { types: [] })).toEqual([]);
        expect(await store.events.read(MISSING)).toEqual([]);
      });

      it('finds one event by id within its session', async () => {
        const sessionId = await newSession();
        const otherSessionId = await newSession();
        const { events } = await store.events.append(sessionId, [userMessage('a'), userMessage('b')]);
        const second = events[1]!;
        expect(await store.events.getEvent(sessionId, second.event.id)).toEqual(second);
        expect(await store.events.getEvent(otherSessionId, second.event.id)).toBeUndefined();
        expect(await store.events.getEvent(sessionId, 'sevt_missing')).toBeUndefined();
      });

      it('reports head seq 0 for a session without events', async () => {
        const sessionId = await newSession();
        expect(await store.events.headSeq(sessionId)).toBe(0);
      });

      it('delivers each committed event once, in order, after it is committed', async () => {
        const sessionId = await newSession();
        const otherSessionId = await newSession();
        const delivered: StoredEvent[] = [];
        const visibleAtDelivery: Promise<StoredEvent | undefined>[] = [];
        store.events.subscribe(sessionId, (events) => {
          delivered.push(...events);
          for (const stored of events)
            visibleAtDelivery.push(store.events.getEvent(sessionId, stored.event.id));
        });

        await store.events.append(sessionId, [{ id: 'sevt_taken', ...userMessage('first') }]);
        await Promise.allSettled([
          ...Array.from({ length: 30 }, (_, index) =>
            store.events.append(sessionId, [userMessage(`${index}`)]),
          ),
          store.events.append(sessionId, [{ id: 'sevt_taken', ...userMessage('failed') }]),
          store.events.append(sessionId, [userMessage('keyed')], { idempotencyKey: 'k' }),
          store.events.append(sessionId, [userMessage('keyed again')], { idempotencyKey: 'k' }),
          store.events.append(otherSessionId, [userMessage('elsewhere')]),
        ]);

        expect(delivered.map((stored) => stored.seq)).toEqual(
          Array.from({ length: 32 }, (_, index) => index + 1),
        );
        expect(delivered.every((stored) => stored.sessionId === sessionId.id)).toBe(true);
        expect(delivered).toEqual(await store.events.read(sessionId));
        for (const visible of await Promise.all(visibleAtDelivery)) expect(visible).toBeDefined();
      });

      it('stops delivering after unsubscribe', async () => {
        const sessionId = await newSession();
        const delivered: number[] = [];
        const unsubscribe = store.events.subscribe(sessionId, (events) => {
          delivered.push(...events.map((stored) => stored.seq));
        });
        await store.events.append(sessionId, [userMessage('a')]);
        unsubscribe();
        unsubscribe();
        await store.events.append(sessionId, [userMessage('b')]);
        expect(delivered).toEqual([1]);
      });

      it('keeps working when a listener throws', async () => {
        const sessionId = await newSession();
        const delivered: number[] = [];
        store.events.subscribe(sessionId, () => {
          throw new Error('listener bug');
        });
        store.events.subscribe(sessionId, (events) => delivered.push(...events.map((stored) => stored.seq)));
        const result = await store.events.append(sessionId, [userMessage('a')]);
        expect(result.events[0]!.seq).toBe(1);
        await store.events.append(sessionId, [userMessage('b')]);
        expect(delivered).toEqual([1, 2]);
      });

      it('keeps acknowledged events across close and reopen', async () => {
        const sessionId = await newSession();
        const { events } = await store.events.append(sessionId, [
          userMessage('a'),
          { type: 'session.status_running' },
        ]);
        await store.close();
        store = await openStore(database.options);
        expect(await store.events.read(sessionId)).toEqual(events);
        expect((await store.resources.getSession(TENANT, sessionId.id))?.status).toBe('running');
      });

      it('keeps every acknowledged event when the writing process is killed with SIGKILL', async () => {
        const sessions = await Promise.all(Array.from({ length: 4 }, () => newSession()));
        const acknowledged = await runChildUntilKilled(database.options, sessions, 400);

        const reopened = await openStore(database.options);
        extraStores.push(reopened);
        for (const sessionId of sessions) {
          const seqs = (await reopened.events.read(sessionId, { limit: 1_000_000 })).map(
            (stored) => stored.seq,
          );
          expect(seqs).toEqual(Array.from({ length: seqs.length }, (_, index) => index + 1));
          const highestAcknowledged = Math.max(0, ...(acknowledged.get(sessionId.id) ?? []));
          expect(seqs.length).toBeGreaterThanOrEqual(highestAcknowledged);
          expect(await reopened.events.headSeq(sessionId)).toBe(seqs.length);
        }
        const total = [...acknowledged.values()].reduce((sum, seqs) => sum + seqs.length, 0);
        expect(total).toBeGreaterThanOrEqual(400);
      });

      it('deletes a session together with its events', async () => {
        const sessionId = await newSession();
        const { events } = await store.events.append(sessionId, [userMessage('a')], { idempotencyKey: 'k' });
        expect(await store.resources.delete('session', TENANT, sessionId.id)).toBe(true);
        expect(await store.resources.getSession(TENANT, sessionId.id)).toBeUndefined();
        expect(await store.events.read(sessionId)).toEqual([]);
        expect(await store.events.getEvent(sessionId, events[0]!.event.id)).toBeUndefined();
        expect(await store.resources.delete('session', TENANT, sessionId.id)).toBe(false);
      });
    });

    describe('resources', () => {
      it('creates a session and its initial events in one write: a failed event leaves no session', async () => {
        const taken = await newSession();
        await store.events.append(taken, [{ id: 'sevt_taken_by_other', ...userMessage('first') }]);
        const record = sessionRecord();
        const failed = store.resources.createSession(record, {
          initialEvents: [userMessage('ok'), { id: 'sevt_taken_by_other', ...userMessage('clash') }],
        });
        expect(await rejectionCode(failed)).toBe('conflict');
        expect(await store.resources.getSession(TENANT, record.id)).toBeUndefined();

        const result = await store.resources.createSession(record, {
          initialEvents: [userMessage('one'), userMessage('two')],
        });
        expect(result.created).toBe(true);
        const key = { tenantId: TENANT, id: record.id };
        expect((await store.events.read(key)).map((stored) => stored.seq)).toEqual([1, 2]);
        expect((await store.resources.getSession(TENANT, record.id))?.lastSeq).toBe(2);
        expect(await store.events.headSeq(key)).toBe(2);
        const next = await store.events.append(key, [userMessage('three')]);
        expect(next.events[0]?.seq).toBe(3);
      });

      it('creates one session per idempotency key and owner', async () => {
        const first = sessionRecord();
        expect(
          await store.resources.createSession(first, {
            idempotencyKey: 'k-create',
            initialEvents: [userMessage('a')],
          }),
        ).toMatchObject({ created: true });
        const retry = sessionRecord();
        expect(
          await store.resources.createSession(retry, {
            idempotencyKey: 'k-create',
            initialEvents: [userMessage('a')],
          }),
        ).toEqual({ created: false, existingSessionId: first.id });
        expect(await store.resources.getSession(TENANT, retry.id)).toBeUndefined();
        expect(
          (await store.resources.findSessionByIdempotencyKey(TENANT, 'user_alice', 'k-create'))?.id,
        ).toBe(first.id);
        // Another owner's key is another key.
        const bob = sessionRecord({ ownerId: 'user_bob' });
        expect(await store.resources.createSession(bob, { idempotencyKey: 'k-create' })).toMatchObject({
          created: true,
        });
        expect(
          await store.resources.findSessionByIdempotencyKey(TENANT, 'user_carol', 'k-create'),
        ).toBeUndefined();
      });

      it('stores agent versions immutably and refuses an update based on an old version', async () => {
        const agent = resourceRecord('agent');
        await store.resources.createAgent(agent);
        const version2 = {
          ...agent,
          updatedAt: nextTimestamp(),
          body: { ...agent.body, name: 'v2', version: 2 },
        };
        await store.resources.addAgentVersion(TENANT, agent.id, 1, version2);

        const stale = {
          ...agent,
          updatedAt: nextTimestamp(),
          body: { ...agent.body, name: 'lost', version: 2 },
        };
        expect(await rejectionCode(store.resources.addAgentVersion(TENANT, agent.id, 1, stale))).toBe(
          'conflict',
        );
        expect(
          await rejectionCode(
            store.resources.addAgentVersion(TENANT, 'agent_missing', 1, { ...version2, id: 'agent_missing' }),
          ),
        ).toBe('not_found');

        expect((await store.resources.getAgentVersion(TENANT, agent.id))?.body.name).toBe('v2');
        expect((await store.resources.get('agent', TENANT, agent.id))?.body.version).toBe(2);
        expect(await store.resources.getAgentVersion(TENANT, agent.id, 1)).toEqual(agent);
        expect((await store.resources.getAgentVersion(TENANT, agent.id, 2))?.body).toEqual(version2.body);
        expect(await store.resources.getAgentVersion(TENANT, agent.id, 3)).toBeUndefined();
        expect(await store.resources.getAgentVersion(OTHER_TENANT, agent.id, 1)).toBeUndefined();
      });

      it('refuses an agent whose first body is not version 1, and a duplicate agent id', async () => {
        const agent = resourceRecord('agent');
        expect(
          await rejectionCode(store.resources.createAgent({ ...agent, body: { ...agent.body, version: 2 } })),
        ).toBe('invalid_request');
        await store.resources.createAgent(agent);
        expect(await rejectionCode(store.resources.createAgent(agent))).toBe('conflict');
      });

      it('lists agent versions newest first, page by page', async () => {
        const agent = resourceRecord('agent');
        await store.resources.createAgent(agent);
        for (let version = 2; version <= 5; version++) {
          await store.resources.addAgentVersion(TENANT, agent.id, version - 1, {
            ...agent,
            body: { ...agent.body, version },
          });
        }
        const first = await store.resources.listAgentVersions(TENANT, agent.id, { limit: 2 });
        expect(first.items.map((item) => item.body.version)).toEqual([5, 4]);
        const second = await store.resources.listAgentVersions(TENANT, agent.id, {
          limit: 2,
          cursor: first.nextCursor!,
        });
        expect(second.items.map((item) => item.body.version)).toEqual([3, 2]);
        const last = await store.resources.listAgentVersions(TENANT, agent.id, {
          limit: 2,
          cursor: second.nextCursor!,
        });
        expect(last.items.map((item) => item.body.version)).toEqual([1]);
        expect(last.nextCursor).toBeNull();
        const ascending = await store.resources.listAgentVersions(TENANT, agent.id, {
          limit: 10,
          order: 'asc',
        });
        expect(ascending.items.map((item) => item.body.version)).toEqual([1, 2, 3, 4, 5]);
        const otherTenant = await store.resources.listAgentVersions(OTHER_TENANT, agent.id, { limit: 10 });
        expect(otherTenant.items).toEqual([]);
      });

      it('hides rows of other tenants from get, update and delete', async () => {
        const environment = resourceRecord('env');
        await store.resources.insert('environment', environment);
        expect(await store.resources.get('environment', TENANT, environment.id)).toEqual(environment);
        expect(await store.resources.get('environment', OTHER_TENANT, environment.id)).toBeUndefined();
        expect(
          await rejectionCode(
            store.resources.update('environment', { ...environment, tenantId: OTHER_TENANT }),
          ),
        ).toBe('not_found');
        expect(await store.resources.delete('environment', OTHER_TENANT, environment.id)).toBe(false);

        const sessionId = await newSession();
        expect(await store.resources.getSession(OTHER_TENANT, sessionId.id)).toBeUndefined();
        expect(await store.resources.get('session', OTHER_TENANT, sessionId.id)).toBeUndefined();
      });

      it('updates body, updatedAt and archivedAt of a row', async () => {
        const environment = resourceRecord('env');
        await store.resources.insert('environment', environment);
        const archived = {
          ...environment,
          updatedAt: nextTimestamp(),
          archivedAt: nextTimestamp(),
          body: { ...environment.body, name: 'renamed' },
        };
        await store.resources.update('environment', archived);
        expect(await store.resources.get('environment', TENANT, environment.id)).toEqual(archived);

        const sessionId = await newSession();
        const session = (await store.resources.getSession(TENANT, sessionId.id))!;
        await store.resources.update('session', { ...session, body: { ...session.body, title: 'renamed' } });
        expect((await store.resources.getSession(TENANT, sessionId.id))?.body.title).toBe('renamed');
        expect(await rejectionCode(store.resources.update('environment', resourceRecord('env')))).toBe(
          'not_found',
        );
      });

      it('pages through rows in creation order with an opaque cursor', async () => {
        const created: ResourceRecord[] = [];
        for (let index = 0; index < 5; index++) {
          const record = resourceRecord('env', { ownerId: index % 2 === 0 ? 'user_alice' : 'user_bob' });
          await store.resources.insert('environment', record);
          created.push(record);
        }
        await store.resources.insert('environment', resourceRecord('env', { tenantId: OTHER_TENANT }));
        const ids = created.map((record) => record.id);

        const pageOne = await store.resources.list('environment', { tenantId: TENANT, limit: 2 });
        const pageTwo = await store.resources.list('environment', {
          tenantId: TENANT,
          limit: 2,
          cursor: pageOne.nextCursor!,
        });
        const pageThree = await store.resources.list('environment', {
          tenantId: TENANT,
          limit: 2,
          cursor: pageTwo.nextCursor!,
        });
        expect([...pageOne.items, ...pageTwo.items, ...pageThree.items].map((item) => item.id)).toEqual(ids);
        expect(pageThree.nextCursor).toBeNull();

        const newest = await store.resources.list('environment', {
          tenantId: TENANT,
          limit: 3,
          order: 'desc',
        });
        const older = await store.resources.list('environment', {
          tenantId: TENANT,
          limit: 3,
          order: 'desc',
          cursor: newest.nextCursor!,
        });
        expect([...newest.items, ...older.items].map((item) => item.id)).toEqual([...ids].reverse());

        const bobs = await store.resources.list('environment', {
          tenantId: TENANT,
          limit: 10,
          ownerId: 'user_bob',
        });
        expect(bobs.items.map((item) => item.id)).toEqual([ids[1], ids[3]]);

        await store.resources.update('environment', { ...created[0]!, archivedAt: nextTimestamp() });
        const active = await store.resources.list('environment', { tenantId: TENANT, limit: 10 });
        expect(active.items.map((item) => item.id)).toEqual(ids.slice(1));
        const all = await store.resources.list('environment', {
          tenantId: TENANT,
          limit: 10,
          includeArchived: true,
        });
        expect(all.items.map((item) => item.id)).toEqual(ids);

        expect(
          await rejectionCode(
            store.resources.list('environment', { tenantId: TENANT, limit: 2, cursor: 'garbage!' }),
          ),
        ).toBe('invalid_request');
      });

      it('lists agents and deletes an agent with its versions', async () => {
        const agent = resourceRecord('agent');
        await store.resources.insert('agent', agent);
        expect((await store.resources.list('agent', { tenantId: TENANT, limit: 10 })).items).toEqual([agent]);
        expect(await store.resources.delete('agent', TENANT, agent.id)).toBe(true);
        expect(await store.resources.getAgentVersion(TENANT, agent.id, 1)).toBeUndefined();
      });

      it('stores sessions with their columns and refuses a duplicate id', async () => {
        const record = sessionRecord({ status: 'idle', stopReason: { type: 'end_turn' } });
        await store.resources.createSession(record);
        expect(await store.resources.getSession(TENANT, record.id)).toEqual(record);
        expect(await store.resources.get('session', TENANT, record.id)).toMatchObject({ id: record.id });
        expect(await rejectionCode(store.resources.createSession(record))).toBe('conflict');
      });

      it('filters sessions by agent, agent version and status', async () => {
        const a1 = (await newSession({ agentId: 'agent_a', agentVersion: 1, status: 'idle' })).id;
        const a2 = (await newSession({ agentId: 'agent_a', agentVersion: 2, status: 'running' })).id;
        const b1 = (await newSession({ agentId: 'agent_b', agentVersion: 1, status: 'terminated' })).id;
        await newSession({ agentId: 'agent_a', tenantId: OTHER_TENANT });
        const idsOf = async (query: Parameters<Store['resources']['listSessions']>[0]) =>
          (await store.resources.listSessions(query)).items.map((item) => item.id);

        expect(await idsOf({ tenantId: TENANT, limit: 10 })).toEqual([a1, a2, b1]);
        expect(await idsOf({ tenantId: TENANT, limit: 10, agentId: 'agent_a' })).toEqual([a1, a2]);
        expect(await idsOf({ tenantId: TENANT, limit: 10, agentId: 'agent_a', agentVersion: 2 })).toEqual([
          a2,
        ]);
        expect(await idsOf({ tenantId: TENANT, limit: 10, statuses: ['idle', 'terminated'] })).toEqual([
          a1,
          b1,
        ]);
        expect(await idsOf({ tenantId: TENANT, limit: 10, order: 'desc' })).toEqual([b1, a2, a1]);
        const firstPage = await store.resources.listSessions({
          tenantId: TENANT,
          limit: 2,
          agentId: 'agent_a',
        });
        expect(firstPage.nextCursor).toBeNull();
        const paged = await store.resources.listSessions({
          tenantId: TENANT,
          limit: 1,
          statuses: ['idle', 'running'],
        });
        const rest = await idsOf({
          tenantId: TENANT,
          limit: 1,
          statuses: ['idle', 'running'],
          cursor: paged.nextCursor!,
        });
        expect([...paged.items.map((item) => item.id), ...rest]).toEqual([a1, a2]);
      });

      it('filters sessions by creation time, each bound exclusive or inclusive', async () => {
        const at = (second: number) => `2031-05-0${second}T10:00:00.000Z`;
        const ids = [];
        for (const second of [1, 2, 3]) {
          ids.push((await newSession({ createdAt: at(second), agentId: 'agent_timed' })).id);
        }
        const idsOf = async (createdAt: Record<string, string>) =>
          (
            await store.resources.listSessions({
              tenantId: TENANT,
              limit: 10,
              agentId: 'agent_timed',
              createdAt,
            })
          ).items.map((item) => item.id);
        expect(await idsOf({ gt: at(1) })).toEqual([ids[1], ids[2]]);
        expect(await idsOf({ gte: at(2) })).toEqual([ids[1], ids[2]]);
        expect(await idsOf({ lt: at(2) })).toEqual([ids[0]]);
        expect(await idsOf({ lte: at(2) })).toEqual([ids[0], ids[1]]);
        expect(await idsOf({ gt: at(1), lt: at(3) })).toEqual([ids[1]]);
      });

      it('finds sessions by status across tenants for crash recovery', async () => {
        const running = await newSession({ status: 'running' });
        const rescheduling = await newSession({ status: 'rescheduling', tenantId: OTHER_TENANT });
        await newSession({ status: 'idle' });
        const idleThenRunning = await newSession({ status: 'idle' });
        await store.events.append(idleThenRunning, [{ type: 'session.status_running' }]);

        const found = await store.resources.findSessionsByStatus(['running', 'rescheduling']);
        expect(found.map((session) => session.id).sort()).toEqual(
          [running.id, rescheduling.id, idleThenRunning.id].sort(),
        );
        expect(await store.resources.findSessionsByStatus([])).toEqual([]);
        // Metrics count across tenants too.
        expect(await store.resources.countSessionsByStatus()).toEqual({
          running: 2,
          rescheduling: 1,
          idle: 1,
        });
      });

      it("stores tenants, users and keys; a key is found by hash with its user's role", async () => {
        expect(await store.resources.countApiKeys()).toBe(0);
        await store.resources.createTenant({
          id: TENANT,
          name: 'contract',
          createdAt: nextTimestamp(),
          limits: null,
        });
        await store.resources.createTenant({
          id: OTHER_TENANT,
          name: 'other',
          createdAt: nextTimestamp(),
          limits: { liveSessions: 3 },
        });
        expect(
          await rejectionCode(
            store.resources.createTenant({
              id: 'tnt_third',
              name: 'other',
              createdAt: nextTimestamp(),
              limits: null,
            }),
          ),
        ).toBe('conflict');
        expect((await store.resources.getTenant(OTHER_TENANT))?.limits).toEqual({ liveSessions: 3 });
        expect((await store.resources.listTenants()).map((tenant) => tenant.name)).toEqual([
          'contract',
          'other',
        ]);

        const alice = {
          id: 'user_alice',
          tenantId: TENANT,
          name: 'alice',
          role: 'admin' as const,
          createdAt: nextTimestamp(),
        };
        const bob = {
          id: 'user_bob',
          tenantId: TENANT,
          name: 'bob',
          role: 'member' as const,
          createdAt: nextTimestamp(),
        };
        await store.resources.createUser(alice);
        await store.resources.createUser(bob);
        // Names are unique per tenant, not across tenants.
        expect(await rejectionCode(store.resources.createUser({ ...bob, id: 'user_bob2' }))).toBe('conflict');
        await store.resources.createUser({ ...bob, id: 'user_bob_other', tenantId: OTHER_TENANT });
        expect(await store.resources.listUsers(TENANT)).toEqual([alice, bob]);
        expect(await store.resources.getUser(OTHER_TENANT, 'user_alice')).toBeUndefined();

        const key = {
          id: newId('key'),
          tenantId: TENANT,
          userId: 'user_alice',
          hash: 'a'.repeat(64),
          name: 'bootstrap',
          createdAt: nextTimestamp(),
          expiresAt: null,
          revokedAt: null,
        };
        const memberKey = {
          ...key,
          id: newId('key'),
          userId: 'user_bob',
          hash: 'b'.repeat(64),
          expiresAt: nextTimestamp(),
        };
        await store.resources.createApiKey(key);
        await store.resources.createApiKey(memberKey);
        expect(await store.resources.findApiKeyByHash(key.hash)).toEqual({ ...key, role: 'admin' });
        expect(await store.resources.findApiKeyByHash(memberKey.hash)).toEqual({
          ...memberKey,
          role: 'member',
        });
        expect(await store.resources.findApiKeyByHash('c'.repeat(64))).toBeUndefined();
        // A role change: the user's keys carry it; another tenant cannot make it.
        expect(await store.resources.setUserRole(OTHER_TENANT, 'user_bob', 'admin')).toBeUndefined();
        expect(await store.resources.setUserRole(TENANT, 'user_bob', 'admin')).toEqual({
          ...bob,
          role: 'admin',
        });
        expect((await store.resources.findApiKeyByHash(memberKey.hash))?.role).toBe('admin');
        expect(await store.resources.setUserRole(TENANT, 'user_bob', 'member')).toEqual(bob);
        expect(await store.resources.setUserRole(TENANT, 'user_nobody', 'admin')).toBeUndefined();
        expect(await store.resources.countApiKeys()).toBe(2);
        expect(await rejectionCode(store.resources.createApiKey({ ...key, id: newId('key') }))).toBe(
          'conflict',
        );

        expect((await store.resources.listApiKeys(TENANT)).map((found) => found.id)).toEqual([
          memberKey.id,
          key.id,
        ]);
        expect((await store.resources.listApiKeys(TENANT, 'user_bob')).map((found) => found.id)).toEqual([
          memberKey.id,
        ]);
        expect(await store.resources.listApiKeys(OTHER_TENANT)).toEqual([]);
        expect(await store.resources.getApiKey(OTHER_TENANT, key.id)).toBeUndefined();
        // Revoking through another tenant changes nothing; the first revocation time stays.
        expect(await store.resources.revokeApiKey(OTHER_TENANT, key.id, nextTimestamp())).toBeUndefined();
        expect((await store.resources.getApiKey(TENANT, key.id))?.revokedAt).toBeNull();
        const revokedAt = nextTimestamp();
        expect((await store.resources.revokeApiKey(TENANT, key.id, revokedAt))?.revokedAt).toBe(revokedAt);
        expect((await store.resources.revokeApiKey(TENANT, key.id, nextTimestamp()))?.revokedAt).toBe(
          revokedAt,
        );
        expect((await store.resources.findApiKeyByHash(key.hash))?.revokedAt).toBe(revokedAt);
      });

      it('takes the first API key from one of several starts racing for it, and none after', async () => {
        // Three connections to one database, as three nodes starting at the same moment.
        const others = [await openStore(database.options), await openStore(database.options)];
        try {
          const first = (index: number) => ({
            tenant: { id: 'tnt_default', name: 'default', createdAt: nextTimestamp(), limits: null },
            user: {
              id: 'user_admin',
              tenantId: 'tnt_default',
              name: 'admin',
              role: 'admin' as const,
              createdAt: nextTimestamp(),
            },
            key: {
              id: newId('key'),
              tenantId: 'tnt_default',
              userId: 'user_admin',
              hash: String(index).repeat(64),
              name: `start ${index}`,
              createdAt: nextTimestamp(),
              expiresAt: null,
              revokedAt: null,
            },
          });
          const outcomes = await Promise.all(
            [store, ...others].map((each, index) => each.resources.createFirstApiKey(first(index))),
          );
          expect(outcomes.filter(Boolean)).toHaveLength(1);
          const winner = outcomes.indexOf(true);
          expect(await store.resources.countApiKeys()).toBe(1);
          expect(await store.resources.findApiKeyByHash(String(winner).repeat(64))).toMatchObject({
            name: `start ${winner}`,
            role: 'admin',
          });
          expect((await store.resources.listTenants()).map((tenant) => tenant.name)).toEqual(['default']);
          expect((await store.resources.listUsers('tnt_default')).map((user) => user.name)).toEqual([
            'admin',
          ]);
          // Later starts find the key and write nothing.
          expect(await others[0]!.resources.createFirstApiKey(first(7))).toBe(false);
          expect(await store.resources.countApiKeys()).toBe(1);
        } finally {
          for (const other of others) await other.close();
        }
      });

      it('stores vaults, updates and archives them, and pages through them in creation order', async () => {
        const vaults: ResourceRecord[] = [];
        for (let index = 0; index < 3; index++) {
          const vault = vaultRecord();
          await store.vaults.createVault(vault);
          vaults.push(vault);
        }
        await store.vaults.createVault(vaultRecord({ tenantId: OTHER_TENANT }));
        expect(await store.vaults.getVault(TENANT, vaults[0]!.id)).toEqual(vaults[0]);
        expect(await rejectionCode(store.vaults.createVault(vaults[0]!))).toBe('conflict');

        const first = await store.vaults.listVaults({ tenantId: TENANT, limit: 2 });
        const second = await store.vaults.listVaults({
          tenantId: TENANT,
          limit: 2,
          cursor: first.nextCursor!,
        });
        expect([...first.items, ...second.items].map((vault) => vault.id)).toEqual(
          vaults.map((vault) => vault.id),
        );
        expect(second.nextCursor).toBeNull();

        const archived = {
          ...vaults[1]!,
          updatedAt: nextTimestamp(),
          archivedAt: nextTimestamp(),
          body: { ...vaults[1]!.body, display_name: 'old keys' },
        };
        await store.vaults.updateVault(archived);
        expect(await store.vaults.getVault(TENANT, archived.id)).toEqual(archived);
        const active = await store.vaults.listVaults({ tenantId: TENANT, limit: 10, order: 'desc' });
        expect(active.items.map((vault) => vault.id)).toEqual([vaults[2]!.id, vaults[0]!.id]);
        const all = await store.vaults.listVaults({ tenantId: TENANT, limit: 10, includeArchived: true });
        expect(all.items).toHaveLength(3);
        expect(await rejectionCode(store.vaults.updateVault(vaultRecord()))).toBe('not_found');
      });

      it('stores credentials in their vault with the sealed secret beside the body, and deletes them with the vault', async () => {
        const vault = vaultRecord();
        const otherVault = vaultRecord();
        await store.vaults.createVault(vault);
        await store.vaults.createVault(otherVault);
        const credentials: CredentialRecord[] = [];
        for (let index = 0; index < 3; index++) {
          const credential = credentialRecord(vault.id);
          await store.vaults.createCredential(credential);
          credentials.push(credential);
        }
        const elsewhere = credentialRecord(otherVault.id);
        await store.vaults.createCredential(elsewhere);

        expect(await store.vaults.getCredential(TENANT, vault.id, credentials[0]!.id)).toEqual(
          credentials[0],
        );
        // A credential is reached only through its own vault.
        expect(await store.vaults.getCredential(TENANT, otherVault.id, credentials[0]!.id)).toBeUndefined();
        expect(await rejectionCode(store.vaults.createCredential(credentials[0]!))).toBe('conflict');
        expect(await rejectionCode(store.vaults.createCredential(credentialRecord('vlt_missing')))).toBe(
          'not_found',
        );

        const pageOne = await store.vaults.listCredentials(TENANT, vault.id, { limit: 2 });
        const pageTwo = await store.vaults.listCredentials(TENANT, vault.id, {
          limit: 2,
          cursor: pageOne.nextCursor!,
        });
        expect([...pageOne.items, ...pageTwo.items]).toEqual(credentials);

        expect(await store.vaults.deleteCredential(TENANT, otherVault.id, credentials[0]!.id)).toBe(false);
        expect(await store.vaults.deleteCredential(TENANT, vault.id, credentials[0]!.id)).toBe(true);
        expect(await store.vaults.deleteCredential(TENANT, vault.id, credentials[0]!.id)).toBe(false);
        expect(await store.vaults.deleteVault(TENANT, vault.id)).toBe(true);
        expect(await store.vaults.getVault(TENANT, vault.id)).toBeUndefined();
        expect(await store.vaults.getCredential(TENANT, vault.id, credentials[1]!.id)).toBeUndefined();
        expect(await store.vaults.getCredential(TENANT, otherVault.id, elsewhere.id)).toEqual(elsewhere);
        expect(await store.vaults.deleteVault(TENANT, vault.id)).toBe(false);
      });

      it('updates a credential only while its secret and updatedAt are as the caller read them', async () => {
        const vault = vaultRecord();
        await store.vaults.createVault(vault);
        const credential = credentialRecord(vault.id);
        await store.vaults.createCredential(credential);
        const key = { tenantId: TENANT, vaultId: vault.id, id: credential.id };

        // No new secret: body and timestamps change, the sealed secret stays.
        const renamed = { ...credential.body, display_name: 'renamed' };
        const renamedAt = nextTimestamp();
        expect(
          await store.vaults.updateCredential({
            ...key,
            body: renamed,
            updatedAt: renamedAt,
            archivedAt: null,
          }),
        ).toBe(true);
        expect(await store.vaults.getCredential(TENANT, vault.id, credential.id)).toEqual({
          ...credential,
          body: renamed,
          updatedAt: renamedAt,
        });

        const newSecret = { keyId: 'key-b', sealed: 'v1.key-b.new.sealed' };
        const stale = { sealed: credential.secret.sealed, updatedAt: credential.updatedAt };
        expect(
          await store.vaults.updateCredential({
            ...key,
            body: renamed,
            updatedAt: nextTimestamp(),
            archivedAt: null,
            secret: newSecret,
            expected: stale,
          }),
        ).toBe(false);
        expect((await store.vaults.getCredential(TENANT, vault.id, credential.id))?.secret).toEqual(
          credential.secret,
        );

        const current = { sealed: credential.secret.sealed, updatedAt: renamedAt };
        const archivedAt = nextTimestamp();
        expect(
          await store.vaults.updateCredential({
            ...key,
            body: renamed,
            updatedAt: archivedAt,
            archivedAt,
            secret: newSecret,
            expected: current,
          }),
        ).toBe(true);
        const stored = await store.vaults.getCredential(TENANT, vault.id, credential.id);
        expect(stored).toMatchObject({ secret: newSecret, archivedAt, updatedAt: archivedAt });
        expect((await store.vaults.listCredentials(TENANT, vault.id, { limit: 10 })).items).toEqual([]);
        expect(
          (await store.vaults.listCredentials(TENANT, vault.id, { limit: 10, includeArchived: true })).items,
        ).toEqual([stored]);
        expect(
          await rejectionCode(
            store.vaults.updateCredential({
              ...key,
              id: 'vcrd_missing',
              body: {},
              updatedAt: archivedAt,
              archivedAt,
            }),
          ),
        ).toBe('not_found');
      });

      it('finds what older keys sealed, page by page, and re-seals one only if it is unchanged', async () => {
        const vault = vaultRecord();
        await store.vaults.createVault(vault);
        const old: CredentialRecord[] = [];
        for (let index = 0; index < 3; index++) {
          const credential = credentialRecord(vault.id, { archivedAt: index === 2 ? nextTimestamp() : null });
          await store.vaults.createCredential(credential);
          old.push(credential);
        }
        const current = credentialRecord(vault.id, {
          secret: { keyId: 'key-b', sealed: 'v1.key-b.x.sealed' },
        });
        await store.vaults.createCredential(current);
        await store.vaults.createVault(vaultRecord({ id: 'vlt_foreign', tenantId: OTHER_TENANT }));
        await store.vaults.createCredential(credentialRecord('vlt_foreign', { tenantId: OTHER_TENANT }));

        expect(await store.vaults.countCredentialsByKey(TENANT)).toEqual({ 'key-a': 3, 'key-b': 1 });
        const first = await store.vaults.listCredentialsSealedWithout(TENANT, 'key-b', { limit: 2 });
        const rest = await store.vaults.listCredentialsSealedWithout(TENANT, 'key-b', {
          limit: 2,
          cursor: first.nextCursor!,
        });
        // Archived credentials count too: an old key can go only when nothing is left under it.
        expect([...first.items, ...rest.items]).toEqual(old);
        expect(rest.nextCursor).toBeNull();

        const next = { keyId: 'key-b', sealed: 'v1.key-b.resealed' };
        expect(await store.vaults.resealCredential(TENANT, old[0]!.id, 'v1.key-a.someone-else', next)).toBe(
          false,
        );
        expect(
          await store.vaults.resealCredential(OTHER_TENANT, old[0]!.id, old[0]!.secret.sealed, next),
        ).toBe(false);
        expect(await store.vaults.resealCredential(TENANT, old[0]!.id, old[0]!.secret.sealed, next)).toBe(
          true,
        );
        // Re-sealing touches the secret only: body and timestamps are as they were.
        expect(await store.vaults.getCredential(TENANT, vault.id, old[0]!.id)).toEqual({
          ...old[0]!,
          secret: next,
        });
        expect(await store.vaults.countCredentialsByKey(TENANT)).toEqual({ 'key-a': 2, 'key-b': 2 });
        expect(await store.vaults.countCredentialsByKey(OTHER_TENANT)).toEqual({ 'key-a': 1 });
      });

      it("hides another tenant's vaults and credentials from every vault call", async () => {
        const vault = vaultRecord();
        await store.vaults.createVault(vault);
        const credential = credentialRecord(vault.id);
        await store.vaults.createCredential(credential);

        expect(await store.vaults.getVault(OTHER_TENANT, vault.id)).toBeUndefined();
        expect((await store.vaults.listVaults({ tenantId: OTHER_TENANT, limit: 10 })).items).toEqual([]);
        expect(await rejectionCode(store.vaults.updateVault({ ...vault, tenantId: OTHER_TENANT }))).toBe(
          'not_found',
        );
        expect(await store.vaults.deleteVault(OTHER_TENANT, vault.id)).toBe(false);
        expect(await store.vaults.getCredential(OTHER_TENANT, vault.id, credential.id)).toBeUndefined();
        expect((await store.vaults.listCredentials(OTHER_TENANT, vault.id, { limit: 10 })).items).toEqual([]);
        expect(
          await rejectionCode(
            store.vaults.updateCredential({
              tenantId: OTHER_TENANT,
              vaultId: vault.id,
              id: credential.id,
              body: { stolen: true },
              updatedAt: nextTimestamp(),
              archivedAt: null,
              secret: { keyId: 'key-x', sealed: 'v1.key-x.intruder' },
            }),
          ),
        ).toBe('not_found');
        expect(await store.vaults.deleteCredential(OTHER_TENANT, vault.id, credential.id)).toBe(false);
        expect(await store.vaults.listCredentialsSealedWithout(OTHER_TENANT, 'key-b', { limit: 10 })).toEqual(
          {
            items: [],
            nextCursor: null,
          },
        );
        // Another tenant cannot put a credential into this tenant's vault.
        expect(
          await rejectionCode(
            store.vaults.createCredential(credentialRecord(vault.id, { tenantId: OTHER_TENANT })),
          ),
        ).toBe('not_found');

        expect(await store.vaults.getVault(TENANT, vault.id)).toEqual(vault);
        expect((await store.vaults.listCredentials(TENANT, vault.id, { limit: 10 })).items).toEqual([
          credential,
        ]);
      });

      it('never reaches a log through a key naming another tenant', async () => {
        const session = await newSession();
        await store.events.append(session, [userMessage('secret')], { idempotencyKey: 'k1' });
        const [stored] = await store.events.read(session);
        const foreign = { tenantId: OTHER_TENANT, id: session.id };
        expect(await store.events.read(foreign)).toEqual([]);
        expect(await store.events.getEvent(foreign, stored!.event.id)).toBeUndefined();
        expect(await store.events.findByIdempotencyKey(foreign, 'k1')).toBeUndefined();
        expect(await rejectionCode(store.events.headSeq(foreign))).toBe('not_found');
        expect(await rejectionCode(store.events.acquireWriter(foreign))).toBe('not_found');
        expect(await rejectionCode(store.events.append(foreign, [userMessage('intruder')]))).toBe(
          'not_found',
        );
        const heard: unknown[] = [];
        const unsubscribe = store.events.subscribe(foreign, (events) => heard.push(...events));
        await store.events.append(session, [userMessage('more')]);
        unsubscribe();
        expect(heard).toEqual([]);
        expect((await store.events.read(session)).map((event) => event.seq)).toEqual([1, 2]);
      });
    });
    describe('skills', () => {
      it('stores a skill with its first version and returns the archive byte for byte', async () => {
        const skill = skillRecord();
        const first = skillVersion(skill, { archive: randomBytes(100 * 1024) });
        await store.skills.createSkill(skill, first);

        expect(await store.skills.getSkill(TENANT, skill.id)).toEqual({
          ...skill,
          latestVersion: first.version,
        });
        const stored = await store.skills.getSkillVersion(TENANT, skill.id, first.version);
        expect(stored === undefined ? undefined : withoutArchive(stored)).toEqual(withoutArchive(first));
        expect(stored?.archive.byteLength).toBe(100 * 1024);
        expect(sameBytes(stored?.archive, first.archive)).toBe(true);

        // A plain Uint8Array viewing the middle of a larger buffer stores only the bytes it views.
        const backing = new Uint8Array(randomBytes(4096));
        const second = skillVersion(skill, { archive: backing.subarray(100, 3100) });
        await store.skills.addSkillVersion(second, nextTimestamp());
        const storedSecond = await store.skills.getSkillVersion(TENANT, skill.id, second.version);
        expect(storedSecond?.archive.byteLength).toBe(3000);
        expect(sameBytes(storedSecond?.archive, backing.subarray(100, 3100))).toBe(true);
        // The first version is untouched by the second.
        expect(
          sameBytes(
            (await store.skills.getSkillVersion(TENANT, skill.id, first.version))?.archive,
            first.archive,
          ),
        ).toBe(true);
      });

      it('writes neither the skill nor its first version when the version cannot be stored', async () => {
        const skill = skillRecord();
        // A body that cannot be serialized fails after the skill row has been written.
        const broken = skillVersion(skill, { body: { size: 1n } });
        await expect(store.skills.createSkill(skill, broken)).rejects.toThrow();
        expect(await store.skills.getSkill(TENANT, skill.id)).toBeUndefined();
        expect((await store.skills.listSkills({ tenantId: TENANT, limit: 10 })).items).toEqual([]);
        // The id is free again: nothing of the failed attempt is left.
        const first = skillVersion(skill);
        await store.skills.createSkill(skill, first);
        expect((await store.skills.getSkill(TENANT, skill.id))?.latestVersion).toBe(first.version);
      });

      it('makes an added version the latest, and the one before it latest again once it is deleted', async () => {
        const skill = skillRecord();
        const first = skillVersion(skill);
        await store.skills.createSkill(skill, first);
        const second = skillVersion(skill);
        const secondAt = nextTimestamp();
        await store.skills.addSkillVersion(second, secondAt);
        // The skill's body stays; only updated_at and the derived latest version move.
        expect(await store.skills.getSkill(TENANT, skill.id)).toEqual({
          ...skill,
          updatedAt: secondAt,
          latestVersion: second.version,
        });
        const third = skillVersion(skill);
        await store.skills.addSkillVersion(third, nextTimestamp());
        expect((await store.skills.getSkill(TENANT, skill.id))?.latestVersion).toBe(third.version);

        expect(await store.skills.deleteSkillVersion(TENANT, skill.id, third.version)).toBe(true);
        expect(await store.skills.deleteSkillVersion(TENANT, skill.id, third.version)).toBe(false);
        expect(await store.skills.getSkillVersion(TENANT, skill.id, third.version)).toBeUndefined();
        expect((await store.skills.getSkill(TENANT, skill.id))?.latestVersion).toBe(second.version);
        // Deleting an older version leaves the latest as it is.
        expect(await store.skills.deleteSkillVersion(TENANT, skill.id, first.version)).toBe(true);
        expect((await store.skills.getSkill(TENANT, skill.id))?.latestVersion).toBe(second.version);
        expect(await store.skills.deleteSkillVersion(TENANT, skill.id, second.version)).toBe(true);
        const empty = await store.skills.getSkill(TENANT, skill.id);
        expect(empty).toMatchObject({ id: skill.id, latestVersion: null });
        expect((await store.skills.listSkillVersions(TENANT, skill.id, { limit: 10 })).items).toEqual([]);
      });

      it('refuses a duplicate skill id or version, and a version of a missing or foreign skill, writing nothing', async () => {
        const skill = skillRecord();
        const first = skillVersion(skill);
        await store.skills.createSkill(skill, first);
        const foreign = skillRecord({ tenantId: OTHER_TENANT });
        const foreignFirst = skillVersion(foreign);
        await store.skills.createSkill(foreign, foreignFirst);

        // Duplicate skill id (with a new version id, which must not be written either).
        const again = skillVersion(skill);
        expect(
          await rejectionCode(store.skills.createSkill({ ...skill, body: { replaced: true } }, again)),
        ).toBe('conflict');
        expect(await store.skills.getSkillVersion(TENANT, skill.id, again.version)).toBeUndefined();
        // Duplicate version: the stored one keeps its archive and the skill its updated_at.
        const duplicate = skillVersion(skill, { version: first.version, archive: randomBytes(32) });
        expect(await rejectionCode(store.skills.addSkillVersion(duplicate, nextTimestamp()))).toBe(
          'conflict',
        );
        expect(
          sameBytes(
            (await store.skills.getSkillVersion(TENANT, skill.id, first.version))?.archive,
            first.archive,
          ),
        ).toBe(true);
        // A version id is unique per skill only.
        const sameIdElsewhere = skillVersion(foreign, { version: first.version });
        await store.skills.addSkillVersion(sameIdElsewhere, nextTimestamp());

        const missing = skillVersion(skillRecord({ id: 'skill_missing' }));
        expect(await rejectionCode(store.skills.addSkillVersion(missing, nextTimestamp()))).toBe('not_found');
        expect(await store.skills.getSkillVersion(TENANT, 'skill_missing', missing.version)).toBeUndefined();
        // Another tenant adding a version to this tenant's skill finds no such skill.
        const intruding = skillVersion({ ...skill, tenantId: OTHER_TENANT });
        expect(await rejectionCode(store.skills.addSkillVersion(intruding, nextTimestamp()))).toBe(
          'not_found',
        );
        expect(await store.skills.getSkillVersion(OTHER_TENANT, skill.id, intruding.version)).toBeUndefined();
        expect(await store.skills.getSkillVersion(TENANT, skill.id, intruding.version)).toBeUndefined();

        expect(await store.skills.getSkill(TENANT, skill.id)).toEqual({
          ...skill,
          latestVersion: first.version,
        });
        expect((await store.skills.listSkillVersions(TENANT, skill.id, { limit: 10 })).items).toEqual([
          withoutArchive(first),
        ]);
      });

      it('pages through skills and versions in creation order, either way round, without archives', async () => {
        const skills: ResourceRecord[] = [];
        const firsts: SkillVersionRecord[] = [];
        for (let index = 0; index < 5; index++) {
          const skill = skillRecord(index === 3 ? { ownerId: 'user_bob' } : {});
          const first = skillVersion(skill);
          await store.skills.createSkill(skill, first);
          skills.push(skill);
          firsts.push(first);
        }
        const foreign = skillRecord({ tenantId: OTHER_TENANT });
        await store.skills.createSkill(foreign, skillVersion(foreign));
        const expected = skills.map((skill, index) => ({ ...skill, latestVersion: firsts[index]!.version }));

        const pages = [];
        let cursor: string | undefined;
        do {
          const page = await store.skills.listSkills({ tenantId: TENANT, limit: 2, cursor });
          pages.push(page.items);
          cursor = page.nextCursor ?? undefined;
        } while (cursor !== undefined);
        expect(pages.map((items) => items.length)).toEqual([2, 2, 1]);
        expect(pages.flat()).toEqual(expected);

        const newest = await store.skills.listSkills({ tenantId: TENANT, limit: 2, order: 'desc' });
        expect(newest.items).toEqual([expected[4], expected[3]]);
        const older = await store.skills.listSkills({
          tenantId: TENANT,
          limit: 2,
          order: 'desc',
          cursor: newest.nextCursor!,
        });
        expect(older.items).toEqual([expected[2], expected[1]]);
        const oldest = await store.skills.listSkills({
          tenantId: TENANT,
          limit: 2,
          order: 'desc',
          cursor: older.nextCursor!,
        });
        expect(oldest).toEqual({ items: [expected[0]], nextCursor: null });
        expect(
          (await store.skills.listSkills({ tenantId: TENANT, limit: 10, ownerId: 'user_bob' })).items,
        ).toEqual([expected[3]]);

        // Five versions of one skill, interleaved with a version of another.
        const skill = skills[0]!;
        const versions = [firsts[0]!];
        for (let index = 0; index < 4; index++) {
          const version = skillVersion(skill);
          await store.skills.addSkillVersion(version, nextTimestamp());
          versions.push(version);
          if (index === 1) await store.skills.addSkillVersion(skillVersion(skills[1]!), nextTimestamp());
        }
        const versionPages = [];
        cursor = undefined;
        do {
          const page = await store.skills.listSkillVersions(TENANT, skill.id, { limit: 2, cursor });
          versionPages.push(page.items);
          cursor = page.nextCursor ?? undefined;
        } while (cursor !== undefined);
        expect(versionPages.map((items) => items.length)).toEqual([2, 2, 1]);
        expect(versionPages.flat()).toEqual(versions.map(withoutArchive));
        for (const item of versionPages.flat()) expect(item).not.toHaveProperty('archive');

        const newestVersions = await store.skills.listSkillVersions(TENANT, skill.id, {
          limit: 2,
          order: 'desc',
        });
        expect(newestVersions.items).toEqual([withoutArchive(versions[4]!), withoutArchive(versions[3]!)]);
        const olderVersions = await store.skills.listSkillVersions(TENANT, skill.id, {
          limit: 2,
          order: 'desc',
          cursor: newestVersions.nextCursor!,
        });
        expect(olderVersions.items).toEqual([withoutArchive(versions[2]!), withoutArchive(versions[1]!)]);
        const oldestVersions = await store.skills.listSkillVersions(TENANT, skill.id, {
          limit: 2,
          order: 'desc',
          cursor: olderVersions.nextCursor!,
        });
        expect(oldestVersions).toEqual({ items: [withoutArchive(versions[0]!)], nextCursor: null });
      });

      it("hides another tenant's skills and versions from every skill call", async () => {
        const skill = skillRecord();
        const first = skillVersion(skill);
        await store.skills.createSkill(skill, first);

        expect(await store.skills.getSkill(OTHER_TENANT, skill.id)).toBeUndefined();
        expect(await store.skills.listSkills({ tenantId: OTHER_TENANT, limit: 10 })).toEqual({
          items: [],
          nextCursor: null,
        });
        expect(await store.skills.getSkillVersion(OTHER_TENANT, skill.id, first.version)).toBeUndefined();
        expect(await store.skills.listSkillVersions(OTHER_TENANT, skill.id, { limit: 10 })).toEqual({
          items: [],
          nextCursor: null,
        });
        expect(await store.skills.deleteSkillVersion(OTHER_TENANT, skill.id, first.version)).toBe(false);
        expect(await store.skills.deleteSkill(OTHER_TENANT, skill.id)).toBe(false);

        expect(await store.skills.getSkill(TENANT, skill.id)).toEqual({
          ...skill,
          latestVersion: first.version,
        });
        const stored = await store.skills.getSkillVersion(TENANT, skill.id, first.version);
        expect(sameBytes(stored?.archive, first.archive)).toBe(true);
        expect((await store.skills.listSkills({ tenantId: TENANT, limit: 10 })).items).toHaveLength(1);
      });

      it('deletes a skill together with its versions', async () => {
        const skill = skillRecord();
        const first = skillVersion(skill);
        await store.skills.createSkill(skill, first);
        const second = skillVersion(skill);
        await store.skills.addSkillVersion(second, nextTimestamp());
        const kept = skillRecord();
        const keptFirst = skillVersion(kept);
        await store.skills.createSkill(kept, keptFirst);

        expect(await store.skills.deleteSkill(TENANT, skill.id)).toBe(true);
        expect(await store.skills.getSkill(TENANT, skill.id)).toBeUndefined();
        expect(await store.skills.getSkillVersion(TENANT, skill.id, first.version)).toBeUndefined();
        expect(await store.skills.getSkillVersion(TENANT, skill.id, second.version)).toBeUndefined();
        expect((await store.skills.listSkillVersions(TENANT, skill.id, { limit: 10 })).items).toEqual([]);
        expect(await store.skills.deleteSkill(TENANT, skill.id)).toBe(false);
        // No version row is left behind: the same skill and version ids can be stored again.
        await store.skills.createSkill(skill, first);
        expect((await store.skills.getSkill(TENANT, skill.id))?.latestVersion).toBe(first.version);

        expect(await store.skills.getSkill(TENANT, kept.id)).toEqual({
          ...kept,
          latestVersion: keptFirst.version,
        });
        expect(
          sameBytes(
            (await store.skills.getSkillVersion(TENANT, kept.id, keptFirst.version))?.archive,
            keptFirst.archive,
          ),
        ).toBe(true);
      });
    });
  });
}

/**
 * Runs `append-until-killed.ts` against the database, SIGKILLs it once it has acknowledged at
 * least `acknowledgements` events, and returns the acknowledged seqs per session.
 */
async function runChildUntilKilled(
  options: OpenStoreOptions,
  sessions: readonly SessionKey[],
  acknowledgements: number,
): Promise<Map<string, number[]>> {
  const child = spawn(
    process.execPath,
    ['--import', 'tsx', CHILD_SCRIPT, JSON.stringify(options), JSON.stringify(sessions)],
    {
      // tsx resolves from the repository, whatever directory the tests were started in.
      cwd: REPOSITORY_ROOT,
      stdio: ['ignore', 'pipe', 'pipe'],
    },
  );
  const acknowledged = new Map<string, number[]>();
  let count = 0;
  let buffered = '';
  let errorOutput = '';
  child.stderr.on('data', (chunk: Buffer) => {
    errorOutput += chunk.toString();
  });
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  await new Promise<void>((resolve, reject) => {
    child.stdout.on('data', (chunk: Buffer) => {
      buffered += chunk.toString();
      const lines = buffered.split('\n');
      buffered = lines.pop() ?? '';
      for (const line of lines) {
        const [sessionId, seq] = line.split(' ');
        if (sessionId === undefined || seq === undefined) continue;
        const seqs = acknowledged.get(sessionId) ?? [];
        seqs.push(Number(seq));
        acknowledged.set(sessionId, seqs);
        count++;
      }
      if (count >= acknowledgements) resolve();
    });
    child.once('exit', (code) => reject(new Error(`child exited early (${code}): ${errorOutput}`)));
  });
  child.kill('SIGKILL');
  await exited;
  return acknowledged;
}
