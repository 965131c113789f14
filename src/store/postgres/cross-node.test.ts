import { randomBytes } from 'node:crypto';
import pg from 'pg';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, inject, it } from 'vitest';
import { testRoleUrls } from '../../../test/support/postgres-database.js';
import { newId } from '../../ids.js';
import type { SessionKey, StoredEvent } from '../event-store.js';
import { openStore } from '../open-store.js';
import type { Store } from '../resource-store.js';

const serverUrl = inject('postgresUrl');
const admin = new pg.Client({ connectionString: serverUrl });
beforeAll(() => admin.connect());
afterAll(() => admin.end());

const message = (text: string) => ({ type: 'user.message', content: [{ type: 'text', text }] });
const textOf = (stored: StoredEvent) => (stored.event.content as { text: string }[])[0]!.text;

async function waitFor(check: () => boolean, timeoutMs = 15_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > deadline) throw new Error('timed out waiting');
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

/**
 * Two stores on one schema stand for two nodes: a subscriber on one hears the other's appends
 * (LISTEN/NOTIFY), in seq order and once each, and catches up after losing its connection.
 */
describe('events across nodes on PostgreSQL', () => {
  let schema: string;
  let nodeA: Store;
  let nodeB: Store;
  let session: SessionKey;

  beforeEach(async () => {
    schema = `berth_test_${randomBytes(6).toString('hex')}`;
    const options = { kind: 'postgres' as const, ...testRoleUrls(serverUrl), schema, maxConnections: 4 };
    nodeA = await openStore(options);
    nodeB = await openStore(options);
    await nodeB.listenAcrossNodes!();
    const id = newId('sesn');
    const at = new Date().toISOString();
    await nodeA.resources.createSession({
      id,
      tenantId: 'tnt_nodes',
      ownerId: 'user_a',
      createdAt: at,
      updatedAt: at,
      archivedAt: null,
      body: { id, type: 'session', metadata: {} },
      agentId: 'agent_a',
      agentVersion: 1,
      environmentId: 'env_a',
      status: 'idle',
      stopReason: null,
      lastSeq: 0,
    });
    session = { tenantId: 'tnt_nodes', id };
  });
  afterEach(async () => {
    await nodeA.close();
    await nodeB.close();
    await admin.query(`DROP SCHEMA IF EXISTS "${schema}" CASCADE`);
  });

  it("delivers the other node's appends and its own, in order, each once", async () => {
    const heard: StoredEvent[] = [];
    nodeB.events.subscribe(session, (events) => heard.push(...events));
    await nodeA.events.append(session, [message('a1'), message('a2')]);
    await nodeB.events.append(session, [message('b1')]);
    await nodeA.events.append(session, [message('a3')]);
    await Promise.all(
      Array.from({ length: 10 }, (_, index) => nodeA.events.append(session, [message(`x${index}`)])),
    );
    await waitFor(() => heard.length >= 14).catch((error) => {
      throw new Error(`${error}: heard ${heard.map((stored) => stored.seq).join(',')}`);
    });
    // A moment more: nothing arrives twice.
    await new Promise((resolve) => setTimeout(resolve, 200));
    expect(heard.map((stored) => stored.seq)).toEqual(Array.from({ length: 14 }, (_, index) => index + 1));
    expect(heard.slice(0, 4).map(textOf)).toEqual(['a1', 'a2', 'b1', 'a3']);
  });

  it('hands a new listener everything committed after it subscribed, in order, with no repeats', async () => {
    await nodeA.events.append(session, [message('before')]);
    const heard: StoredEvent[] = [];
    nodeB.events.subscribe(session, (events) => heard.push(...events));
    for (let index = 0; index < 5; index++) await nodeA.events.append(session, [message(`after-${index}`)]);
    await waitFor(() => heard.some((stored) => textOf(stored) === 'after-4'));
    await new Promise((resolve) => setTimeout(resolve, 100));
    // An event from just before the subscription may come too (consumers dedupe by seq).
    const seqs = heard.map((stored) => stored.seq);
    expect(seqs).toEqual([...new Set(seqs)].sort((a, b) => a - b));
    expect(heard.map(textOf).filter((text) => text.startsWith('after'))).toEqual(
      Array.from({ length: 5 }, (_, index) => `after-${index}`),
    );
  });

  it('catches up after its listening connection is cut', async () => {
    const heard: StoredEvent[] = [];
    nodeB.events.subscribe(session, (events) => heard.push(...events));
    await nodeA.events.append(session, [message('one')]);
    await waitFor(() => heard.length === 1);
    // Cut the LISTEN connection from the server side, then append while nobody listens.
    const cut = await admin.query(
      `SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE 'LISTEN "${schema}_events"%'`,
    );
    expect(cut.rowCount).toBe(1);
    await nodeA.events.append(session, [message('two')]);
    await nodeA.events.append(session, [message('three')]);
    await waitFor(() => heard.length === 3);
    expect(heard.map(textOf)).toEqual(['one', 'two', 'three']);
  });
});
