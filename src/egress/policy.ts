/**
 * The egress policy of one session: which hosts its sandbox may reach (from its environment's
 * `networking`), which destination addresses are never reachable (the host's own networks), and
 * which credentials apply to which hosts. Pure functions; the proxy (`proxy.ts`) applies them.
 *
 * Order matters and is fixed: the host name is checked against the policy BEFORE any DNS
 * lookup (resolving a name the sandbox chose would leak data through DNS), then the proxy
 * resolves it itself and refuses private, loopback and link-local results (no request forgery
 * against the host's own services), then connects to exactly the address it checked (no DNS
 * rebinding between check and use).
 */
import { BlockList, isIP } from 'node:net';

/** A credential as the proxy uses it: the real secret, and the placeholder the sandbox sees. */
export interface EgressCredential {
  id: string;
  /** Display name (or id): what audit records name; never the value. */
  name: string;
  /** The stand-in value the sandbox has; swapped for `secret` only on an allowed host. */
  placeholder: string;
  secret: string;
  /** Exact host names (`*.example.com`: its subdomains), or any host. */
  allowedHosts: 'unrestricted' | readonly string[];
  injection: { header: boolean; body: boolean };
}

/** An environment's `networking`, as the proxy enforces it. */
export type EgressNetworking =
  | { type: 'unrestricted' }
  | {
      type: 'limited';
      allowedHosts: readonly string[];
      allowPackageManagers: boolean;
      /** Hosts allowed for other reasons (the agent's MCP servers with `allow_mcp_servers`). */
      extraHosts?: readonly string[];
    };

export interface EgressPolicy {
  networking: EgressNetworking;
  credentials: readonly EgressCredential[];
}

/**
 * Package registries and mirrors that `allow_package_managers` opens: npm, Yarn, PyPI, crates,
 * the Go module proxy, RubyGems, Maven Central, Debian/Ubuntu archives, and GitHub's release and
 * source download hosts (which many installers fetch from).
 */
export const PACKAGE_MANAGER_HOSTS: readonly string[] = [
  'registry.npmjs.org',
  'registry.yarnpkg.com',
  'pypi.org',
  'files.pythonhosted.org',
  'crates.io',
  'static.crates.io',
  'index.crates.io',
  'proxy.golang.org',
  'sum.golang.org',
  'rubygems.org',
  'index.rubygems.org',
  'repo.maven.apache.org',
  'repo1.maven.org',
  'deb.debian.org',
  'security.debian.org',
  'archive.ubuntu.com',
  'security.ubuntu.com',
  'github.com',
  'codeload.github.com',
  'objects.githubusercontent.com',
];

/** A host name in the one form policies compare: lower case, no trailing dot, no IPv6 brackets. */
export function normalizeHost(host: string): string {
  let result = host.trim().toLowerCase();
  if (result.startsWith('[') && result.endsWith(']')) result = result.slice(1, -1);
  while (result.endsWith('.')) result = result.slice(0, -1);
  return result;
}

/** Whether `host` matches `pattern`: the same name, or for `*.example.com` any subdomain of it. */
export function hostMatches(pattern: string, host: string): boolean {
  const wanted = normalizeHost(pattern);
  const name = normalizeHost(host);
  if (wanted.startsWith('*.')) return name.endsWith(wanted.slice(1)) && name.length > wanted.length - 1;
  return wanted === name;
}

/** Whether the policy lets the sandbox reach `host` at all (checked before any DNS lookup). */
export function hostReachable(
  networking: EgressNetworking,
  host: string,
): { ok: true } | { ok: false; reason: string } {
  if (networking.type === 'unrestricted') return { ok: true };
  const allowed = [
    ...networking.allowedHosts,
    ...(networking.allowPackageManagers ? PACKAGE_MANAGER_HOSTS : []),
    ...(networking.extraHosts ?? []),
  ];
  if (allowed.some((pattern) => hostMatches(pattern, host))) return { ok: true };
  return {
    ok: false,
    reason: `host ${normalizeHost(host)} is not in the environment's allowed_hosts (networking: limited)`,
  };
}

/** The credentials whose allowed hosts include `host` (where their placeholders are swapped). */
export function credentialsFor(policy: EgressPolicy, host: string): EgressCredential[] {
  return policy.credentials.filter(
    (credential) =>
      credential.allowedHosts === 'unrestricted' ||
      credential.allowedHosts.some((pattern) => hostMatches(pattern, host)),
  );
}

/**
 * Addresses no sandbox may reach through the proxy, whatever its policy: the host itself and
 * the networks around it. IPv4-mapped IPv6 addresses are checked as the IPv4 address they carry.
 */
const NON_PUBLIC = (() => {
  const list = new BlockList();
  for (const [network, prefix] of [
    ['0.0.0.0', 8], // "this" network; 0.0.0.0 reaches the host's own listeners
    ['10.0.0.0', 8],
    ['100.64.0.0', 10], // carrier-grade NAT
    ['127.0.0.0', 8],
    ['169.254.0.0', 16], // link-local, cloud metadata (169.254.169.254)
    ['172.16.0.0', 12],
    ['192.0.0.0', 24],
    ['192.0.2.0', 24],
    ['192.168.0.0', 16],
    ['198.18.0.0', 15],
    ['198.51.100.0', 24],
    ['203.0.113.0', 24],
    ['224.0.0.0', 4], // multicast
    ['240.0.0.0', 4], // reserved, broadcast
  ] as const) {
    list.addSubnet(network, prefix, 'ipv4');
  }
  for (const [network, prefix] of [
    ['::', 128], // unspecified
    ['::1', 128],
    ['64:ff9b::', 96], // NAT64 (reaches IPv4 space)
    ['100::', 64],
    ['2001:db8::', 32],
    ['fc00::', 7], // unique local
    ['fe80::', 10], // link-local
    ['fec0::', 10],
    ['ff00::', 8], // multicast
  ] as const) {
    list.addSubnet(network, prefix, 'ipv6');
  }
  return list;
})();

/** True for an address on the public internet; false for the host's own and private networks. */
export function isPublicAddress(address: string): boolean {
  const family = isIP(address);
  if (family === 0) return false;
  if (family === 6) {
    const mapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(address)?.[1];
    if (mapped) return !NON_PUBLIC.check(mapped, 'ipv4');
    if (/^::ffff:/i.test(address) || /^::(\d|[0-9a-f]{1,4}:)/i.test(address)) {
      // Other embeddings of IPv4 (IPv4-compatible ::a.b.c.d, hex-mapped): never public here.
      return false;
    }
    return !NON_PUBLIC.check(address, 'ipv6');
  }
  return !NON_PUBLIC.check(address, 'ipv4');
}
