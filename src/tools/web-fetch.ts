/**
 * The `web_fetch` tool of `agent_toolset_20260401`: fetches one URL from the Berth host under the
 * session's egress rules (`egress/host-fetch.ts`: the environment's `networking`, no private
 * addresses, audited as `berth.egress_request`) and gives the model readable text: HTML is turned
 * into plain text (html-to-text), text and JSON pass through, anything else is refused. The URL
 * comes from the model (and so possibly from a page it read): every rule applies to every
 * redirect hop too. The tool's own config narrows it further (`allowed_domains`,
 * `blocked_domains`, `max_content_tokens`).
 */
import type { JSONSchema7 } from '@ai-sdk/provider';
import { convert } from 'html-to-text';
import { z } from 'zod';
import { canonicalHost } from '../egress/addresses.js';
import { type HostFetch, Refusal } from '../egress/host-fetch.js';
import { TOOL_OUTPUT_LIMIT_BYTES, type ToolDefinition, type ToolResult } from './builtin-tools.js';

/** The tool's settings from the agent's toolset config (`BetaManagedAgentsWebFetchToolConfigParams`). */
export interface WebFetchConfig {
  /** Only these domains and their subdomains. */
  allowedDomains?: readonly string[];
  /** Never these domains or their subdomains. */
  blockedDomains?: readonly string[];
  /** Most text per call, in tokens (counted as 4 characters each). */
  maxContentTokens?: number | null;
}

/** Largest response body read (bytes); the rest is not downloaded. */
const MAX_BODY_BYTES = 5 * 1024 * 1024;
/** Whole fetch, redirects included. */
const FETCH_TIMEOUT_MS = 30_000;
const CHARACTERS_PER_TOKEN = 4;
const USER_AGENT = 'Berth-web_fetch/0.1 (+https://github.com/berth)';

const input = z
  .object({
    url: z
      .string()
      .min(1)
      .max(2048)
      .describe('The http or https URL to fetch (including the scheme, e.g. https://example.com/page).'),
  })
  .strict();

const { $schema: _ignored, ...inputSchema } = z.toJSONSchema(input, {
  target: 'draft-7',
  io: 'input',
}) as Record<string, unknown>;

export const webFetchDefinition: ToolDefinition = {
  name: 'web_fetch',
  description:
    "Fetch a web page or text document by URL and return its content as plain text (HTML is converted). Only http and https; the session's network policy decides which hosts are reachable.",
  inputSchema: inputSchema as JSONSchema7,
  readOnly: true,
};

const failed = (content: string): ToolResult => ({ content, isError: true });

/** True when `host` is `domain` or one of its subdomains. */
function withinDomain(host: string, domain: string): boolean {
  const wanted = canonicalHost(domain.trim()) ?? domain.trim().toLowerCase();
  return host === wanted || host.endsWith(`.${wanted}`);
}

/** Reads at most `limit` bytes of a body; says whether there was more. */
async function readCapped(response: Response, limit: number): Promise<{ bytes: Buffer; cut: boolean }> {
  const reader = response.body?.getReader();
  if (!reader) return { bytes: Buffer.alloc(0), cut: false };
  const chunks: Buffer[] = [];
  let size = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) return { bytes: Buffer.concat(chunks), cut: false };
    chunks.push(Buffer.from(value));
    size += value.byteLength;
    if (size > limit) {
      await reader.cancel().catch(() => undefined);
      return { bytes: Buffer.concat(chunks).subarray(0, limit), cut: true };
    }
  }
}

function charsetOf(contentType: string): string {
  const charset = /charset\s*=\s*"?([\w-]+)/i.exec(contentType)?.[1]?.toLowerCase() ?? 'utf-8';
  try {
    new TextDecoder(charset);
    return charset;
  } catch {
    return 'utf-8';
  }
}

/** The page's text: HTML converted (scripts, styles and images dropped; links kept as URLs). */
function pageText(body: string, html: boolean): { title?: string; text: string } {
  if (!html) return { text: body };
  const title = /<title[^>]*>([\s\S]*?)<\/title>/i.exec(body)?.[1]?.replace(/\s+/g, ' ').trim();
  const text = convert(body, {
    wordwrap: false,
    selectors: [
      { selector: 'img', format: 'skip' },
      { selector: 'a', options: { hideLinkHrefIfSameAsText: true, ignoreHref: false } },
      { selector: 'nav', format: 'skip' },
      { selector: 'head', format: 'skip' },
    ],
  });
  return {
    title: title && title.length > 0 ? title : undefined,
    text: text.replace(/\n{3,}/g, '\n\n').trim(),
  };
}

/** Runs `web_fetch` calls for one session. */
export function createWebFetch(options: {
  /** The session's host-side egress client (made on first use). */
  client: () => Promise<HostFetch>;
  config?: WebFetchConfig;
}): (rawInput: unknown, signal?: AbortSignal) => Promise<ToolResult> {
  const config = options.config ?? {};
  const limitChars = Math.min(
    config.maxContentTokens ? config.maxContentTokens * CHARACTERS_PER_TOKEN : Number.POSITIVE_INFINITY,
    TOOL_OUTPUT_LIMIT_BYTES,
  );
  const checkHop = (url: URL) => {
    const host = canonicalHost(url.hostname) ?? url.hostname;
    if (config.allowedDomains && !config.allowedDomains.some((domain) => withinDomain(host, domain))) {
      throw new Refusal(403, `${host} is not in this tool's allowed_domains`, 'denied');
    }
    if (config.blockedDomains?.some((domain) => withinDomain(host, domain))) {
      throw new Refusal(403, `${host} is in this tool's blocked_domains`, 'denied');
    }
  };

  return async (rawInput, signal) => {
    const parsed = input.safeParse(rawInput);
    if (!parsed.success) {
      return failed(
        `Invalid input for web_fetch: ${parsed.error.issues.map((issue) => issue.message).join('; ')}`,
      );
    }
    let url: URL;
    try {
      url = new URL(parsed.data.url);
    } catch {
      return failed(`web_fetch: not a URL: ${parsed.data.url}`);
    }
    const deadline = AbortSignal.timeout(FETCH_TIMEOUT_MS);
    const combined = signal ? AbortSignal.any([signal, deadline]) : deadline;
    try {
      const client = await options.client();
      const response = await client.fetch(url, {
        headers: {
          'user-agent': USER_AGENT,
          accept: 'text/html,application/xhtml+xml,text/plain;q=0.9,application/json;q=0.9,*/*;q=0.5',
        },
        signal: combined,
        checkHop,
        purpose: 'web_fetch',
      });
      const finalUrl = response.url || url.href;
      const contentType = response.headers.get('content-type') ?? '';
      const mediaType = contentType.split(';')[0]!.trim().toLowerCase();
      const html = mediaType === 'text/html' || mediaType === 'application/xhtml+xml';
      const textual =
        html ||
        mediaType.startsWith('text/') ||
        /[/+]json$/.test(mediaType) ||
        /[/+]xml$/.test(mediaType) ||
        mediaType === '';
      if (!textual) {
        await response.body?.cancel().catch(() => undefined);
        return failed(`web_fetch: ${finalUrl} is ${mediaType}; only text, HTML, JSON and XML can be read`);
      }
      const { bytes, cut } = await readCapped(response, MAX_BODY_BYTES);
      const body = new TextDecoder(charsetOf(contentType)).decode(bytes);
      const { title, text } = pageText(body, html);
      if (!response.ok) {
        return failed(
          `web_fetch: ${finalUrl} answered ${response.status} ${response.statusText}\n\n${text.slice(0, 2000)}`,
        );
      }
      let content = text;
      const notes: string[] = [];
      if (content.length > limitChars) {
        content = content.slice(0, limitChars);
        notes.push(`[content truncated to ${limitChars} characters]`);
      } else if (cut) {
        notes.push(`[only the first ${MAX_BODY_BYTES} bytes of the response were read]`);
      }
      const header = [`URL: ${finalUrl}`, ...(title ? [`Title: ${title}`] : [])].join('\n');
      return { content: [header, '', content || '(empty page)', ...notes].join('\n'), isError: false };
    } catch (error) {
      if (error instanceof Refusal) return failed(`web_fetch refused ${url.href}: ${error.message}`);
      if (signal?.aborted) return failed('web_fetch was cancelled');
      if (deadline.aborted)
        return failed(`web_fetch: ${url.href} did not answer within ${FETCH_TIMEOUT_MS / 1000} s`);
      const cause = error instanceof Error && error.cause instanceof Error ? ` (${error.cause.message})` : '';
      return failed(
        `web_fetch could not fetch ${url.href}: ${error instanceof Error ? error.message : String(error)}${cause}`,
      );
    }
  };
}
