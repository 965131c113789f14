import { createAnthropic } from '@ai-sdk/anthropic';
import { createOpenAI } from '@ai-sdk/openai';
import { createOpenAICompatible } from '@ai-sdk/openai-compatible';
import { BerthError } from '../errors.js';
import type { LanguageModel, ModelRegistry } from './model-registry.js';
import { builtInScripts } from './scripted/built-in-scripts.js';
import type { Script } from './scripted/script.js';
import { ScriptedLanguageModel } from './scripted/scripted-model.js';

/** Providers a Berth model id may name before the slash. */
export const MODEL_PROVIDERS = ['anthropic', 'openai', 'openai-compatible', 'scripted'] as const;

/** One of {@link MODEL_PROVIDERS}. */
export type ModelProvider = (typeof MODEL_PROVIDERS)[number];

/** Inputs of {@link createModelRegistry}; config builds them, so this module never reads `process.env`. */
export interface ModelRegistryOptions {
  /** Provider settings (`ANTHROPIC_API_KEY`, `OPENAI_BASE_URL`, ...). Empty strings count as unset. */
  environment: Record<string, string | undefined>;
  /** Extra scripts for `scripted/<name>`, by name; they win over built-ins of the same name. */
  scriptedScripts?: Record<string, Script>;
}

const ANTHROPIC_DEFAULT_BASE_URL = 'https://api.anthropic.com/v1';
const OPENAI_DEFAULT_BASE_URL = 'https://api.openai.com/v1';

/**
 * Builds the registry that turns Berth model ids into AI SDK language models. Ids are
 * `<provider>/<model>`; a bare `claude-*` id means `anthropic/`. Models are cached per id.
 */
export function createModelRegistry(options: ModelRegistryOptions): ModelRegistry {
  const environment = options.environment;
  const scripts: Record<string, Script> = { ...builtInScripts, ...options.scriptedScripts };
  const models = new Map<string, LanguageModel>();

  const setting = (name: string): string | undefined => {
    const value = environment[name];
    return value === undefined || value.trim() === '' ? undefined : value.trim();
  };
  const requireSetting = (modelId: string, name: string, what: string): string => {
    const value = setting(name);
    if (value === undefined) {
      throw new BerthError('invalid_request', `Model "${modelId}" needs ${what}: set ${name}.`, {
        details: { model: modelId, missing_setting: name },
      });
    }
    return value;
  };

  const create = (modelId: string, provider: ModelProvider, model: string): LanguageModel => {
    switch (provider) {
      case 'anthropic':
        return createAnthropic({
          apiKey: requireSetting(modelId, 'ANTHROPIC_API_KEY', 'an Anthropic API key'),
          baseURL: setting('ANTHROPIC_BASE_URL') ?? ANTHROPIC_DEFAULT_BASE_URL,
        })(model);
      case 'openai':
        return createOpenAI({
          apiKey: requireSetting(modelId, 'OPENAI_API_KEY', 'an OpenAI API key'),
          baseURL: setting('OPENAI_BASE_URL') ?? OPENAI_DEFAULT_BASE_URL,
        }).chat(model);
      case 'openai-compatible':
        return createOpenAICompatible({
          name: 'openai-compatible',
          baseURL: requireSetting(
            modelId,
            'OPENAI_COMPATIBLE_BASE_URL',
            'the base URL of an OpenAI-compatible server (for example http://127.0.0.1:8080/v1 for llama.cpp or http://127.0.0.1:11434/v1 for Ollama)',
          ),
          apiKey: setting('OPENAI_COMPATIBLE_API_KEY'),
          includeUsage: true,
        })(model);
      case 'scripted': {
        const script = Object.hasOwn(scripts, model) ? scripts[model] : undefined;
        if (script === undefined) {
          throw new BerthError(
            'invalid_request',
            `Unknown scripted model "${modelId}". Available scripts: ${Object.keys(scripts)
              .map((name) => `scripted/${name}`)
              .join(', ')}.`,
            { details: { model: modelId } },
          );
        }
        return new ScriptedLanguageModel({ ...script, name: model });
      }
    }
  };

  return {
    resolve(modelId: string): LanguageModel {
      const { provider, model } = parseModelId(modelId);
      const canonicalId = `${provider}/${model}`;
      const cached = models.get(canonicalId);
      if (cached !== undefined) return cached;
      const created = create(canonicalId, provider, model);
      models.set(canonicalId, created);
      return created;
    },
  };
}

/** A model id with its provider spelled out: a bare `claude-*` id becomes `anthropic/claude-*`. */
export function canonicalModelId(modelId: string): string {
  const trimmed = modelId.trim();
  return trimmed.startsWith('claude-') ? `anthropic/${trimmed}` : trimmed;
}

/**
 * Splits a Berth model id into provider and model name (the model name may itself contain
 * slashes, as in `openai-compatible/meta-llama/Llama-3.1-8B`). Throws `invalid_request`.
 */
export function parseModelId(modelId: string): { provider: ModelProvider; model: string } {
  const trimmed = modelId.trim();
  const slash = trimmed.indexOf('/');
  if (slash === -1) {
    if (trimmed.startsWith('claude-')) return { provider: 'anthropic', model: trimmed };
    throw new BerthError(
      'invalid_request',
      `Model id "${modelId}" must look like <provider>/<model>, where provider is one of ${MODEL_PROVIDERS.join(', ')} (for example anthropic/claude-sonnet-4-5 or scripted/demo).`,
      { details: { model: modelId } },
    );
  }
  const provider = trimmed.slice(0, slash);
  const model = trimmed.slice(slash + 1);
  if (!isModelProvider(provider)) {
    throw new BerthError(
      'invalid_request',
      `Model id "${modelId}" names unknown provider "${provider}"; use one of ${MODEL_PROVIDERS.join(', ')}.`,
      { details: { model: modelId } },
    );
  }
  if (model === '') {
    throw new BerthError(
      'invalid_request',
      `Model id "${modelId}" has an empty model name after "${provider}/".`,
      {
        details: { model: modelId },
      },
    );
  }
  return { provider, model };
}

function isModelProvider(value: string): value is ModelProvider {
  return (MODEL_PROVIDERS as readonly string[]).includes(value);
}
