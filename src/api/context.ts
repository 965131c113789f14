import type { HttpBindings } from '@hono/node-server';
import type { Context } from 'hono';
import { z } from 'zod';
import type { SandboxManager } from '../control/sandbox-manager.js';
import type { Supervisor } from '../control/supervisor.js';
import { invalidRequest } from '../errors.js';
import type { DeltaBus } from '../harness/delta-bus.js';
import type { Authenticator, Principal } from '../identity/api-keys.js';
import type { Limits } from '../identity/limits.js';
import type { PriceBook } from '../metering/price-books.js';
import type { SessionKey } from '../store/event-store.js';
import type { ResourceRecord, ResourceStore, SessionRecord, Store } from '../store/resource-store.js';
import type { Metrics } from '../telemetry/metrics.js';
import type { VaultService } from '../vault/vault-service.js';
import { describeZodError } from './errors.js';
import type { ClusterRouter } from './forwarding.js';

/** What the routes need; built once by `createApp`. */
export interface ApiDependencies {
  store: Store;
  /** Seals and opens credential secrets (the routes never store a secret in the clear). */
  vault: VaultService;
  supervisor: Supervisor;
  /** Drops everything live of a deleted session: MCP connections, sandbox, files. */
  forgetSession(session: SessionKey): Promise<void>;
  /** Per-tenant and per-user limits (429 with retry-after). */
  limits: Limits;
  /** Resolves API keys; revocations end streams held under the key. */
  authenticator: Authenticator;
  deltas: DeltaBus;
  /** Sandbox drivers this host can run, by name; the first is the default. */
  sandboxDrivers: readonly string[];
  /** Why a known driver cannot run here (for clear refusal messages). */
  unavailableDrivers?: Readonly<Record<string, string>>;
  /** Largest accepted request body in bytes (default 1 MiB). */
  maxBodyBytes?: number;
  /** The sessions' sandboxes (the files API works in them). */
  sandboxes: SandboxManager;
  /** The price book session budgets and list costs use. */
  budgetBook: PriceBook;
  /** Prometheus metrics served at `/metrics` (absent when turned off). */
  metrics?: Metrics;
  /**
   * Lowest `idle_timeout_s` / `max_lifetime_s` an environment may set (default 60; lower only
   * for tests and demos, `BERTH_MIN_LIFECYCLE_S`).
   */
  minLifecycleSeconds?: number;
  /** Interval of SSE keep-alive pings (default 15 s). */
  streamPingMs?: number;
  /** Several nodes: where a session's live instance is (requests go there). */
  cluster?: ClusterRouter;
}

/** Hono context variables set by the middleware. */
export interface ApiEnvironment {
  /** Node's request and response under `berth serve`; absent in `app.request()` (tests). */
  Bindings: Partial<HttpBindings> | undefined;
  Variables: {
    principal: Principal;
    /** Set for every `/v1/sessions/:id…` route, by the one ownership check in `app.ts`. */
    session: SessionRecord;
  };
}

export type ApiContext = Context<ApiEnvironment>;

/** Parses a JSON body against a schema; malformed JSON and schema errors are 400s. */
export async function readBody<T extends z.ZodType>(context: ApiContext, schema: T): Promise<z.infer<T>> {
  let raw: unknown;
  const text = await context.req.text();
  if (text.trim() === '') {
    raw = {};
  } else {
    let hasNul = false;
    try {
      raw = JSON.parse(text, (_key, value) => {
        if (typeof value === 'string' && value.includes('\u0000')) hasNul = true;
        return value;
      });
    } catch (error) {
      // V8 quotes the start of the text in some messages; a body may hold a secret, so cut it.
      const reason = (error as Error).message.replace(/,? ?".*" is not valid JSON$/s, '') || 'malformed';
      throw invalidRequest(`Request body is not valid JSON: ${reason}`);
    }
    if (hasNul) throw invalidRequest('Request body strings must not contain NUL characters');
  }
  const parsed = schema.safeParse(raw);
  if (!parsed.success) throw invalidRequest(describeZodError(parsed.error));
  return parsed.data;
}

const pageQuery = z.object({
  limit: z.coerce.number().int().min(1).max(1000).optional(),
  page: z.string().min(1).optional(),
});

/** `limit` and `page` from the query string, validated. */
export function readPageQuery(context: ApiContext, defaultLimit = 20) {
  const parsed = pageQuery.safeParse({
    limit: context.req.query('limit'),
    page: context.req.query('page') || undefined,
  });
  if (!parsed.success) throw invalidRequest(describeZodError(parsed.error));
  return { limit: parsed.data.limit ?? defaultLimit, cursor: parsed.data.page };
}

/** A positive integer query parameter (at most 2^31 - 1), or undefined when absent. */
export function readPositiveInteger(context: ApiContext, name: string): number | undefined {
  const value = context.req.query(name);
  if (value === undefined || value === '') return undefined;
  const number = Number(value);
  if (!/^\d+$/.test(value) || !Number.isSafeInteger(number) || number < 1 || number > 2_147_483_647) {
    throw invalidRequest(`${name} must be a positive integer`);
  }
  return number;
}

/** A boolean query flag (`true`/`false`/absent). */
export function readFlag(context: ApiContext, name: string): boolean {
  const value = context.req.query(name);
  if (value === undefined || value === '' || value === 'false') return false;
  if (value === 'true') return true;
  throw invalidRequest(`${name} must be true or false`);
}

/** `asc`/`desc` from the query string. */
export function readOrder(context: ApiContext, fallback: 'asc' | 'desc'): 'asc' | 'desc' {
  const value = context.req.query('order');
  if (value === undefined || value === '') return fallback;
  if (value === 'asc' || value === 'desc') return value;
  throw invalidRequest('order must be asc or desc');
}

/** Array query parameters in either `name[]=a&name[]=b` (the SDK's form) or `name=a,b`. */
export function readArrayQuery(context: ApiContext, name: string): string[] | undefined {
  const values = [...(context.req.queries(`${name}[]`) ?? []), ...(context.req.queries(name) ?? [])]
    .flatMap((value) => value.split(','))
    .map((value) => value.trim())
    .filter((value) => value !== '');
  return values.length > 0 ? values : undefined;
}

/**
 * The request's `Idempotency-Key` header (at most 255 characters), or undefined. The same key
 * sent again by the same owner is answered as the first request was and writes nothing.
 */
export function readIdempotencyKey(context: ApiContext): string | undefined {
  const key = context.req.header('idempotency-key') || undefined;
  if (key !== undefined && key.length > 255) {
    throw invalidRequest('Idempotency-Key must be at most 255 characters');
  }
  return key;
}

/** Now as the API shows times. */
export function nowIso(): string {
  return new Date().toISOString();
}

/**
 * Applies a metadata patch as the official API does: a key set to null is removed; a null
 * patch clears everything.
 */
export function mergeMetadata(
  current: Record<string, string> | undefined,
  patch: Record<string, string | null> | null,
): Record<string, string> {
  if (patch === null) return {};
  const metadata = { ...(current ?? {}) };
  for (const [key, value] of Object.entries(patch)) {
    if (value === null) delete metadata[key];
    else metadata[key] = value;
  }
  return metadata;
}

/** A new row owned by the caller. */
export function newRecord(
  principal: Principal,
  id: string,
  now: string,
  body: Record<string, unknown>,
): ResourceRecord {
  return {
    id,
    tenantId: principal.tenantId,
    ownerId: principal.userId,
    createdAt: now,
    updatedAt: now,
    archivedAt: null,
    body,
  };
}

/** Marks a row archived (once) and stores it; returns the body to answer with. */
export async function archiveRecord(
  resources: ResourceStore,
  kind: 'agent' | 'environment',
  record: ResourceRecord,
): Promise<Record<string, unknown>> {
  if (!record.archivedAt) {
    const now = nowIso();
    record.archivedAt = now;
    record.updatedAt = now;
    record.body = { ...record.body, archived_at: now, updated_at: now };
    await resources.update(kind, record);
  }
  return record.body;
}

/** `GET /v1/agents` and `GET /v1/environments`: a tenant's rows, newest first, page by page. */
export async function listRecords(
  context: ApiContext,
  resources: ResourceStore,
  kind: 'agent' | 'environment',
  /** How a stored body is shown (defaults to as stored). */
  present: (body: Record<string, unknown>) => Record<string, unknown> = (body) => body,
) {
  const { limit, cursor } = readPageQuery(context);
  const page = await resources.list(kind, {
    tenantId: context.get('principal').tenantId,
    limit,
    cursor,
    includeArchived: readFlag(context, 'include_archived'),
    order: readOrder(context, 'desc'),
  });
  return context.json({ data: page.items.map((record) => present(record.body)), next_page: page.nextCursor });
}

/** The presented key: `x-api-key`, or `Authorization: Bearer <key>`. */
export function presentedKey(headers: { header(name: string): string | undefined }): string | undefined {
  const apiKey = headers.header('x-api-key');
  if (apiKey) return apiKey.trim();
  const authorization = headers.header('authorization');
  const match = authorization ? /^Bearer\s+(.+)$/i.exec(authorization) : null;
  return match?.[1]?.trim();
}
