import type { LanguageModelV3 } from '@ai-sdk/provider';

/**
 * The model port is the Vercel AI SDK's `LanguageModelV3` spec, so any AI SDK provider plugs
 * in. A registry turns Berth model ids (`<provider>/<model>`, a bare `claude-*` meaning
 * `anthropic/`) into language models.
 */
export type LanguageModel = LanguageModelV3;

export interface ModelRegistry {
  /** Returns the model for an id, or throws an `invalid_request` BerthError naming the problem. */
  resolve(modelId: string): LanguageModel;
}
