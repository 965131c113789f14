import { describe, expect, it } from 'vitest';
import { type BerthError, isBerthError } from '../errors.js';
import { createModelRegistry, parseModelId } from './provider-registry.js';
import { ScriptedLanguageModel } from './scripted/scripted-model.js';

function expectInvalidRequest(action: () => unknown, messagePattern: RegExp): BerthError {
  let caught: unknown;
  try {
    action();
  } catch (error) {
    caught = error;
  }
  expect(isBerthError(caught, 'invalid_request')).toBe(true);
  expect((caught as BerthError).message).toMatch(messagePattern);
  return caught as BerthError;
}

describe('model registry', () => {
  const fullEnvironment = {
    ANTHROPIC_API_KEY: 'anthropic-test-key',
    OPENAI_API_KEY: 'openai-test-key',
    OPENAI_COMPATIBLE_BASE_URL: 'http://127.0.0.1:9/v1',
  };

  it('resolves anthropic/<model> to the Anthropic messages model', () => {
    const model = createModelRegistry({ environment: fullEnvironment }).resolve(
      'anthropic/claude-sonnet-4-5',
    );
    expect(model.specificationVersion).toBe('v3');
    expect(model.provider).toBe('anthropic.messages');
    expect(model.modelId).toBe('claude-sonnet-4-5');
  });

  it('treats a bare claude-* id as anthropic/ and returns the same cached model', () => {
    const registry = createModelRegistry({ environment: fullEnvironment });
    const bare = registry.resolve('claude-sonnet-4-5');
    expect(bare.provider).toBe('anthropic.messages');
    expect(registry.resolve('anthropic/claude-sonnet-4-5')).toBe(bare);
  });

  it('resolves openai/<model> to the chat completions model', () => {
    const model = createModelRegistry({ environment: fullEnvironment }).resolve('openai/gpt-5');
    expect(model.provider).toBe('openai.chat');
    expect(model.modelId).toBe('gpt-5');
  });

  it('resolves openai-compatible/<model> keeping slashes in the model name', () => {
    const model = createModelRegistry({ environment: fullEnvironment }).resolve(
      'openai-compatible/meta-llama/Llama-3.1-8B',
    );
    expect(model.provider).toBe('openai-compatible.chat');
    expect(model.modelId).toBe('meta-llama/Llama-3.1-8B');
  });

  it('resolves scripted models without any environment', () => {
    const registry = createModelRegistry({ environment: {} });
    for (const name of ['demo', 'echo', 'bash-once']) {
      const model = registry.resolve(`scripted/${name}`);
      expect(model).toBeInstanceOf(ScriptedLanguageModel);
      expect(model.provider).toBe('scripted');
      expect(model.modelId).toBe(name);
    }
  });

  it('serves extra scripts passed in the options', () => {
    const registry = createModelRegistry({
      environment: {},
      scriptedScripts: { greeter: { name: 'greeter', steps: [{ text: 'hello' }] } },
    });
    const model = registry.resolve('scripted/greeter') as ScriptedLanguageModel;
    expect(model.script.steps).toEqual([{ text: 'hello' }]);
  });

  it('caches one model instance per id', () => {
    const registry = createModelRegistry({ environment: fullEnvironment });
    expect(registry.resolve('openai/gpt-5')).toBe(registry.resolve('openai/gpt-5'));
    expect(registry.resolve('scripted/echo')).toBe(registry.resolve('scripted/echo'));
  });

  it('tells the user to set ANTHROPIC_API_KEY when it is missing or empty', () => {
    const error = expectInvalidRequest(
      () => createModelRegistry({ environment: { ANTHROPIC_API_KEY: '' } }).resolve('claude-opus-4-1'),
      /ANTHROPIC_API_KEY/,
    );
    expect(error.details).toMatchObject({ missing_setting: 'ANTHROPIC_API_KEY' });
  });

  it('tells the user to set OPENAI_API_KEY when it is missing', () => {
    expectInvalidRequest(
      () => createModelRegistry({ environment: {} }).resolve('openai/gpt-5'),
      /OPENAI_API_KEY/,
    );
  });

  it('tells the user to set OPENAI_COMPATIBLE_BASE_URL when it is missing, even with an API key', () => {
    expectInvalidRequest(
      () =>
        createModelRegistry({ environment: { OPENAI_COMPATIBLE_API_KEY: 'key' } }).resolve(
          'openai-compatible/qwen3',
        ),
      /OPENAI_COMPATIBLE_BASE_URL/,
    );
  });

  it('rejects unknown providers, listing the known ones', () => {
    expectInvalidRequest(
      () => createModelRegistry({ environment: fullEnvironment }).resolve('mistral/large'),
      /unknown provider "mistral".*anthropic, openai, openai-compatible, scripted/,
    );
  });

  it('rejects ids without a provider that are not claude-*', () => {
    expectInvalidRequest(
      () => createModelRegistry({ environment: fullEnvironment }).resolve('gpt-5'),
      /must look like <provider>\/<model>/,
    );
  });

  it('rejects an empty model name', () => {
    expectInvalidRequest(
      () => createModelRegistry({ environment: fullEnvironment }).resolve('openai/'),
      /empty model name/,
    );
  });

  it('rejects unknown scripts, listing the available ones', () => {
    expectInvalidRequest(
      () => createModelRegistry({ environment: {} }).resolve('scripted/nope'),
      /scripted\/demo, scripted\/echo, scripted\/bash-once/,
    );
  });

  it('reports a missing key on every resolve instead of caching the failure', () => {
    const registry = createModelRegistry({ environment: {} });
    expect(() => registry.resolve('openai/gpt-5')).toThrow(/OPENAI_API_KEY/);
    expect(() => registry.resolve('openai/gpt-5')).toThrow(/OPENAI_API_KEY/);
  });

  it('parses ids into provider and model', () => {
    expect(parseModelId('scripted/demo')).toEqual({ provider: 'scripted', model: 'demo' });
    expect(parseModelId('claude-haiku-4-5')).toEqual({ provider: 'anthropic', model: 'claude-haiku-4-5' });
  });
});
