import { Counter, Gauge, Histogram, Registry } from 'prom-client';
import type { EgressAuditRecord } from '../egress/proxy.js';
import type { Harness, SessionToolbox } from '../harness/harness.js';
import type { SandboxDriver } from '../sandbox/driver.js';
import type { EventStore, SessionStatus } from '../store/event-store.js';

/** What the `/metrics` gauges read when scraped. */
export interface MetricsSources {
  /** Sessions per status, across tenants (aggregate counts only). */
  sessionsByStatus(): Promise<Partial<Record<SessionStatus, number>>>;
  /** Live sandboxes per driver on this node. */
  sandboxesByDriver(): Record<string, number>;
}

const STATUSES: readonly SessionStatus[] = ['idle', 'running', 'rescheduling', 'terminated'];

interface EgressCounters {
  requests: Counter<'source' | 'decision'>;
  denied: Counter<'source' | 'status'>;
  bytes: Counter<'source' | 'direction'>;
}

/**
 * Egress counters, by source: `sandbox` (its proxy), `web_fetch`, `mcp` (Berth's own requests
 * for a session) and `oauth` (the vault's token and validation requests). No host label: hosts
 * are the sandbox's choice and would make the series unbounded.
 */
function egressCounters(registry: Registry): EgressCounters {
  return {
    requests: new Counter({
      name: 'berth_egress_requests_total',
      help: 'Egress requests and CONNECT tunnels by source and decision (allowed, denied).',
      labelNames: ['source', 'decision'],
      registers: [registry],
    }),
    denied: new Counter({
      name: 'berth_egress_denied_total',
      help: 'Egress requests a rule or limit refused, by source and the status the refusal answered.',
      labelNames: ['source', 'status'],
      registers: [registry],
    }),
    bytes: new Counter({
      name: 'berth_egress_bytes_total',
      help: 'Body bytes of egress requests (tunnels: every byte), by source and direction (sent, received).',
      labelNames: ['source', 'direction'],
      registers: [registry],
    }),
  };
}

/** The source label of an audit record's `purpose` (`mcp:<server>` is `mcp`: no server names). */
function egressSource(purpose: string | undefined): string {
  if (purpose === undefined) return 'sandbox';
  if (purpose.startsWith('mcp:')) return 'mcp';
  return purpose === 'web_fetch' || purpose === 'oauth' ? purpose : 'other';
}

/**
 * Prometheus metrics for one Berth process, served at `/metrics`: counters and histograms fed
 * by interceptors around the ports (like tracing, never calls inside the loop), gauges read
 * from the store and the sandbox manager at scrape time. Aggregates only: no tenant, session
 * or user ids in any label.
 */
export class Metrics {
  readonly registry = new Registry();
  readonly #turnSeconds: Histogram<'outcome'>;
  readonly #toolSeconds: Histogram<'kind' | 'outcome'>;
  readonly #coldStarts: Counter<'driver' | 'kind'>;
  readonly #coldStartSeconds: Histogram<'driver' | 'kind'>;
  readonly #appendedEvents: Counter;
  readonly #appends: Counter;
  readonly #egress: EgressCounters;

  constructor(sources: MetricsSources) {
    const registry = this.registry;
    this.#egress = egressCounters(registry);
    this.#turnSeconds = new Histogram({
      name: 'berth_turn_duration_seconds',
      help: 'Duration of harness wakes (a turn, or the part of one a process ran).',
      labelNames: ['outcome'],
      buckets: [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300],
      registers: [registry],
    });
    this.#toolSeconds = new Histogram({
      name: 'berth_tool_duration_seconds',
      help: 'Duration of tool calls by kind (builtin runs in the sandbox, mcp on an MCP server).',
      labelNames: ['kind', 'outcome'],
      buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60],
      registers: [registry],
    });
    this.#coldStarts = new Counter({
      name: 'berth_sandbox_cold_starts_total',
      help: 'Sandboxes provisioned (cold starts), by driver and kind (new: a first sandbox; resume: from a snapshot).',
      labelNames: ['driver', 'kind'],
      registers: [registry],
    });
    this.#coldStartSeconds = new Histogram({
      name: 'berth_sandbox_cold_start_seconds',
      help: 'Time to provision a sandbox, by driver and kind (new or resume).',
      labelNames: ['driver', 'kind'],
      buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 30],
      registers: [registry],
    });
    this.#appends = new Counter({
      name: 'berth_appends_total',
      help: 'Committed appends to session logs (rate() of it is appends per second).',
      registers: [registry],
    });
    this.#appendedEvents = new Counter({
      name: 'berth_events_appended_total',
      help: 'Events committed to session logs.',
      registers: [registry],
    });
    new Gauge({
      name: 'berth_sessions',
      help: 'Sessions by status, across all tenants.',
      labelNames: ['status'],
      registers: [registry],
      async collect() {
        const counts = await sources.sessionsByStatus();
        for (const status of STATUSES) this.set({ status }, counts[status] ?? 0);
      },
    });
    new Gauge({
      name: 'berth_live_sandboxes',
      help: 'Live sandboxes on this node, by driver.',
      labelNames: ['driver'],
      registers: [registry],
      collect() {
        this.reset();
        for (const [driver, count] of Object.entries(sources.sandboxesByDriver()))
          this.set({ driver }, count);
      },
    });
  }

  /** Counts one egress request or tunnel (see `egressCounters`). */
  egress(
    record: Pick<EgressAuditRecord, 'decision' | 'status' | 'bytesSent' | 'bytesReceived' | 'purpose'>,
  ): void {
    const source = egressSource(record.purpose);
    this.#egress.requests.inc({ source, decision: record.decision });
    if (record.decision === 'denied')
      this.#egress.denied.inc({ source, status: String(record.status ?? 'none') });
    if (record.bytesSent > 0) this.#egress.bytes.inc({ source, direction: 'sent' }, record.bytesSent);
    if (record.bytesReceived > 0)
      this.#egress.bytes.inc({ source, direction: 'received' }, record.bytesReceived);
  }

  /** The text exposition format and its content type. */
  async render(): Promise<{ body: string; contentType: string }> {
    return { body: await this.registry.metrics(), contentType: this.registry.contentType };
  }

  /** Times every wake. */
  harness(harness: Harness): Harness {
    return {
      ...harness,
      wake: async (session, control) => {
        const end = this.#turnSeconds.startTimer();
        try {
          await harness.wake(session, control);
          end({ outcome: 'ok' });
        } catch (error) {
          end({ outcome: 'error' });
          throw error;
        }
      },
    };
  }

  /** Times every tool call. */
  toolbox(toolbox: SessionToolbox): SessionToolbox {
    return {
      ...toolbox,
      listTools: () => toolbox.listTools(),
      failures: toolbox.failures ? () => toolbox.failures!() : undefined,
      instructions: toolbox.instructions ? () => toolbox.instructions!() : undefined,
      execute: async (name, input, options) => {
        const kind = (await toolbox.listTools()).find((tool) => tool.name === name)?.kind ?? 'unknown';
        const end = this.#toolSeconds.startTimer({ kind });
        try {
          const outcome = await toolbox.execute(name, input, options);
          end({ outcome: outcome.isError ? 'error' : 'ok' });
          return outcome;
        } catch (error) {
          end({ outcome: 'error' });
          throw error;
        }
      },
    };
  }

  /** Counts and times sandbox cold starts. */
  driver(driver: SandboxDriver): SandboxDriver {
    const provision: SandboxDriver['provision'] = async (spec) => {
      const labels = { driver: driver.name, kind: spec.restoreFrom === undefined ? 'new' : 'resume' };
      const end = this.#coldStartSeconds.startTimer(labels);
      const handle = await driver.provision(spec);
      end();
      this.#coldStarts.inc(labels);
      return handle;
    };
    return new Proxy(driver, {
      get(target, property) {
        if (property === 'provision') return provision;
        const value = Reflect.get(target, property, target);
        return typeof value === 'function' ? value.bind(target) : value;
      },
    });
  }

  /** Counts committed appends and their events. */
  eventStore(events: EventStore): EventStore {
    const append: EventStore['append'] = async (session, batch, options) => {
      const result = await events.append(session, batch, options);
      if (!result.duplicate) {
        this.#appends.inc();
        this.#appendedEvents.inc(result.events.length);
      }
      return result;
    };
    return new Proxy(events, {
      get(target, property) {
        if (property === 'append') return append;
        const value = Reflect.get(target, property, target);
        return typeof value === 'function' ? value.bind(target) : value;
      },
    });
  }
}
