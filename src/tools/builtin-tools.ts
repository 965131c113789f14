/**
 * The built-in toolset (`agent_toolset_20260401`): bash, read, write, edit, glob and grep with
 * the official input shapes. Every tool runs inside the session's sandbox through the driver
 * port; nothing here touches the host filesystem. A bad input or a failed operation is an error
 * result for the model, never a thrown exception.
 */
import type { JSONSchema7 } from '@ai-sdk/provider';
import { z } from 'zod';
import { isBerthError } from '../errors.js';
import type { SandboxDriver, SandboxHandle } from '../sandbox/driver.js';

/** What a tool call returns to the model. */
export interface ToolResult {
  content: string;
  isError: boolean;
}

/** A tool as the model sees it; `readOnly` tools may be re-run after a crash. */
export interface ToolDefinition {
  name: string;
  description: string;
  inputSchema: JSONSchema7;
  readOnly: boolean;
}

/** Gives the executor the session's sandbox, provisioning it on the first call. */
export interface SandboxAccess {
  get(): Promise<SandboxHandle>;
}

/** Runs built-in tools by name. */
export interface BuiltinToolExecutor {
  execute(name: string, input: unknown, options?: { signal?: AbortSignal }): Promise<ToolResult>;
}

/** Largest tool output handed to the model (bash, grep, glob, read). */
export const TOOL_OUTPUT_LIMIT_BYTES = 100_000;
const DEFAULT_BASH_TIMEOUT_MS = 120_000;
const MAX_BASH_TIMEOUT_MS = 600_000;
/** Files larger than this are not read or edited whole. */
const MAX_FILE_BYTES = 10 * 1024 * 1024;
const DEFAULT_READ_LINES = 2000;
const MAX_GLOB_RESULTS = 1000;

const bashInput = z
  .object({
    command: z.string().min(1).optional().describe('The shell command to run (bash, in /workspace).'),
    timeout_ms: z
      .number()
      .int()
      .positive()
      .max(MAX_BASH_TIMEOUT_MS)
      .optional()
      .describe(`Kill the command after this many milliseconds (default ${DEFAULT_BASH_TIMEOUT_MS}).`),
    restart: z.boolean().optional().describe('Restart the shell.'),
  })
  .strict()
  .refine((input) => input.command !== undefined || input.restart === true, {
    message: 'command is required unless restart is true',
  });

const readInput = z
  .object({
    file_path: z.string().min(1).describe('File to read, relative to /workspace or absolute.'),
    view_range: z
      .tuple([z.number().int().min(1), z.number().int().min(-1)])
      .optional()
      .describe('[start, end] 1-based line numbers, inclusive; end -1 means to the end of the file.'),
  })
  .strict();

const writeInput = z
  .object({
    file_path: z.string().min(1).describe('File to write, relative to /workspace or absolute.'),
    content: z.string().describe('The full new content of the file.'),
  })
  .strict();

const editInput = z
  .object({
    file_path: z.string().min(1).describe('File to edit, relative to /workspace or absolute.'),
    old_string: z.string().min(1).describe('Exact text to replace.'),
    new_string: z.string().describe('Replacement text.'),
    replace_all: z
      .boolean()
      .optional()
      .describe('Replace every occurrence (default: exactly one must exist).'),
  })
  .strict();

const globInput = z
  .object({
    pattern: z.string().min(1).describe('Glob pattern such as `**/*.ts`.'),
    path: z.string().min(1).optional().describe('Directory to search in (default /workspace).'),
  })
  .strict();

const grepInput = z
  .object({
    pattern: z.string().min(1).describe('Extended regular expression to search file contents for.'),
    path: z.string().min(1).optional().describe('File or directory to search (default /workspace).'),
  })
  .strict();

const schemas = {
  bash: bashInput,
  read: readInput,
  write: writeInput,
  edit: editInput,
  glob: globInput,
  grep: grepInput,
} as const;

type ToolName = keyof typeof schemas;

const descriptions: Record<ToolName, { description: string; readOnly: boolean }> = {
  bash: {
    description:
      'Run a bash command in the sandbox (working directory /workspace). stdout and stderr are returned together; a non-zero exit code is reported.',
    readOnly: false,
  },
  read: {
    description: 'Read a text file from the sandbox, with line numbers. Use view_range to read part of it.',
    readOnly: true,
  },
  write: { description: 'Create or overwrite a file in the sandbox.', readOnly: false },
  edit: {
    description:
      'Replace old_string with new_string in a file. old_string must occur exactly once unless replace_all is true.',
    readOnly: false,
  },
  glob: { description: 'List files matching a glob pattern (supports **).', readOnly: true },
  grep: {
    description: 'Search file contents with an extended regular expression; prints file:line:text.',
    readOnly: true,
  },
};

/** The built-in tools' definitions, in the order the model sees them. */
export const builtinToolDefinitions: readonly ToolDefinition[] = (Object.keys(schemas) as ToolName[]).map(
  (name) => {
    const { $schema: _ignored, ...inputSchema } = z.toJSONSchema(schemas[name], {
      target: 'draft-7',
      io: 'input',
    }) as Record<string, unknown>;
    return { name, ...descriptions[name], inputSchema: inputSchema as JSONSchema7 };
  },
);

const ok = (content: string): ToolResult => ({ content, isError: false });
const failed = (content: string): ToolResult => ({ content, isError: true });

/** Cuts text to the output limit and says so. */
function capOutput(text: string, alreadyTruncated = false): string {
  const bytes = Buffer.from(text, 'utf8');
  if (bytes.length <= TOOL_OUTPUT_LIMIT_BYTES && !alreadyTruncated) return text;
  const kept = bytes.subarray(0, TOOL_OUTPUT_LIMIT_BYTES).toString('utf8');
  return `${kept}\n[output truncated: only the first ${TOOL_OUTPUT_LIMIT_BYTES} bytes are shown]`;
}

function errorMessage(error: unknown): string {
  if (isBerthError(error, 'not_found'))
    return `File not found: ${error.message.replace(/^no such file: /, '')}`;
  return error instanceof Error ? error.message : String(error);
}

function countOccurrences(text: string, needle: string): number {
  let count = 0;
  for (let index = text.indexOf(needle); index !== -1; index = text.indexOf(needle, index + needle.length)) {
    count += 1;
  }
  return count;
}

/** Creates the executor for the built-in tools of one session. */
export function createBuiltinToolExecutor(
  driver: SandboxDriver,
  sandbox: SandboxAccess,
): BuiltinToolExecutor {
  const readText = async (handle: SandboxHandle, path: string) => {
    const bytes = await driver.readFile(handle, path, MAX_FILE_BYTES + 1);
    if (bytes.byteLength > MAX_FILE_BYTES) {
      throw new Error(
        `${path} is larger than ${MAX_FILE_BYTES} bytes; use bash (head, sed) to read parts of it`,
      );
    }
    return Buffer.from(bytes).toString('utf8');
  };

  const tools: {
    [Name in ToolName]: (
      input: z.output<(typeof schemas)[Name]>,
      handle: SandboxHandle,
      signal?: AbortSignal,
    ) => Promise<ToolResult>;
  } = {
    async bash(input, handle, signal) {
      if (input.command === undefined) return ok('Shell restarted.');
      const timeoutMs = input.timeout_ms ?? DEFAULT_BASH_TIMEOUT_MS;
      // One stream, so stdout and stderr stay in the order the command wrote them.
      const result = await driver.exec(handle, ['bash', '-c', `exec 2>&1\n${input.command}`], {
        timeoutMs,
        signal,
        maxOutputBytes: TOOL_OUTPUT_LIMIT_BYTES,
      });
      let content = capOutput(result.stdout + result.stderr, result.truncated);
      if (result.timedOut)
        return failed(`${content}\n[command timed out after ${timeoutMs} ms and was killed]`);
      if (signal?.aborted) return failed(`${content}\n[command interrupted]`);
      if (result.exitCode === null) content += `\n[killed by signal ${result.signal ?? 'unknown'}]`;
      else if (result.exitCode !== 0) content += `\n[exit code: ${result.exitCode}]`;
      return ok(content.length > 0 ? content : '(no output)');
    },

    async read(input, handle) {
      const text = await readText(handle, input.file_path);
      if (text.length === 0) return ok('(empty file)');
      const lines = text.endsWith('\n') ? text.slice(0, -1).split('\n') : text.split('\n');
      const [start, requestedEnd] = input.view_range ?? [1, -1];
      if (start > lines.length) {
        return failed(`view_range starts at line ${start} but the file has ${lines.length} lines`);
      }
      let end = requestedEnd === -1 ? lines.length : Math.min(requestedEnd, lines.length);
      if (end < start) return failed(`view_range end (${requestedEnd}) is before its start (${start})`);
      let note = '';
      if (input.view_range === undefined && end - start + 1 > DEFAULT_READ_LINES) {
        end = start + DEFAULT_READ_LINES - 1;
        note = `\n[showing lines ${start}-${end} of ${lines.length}; pass view_range to read more]`;
      }
      const numbered = lines
        .slice(start - 1, end)
        .map((line, index) => `${String(start + index).padStart(6)}\t${line}`)
        .join('\n');
      return ok(capOutput(numbered) + note);
    },

    async write(input, handle) {
      await driver.writeFile(handle, input.file_path, input.content);
      return ok(`Wrote ${Buffer.byteLength(input.content)} bytes to ${input.file_path}`);
    },

    async edit(input, handle) {
      const text = await readText(handle, input.file_path);
      const occurrences = countOccurrences(text, input.old_string);
      if (occurrences === 0) return failed(`old_string was not found in ${input.file_path}`);
      if (occurrences > 1 && input.replace_all !== true) {
        return failed(
          `old_string occurs ${occurrences} times in ${input.file_path}; add context to make it unique or set replace_all`,
        );
      }
      const updated = input.replace_all
        ? text.split(input.old_string).join(input.new_string)
        : text.replace(input.old_string, () => input.new_string);
      await driver.writeFile(handle, input.file_path, updated);
      return ok(`Replaced ${occurrences} occurrence${occurrences === 1 ? '' : 's'} in ${input.file_path}`);
    },

    async glob(input, handle) {
      // The pattern is expanded by bash from a variable: globbing happens, command
      // substitution does not. IFS is empty so spaces in the pattern are not split.
      const script =
        'shopt -s globstar nullglob extglob; IFS=; n=0; for f in $1; do printf "%s\\n" "$f"; n=$((n+1)); ' +
        `[ $n -ge ${MAX_GLOB_RESULTS} ] && { echo "[more than ${MAX_GLOB_RESULTS} matches; narrow the pattern]"; break; }; done`;
      const result = await driver.exec(handle, ['bash', '-c', script, 'glob', input.pattern], {
        cwd: input.path,
        timeoutMs: 60_000,
        maxOutputBytes: TOOL_OUTPUT_LIMIT_BYTES,
      });
      if (result.exitCode !== 0 && result.stdout.length === 0) {
        return failed(result.stderr.trim() || `glob failed with exit code ${result.exitCode}`);
      }
      if (result.stdout.length === 0) return ok('No files matched.');
      return ok(capOutput(result.stdout.trimEnd(), result.truncated));
    },

    async grep(input, handle) {
      const argv = ['grep', '-r', '-n', '-I', '-E', '--exclude-dir=.git', '--', input.pattern];
      if (input.path !== undefined) argv.push(input.path);
      const result = await driver.exec(handle, argv, {
        timeoutMs: 60_000,
        maxOutputBytes: TOOL_OUTPUT_LIMIT_BYTES,
      });
      if (result.exitCode === 1 && result.stdout.length === 0) return ok('No matches found.');
      if (result.exitCode !== 0 && result.exitCode !== 1 && result.stdout.length === 0) {
        return failed(result.stderr.trim() || `grep failed with exit code ${result.exitCode}`);
      }
      return ok(capOutput(result.stdout.trimEnd(), result.truncated));
    },
  };

  return {
    async execute(name, input, options = {}) {
      if (!Object.hasOwn(schemas, name)) {
        return failed(`Unknown tool: ${name}. Available tools: ${Object.keys(schemas).join(', ')}`);
      }
      const toolName = name as ToolName;
      const parsed = schemas[toolName].safeParse(input);
      if (!parsed.success) {
        const problems = parsed.error.issues
          .map((issue) => `${issue.path.length > 0 ? issue.path.join('.') : 'input'}: ${issue.message}`)
          .join('; ');
        return failed(`Invalid input for ${toolName}: ${problems}`);
      }
      try {
        const handle = await sandbox.get();
        const run = tools[toolName] as (
          input: unknown,
          handle: SandboxHandle,
          signal?: AbortSignal,
        ) => Promise<ToolResult>;
        return await run(parsed.data, handle, options.signal);
      } catch (error) {
        return failed(`${toolName} failed: ${errorMessage(error)}`);
      }
    },
  };
}
