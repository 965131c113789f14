import type { Context } from 'hono';
import type { ContentfulStatusCode } from 'hono/utils/http-status';
import { ZodError } from 'zod';
import { BerthError, type BerthErrorCode } from '../errors.js';

/** Anthropic error types, as the official SDK maps them to exception classes. */
type AnthropicErrorType =
  | 'invalid_request_error'
  | 'authentication_error'
  | 'permission_error'
  | 'not_found_error'
  | 'request_too_large'
  | 'rate_limit_error'
  | 'api_error'
  | 'overloaded_error';

const statusByCode: Record<BerthErrorCode, [ContentfulStatusCode, AnthropicErrorType]> = {
  invalid_request: [400, 'invalid_request_error'],
  not_found: [404, 'not_found_error'],
  conflict: [409, 'invalid_request_error'],
  authentication: [401, 'authentication_error'],
  permission: [403, 'permission_error'],
  payload_too_large: [413, 'request_too_large'],
  rate_limited: [429, 'rate_limit_error'],
  stale_writer: [409, 'invalid_request_error'],
  head_moved: [409, 'invalid_request_error'],
  store_unavailable: [503, 'overloaded_error'],
  sandbox_unavailable: [400, 'invalid_request_error'],
  sandbox_failed: [500, 'api_error'],
  model_failed: [502, 'api_error'],
  tool_failed: [500, 'api_error'],
  vault_failed: [500, 'api_error'],
  internal: [500, 'api_error'],
};

/** The Anthropic-shaped error body. */
export function errorBody(type: AnthropicErrorType, message: string) {
  return { type: 'error' as const, error: { type, message } };
}

/** Describes zod issues as one readable line: `events.0.type: Invalid input; name: Required`. */
export function describeZodError(error: ZodError): string {
  return error.issues
    .slice(0, 5)
    .map((issue) => {
      const path = issue.path.join('.');
      return path ? `${path}: ${issue.message}` : issue.message;
    })
    .join('; ');
}

/** Hono `onError`: every failure leaves as an Anthropic-shaped error with the right status. */
export function handleError(error: unknown, context: Context): Response {
  if (error instanceof ZodError) {
    return context.json(errorBody('invalid_request_error', describeZodError(error)), 400);
  }
  if (BerthError.isInstance(error)) {
    const [status, type] = statusByCode[error.code];
    if (status >= 500) console.error(error);
    const retryAfter = error.details?.retryAfterSeconds;
    if (typeof retryAfter === 'number')
      context.header('retry-after', String(Math.max(1, Math.ceil(retryAfter))));
    return context.json(errorBody(type, error.message), status);
  }
  console.error(error);
  return context.json(errorBody('api_error', 'Internal server error'), 500);
}
