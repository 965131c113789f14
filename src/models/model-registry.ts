import type { LanguageModelV3 } from '@ai-sdk/provider';
import type { SessionKey } from '../store/event-store.js';

/**
 * The model port is the Vercel AI SDK's `LanguageModelV3` spec, so any AI SDK provider plugs
 * in. A registry turns Berth model ids (`<provider>/<model>`, a bare `claude-*` meaning
 * `anthropic/`) into language models.
 */
export type LanguageModel = LanguageModelV3;

export interface ModelRegistry {
  /**
   * Returns the model for an id, or throws an `invalid_request` BerthError naming the problem.
   * `context.session` says which session the model is for (interceptors such as tracing use it;
   * registries may ignore it).
   */
  resolve(modelId: string, context?: { session: SessionKey }): LanguageModel;
}
