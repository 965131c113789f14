/**
 * The egress policy of one session: which hosts its sandbox may reach (from its environment's
 * `networking`) and which credentials apply to which hosts. A raw `EgressPolicy` is compiled
 * once (`compilePolicy`) into lookups the proxy's hot path uses; the proxy (`proxy.ts`) applies
 * them, and `addresses.ts` holds the rule about destination addresses.
 *
 * Order matters and is fixed: the host name is checked against the policy BEFORE any DNS
 * lookup (resolving a name the sandbox chose would leak data through DNS), then the proxy
 * resolves it itself and refuses private, loopback and link-local results (no request forgery
 * against the host's own services), then connects to exactly the address it checked (no DNS
 * rebinding between check and use).
 */
import { invalidRequest } from '../errors.js';
import { canonicalHost } from './addresses.js';
import type { Replacement } from './replace-stream.js';

/** A credential as the proxy uses it: the real secret, and the placeholder the sandbox sees. */
export interface EgressCredential {
  id: string;
  /** Display name (or id): what audit records name; never the value. */
  name: string;
  /** The stand-in value the sandbox has; swapped for `secret` only on an allowed host. */
  placeholder: string;
  secret: string;
  /**
   * Hosts where the placeholder is swapped (the SDK's credential `networking.allowed_hosts`):
   * exact names, `*.example.com` for any subdomain (not the apex), or `unrestricted` for any
   * host the environment lets the sandbox reach.
   */
  allowedHosts: 'unrestricted' | readonly string[];
  /** Where the placeholder is swapped: request headers, request body. */
  injection: { header: boolean; body: boolean };
}

/** An environment's `networking`, as the proxy enforces it. */
export type EgressNetworking =
  | { type: 'unrestricted' }
  | {
      type: 'limited';
      /** Exact host names (case-insensitive), or `*.example.com` for its subdomains. */
      allowedHosts: readonly string[];
      /** Adds `PACKAGE_MANAGER_HOSTS`. */
      allowPackageManagers: boolean;
      /** Hosts allowed for other reasons (the agent's MCP servers with `allow_mcp_servers`). */
      extraHosts?: readonly string[];
    };

/**
 * A secret of the session the sandbox never gets a placeholder for (the bearer kinds:
 * `static_bearer` tokens, `mcp_oauth` tokens and client secrets, which Berth itself sends). It
 * is never injected; responses are scanned for it like for every other secret.
 */
export interface WithheldSecret {
  /** The credential's id: what replaces the secret in a response (`berth_withheld_<id>`). */
  id: string;
  secret: string;
}

/** Everything the proxy of one session enforces; replaced whole by `updatePolicy`. */
export interface EgressPolicy {
  networking: EgressNetworking;
  credentials: readonly EgressCredential[];
  /** More secrets of the session's vaults to scan responses for (never injected). */
  withheld?: readonly WithheldSecret[];
}

/**
 * Whether a request header carries credentials, so that a header-injected credential's
 * placeholder is swapped in it: `Authorization`, `Cookie`, and headers whose name ends in
 * `key`, `token`, `secret`, `auth`, `password` or `credential(s)` (`X-Api-Key`, `Private-Token`,
 * `X-Auth-Token`, `Ocp-Apim-Subscription-Key`, `DD-API-KEY`). Other headers (`X-Note`,
 * `User-Agent`, …) keep the placeholder: a host that stores what it is sent (and serves it again,
 * perhaps from another host) must not be handed the secret in an arbitrary header. `name` is
 * lower case (as Node gives it).
 */
export function isCredentialHeader(name: string): boolean {
  return name === 'authorization' || name === 'cookie' || CREDENTIAL_HEADER_SUFFIX.test(name);
}
const CREDENTIAL_HEADER_SUFFIX = /(key|token|secret|auth|password|credentials?)$/;

/**
 * Package registries and mirrors that `allow_package_managers` opens, in one place: npm and
 * Yarn, PyPI, crates.io, the Go module proxy and checksum database, RubyGems, Maven Central,
 * Debian and Ubuntu archives, and GitHub's repository, release and source download hosts (which
 * many installers fetch from).
 */
export const PACKAGE_MANAGER_HOSTS: readonly string[] = [
  // npm, Yarn
  'registry.npmjs.org',
  'registry.yarnpkg.com',
  'repo.yarnpkg.com',
  // PyPI
  'pypi.org',
  'files.pythonhosted.org',
  // Rust
  'crates.io',
  'static.crates.io',
  'index.crates.io',
  // Go
  'proxy.golang.org',
  'sum.golang.org',
  // Ruby
  'rubygems.org',
  'index.rubygems.org',
  // Java
  'repo.maven.apache.org',
  'repo1.maven.org',
  // Debian, Ubuntu
  'deb.debian.org',
  'security.debian.org',
  'archive.ubuntu.com',
  '*.archive.ubuntu.com',
  'security.ubuntu.com',
  'ports.ubuntu.com',
  // GitHub releases and source archives
  'github.com',
  'codeload.github.com',
  'objects.githubusercontent.com',
  'release-assets.githubusercontent.com',
];

/** Lower case, trimmed, no trailing dot, no IPv6 brackets. */
function normalizeHost(host: string): string {
  let result = host.trim().toLowerCase();
  if (result.startsWith('[') && result.endsWith(']')) result = result.slice(1, -1);
  while (result.endsWith('.')) result = result.slice(0, -1);
  return result;
}

/** A pattern in canonical form (`*.` kept, the rest as a URL parser reads it: punycode, lower case). */
function canonicalPattern(pattern: string): string {
  const trimmed = normalizeHost(pattern);
  if (trimmed.startsWith('*.')) return `*.${canonicalHost(trimmed.slice(2)) ?? trimmed.slice(2)}`;
  return canonicalHost(trimmed) ?? trimmed;
}

/**
 * A matcher for a list of host patterns, taking hosts already in canonical form
 * (`canonicalHost`): exact names in a set, `*.` suffixes in a list.
 */
function compileHostPatterns(patterns: readonly string[]): (host: string) => boolean {
  const exact = new Set<string>();
  const suffixes: string[] = [];
  for (const pattern of patterns.map(canonicalPattern)) {
    if (pattern.startsWith('*.')) suffixes.push(pattern.slice(1));
    else exact.add(pattern);
  }
  return (host) =>
    exact.has(host) || suffixes.some((suffix) => host.endsWith(suffix) && host.length > suffix.length);
}

/** A policy ready for the hot path. Hosts given to it must be canonical (`canonicalHost`). */
export interface CompiledPolicy {
  readonly policy: EgressPolicy;
  /** Whether the sandbox may reach `host` at all (checked before any DNS lookup). */
  reachable(host: string): { ok: true } | { ok: false; reason: string };
  /** The credentials whose placeholders are swapped on requests to `host`. */
  credentialsFor(host: string): readonly EgressCredential[];
  /**
   * Every secret of the session (its credentials' and the withheld ones) to what replaces it
   * in responses: a credential's placeholder, or `berth_withheld_<id>`. Responses of hosts
   * where a credential applies are scanned with it.
   */
  readonly responseSwaps: readonly Replacement[];
  /**
   * The same without secrets shorter than `MIN_SCANNED_EVERYWHERE` bytes: responses of every
   * other host are scanned with it (a few common bytes cannot be told from a download's own).
   */
  readonly responseSwapsEverywhere: readonly Replacement[];
}

/** Secrets at least this long are scanned for in every response, not only a credential host's. */
export const MIN_SCANNED_EVERYWHERE = 8;

/**
 * Checks and compiles a policy. Throws `invalid_request` for a credential the proxy could not
 * apply safely: an empty placeholder or secret, or one that contains the other (a swap would
 * then not be reversible).
 */
export function compilePolicy(policy: EgressPolicy): CompiledPolicy {
  for (const credential of policy.credentials) {
    if (credential.placeholder.length === 0 || credential.secret.length === 0) {
      throw invalidRequest(`egress credential ${credential.name} has an empty placeholder or secret`);
    }
    if (
      credential.secret.includes(credential.placeholder) ||
      credential.placeholder.includes(credential.secret)
    ) {
      throw invalidRequest(`egress credential ${credential.name}: placeholder and secret overlap`);
    }
  }
  const responseSwaps: Replacement[] = [
    ...policy.credentials.map((credential) => ({ from: credential.secret, to: credential.placeholder })),
    ...(policy.withheld ?? []).flatMap((withheld) =>
      withheld.secret.length === 0 ? [] : [{ from: withheld.secret, to: `berth_withheld_${withheld.id}` }],
    ),
  ];
  const { networking } = policy;
  const reachable: CompiledPolicy['reachable'] =
    networking.type === 'unrestricted'
      ? () => ({ ok: true })
      : (() => {
          const allowed = compileHostPatterns([
            ...networking.allowedHosts,
            ...(networking.allowPackageManagers ? PACKAGE_MANAGER_HOSTS : []),
            ...(networking.extraHosts ?? []),
          ]);
          return (host: string) =>
            allowed(host)
              ? { ok: true }
              : {
                  ok: false,
                  reason: `host ${host} is not in the environment's allowed_hosts (networking: limited)`,
                };
        })();
  const matchers = policy.credentials.map((credential) => ({
    credential,
    applies:
      credential.allowedHosts === 'unrestricted' ? () => true : compileHostPatterns(credential.allowedHosts),
  }));
  const none: readonly EgressCredential[] = [];
  return {
    policy,
    reachable,
    responseSwaps,
    responseSwapsEverywhere: responseSwaps.filter(
      (swap) => Buffer.byteLength(swap.from) >= MIN_SCANNED_EVERYWHERE,
    ),
    credentialsFor: (host) => {
      if (matchers.length === 0) return none;
      return matchers.filter((entry) => entry.applies(host)).map((entry) => entry.credential);
    },
  };
}
