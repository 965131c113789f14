import { z } from 'zod';
import { MODEL_PROVIDERS } from '../models/provider-registry.js';

/**
 * Request schemas, shaped like the official SDK's `client.beta.*` params. Unknown fields are
 * rejected (`strict`) so a typo is an error, not a silent no-op; `betas` and `workspace_id`
 * are accepted and ignored, as the SDK may send them.
 */

const metadata = z
  .record(z.string().max(64), z.string().max(512))
  .refine((value) => Object.keys(value).length <= 16, {
    message: 'at most 16 metadata keys',
  });
const nullableMetadataPatch = z.record(z.string().max(64), z.string().max(512).nullable());
const sdkExtras = { betas: z.array(z.string()).optional(), workspace_id: z.string().optional() };

const permissionPolicy = z.object({ type: z.enum(['always_allow', 'always_ask', 'auto']) }).strict();

/** Built-in tool names of `agent_toolset_20260401`. */
export const builtinToolNames = [
  'bash',
  'edit',
  'read',
  'write',
  'glob',
  'grep',
  'web_fetch',
  'web_search',
] as const;

const sandboxToolNames = ['bash', 'edit', 'read', 'write', 'glob', 'grep'] as const;

/** Fields every built-in tool's config has. */
const toolConfigBase = {
  enabled: z.boolean().nullable().optional(),
  permission_policy: permissionPolicy.nullable().optional(),
};

const urlSourceShorthand = z.enum(['all', 'none']);
const urlSourceAll = z.object({ type: z.literal('all') }).strict();
const urlSourceNone = z.object({ type: z.literal('none') }).strict();
const toolReferences = z
  .array(z.object({ type: z.literal('tool_reference'), name: z.string().min(1) }).strict())
  .max(1024);
const urlSourceToolFilter = z.union([
  urlSourceShorthand,
  z.discriminatedUnion('type', [
    urlSourceAll,
    urlSourceNone,
    z.object({ type: z.literal('only'), tools: toolReferences }).strict(),
    z.object({ type: z.literal('except'), tools: toolReferences }).strict(),
  ]),
]);

/** `web_fetch`'s `url_sources` (official `BetaManagedAgentsWebFetchURLSourcesParams`). */
const urlSources = z
  .object({
    client_tool_results: urlSourceToolFilter.nullable().optional(),
    server_tool_results: urlSourceToolFilter.nullable().optional(),
    user_input: z
      .union([urlSourceShorthand, z.discriminatedUnion('type', [urlSourceAll, urlSourceNone])])
      .nullable()
      .optional(),
  })
  .strict();
export type UrlSourcesParams = z.infer<typeof urlSources>;

/** `url_sources` as the official API shows it: every field present, shorthands expanded. */
export function resolveUrlSources(sources: UrlSourcesParams | null | undefined) {
  if (!sources) return null;
  const expand = <T>(value: T | 'all' | 'none' | null | undefined) =>
    value === undefined || value === null ? null : typeof value === 'string' ? { type: value } : value;
  return {
    client_tool_results: expand(sources.client_tool_results),
    server_tool_results: expand(sources.server_tool_results),
    user_input: expand(sources.user_input),
  };
}

const domains = z.array(z.string().min(1)).max(1024).optional();

/** A built-in tool's config: the fields the official SDK gives that tool, and no others. */
const toolConfigParams = z.discriminatedUnion('name', [
  z
    .object({ name: z.enum(sandboxToolNames), type: z.enum(sandboxToolNames).optional(), ...toolConfigBase })
    .strict(),
  z
    .object({
      name: z.literal('web_fetch'),
      type: z.literal('web_fetch').optional(),
      ...toolConfigBase,
      allowed_domains: domains,
      blocked_domains: domains,
      max_content_tokens: z.number().int().positive().nullable().optional(),
      url_sources: urlSources.nullable().optional(),
    })
    .strict(),
  z
    .object({
      name: z.literal('web_search'),
      type: z.literal('web_search').optional(),
      ...toolConfigBase,
      allowed_domains: domains,
      blocked_domains: domains,
      user_location: z
        .object({
          type: z.literal('approximate'),
          city: z.string().max(255).nullable().optional(),
          country: z.string().max(255).nullable().optional(),
          region: z.string().max(255).nullable().optional(),
          timezone: z.string().max(255).nullable().optional(),
        })
        .strict()
        .nullable()
        .optional(),
    })
    .strict(),
]);

const defaultConfigParams = z
  .object({
    enabled: z.boolean().nullable().optional(),
    permission_policy: permissionPolicy.nullable().optional(),
  })
  .strict();

const agentToolset = z
  .object({
    type: z.literal('agent_toolset_20260401'),
    configs: z.array(toolConfigParams).optional(),
    default_config: defaultConfigParams.nullable().optional(),
  })
  .strict();

const mcpToolset = z
  .object({
    type: z.literal('mcp_toolset'),
    mcp_server_name: z.string().min(1),
    configs: z
      .array(
        z
          .object({
            name: z.string().min(1),
            enabled: z.boolean().nullable().optional(),
            permission_policy: permissionPolicy.nullable().optional(),
          })
          .strict(),
      )
      .optional(),
    default_config: defaultConfigParams.nullable().optional(),
  })
  .strict();

const customTool = z
  .object({
    type: z.literal('custom'),
    name: z
      .string()
      .regex(/^[a-zA-Z0-9_-]{1,64}$/, 'tool names are 1-64 characters of letters, digits, _ and -'),
    description: z.string().min(1),
    input_schema: z.object({ type: z.literal('object') }).passthrough(),
  })
  .strict();

const tool = z.discriminatedUnion('type', [agentToolset, mcpToolset, customTool]);

/** `<provider>/<model>` with a known provider, or a bare `claude-*` id. */
export const modelId = z
  .string()
  .min(1)
  .refine(
    (value) =>
      /^claude-/.test(value) ||
      MODEL_PROVIDERS.some(
        (provider) => value.startsWith(`${provider}/`) && value.length > provider.length + 1,
      ),
    {
      message: `model must be "<provider>/<model>" with provider ${MODEL_PROVIDERS.join(', ')}, or a bare claude-* id`,
    },
  );

const modelConfig = z.union([
  modelId,
  z
    .object({
      id: modelId,
      effort: z
        .union([z.enum(['low', 'medium', 'high', 'xhigh', 'max']), z.object({ type: z.string() })])
        .nullable()
        .optional(),
      inference_geo: z.string().nullable().optional(),
      speed: z.enum(['standard', 'fast']).nullable().optional(),
    })
    .strict(),
]);

const mcpServerName = z
  .string()
  .regex(/^[a-zA-Z0-9_-]{1,32}$/, 'MCP server names are 1-32 characters of letters, digits, _ and -');

/**
 * MCP servers: `url` (streamable HTTP, as in the official API) or Berth's `stdio`, a command
 * started inside the session's sandbox.
 */
const mcpServer = z.discriminatedUnion('type', [
  z.object({ name: mcpServerName, type: z.literal('url'), url: z.string().url() }).strict(),
  z
    .object({
      name: mcpServerName,
      type: z.literal('stdio'),
      command: z.string().min(1),
      args: z.array(z.string()).max(64).optional(),
      env: z.record(z.string().regex(/^[A-Za-z_][A-Za-z0-9_]*$/), z.string()).optional(),
    })
    .strict(),
]);
const skill = z
  .object({
    type: z.enum(['anthropic', 'custom']),
    skill_id: z.string().min(1),
    version: z.string().nullable().optional(),
  })
  .strict();
const executionIdentity = z.union([
  z.object({ type: z.literal('service_account') }).strict(),
  z.object({ type: z.literal('aws_role'), role_arn: z.string() }).strict(),
]);

export const agentCreate = z
  .object({
    name: z.string().min(1).max(256),
    model: modelConfig,
    description: z.string().max(2048).nullable().optional(),
    system: z.string().max(100_000).nullable().optional(),
    tools: z.array(tool).max(1024).optional(),
    mcp_servers: z.array(mcpServer).max(32).optional(),
    skills: z.array(skill).max(64).optional(),
    metadata: metadata.optional(),
    execution_identity: executionIdentity.nullable().optional(),
    multiagent: z.unknown().optional(),
    ...sdkExtras,
  })
  .strict();
export type AgentCreate = z.infer<typeof agentCreate>;

export const agentUpdate = z
  .object({
    name: z.string().min(1).max(256).optional(),
    model: modelConfig.optional(),
    description: z.string().max(2048).nullable().optional(),
    system: z.string().max(100_000).nullable().optional(),
    tools: z.array(tool).max(1024).nullable().optional(),
    mcp_servers: z.array(mcpServer).max(32).nullable().optional(),
    skills: z.array(skill).max(64).nullable().optional(),
    metadata: nullableMetadataPatch.nullable().optional(),
    execution_identity: executionIdentity.nullable().optional(),
    multiagent: z.unknown().optional(),
    /** Optimistic concurrency: the version the caller last saw. */
    version: z.number().int().positive().optional(),
    ...sdkExtras,
  })
  .strict();
export type AgentUpdate = z.infer<typeof agentUpdate>;

const network = z.discriminatedUnion('type', [
  z.object({ type: z.literal('unrestricted') }).strict(),
  z
    .object({
      type: z.literal('limited'),
      allowed_hosts: z.array(z.string().min(1)).nullable().optional(),
      allow_mcp_servers: z.boolean().nullable().optional(),
      allow_package_managers: z.boolean().nullable().optional(),
    })
    .strict(),
]);

const packageList = z.array(z.string().min(1)).nullable().optional();

/** Berth's own environment settings, under `config.berth`. */
const berthEnvironmentConfig = z
  .object({
    driver: z.string().min(1).optional(),
    limits: z
      .object({
        cpu: z.number().positive().max(64).optional(),
        memory_mb: z.number().int().min(16).max(1_048_576).optional(),
        pids: z.number().int().min(8).max(1_000_000).optional(),
        disk_mb: z.number().int().min(1).max(10_485_760).optional(),
      })
      .strict()
      .optional(),
    lifecycle: z
      .object({
        // The lower bound (60 s unless BERTH_MIN_LIFECYCLE_S says less) is checked with the config.
        idle_timeout_s: z.number().int().positive().optional(),
        max_lifetime_s: z.number().int().positive().optional(),
      })
      .strict()
      .optional(),
  })
  .strict();

const environmentConfig = z.discriminatedUnion('type', [
  z
    .object({
      type: z.literal('cloud'),
      networking: network.nullable().optional(),
      packages: z
        .object({
          type: z.literal('packages').optional(),
          apt: packageList,
          cargo: packageList,
          gem: packageList,
          go: packageList,
          npm: packageList,
          pip: packageList,
        })
        .strict()
        .nullable()
        .optional(),
      berth: berthEnvironmentConfig.optional(),
    })
    .strict(),
  z.object({ type: z.literal('self_hosted') }).strict(),
]);
export type EnvironmentConfigParams = z.infer<typeof environmentConfig>;

export const environmentCreate = z
  .object({
    name: z.string().min(1).max(256),
    config: environmentConfig.nullable().optional(),
    description: z.string().max(2048).nullable().optional(),
    metadata: metadata.optional(),
    scope: z.enum(['organization', 'account']).nullable().optional(),
    ...sdkExtras,
  })
  .strict();

export const environmentUpdate = z
  .object({
    name: z.string().min(1).max(256).nullable().optional(),
    config: environmentConfig.nullable().optional(),
    description: z.string().max(2048).nullable().optional(),
    metadata: nullableMetadataPatch.optional(),
    scope: z.enum(['organization', 'account']).nullable().optional(),
    ...sdkExtras,
  })
  .strict();

const textBlock = z.object({ type: z.literal('text'), text: z.string() }).strict();
const imageBlock = z
  .object({ type: z.literal('image'), source: z.object({ type: z.string() }).passthrough() })
  .strict();
const documentBlock = z
  .object({
    type: z.literal('document'),
    source: z.object({ type: z.string() }).passthrough(),
    context: z.string().nullable().optional(),
    title: z.string().nullable().optional(),
  })
  .strict();
const userContent = z.array(z.discriminatedUnion('type', [textBlock, imageBlock, documentBlock])).min(1);
const resultContent = z.array(z.discriminatedUnion('type', [textBlock, imageBlock, documentBlock]));

export const userMessageEvent = z.object({ type: z.literal('user.message'), content: userContent }).strict();

/** The events a client may send, by type. */
export const clientEvent = z.discriminatedUnion('type', [
  userMessageEvent,
  z.object({ type: z.literal('user.interrupt') }).strict(),
  z
    .object({
      type: z.literal('user.tool_confirmation'),
      tool_use_id: z.string().min(1),
      result: z.enum(['allow', 'deny']),
      deny_message: z.string().nullable().optional(),
    })
    .strict(),
  z
    .object({
      type: z.literal('user.custom_tool_result'),
      custom_tool_use_id: z.string().min(1),
      content: resultContent.optional(),
      is_error: z.boolean().nullable().optional(),
    })
    .strict(),
]);
export type ClientEvent = z.infer<typeof clientEvent>;

/** Client event types Berth knows but does not support yet, with the reason. */
export const unsupportedClientEventTypes: Record<string, string> = {
  'user.define_outcome': 'outcomes are not supported by Berth yet',
  'user.tool_result': 'user.tool_result is for self-hosted tool runners, which Berth does not support yet',
  'system.message': 'system.message events are not supported by Berth yet',
};

export const eventSend = z.object({ events: z.array(z.unknown()).min(1).max(100), ...sdkExtras }).strict();

/**
 * An event of `sessions.create`'s `initial_events`: a `user.message`. A `user.define_outcome`
 * (which the SDK allows there too) is refused with its reason, in one clear message.
 */
const initialEvent = z.discriminatedUnion('type', [
  userMessageEvent,
  z
    .object({ type: z.literal('user.define_outcome') })
    .passthrough()
    .refine(() => false, { message: unsupportedClientEventTypes['user.define_outcome']! }),
]);

const budget = z
  .object({
    type: z.literal('limit'),
    max_list_cost: z
      .object({ amount: z.union([z.string(), z.number()]), currency: z.string() })
      .passthrough(),
  })
  .strict();

/**
 * An agent plus replacements for this session only (official
 * `BetaManagedAgentsAgentWithOverridesParams`): each given field replaces the agent's whole
 * value; the agent itself is unchanged.
 */
const agentWithOverrides = z
  .object({
    type: z.literal('agent_with_overrides'),
    id: z.string().min(1),
    version: z.number().int().positive().optional(),
    model: modelConfig.optional(),
    system: z.string().max(100_000).nullable().optional(),
    tools: z.array(tool).max(1024).optional(),
    mcp_servers: z.array(mcpServer).max(32).optional(),
    skills: z.array(skill).max(64).optional(),
  })
  .strict();
export type AgentWithOverrides = z.infer<typeof agentWithOverrides>;

export const sessionCreate = z
  .object({
    agent: z.union([
      z.string().min(1),
      z
        .object({
          type: z.literal('agent'),
          id: z.string().min(1),
          version: z.number().int().positive().optional(),
        })
        .strict(),
      agentWithOverrides,
    ]),
    environment_id: z.string().min(1),
    budget: budget.optional(),
    initial_events: z.array(initialEvent).max(100).optional(),
    metadata: metadata.optional(),
    resources: z.array(z.unknown()).max(0, 'session resources are not supported by Berth yet').optional(),
    title: z.string().max(512).nullable().optional(),
    /** Vaults whose credentials the session may use (checked: the tenant's, not archived). */
    vault_ids: z.array(z.string().min(1).max(128)).max(32).optional(),
    ...sdkExtras,
  })
  .strict();

export const sessionUpdate = z
  .object({
    metadata: nullableMetadataPatch.nullable().optional(),
    title: z.string().max(512).nullable().optional(),
    budget: budget.nullable().optional(),
    // As in the official API: vaults are attached when a session is created, not later.
    vault_ids: z
      .array(z.string())
      .max(
        0,
        "vault_ids can only be set when a session is created; create a new session to change a session's vaults",
      )
      .optional(),
    agent: z.unknown().optional(),
    ...sdkExtras,
  })
  .strict();

/** Every event type of the official API (the `types[]` filter accepts only these, plus `berth.*`). */
export const knownEventTypes = new Set([
  'user.message',
  'user.interrupt',
  'user.tool_confirmation',
  'user.custom_tool_result',
  'agent.custom_tool_use',
  'agent.message',
  'agent.thinking',
  'agent.mcp_tool_use',
  'agent.mcp_tool_result',
  'agent.tool_use',
  'agent.tool_result',
  'agent.thread_message_received',
  'agent.thread_message_sent',
  'agent.thread_context_compacted',
  'session.error',
  'session.status_rescheduled',
  'session.status_running',
  'session.status_idle',
  'session.status_terminated',
  'session.thread_created',
  'span.outcome_evaluation_start',
  'span.outcome_evaluation_end',
  'span.model_request_start',
  'span.model_request_end',
  'span.outcome_evaluation_ongoing',
  'user.define_outcome',
  'session.thread_status_running',
  'session.thread_status_idle',
  'session.thread_status_terminated',
  'user.tool_result',
  'session.thread_status_rescheduled',
  'session.updated',
  'system.message',
  'session.usage',
]);

/** Names of tenants and users: short, readable, safe in URLs and logs. */
export const principalName = z
  .string()
  .regex(
    /^[a-z0-9][a-z0-9._-]{0,62}$/,
    'use 1–63 lower-case letters, digits, ".", "_" or "-", starting with a letter or digit',
  );

/** `POST /v1/users` (admins): a user of the caller's tenant. */
export const userCreate = z
  .object({ name: principalName, role: z.enum(['admin', 'member']).default('member') })
  .strict();

/** `POST /v1/users/{id}` (admins): a user's new role. */
export const userUpdate = z.object({ role: z.enum(['admin', 'member']) }).strict();

/** `POST /v1/api_keys`: a key for the caller, or (admins) for a user of the tenant. */
export const apiKeyCreate = z
  .object({
    name: z.string().min(1).max(100),
    user_id: z.string().min(1).max(100).optional(),
    /** Absolute expiry (RFC 3339), or… */
    expires_at: z.iso.datetime({ offset: true }).optional(),
    /** …seconds from now. */
    expires_in_seconds: z
      .number()
      .int()
      .min(1)
      .max(10 * 365 * 86_400)
      .optional(),
  })
  .strict()
  .refine((value) => value.expires_at === undefined || value.expires_in_seconds === undefined, {
    message: 'give expires_at or expires_in_seconds, not both',
  });

const vaultDisplayName = z.string().min(1).max(255);

/** `POST /v1/vaults` (official `VaultCreateParams`). */
export const vaultCreate = z
  .object({ display_name: vaultDisplayName, metadata: metadata.optional(), ...sdkExtras })
  .strict();

/** `POST /v1/vaults/{id}` (official `VaultUpdateParams`). */
export const vaultUpdate = z
  .object({
    display_name: vaultDisplayName.nullable().optional(),
    metadata: nullableMetadataPatch.nullable().optional(),
    ...sdkExtras,
  })
  .strict();

/**
 * A secret sent to the vault: write-only, never echoed (zod messages here name limits, not
 * values). Tokens go into HTTP headers, so line breaks are refused.
 */
const secretText = z.string().min(1).max(16_384);
const headerSecret = secretText.refine((value) => !/[\r\n]/.test(value), {
  message: 'must not contain line breaks',
});

const httpUrl = z
  .string()
  .max(2048)
  .refine((value) => {
    try {
      const url = new URL(value);
      return (
        (url.protocol === 'https:' || url.protocol === 'http:') && url.username === '' && url.password === ''
      );
    } catch {
      return false;
    }
  }, 'must be an http(s) URL without credentials in it');

const hostLabel = '[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?';
/** A bare host name or IPv4 address, optionally behind `*.` (checked below: two labels or more). */
const allowedHostPattern = new RegExp(`^(?:\\*\\.)?${hostLabel}(?:\\.${hostLabel})*$`);
const allowedHost = z
  .string()
  .max(253)
  .transform((value) => value.toLowerCase())
  .refine(
    (value) => allowedHostPattern.test(value) && !/^\*\.[^.]+$/.test(value),
    'each allowed host is a bare host name (api.example.com), an IPv4 address, or *.example.com; no URLs, ports, paths or IPv6',
  );

const credentialNetworking = z.discriminatedUnion('type', [
  z.object({ type: z.literal('unrestricted') }).strict(),
  z.object({ type: z.literal('limited'), allowed_hosts: z.array(allowedHost).min(1).max(16) }).strict(),
]);

const injectionLocation = z.object({ header: z.boolean().optional(), body: z.boolean().optional() }).strict();

/** Environment variable names: POSIX-style, so the sandbox can hold them. */
const secretName = z
  .string()
  .regex(
    /^[A-Za-z_][A-Za-z0-9_]{0,255}$/,
    'must be an environment variable name: letters, digits and _, not starting with a digit',
  );

const tokenEndpointAuth = z.discriminatedUnion('type', [
  z.object({ type: z.literal('none') }).strict(),
  z.object({ type: z.literal('client_secret_basic'), client_secret: headerSecret }).strict(),
  z.object({ type: z.literal('client_secret_post'), client_secret: headerSecret }).strict(),
]);

const optionalText = z.string().max(2048).nullable().optional();

/** Auth of a new credential (official `BetaManagedAgents*CreateParams`). */
export const credentialAuthCreate = z.discriminatedUnion('type', [
  z.object({ type: z.literal('static_bearer'), token: headerSecret, mcp_server_url: httpUrl }).strict(),
  z
    .object({
      type: z.literal('environment_variable'),
      secret_name: secretName,
      secret_value: secretText,
      networking: credentialNetworking,
      injection_location: injectionLocation.optional(),
    })
    .strict(),
  z
    .object({
      type: z.literal('mcp_oauth'),
      access_token: headerSecret,
      mcp_server_url: httpUrl,
      expires_at: z.iso.datetime({ offset: true }).nullable().optional(),
      refresh: z
        .object({
          client_id: z.string().min(1).max(1024),
          refresh_token: headerSecret,
          token_endpoint: httpUrl,
          token_endpoint_auth: tokenEndpointAuth,
          resource: optionalText,
          scope: optionalText,
        })
        .strict()
        .nullable()
        .optional(),
    })
    .strict(),
]);
export type CredentialAuthCreate = z.infer<typeof credentialAuthCreate>;

/** `POST /v1/vaults/{id}/credentials` (official `CredentialCreateParams`). */
export const credentialCreate = z
  .object({
    auth: credentialAuthCreate,
    display_name: z.string().max(255).nullable().optional(),
    metadata: metadata.optional(),
    ...sdkExtras,
  })
  .strict();

const secretTokenEndpointUpdate = (type: 'client_secret_basic' | 'client_secret_post') =>
  z.object({ type: z.literal(type), client_secret: headerSecret.nullable().optional() }).strict();

/** Auth changes of a credential; `type` must be the credential's (official `*UpdateParams`). */
export const credentialAuthUpdate = z.discriminatedUnion('type', [
  z.object({ type: z.literal('static_bearer'), token: headerSecret.nullable().optional() }).strict(),
  z
    .object({
      type: z.literal('environment_variable'),
      secret_value: secretText.nullable().optional(),
      networking: credentialNetworking.nullable().optional(),
      injection_location: injectionLocation.optional(),
    })
    .strict(),
  z
    .object({
      type: z.literal('mcp_oauth'),
      access_token: headerSecret.nullable().optional(),
      expires_at: z.iso.datetime({ offset: true }).nullable().optional(),
      refresh: z
        .object({
          refresh_token: headerSecret.nullable().optional(),
          scope: optionalText,
          token_endpoint_auth: z
            .discriminatedUnion('type', [
              secretTokenEndpointUpdate('client_secret_basic'),
              secretTokenEndpointUpdate('client_secret_post'),
            ])
            .optional(),
        })
        .strict()
        .nullable()
        .optional(),
    })
    .strict(),
]);
export type CredentialAuthUpdate = z.infer<typeof credentialAuthUpdate>;

/** `POST /v1/vaults/{vault_id}/credentials/{id}` (official `CredentialUpdateParams`). */
export const credentialUpdate = z
  .object({
    auth: credentialAuthUpdate.optional(),
    display_name: z.string().min(1).max(255).nullable().optional(),
    metadata: nullableMetadataPatch.nullable().optional(),
    ...sdkExtras,
  })
  .strict();
