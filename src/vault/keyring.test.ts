import { randomBytes } from 'node:crypto';
import { mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { inspect } from 'node:util';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import {
  formatVaultKey,
  generateVaultKey,
  loadVaultKeyring,
  parseVaultKeys,
  VaultKeyring,
} from './keyring.js';

let directory: string;
beforeEach(async () => {
  directory = await mkdtemp(join(tmpdir(), 'berth-keyring-'));
});
afterEach(async () => rm(directory, { recursive: true, force: true }));

const base64 = (bytes: number) => randomBytes(bytes).toString('base64');

describe('vault keys', () => {
  it('parses "id:base64" entries in order, the first being current', () => {
    const a = base64(32);
    const b = base64(32);
    const keys = parseVaultKeys(` new:${b} , old:${a}`, 'BERTH_VAULT_KEYS');
    expect(keys.map((key) => key.id)).toEqual(['new', 'old']);
    expect(keys[1]!.material.equals(Buffer.from(a, 'base64'))).toBe(true);
    expect(new VaultKeyring(keys).currentKeyId).toBe('new');
  });

  it('names the setting and entry of a bad key, and never echoes key material', () => {
    const short = base64(16);
    expect(() => parseVaultKeys(`good:${base64(32)},bad:${short}`, 'BERTH_VAULT_KEYS')).toThrow(
      /BERTH_VAULT_KEYS entry 2 \(key id "bad"\): the key must be 32 bytes, got 16/,
    );
    try {
      parseVaultKeys(`bad:${short}`, 'BERTH_VAULT_KEYS');
    } catch (error) {
      expect((error as Error).message).not.toContain(short);
    }
    expect(() => parseVaultKeys(base64(32), 'BERTH_VAULT_KEYS')).toThrow(
      /entry 1: expected "<key id>:<base64/,
    );
    expect(() => parseVaultKeys('a.b:abc', 'X')).toThrow(/key id of 1-64 letters/);
    const material = base64(32);
    expect(() => new VaultKeyring(parseVaultKeys(`k:${material},k:${base64(32)}`, 'X'))).toThrow(
      /configured twice with different keys/,
    );
  });

  it('shows key ids only when a keyring is printed or serialized', () => {
    const key = generateVaultKey();
    const keyring = new VaultKeyring([key]);
    const shown = `${JSON.stringify(keyring)} ${inspect(keyring)} ${String(keyring)}`;
    expect(shown).toContain(key.id);
    expect(shown).not.toContain(key.material.toString('base64'));
  });

  it('generates the default key file once, mode 600, and reads it on later starts', async () => {
    const config = { keys: [], keyFile: undefined, defaultKeyFile: join(directory, 'vault.key') };
    const first = await loadVaultKeyring(config);
    expect(first.createdKeyFile).toBe(config.defaultKeyFile);
    expect((await stat(config.defaultKeyFile)).mode & 0o777).toBe(0o600);
    const second = await loadVaultKeyring(config);
    expect(second.createdKeyFile).toBeUndefined();
    expect(second.keyring.currentKeyId).toBe(first.keyring.currentKeyId);
    expect(first.warnings).toEqual([]);
  });

  it('puts BERTH_VAULT_KEYS before the key file, and never generates when keys are configured', async () => {
    const fromFile = generateVaultKey();
    const keyFile = join(directory, 'keys');
    await writeFile(keyFile, `# old keys\n${formatVaultKey(fromFile)}\n`, { mode: 0o644 });
    const fromEnvironment = generateVaultKey();
    const loaded = await loadVaultKeyring({
      keys: [fromEnvironment],
      keyFile,
      defaultKeyFile: join(directory, 'vault.key'),
    });
    expect(loaded.keyring.keyIds).toEqual([fromEnvironment.id, fromFile.id]);
    expect(loaded.warnings.join()).toContain('can be read by other users');
    await expect(stat(join(directory, 'vault.key'))).rejects.toThrow();
    expect(await readFile(keyFile, 'utf8')).toContain(fromFile.id);
  });

  it('refuses to invent a key for an operator command when the server has none', async () => {
    await expect(
      loadVaultKeyring(
        { keys: [], keyFile: undefined, defaultKeyFile: join(directory, 'vault.key') },
        { generate: false },
      ),
    ).rejects.toThrow(/no vault key is configured/);
    await expect(
      loadVaultKeyring({
        keys: [],
        keyFile: join(directory, 'missing'),
        defaultKeyFile: join(directory, 'x'),
      }),
    ).rejects.toThrow(/BERTH_VAULT_KEY_FILE .*missing cannot be read: ENOENT/);
  });
});
