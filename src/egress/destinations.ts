/**
 * Rules 1 and 2 of egress, shared by the sandbox's proxy (`proxy.ts`) and Berth's own requests
 * on a session's behalf (`host-fetch.ts`): the host must be allowed by the session's policy,
 * checked before any lookup; then the name is resolved here and only an address on the public
 * internet (or an operator's exact `address:port` exception) is used, and the caller connects
 * to exactly that address (no DNS rebinding between check and use).
 */
import { lookup } from 'node:dns/promises';
import { isIP } from 'node:net';
import { invalidRequest } from '../errors.js';
import {
  type Authority,
  canonicalAddress,
  destinationKey,
  formatAuthority,
  isPublicAddress,
} from './addresses.js';
import type { CompiledPolicy } from './policy.js';

/** Why a request was not sent: the HTTP status the proxy answers with, and whose decision it was. */
export class Refusal extends Error {
  constructor(
    readonly status: number,
    message: string,
    /** `denied`: a rule or limit refused it; `allowed`: allowed, but it could not be done. */
    readonly decision: 'allowed' | 'denied',
  ) {
    super(message);
  }
}

export interface DestinationOptions {
  /**
   * Exact `address:port` pairs off the public internet that may still be reached (tests,
   * operators): `127.0.0.1:8080`, `[::1]:8080`.
   */
  allowPrivateDestinations?: readonly string[];
  /** Name resolution (default: the system resolver); never called for a denied name. */
  resolve?(host: string): Promise<readonly string[]>;
  /** How long a lookup may take. */
  resolveTimeoutMs: number;
}

/** Picks the address to connect to for a target, or throws a Refusal saying which rule failed. */
export type DestinationRule = (
  policy: Pick<CompiledPolicy, 'reachable'>,
  target: Authority,
) => Promise<string>;

const systemResolve = async (host: string) =>
  (await lookup(host, { all: true, verbatim: true })).map((entry) => entry.address);

/** Compiles the operator's exceptions once; throws `invalid_request` for a malformed one. */
export function createDestinationRule(options: DestinationOptions): DestinationRule {
  const allowedPrivate = new Set<string>();
  for (const entry of options.allowPrivateDestinations ?? []) {
    const key = destinationKey(entry);
    if (!key) throw invalidRequest(`allowPrivateDestinations: ${entry} is not an address:port`);
    allowedPrivate.add(key);
  }
  const resolve = options.resolve ?? systemResolve;
  const resolveWithTimeout = (host: string): Promise<readonly string[]> =>
    new Promise((resolvePromise, reject) => {
      const timer = setTimeout(() => reject(new Error('timed out')), options.resolveTimeoutMs);
      resolve(host).then(
        (addresses) => {
          clearTimeout(timer);
          resolvePromise(addresses);
        },
        (error: unknown) => {
          clearTimeout(timer);
          reject(error);
        },
      );
    });

  return async (policy, target) => {
    const reachable = policy.reachable(target.host);
    if (!reachable.ok) throw new Refusal(403, reachable.reason, 'denied');
    let found: readonly string[];
    if (isIP(target.host)) found = [target.host];
    else {
      try {
        found = await resolveWithTimeout(target.host);
      } catch {
        throw new Refusal(502, `cannot resolve ${target.host}`, 'allowed');
      }
    }
    const addresses = found.flatMap((address) => canonicalAddress(address) ?? []);
    const usable = addresses.find(
      (address) => isPublicAddress(address) || allowedPrivate.has(formatAuthority(address, target.port)),
    );
    if (usable !== undefined) return usable;
    if (addresses.length === 0) throw new Refusal(502, `${target.host} has no address`, 'allowed');
    const where = isIP(target.host) ? target.host : `${target.host} resolves to ${addresses[0]}, which`;
    throw new Refusal(
      403,
      `${where} is on a private, loopback or link-local network that sandboxes may not reach`,
      'denied',
    );
  };
}
