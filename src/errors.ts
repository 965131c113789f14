/**
 * Berth's one error family. Every error a layer raises on purpose is a BerthError with a
 * stable string `code`, whether retrying could help, and an optional cause. Only `api/`
 * maps codes to HTTP statuses.
 */
const BERTH_ERROR_MARKER = Symbol.for('berth.error');

/** Stable codes; `api/errors.ts` maps each to an HTTP status and an Anthropic error type. */
export type BerthErrorCode =
  | 'invalid_request'
  | 'not_found'
  | 'conflict'
  | 'authentication'
  | 'permission'
  | 'payload_too_large'
  | 'rate_limited'
  | 'stale_writer'
  | 'head_moved'
  | 'store_unavailable'
  | 'sandbox_unavailable'
  | 'sandbox_failed'
  | 'model_failed'
  | 'tool_failed'
  /** A vault secret could not be sealed, opened or refreshed (missing key, altered ciphertext, token endpoint). */
  | 'vault_failed'
  | 'internal';

export interface BerthErrorOptions {
  retryable?: boolean;
  cause?: unknown;
  /** Extra machine-readable data for the caller (never secrets). */
  details?: Record<string, unknown>;
}

/** Base error: branded so `isBerthError` works across module copies. */
export class BerthError extends Error {
  readonly [BERTH_ERROR_MARKER] = true;
  readonly code: BerthErrorCode;
  readonly retryable: boolean;
  readonly details: Record<string, unknown> | undefined;

  constructor(code: BerthErrorCode, message: string, options: BerthErrorOptions = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'BerthError';
    this.code = code;
    this.retryable = options.retryable ?? false;
    this.details = options.details;
  }

  static isInstance(value: unknown): value is BerthError {
    return typeof value === 'object' && value !== null && BERTH_ERROR_MARKER in value;
  }
}

/** True for any BerthError (or one with the given code). */
export function isBerthError(value: unknown, code?: BerthErrorCode): value is BerthError {
  return BerthError.isInstance(value) && (code === undefined || value.code === code);
}

/** Shorthands for the common cases. */
export const invalidRequest = (message: string, details?: Record<string, unknown>) =>
  new BerthError('invalid_request', message, { details });
export const notFound = (what: string, id: string) => new BerthError('not_found', `${what} ${id} not found`);
export const conflict = (message: string) => new BerthError('conflict', message);
