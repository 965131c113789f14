/**
 * Gives each session's sandbox its egress proxy: the environment variables every command gets
 * (proxy settings, the session CA's trust files, and a placeholder for each of the session's
 * `environment_variable` credentials), and, once a sandbox with a services directory is up, the
 * proxy listening there with the session's policy (its environment's `networking`, its vaults'
 * credentials). Audit records go to `onRequest`. The real secrets stay in this process.
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { SandboxHandle } from '../sandbox/driver.js';
import { type SessionKey, sessionKeyString } from '../store/event-store.js';
import type { SessionRecord } from '../store/resource-store.js';
import type { VaultService } from '../vault/vault-service.js';
import { canonicalHost } from './addresses.js';
import { createDestinationRule, type DestinationRule } from './destinations.js';
import { createHostFetch, type HostFetch } from './host-fetch.js';
import {
  compilePolicy,
  type EgressCredential,
  type EgressNetworking,
  type EgressPolicy,
  type WithheldSecret,
} from './policy.js';
import {
  createEgressProxy,
  DEFAULT_EGRESS_LIMITS,
  type EgressAuditRecord,
  type EgressProxy,
} from './proxy.js';

/** Where the sandbox sees its services directory, and what the files in it are called. */
const SERVICES_INSIDE = '/run/berth';
const SOCKET_NAME = 'egress.sock';
const CA_NAME = 'egress-ca.pem';
const BUNDLE_NAME = 'ca-bundle.pem';
const PROXY_URL = 'http://127.0.0.1:3128';
const SYSTEM_BUNDLES = ['/etc/ssl/certs/ca-certificates.crt', '/etc/pki/tls/certs/ca-bundle.crt'];

export interface SessionEgressOptions {
  vault: VaultService;
  /** Every request and tunnel of a session, allowed or denied. */
  onRequest(session: SessionKey, record: EgressAuditRecord): void;
  /** Exact `address:port` pairs on private networks sandboxes may still reach (tests, operators). */
  allowPrivateDestinations?: readonly string[];
  /** Extra roots trusted for upstream TLS (PEM). */
  upstreamCaCertificates?: readonly string[];
  /** Static name → address overrides (like curl's --resolve), checked before the system resolver. */
  hosts?: Readonly<Record<string, string>>;
}

/**
 * The environment's `networking` as the proxy enforces it (default: unrestricted). With
 * `allow_mcp_servers`, the hosts of the session's remote MCP servers are allowed too.
 */
export function networkingOf(config: unknown, session?: SessionRecord): EgressNetworking {
  const networking = (config as { networking?: Record<string, unknown> } | undefined)?.networking;
  if (networking?.type !== 'limited') return { type: 'unrestricted' };
  return {
    type: 'limited',
    allowedHosts: (networking.allowed_hosts as string[] | undefined) ?? [],
    allowPackageManagers: networking.allow_package_managers === true,
    extraHosts: networking.allow_mcp_servers === true && session ? mcpServerHostsOf(session) : [],
  };
}

/** Host names of the remote (`url`) MCP servers of a session's agent. */
function mcpServerHostsOf(session: SessionRecord): string[] {
  const servers = (session.body.agent as { mcp_servers?: { type?: string; url?: string }[] } | undefined)
    ?.mcp_servers;
  return (servers ?? []).flatMap((server) => {
    if (server.type !== 'url' || typeof server.url !== 'string') return [];
    try {
      const host = canonicalHost(new URL(server.url).hostname);
      return host ? [host] : [];
    } catch {
      return [];
    }
  });
}

export class SessionEgress {
  readonly #options: SessionEgressOptions;
  readonly #proxies = new Map<string, EgressProxy>();
  readonly #systemBundle: string;
  readonly #resolve: ((host: string) => Promise<readonly string[]>) | undefined;
  readonly #destinations: DestinationRule;

  constructor(options: SessionEgressOptions) {
    this.#options = options;
    const hosts = options.hosts ?? {};
    this.#resolve =
      Object.keys(hosts).length > 0
        ? async (host: string) => {
            const fixed = hosts[host];
            if (fixed) return [fixed];
            const { lookup } = await import('node:dns/promises');
            return (await lookup(host, { all: true, verbatim: true })).map((entry) => entry.address);
          }
        : undefined;
    this.#destinations = createDestinationRule({
      allowPrivateDestinations: options.allowPrivateDestinations,
      resolve: this.#resolve,
      resolveTimeoutMs: DEFAULT_EGRESS_LIMITS.resolveTimeoutMs,
    });
    this.#systemBundle =
      SYSTEM_BUNDLES.map((path) => {
        try {
          return readFileSync(path, 'utf8');
        } catch {
          return '';
        }
      }).find((text) => text.length > 0) ?? '';
  }

  /** The session's `environment_variable` credentials as the proxy swaps them. */
  async #credentials(session: SessionRecord): Promise<EgressCredential[]> {
    const credentials = await this.#options.vault.credentialsForSession(session);
    return credentials.flatMap((credential) =>
      credential.type === 'environment_variable'
        ? [
            {
              id: credential.id,
              name: credential.name,
              placeholder: credential.placeholder,
              secret: credential.secretValue.reveal(),
              allowedHosts: credential.allowedHosts,
              injection: credential.injection,
            },
          ]
        : [],
    );
  }

  /**
   * The secrets of the session the sandbox has no placeholder for (bearer tokens, OAuth tokens
   * and client secrets, which Berth sends itself): responses are scanned for them too.
   */
  async #withheld(session: SessionRecord): Promise<WithheldSecret[]> {
    const secrets = await this.#options.vault.secretsForSession(session);
    return secrets.flatMap((entry) =>
      entry.type === 'environment_variable'
        ? []
        : entry.values.map((value) => ({ id: entry.credentialId, secret: value.reveal() })),
    );
  }

  /** Variables every command of the session's sandbox gets. */
  async environment(session: SessionRecord): Promise<Record<string, string>> {
    const bundle = `${SERVICES_INSIDE}/${BUNDLE_NAME}`;
    const env: Record<string, string> = {
      HTTP_PROXY: PROXY_URL,
      HTTPS_PROXY: PROXY_URL,
      http_proxy: PROXY_URL,
      https_proxy: PROXY_URL,
      NO_PROXY: 'localhost,127.0.0.1,::1',
      no_proxy: 'localhost,127.0.0.1,::1',
      SSL_CERT_FILE: bundle,
      CURL_CA_BUNDLE: bundle,
      REQUESTS_CA_BUNDLE: bundle,
      GIT_SSL_CAINFO: bundle,
      PIP_CERT: bundle,
      NODE_EXTRA_CA_CERTS: `${SERVICES_INSIDE}/${CA_NAME}`,
    };
    for (const credential of await this.#options.vault.credentialsForSession(session)) {
      if (credential.type === 'environment_variable') env[credential.secretName] = credential.placeholder;
    }
    return env;
  }

  /** Starts the session's proxy in the sandbox's services directory (none: no network at all). */
  async attach(session: SessionRecord, handle: SandboxHandle, environmentConfig: unknown): Promise<void> {
    const directory = handle.servicesDirectory;
    if (!directory) return;
    await this.detach(session);
    const policy: EgressPolicy = {
      networking: networkingOf(environmentConfig, session),
      credentials: await this.#credentials(session),
      withheld: await this.#withheld(session),
    };
    const key: SessionKey = { tenantId: session.tenantId, id: session.id };
    const resolve = this.#resolve;
    const proxy = await createEgressProxy({
      socketPath: join(directory, SOCKET_NAME),
      label: session.id,
      policy,
      onRequest: (record) => this.#options.onRequest(key, record),
      allowPrivateDestinations: this.#options.allowPrivateDestinations,
      upstreamCaCertificates: this.#options.upstreamCaCertificates,
      ...(resolve ? { resolve } : {}),
    });
    writeFileSync(join(directory, CA_NAME), proxy.caCertificatePem, { mode: 0o644 });
    writeFileSync(join(directory, BUNDLE_NAME), `${this.#systemBundle}\n${proxy.caCertificatePem}`, {
      mode: 0o644,
    });
    this.#proxies.set(sessionKeyString(key), proxy);
  }

  /** Stops the session's proxy (its sandbox stopped or went away). */
  async detach(session: SessionKey): Promise<void> {
    const key = sessionKeyString(session);
    const proxy = this.#proxies.get(key);
    if (!proxy) return;
    this.#proxies.delete(key);
    await proxy.close().catch(() => undefined);
  }

  /**
   * A client for Berth's own requests on the session's behalf (`web_fetch`, remote MCP servers):
   * the same networking rules, address rules and audit as the session's proxy, without a sandbox.
   */
  async hostFetch(session: SessionRecord, environmentConfig: unknown): Promise<HostFetch> {
    const key: SessionKey = { tenantId: session.tenantId, id: session.id };
    // Answers are scanned for the session's secrets, like the proxy scans the sandbox's.
    const secrets = compilePolicy({
      networking: { type: 'unrestricted' },
      credentials: await this.#credentials(session),
      withheld: await this.#withheld(session),
    });
    return createHostFetch({
      policy: compilePolicy({ networking: networkingOf(environmentConfig, session), credentials: [] }),
      responseSwaps: secrets.responseSwapsEverywhere,
      destinations: this.#destinations,
      upstreamCaCertificates: this.#options.upstreamCaCertificates,
      onRequest: (record) => this.#options.onRequest(key, record),
    });
  }

  async closeAll(): Promise<void> {
    await Promise.all([...this.#proxies.keys()].map((key) => this.#proxies.get(key)?.close()));
    this.#proxies.clear();
  }
}
