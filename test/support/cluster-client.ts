/**
 * A test client for a cluster of `berth serve --cluster` processes: API calls through a random
 * live node (retrying 503s and dead nodes, as the SDK does), waiting for turns to end, and the
 * checks every cluster test makes of the logs (gapless, no duplicate, each tool run once).
 */
import { rm } from 'node:fs/promises';
import type pg from 'pg';
import { expect } from 'vitest';
import { type BerthProcess, killProcessesUsing } from './berth-process.js';

export interface ApiEvent {
  id: string;
  type: string;
  [field: string]: unknown;
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

export function clusterClient(options: {
  /** The nodes requests may go to (undefined entries are skipped). */
  nodes: () => readonly (BerthProcess | undefined)[];
  apiKey: () => string;
  /** A connection as the tables' owner, for reading the log and the leases directly. */
  owner: () => pg.Client;
}) {
  const live = () =>
    options
      .nodes()
      .filter(
        (node): node is BerthProcess =>
          node !== undefined && node.child.exitCode === null && node.child.signalCode === null,
      );
  const anyNode = () => {
    const candidates = live();
    return candidates[Math.floor(Math.random() * candidates.length)]!;
  };

  async function api<T>(method: string, path: string, body?: unknown, node = anyNode()): Promise<T> {
    for (let attempt = 0; ; attempt++) {
      const response = await fetch(`${node.url}${path}`, {
        method,
        headers: { 'x-api-key': options.apiKey(), 'content-type': 'application/json' },
        body: body === undefined ? undefined : JSON.stringify(body),
      }).catch(() => undefined);
      // A node that died or a session moving between nodes: the client retries (as the SDK does).
      if ((response === undefined || response.status === 503) && attempt < 40) {
        await sleep(250);
        node = anyNode();
        continue;
      }
      if (response === undefined) throw new Error(`${method} ${path}: no answer`);
      const text = await response.text();
      if (!response.ok) {
        const logs = options
          .nodes()
          .map((each, index) => `node-${index}: ${each?.stderr().slice(-1500)}`)
          .join('\n');
        throw new Error(`${method} ${path} answered ${response.status}: ${text}\n${logs}`);
      }
      return JSON.parse(text) as T;
    }
  }

  async function events(sessionId: string): Promise<ApiEvent[]> {
    const all: ApiEvent[] = [];
    let after: string | undefined;
    for (;;) {
      const page = await api<{ data: ApiEvent[]; next_page: string | null }>(
        'GET',
        `/v1/sessions/${sessionId}/events?limit=100${after ? `&page=${after}` : ''}`,
      );
      all.push(...page.data);
      if (!page.next_page) return all;
      after = page.next_page;
    }
  }

  async function waitIdle(sessionIds: readonly string[], timeoutMs: number): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    let pending = [...sessionIds];
    while (pending.length > 0) {
      // Done when the newest event ends a turn (the status alone is still idle for a moment
      // after a message is accepted and before its turn starts).
      const newest = await Promise.all(
        pending.map((id) =>
          api<{ data: ApiEvent[] }>('GET', `/v1/sessions/${id}/events?order=desc&limit=1`).then(
            (page) => page.data[0]?.type,
          ),
        ),
      );
      pending = pending.filter((_, index) => newest[index] !== 'session.status_idle');
      if (pending.length === 0) return;
      if (Date.now() > deadline) {
        // Say what the stuck sessions were doing and who held them: a timeout alone is no help.
        const details = await Promise.all(
          pending.slice(0, 5).map(async (id) => {
            const log = await options
              .owner()
              .query<{ seq: number; type: string }>(
                'SELECT seq, type FROM berth.events WHERE session_id = $1 ORDER BY seq',
                [id],
              );
            const lease = await options.owner().query<{ node_id: string; live: boolean; status: string }>(
              `SELECT l.node_id, l.expires_at > now() AS live, h.status FROM berth.session_heads h
                 LEFT JOIN berth.session_leases l USING (tenant_id, session_id) WHERE h.session_id = $1`,
              [id],
            );
            const head = lease.rows[0];
            const mentions = options.nodes().flatMap((each, index) =>
              (each?.stderr() ?? '')
                .split('\n')
                .filter((line) => line.includes(id))
                .map((line) => `  node-${index}: ${line}`),
            );
            return `${id} (${head?.status}) lease ${head?.node_id ?? 'none'} live=${head?.live}: ${log.rows
              .map((event) => `${event.seq}:${event.type}`)
              .join(' ')}\n${mentions.join('\n')}`;
          }),
        );
        const logs = options
          .nodes()
          .map((each, index) => `node-${index}: ${each?.stderr().slice(-2000)}`)
          .join('\n');
        throw new Error(
          `not idle in time (${pending.length}): ${pending.join(', ')}\n${details.join('\n')}\n${logs}`,
        );
      }
      await sleep(200);
    }
  }

  const send = (sessionId: string, text: string) =>
    api<{ data: ApiEvent[] }>('POST', `/v1/sessions/${sessionId}/events`, {
      events: [{ type: 'user.message', content: [{ type: 'text', text }] }],
    });

  let agentId: string;
  let environmentId: string;
  const newSessions = async (count: number) => {
    agentId ??= (
      await api<{ id: string }>('POST', '/v1/agents', {
        name: 'cluster-test',
        model: 'openai-compatible/fake-model',
        tools: [{ type: 'agent_toolset_20260401' }],
      })
    ).id;
    environmentId ??= (
      await api<{ id: string }>('POST', '/v1/environments', { name: 'cluster', config: { type: 'cloud' } })
    ).id;
    return Promise.all(
      Array.from(
        { length: count },
        async () =>
          (
            await api<{ id: string }>('POST', '/v1/sessions', {
              agent: agentId,
              environment_id: environmentId,
            })
          ).id,
      ),
    );
  };

  /** Every session: events numbered 1..n with no gap (in the database), each tool run once. */
  async function checkLogs(sessionIds: readonly string[], acknowledged: ReadonlyMap<string, string[]>) {
    const rows = await options.owner().query<{ session_id: string; seqs: string[]; ids: string[] }>(
      `SELECT session_id, array_agg(seq ORDER BY seq) AS seqs, array_agg(id ORDER BY seq) AS ids
       FROM berth.events WHERE session_id = ANY($1) GROUP BY session_id`,
      [sessionIds],
    );
    expect(rows.rows).toHaveLength(sessionIds.length);
    for (const row of rows.rows) {
      expect(row.seqs.map(Number)).toEqual(row.seqs.map((_, index) => index + 1));
      expect(new Set(row.ids).size).toBe(row.ids.length);
      for (const id of acknowledged.get(row.session_id) ?? []) expect(row.ids).toContain(id);
    }
    for (const sessionId of sessionIds) {
      const log = await events(sessionId);
      const uses = log.filter((event) => event.type === 'agent.tool_use').map((event) => event.id);
      const results = log
        .filter((event) => event.type === 'agent.tool_result')
        .map((event) => event.tool_use_id);
      // Each tool call has one result; none ran twice.
      expect(results.sort()).toEqual([...uses].sort());
      expect(log.at(-1)?.type).toBe('session.status_idle');
    }
  }

  return { live, anyNode, api, events, waitIdle, send, newSessions, checkLogs };
}

/**
 * The environment of one `berth serve --cluster` node in the cluster tests: the fake model, the
 * migration role, the node id, the lease, shared vault keys, fast model retries, no warm pool,
 * and no per-tenant limits (the tests send hundreds of requests at once).
 */
export function clusterNodeEnvironment(options: {
  nodeId: string;
  modelUrl: string;
  migrationUrl: string;
  leaseMs: number;
  vaultKeys: string;
}): Record<string, string> {
  return {
    OPENAI_COMPATIBLE_BASE_URL: options.modelUrl,
    BERTH_DATABASE_MIGRATION_URL: options.migrationUrl,
    BERTH_NODE_ID: options.nodeId,
    BERTH_LEASE_MS: String(options.leaseMs),
    BERTH_VAULT_KEYS: options.vaultKeys,
    BERTH_RETRY_BASE_DELAY_MS: '20',
    BERTH_SANDBOX_WARM_POOL: '0',
    BERTH_TENANT_LIVE_SESSIONS: '0',
    BERTH_USER_LIVE_SESSIONS: '0',
    BERTH_TENANT_SESSIONS_PER_MINUTE: '0',
    BERTH_USER_SESSIONS_PER_MINUTE: '0',
    BERTH_TENANT_EVENTS_PER_MINUTE: '0',
    BERTH_USER_EVENTS_PER_MINUTE: '0',
  };
}

/**
 * Ends a cluster test: stops the nodes (a clean stop puts each sandbox's files back and unmounts
 * its disk), the fake model and the owner connection, then removes the nodes' data under `root`
 * (killing anything still using it first).
 */
export async function stopCluster(parts: {
  nodes: readonly (BerthProcess | undefined)[];
  model?: { close(): Promise<void> };
  owner?: pg.Client;
  root?: string;
}): Promise<void> {
  for (const node of parts.nodes) await node?.stop().catch(() => undefined);
  await parts.model?.close();
  await parts.owner?.end();
  if (parts.root) {
    killProcessesUsing(parts.root);
    await rm(parts.root, { recursive: true, force: true });
  }
}
