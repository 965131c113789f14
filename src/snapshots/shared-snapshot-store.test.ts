import { randomBytes } from 'node:crypto';
import {
  chmodSync,
  lstatSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  readlinkSync,
  rmSync,
  symlinkSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pg from 'pg';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, inject, it } from 'vitest';
import { testRoleUrls } from '../../test/support/postgres-database.js';
import { openStore } from '../store/open-store.js';
import type { Store } from '../store/resource-store.js';
import { SharedSnapshotStore } from './shared-snapshot-store.js';

const serverUrl = inject('postgresUrl');
const admin = new pg.Client({ connectionString: serverUrl });
beforeAll(() => admin.connect());
afterAll(() => admin.end());

const session = { tenantId: 'tnt_snap', id: 'sesn_moving' };
const info = (createdAt: string) => ({ driver: 'bwrap', memory: false, createdAt });

/** Two nodes' snapshot stores: their own cache directories, one PostgreSQL. */
describe('snapshots shared between nodes', () => {
  let schema: string;
  let store: Store;
  let scratch: string;
  let nodeA: SharedSnapshotStore;
  let nodeB: SharedSnapshotStore;

  beforeEach(async () => {
    schema = `berth_test_${randomBytes(6).toString('hex')}`;
    store = await openStore({ kind: 'postgres', ...testRoleUrls(serverUrl), schema, maxConnections: 4 });
    scratch = mkdtempSync(join(tmpdir(), 'berth-snapshots-'));
    nodeA = new SharedSnapshotStore({ root: join(scratch, 'a'), archives: store.snapshotArchives! });
    nodeB = new SharedSnapshotStore({ root: join(scratch, 'b'), archives: store.snapshotArchives! });
  });
  afterEach(async () => {
    await store.close();
    await admin.query(`DROP SCHEMA IF EXISTS "${schema}" CASCADE`);
    rmSync(scratch, { recursive: true, force: true });
  });

  /** Suspends "a sandbox" on a node: a workspace with nested files, a symlink, modes and an owner. */
  async function snapshotOn(node: SharedSnapshotStore, text: string, createdAt: string) {
    const staged = await node.stage(session);
    mkdirSync(join(staged, 'workspace/src'), { recursive: true });
    writeFileSync(join(staged, 'workspace/src/main.py'), text);
    writeFileSync(join(staged, 'workspace/run.sh'), '#!/bin/sh\necho hi\n');
    chmodSync(join(staged, 'workspace/run.sh'), 0o750);
    symlinkSync('src/main.py', join(staged, 'workspace/link'));
    await node.commit(session, staged, info(createdAt));
  }

  it('resumes on another node with the same files, modes and links', async () => {
    await snapshotOn(nodeA, 'print("from node a")\n', '2026-11-22T10:00:00.000Z');
    const onB = await nodeB.get(session);
    expect(onB).toMatchObject({ driver: 'bwrap', memory: false, createdAt: '2026-11-22T10:00:00.000Z' });
    const workspace = join(onB!.directory, 'workspace');
    expect(readFileSync(join(workspace, 'src/main.py'), 'utf8')).toBe('print("from node a")\n');
    expect(lstatSync(join(workspace, 'run.sh')).mode & 0o777).toBe(0o750);
    expect(readlinkSync(join(workspace, 'link'))).toBe('src/main.py');
  });

  it('prefers a newer snapshot made elsewhere over its own older copy', async () => {
    await snapshotOn(nodeA, 'old\n', '2026-11-22T10:00:00.000Z');
    expect((await nodeA.get(session))?.createdAt).toBe('2026-11-22T10:00:00.000Z');
    await snapshotOn(nodeB, 'new\n', '2026-11-22T11:00:00.000Z');
    const onA = await nodeA.get(session);
    expect(readFileSync(join(onA!.directory, 'workspace/src/main.py'), 'utf8')).toBe('new\n');
  });

  it('drops its own copy once the snapshot was restored or deleted elsewhere', async () => {
    await snapshotOn(nodeA, 'consumed\n', '2026-11-22T10:00:00.000Z');
    expect(await nodeB.get(session)).toBeDefined();
    await nodeB.delete(session);
    expect(await nodeA.get(session)).toBeUndefined();
    expect(await nodeA.get(session)).toBeUndefined();
  });

  it('keeps an oversized snapshot on its node and tells the others it is not theirs', async () => {
    const warnings: string[] = [];
    const small = new SharedSnapshotStore({
      root: join(scratch, 'small'),
      archives: store.snapshotArchives!,
      maxArchiveBytes: 64,
      warn: (message) => warnings.push(message),
    });
    const staged = await small.stage(session);
    writeFileSync(join(staged, 'noise.bin'), randomBytes(4096));
    await small.commit(session, staged, info('2026-11-22T12:00:00.000Z'));
    expect(warnings).toEqual(['snapshot too large to share between nodes; kept on this node only']);
    expect((await small.get(session))?.createdAt).toBe('2026-11-22T12:00:00.000Z');
    expect(await nodeB.get(session)).toBeUndefined();
  });
});
