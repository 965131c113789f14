import type { LimitSettings, LimitsConfig } from '../config/config.js';
import { BerthError } from '../errors.js';
import type { ResourceStore, TenantLimits } from '../store/resource-store.js';

/** Who a limited action is charged to: the tenant, and the user within it. */
export interface LimitSubject {
  tenantId: string;
  userId: string;
}

/** Live sessions right now (the supervisor's count on this node). */
export type LiveSessionCounter = (tenantId: string, userId?: string) => number;

/** A token bucket: `capacity` tokens, refilled continuously at capacity per minute. */
class Bucket {
  tokens: number;
  updatedAt: number;
  constructor(
    readonly capacity: number,
    now: number,
  ) {
    this.tokens = capacity;
    this.updatedAt = now;
  }

  refill(now: number, capacity: number): void {
    this.tokens = Math.min(capacity, this.tokens + ((now - this.updatedAt) / 60_000) * capacity);
    this.updatedAt = now;
  }

  /** Seconds until `count` tokens are there (0 if they are now). */
  waitFor(count: number, capacity: number): number {
    if (this.tokens >= count) return 0;
    return ((count - this.tokens) / capacity) * 60;
  }
}

const TENANT_LIMITS_TTL_MS = 30_000;

/**
 * Per-tenant and per-user limits: concurrent live sessions, sessions created per minute and
 * client events per minute. A request over any limit fails with `rate_limited` (HTTP 429 with
 * `retry-after`) before anything is written. Buckets are keyed by tenant and user and held per
 * process; with several nodes each node enforces its share (documented in NOTES.md).
 */
export class Limits {
  readonly #defaults: LimitsConfig;
  readonly #resources: ResourceStore;
  readonly #liveSessions: LiveSessionCounter;
  readonly #buckets = new Map<string, Bucket>();
  readonly #tenantLimits = new Map<string, { limits: TenantLimits | null; fetchedAt: number }>();
  /** Turns admitted but not yet started (their wake is being registered). */
  readonly #pending = new Map<string, number>();

  constructor(options: {
    defaults: LimitsConfig;
    resources: ResourceStore;
    liveSessions: LiveSessionCounter;
  }) {
    this.#defaults = options.defaults;
    this.#resources = options.resources;
    this.#liveSessions = options.liveSessions;
  }

  /**
   * Charges one session creation; throws `rate_limited` when over a limit. Returns the refund
   * to call when a later limit refuses the same request.
   */
  async chargeSessionCreate(subject: LimitSubject): Promise<() => void> {
    return this.#charge(subject, 'sessionsPerMinute', 1, 'sessions created per minute');
  }

  /** Charges `count` client events like {@link chargeSessionCreate}, returning the refund. */
  async chargeEvents(subject: LimitSubject, count: number): Promise<() => void> {
    return this.#charge(subject, 'eventsPerMinute', count, 'events per minute');
  }

  /**
   * Admits a new live session (a turn about to start) for its owner, or throws `rate_limited`.
   * Returns the release to call once the wake is registered with the supervisor (which then
   * counts it), so concurrent admissions cannot overshoot.
   */
  async admitLiveSession(owner: LimitSubject): Promise<() => void> {
    const tenantLimit = (await this.#settings(owner.tenantId, 'tenant')).liveSessions;
    const userLimit = (await this.#settings(owner.tenantId, 'user')).liveSessions;
    const userKey = `${owner.tenantId}/${owner.userId}`;
    const tenantLive = this.#liveSessions(owner.tenantId) + (this.#pending.get(owner.tenantId) ?? 0);
    const userLive = this.#liveSessions(owner.tenantId, owner.userId) + (this.#pending.get(userKey) ?? 0);
    if (tenantLimit > 0 && tenantLive >= tenantLimit)
      throw this.#limited('live sessions of the tenant', tenantLimit, 1);
    if (userLimit > 0 && userLive >= userLimit)
      throw this.#limited('live sessions of the user', userLimit, 1);
    for (const key of [owner.tenantId, userKey]) this.#pending.set(key, (this.#pending.get(key) ?? 0) + 1);
    let released = false;
    return () => {
      if (released) return;
      released = true;
      for (const key of [owner.tenantId, userKey]) {
        const count = (this.#pending.get(key) ?? 1) - 1;
        if (count > 0) this.#pending.set(key, count);
        else this.#pending.delete(key);
      }
    };
  }

  async #charge(
    subject: LimitSubject,
    kind: 'sessionsPerMinute' | 'eventsPerMinute',
    count: number,
    what: string,
  ): Promise<() => void> {
    const now = Date.now();
    const tenantCapacity = (await this.#settings(subject.tenantId, 'tenant'))[kind];
    const userCapacity = (await this.#settings(subject.tenantId, 'user'))[kind];
    const levels = [
      { key: `${kind}:${subject.tenantId}`, capacity: tenantCapacity, level: 'tenant' },
      { key: `${kind}:${subject.tenantId}/${subject.userId}`, capacity: userCapacity, level: 'user' },
    ].filter((level) => level.capacity > 0);
    // Check every level first, then take from all: a refused request costs nothing.
    if (this.#buckets.size > 50_000) this.#prune(now);
    const buckets = levels.map((level) => {
      let bucket = this.#buckets.get(level.key);
      if (!bucket) {
        bucket = new Bucket(level.capacity, now);
        this.#buckets.set(level.key, bucket);
      }
      bucket.refill(now, level.capacity);
      return { ...level, bucket };
    });
    for (const { bucket, capacity, level } of buckets) {
      if (count > capacity) throw this.#limited(`${what} of the ${level}`, capacity, 60);
      const wait = bucket.waitFor(count, capacity);
      if (wait > 0) throw this.#limited(`${what} of the ${level}`, capacity, wait);
    }
    for (const { bucket } of buckets) bucket.tokens -= count;
    let refunded = false;
    return () => {
      if (refunded) return;
      refunded = true;
      for (const { bucket, capacity } of buckets) bucket.tokens = Math.min(capacity, bucket.tokens + count);
    };
  }

  /** Drops buckets that have refilled completely: they hold nothing a new bucket would not. */
  #prune(now: number): void {
    for (const [key, bucket] of this.#buckets) {
      bucket.refill(now, bucket.capacity);
      if (bucket.tokens >= bucket.capacity) this.#buckets.delete(key);
    }
  }

  async #settings(tenantId: string, level: 'tenant' | 'user'): Promise<LimitSettings> {
    const defaults = this.#defaults[level];
    if (level === 'user') return defaults;
    const now = Date.now();
    let cached = this.#tenantLimits.get(tenantId);
    if (!cached || now - cached.fetchedAt > TENANT_LIMITS_TTL_MS) {
      const tenant = await this.#resources.getTenant(tenantId);
      cached = { limits: tenant?.limits ?? null, fetchedAt: now };
      if (this.#tenantLimits.size > 10_000) this.#tenantLimits.clear();
      this.#tenantLimits.set(tenantId, cached);
    }
    return { ...defaults, ...(cached.limits ?? {}) };
  }

  #limited(what: string, limit: number, retryAfterSeconds: number): BerthError {
    return new BerthError('rate_limited', `Rate limit reached: at most ${limit} ${what}; retry later`, {
      retryable: true,
      details: { retryAfterSeconds },
    });
  }
}
