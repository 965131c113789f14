/**
 * Host names and addresses as the egress proxy sees them: one canonical spelling per host (so
 * `0x7f.1`, `2130706433` and `[0:0::1]` cannot pass for names), and the rule that sandboxes never
 * reach an address off the public internet. Parsing is WHATWG URL's (node:url) and ipaddr.js's;
 * nothing here resolves names.
 */
import { isIP } from 'node:net';
import ipaddr from 'ipaddr.js';

/** A destination the proxy was asked for: a canonical host name or address literal, and a port. */
export interface Authority {
  /** Lower case, punycode, no trailing dot; an address literal in its canonical form, no brackets. */
  host: string;
  port: number;
}

/** Characters that may not appear in an authority (user info, paths, queries, fragments, spaces). */
const FORBIDDEN_IN_AUTHORITY = /[\s@/\\?#]/;

/**
 * The canonical form of a host as a URL parser reads it: IDN names in punycode, numeric IPv4
 * spellings (`0x7f.1`, `2130706433`, `017700000001`, `127.1`) as dotted quads, IPv6 compressed
 * and without brackets, no trailing dot. Undefined when it is not a valid host.
 */
export function canonicalHost(raw: string): string | undefined {
  if (raw.length === 0 || raw.length > 255 || FORBIDDEN_IN_AUTHORITY.test(raw)) return undefined;
  let host: string;
  try {
    host = new URL(`http://${raw}/`).hostname;
  } catch {
    return undefined;
  }
  if (host.startsWith('[') && host.endsWith(']')) host = host.slice(1, -1);
  while (host.endsWith('.')) host = host.slice(0, -1);
  return host.length > 0 ? host : undefined;
}

/**
 * Parses a CONNECT target (`host:port`, `[v6]:port`) or a URL's authority into its canonical
 * host and port; a missing port is `defaultPort`. Undefined when malformed.
 */
export function parseAuthority(authority: string, defaultPort: number): Authority | undefined {
  const match =
    /^\[([^\]]*)\](?::(\d{1,5}))?$/.exec(authority) ?? /^([^:[\]]*)(?::(\d{1,5}))?$/.exec(authority);
  if (!match) return undefined;
  const port = match[2] === undefined ? defaultPort : Number(match[2]);
  if (!(port > 0 && port < 65536)) return undefined;
  const raw = match[0].startsWith('[') ? `[${match[1]}]` : match[1]!;
  const host = canonicalHost(raw);
  return host === undefined ? undefined : { host, port };
}

/** `host:port` as written in a Host header or an allow list (IPv6 in brackets). */
export function formatAuthority(host: string, port: number): string {
  return `${isIP(host) === 6 ? `[${host}]` : host}:${port}`;
}

/**
 * An operator's `address:port` entry (`127.0.0.1:8080`, `[::1]:8080`) in the form the proxy
 * compares, or undefined when it is not an address and a port.
 */
export function destinationKey(entry: string): string | undefined {
  const parsed = parseAuthority(entry.trim(), 0);
  if (!parsed || parsed.port === 0 || isIP(parsed.host) === 0) return undefined;
  return formatAuthority(ipaddr.parse(parsed.host).toString(), parsed.port);
}

/** The canonical text of an address (as `destinationKey` uses), or undefined for a non-address. */
export function canonicalAddress(address: string): string | undefined {
  if (isIP(address) === 0 || !ipaddr.isValid(stripZone(address))) return undefined;
  return ipaddr.parse(stripZone(address)).toString();
}

function stripZone(address: string): string {
  const at = address.indexOf('%');
  return at < 0 ? address : address.slice(0, at);
}

function publicIpv4(address: ipaddr.IPv4): boolean {
  // Everything ipaddr.js names (loopback, private, link-local and metadata, CGNAT, unspecified,
  // multicast, broadcast, documentation and benchmarking nets, reserved 240/4, …) is refused.
  return address.range() === 'unicast';
}

/**
 * True only for an address on the public internet. False for the host's own and neighbouring
 * networks: loopback, RFC 1918, CGNAT 100.64/10, link-local 169.254/16 (cloud metadata) and
 * fe80::/10, unique local fc00::/7, unspecified, multicast, reserved and documentation ranges.
 * IPv6 forms that carry an IPv4 address (mapped `::ffff:a.b.c.d`, NAT64 `64:ff9b::/96`, 6to4
 * `2002::/16`) are judged by the IPv4 address inside; Teredo, IPv4-compatible, SIIT and
 * local-use NAT64 forms are refused. An address with a zone (`fe80::1%eth0`) is never public.
 */
export function isPublicAddress(address: string): boolean {
  const family = isIP(address);
  if (family === 0 || address.includes('%') || !ipaddr.isValid(address)) return false;
  const parsed = ipaddr.parse(address);
  if (parsed.kind() === 'ipv4') return publicIpv4(parsed as ipaddr.IPv4);
  const v6 = parsed as ipaddr.IPv6;
  const parts = v6.parts;
  const embedded = (high: number, low: number) =>
    new ipaddr.IPv4([high >> 8, high & 0xff, low >> 8, low & 0xff]);
  switch (v6.range()) {
    case 'ipv4Mapped':
      return publicIpv4(v6.toIPv4Address());
    case 'rfc6052':
      // 64:ff9b::/96 (well-known NAT64 prefix) carries a public IPv4 address on IPv6-only
      // networks; 64:ff9b:1::/48 is for local use.
      return parts[2] === 0 && parts[3] === 0 && parts[4] === 0 && parts[5] === 0
        ? publicIpv4(embedded(parts[6]!, parts[7]!))
        : false;
    case '6to4':
      return publicIpv4(embedded(parts[1]!, parts[2]!));
    case 'unicast':
      // ::/96 (IPv4-compatible, deprecated) is not in ipaddr.js's table.
      return !parts.slice(0, 6).every((part) => part === 0);
    default:
      return false;
  }
}
