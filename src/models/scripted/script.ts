import { readFile } from 'node:fs/promises';
import { z } from 'zod';
import { BerthError } from '../../errors.js';

/**
 * One model response in a script. `text` and string values inside tool inputs may use the
 * templates `{{last_user_message}}` and `{{last_tool_result}}`.
 */
export interface ScriptStep {
  /** Assistant text for this response. */
  text?: string;
  /** Reasoning ("thinking") emitted before the text. */
  reasoning?: string;
  /** Tool calls; when present the response finishes with `tool-calls`. */
  toolCalls?: Array<{ toolName: string; input: Record<string, unknown> }>;
  /** Wait this long before the first stream part (honours the abort signal). */
  delayMs?: number;
  /** Fail the call with a retryable APICallError carrying this message. */
  error?: string;
}

/** A named, ordered list of responses played by the scripted model. */
export interface Script {
  name: string;
  steps: ScriptStep[];
}

const scriptStepSchema = z.strictObject({
  text: z.string().optional(),
  reasoning: z.string().optional(),
  toolCalls: z
    .array(z.strictObject({ toolName: z.string().min(1), input: z.record(z.string(), z.unknown()) }))
    .optional(),
  delayMs: z.number().int().nonnegative().optional(),
  error: z.string().min(1).optional(),
});

/** Zod schema for a script, used for script files and config. */
export const scriptSchema = z.strictObject({
  name: z.string().min(1),
  steps: z.array(scriptStepSchema),
});

/**
 * Validates an unknown value as a script. `source` names where the value came from, so the
 * error message points the user at the right file or setting.
 */
export function parseScript(value: unknown, source: string): Script {
  const result = scriptSchema.safeParse(value);
  if (!result.success) {
    throw new BerthError(
      'invalid_request',
      `Invalid scripted model script in ${source}:\n${z.prettifyError(result.error)}`,
      {
        details: { source },
      },
    );
  }
  return result.data as Script;
}

/** Loads and validates a JSON script file (`{ "name": ..., "steps": [...] }`). */
export async function loadScriptFile(path: string): Promise<Script> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (error) {
    throw new BerthError(
      'invalid_request',
      `Cannot read scripted model script file ${path}: ${describe(error)}`,
      {
        cause: error,
        details: { source: path },
      },
    );
  }
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (error) {
    throw new BerthError(
      'invalid_request',
      `Scripted model script file ${path} is not valid JSON: ${describe(error)}`,
      {
        cause: error,
        details: { source: path },
      },
    );
  }
  return parseScript(value, path);
}

function describe(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}
