import { randomBytes } from 'node:crypto';
import { chmod, readFile, stat, writeFile } from 'node:fs/promises';
import { inspect } from 'node:util';
import { invalidRequest } from '../errors.js';

/**
 * The vault's keys. Every secret is sealed under the current key (the first configured); older
 * keys stay configured only to open what they sealed until `berth vault rotate-key` has
 * re-sealed it. Keys come from `BERTH_VAULT_KEYS` (`id:base64,id:base64`) and/or a key file
 * (one `id:base64` per line); with neither, a key file is generated in the data directory.
 */

/** Bytes of an AES-256 key. */
export const VAULT_KEY_BYTES = 32;

/** Key ids: short, safe in envelopes, logs and file names. */
const KEY_ID = /^[A-Za-z0-9_-]{1,64}$/;

/** One key as configured. The material never leaves this module except into node:crypto. */
export interface VaultKeySpec {
  id: string;
  material: Buffer;
}

/**
 * Parses `id:base64` entries (comma- or newline-separated; blank lines and `#` comments
 * ignored). Errors name the source and the entry, never the key material.
 */
export function parseVaultKeys(text: string, source: string): VaultKeySpec[] {
  const entries = text
    .split('\n')
    .filter((line) => !line.trim().startsWith('#'))
    .flatMap((line) => line.split(','))
    .map((entry) => entry.trim())
    .filter((entry) => entry !== '');
  return entries.map((entry, index) => {
    const separator = entry.indexOf(':');
    const id = separator < 0 ? '' : entry.slice(0, separator).trim();
    const encoded = separator < 0 ? '' : entry.slice(separator + 1).trim();
    const where = `${source} entry ${index + 1}${KEY_ID.test(id) ? ` (key id "${id}")` : ''}`;
    if (!KEY_ID.test(id)) {
      throw invalidRequest(
        `${where}: expected "<key id>:<base64 of 32 bytes>" with a key id of 1-64 letters, digits, _ or -`,
      );
    }
    if (!/^[A-Za-z0-9+/_-]+={0,2}$/.test(encoded)) throw invalidRequest(`${where}: the key is not base64`);
    // Node's base64 decoder takes the URL-safe alphabet too.
    const material = Buffer.from(encoded, 'base64');
    if (material.length !== VAULT_KEY_BYTES) {
      throw invalidRequest(`${where}: the key must be ${VAULT_KEY_BYTES} bytes, got ${material.length}`);
    }
    return { id, material };
  });
}

/** A fresh random key with a readable, sortable id (`k20260101-3fa2c1`). */
export function generateVaultKey(now = new Date()): VaultKeySpec {
  const day = now.toISOString().slice(0, 10).replaceAll('-', '');
  return { id: `k${day}-${randomBytes(3).toString('hex')}`, material: randomBytes(VAULT_KEY_BYTES) };
}

/** A key as one `id:base64` line, the format of `BERTH_VAULT_KEYS` entries and key files. */
export function formatVaultKey(key: VaultKeySpec): string {
  return `${key.id}:${key.material.toString('base64')}`;
}

/**
 * The keys in use: the current one seals, every one opens what it sealed. Printing or
 * serializing a keyring shows key ids only.
 */
export class VaultKeyring {
  readonly currentKeyId: string;
  readonly #keys: ReadonlyMap<string, Buffer>;

  constructor(keys: readonly VaultKeySpec[]) {
    const first = keys[0];
    if (first === undefined) throw invalidRequest('a vault keyring needs at least one key');
    const map = new Map<string, Buffer>();
    for (const key of keys) {
      const known = map.get(key.id);
      if (known !== undefined && !known.equals(key.material)) {
        throw invalidRequest(`vault key id "${key.id}" is configured twice with different keys`);
      }
      if (key.material.length !== VAULT_KEY_BYTES) {
        throw invalidRequest(`vault key "${key.id}" must be ${VAULT_KEY_BYTES} bytes`);
      }
      map.set(key.id, Buffer.from(key.material));
    }
    this.currentKeyId = first.id;
    this.#keys = map;
  }

  /** Every configured key id, the current one first. */
  get keyIds(): string[] {
    return [...this.#keys.keys()];
  }

  has(keyId: string): boolean {
    return this.#keys.has(keyId);
  }

  /** Key material for node:crypto; `vault/` only. */
  materialOf(keyId: string): Buffer | undefined {
    return this.#keys.get(keyId);
  }

  toJSON() {
    return { currentKeyId: this.currentKeyId, keyIds: this.keyIds };
  }

  [inspect.custom]() {
    return `VaultKeyring(current ${this.currentKeyId}; ${this.keyIds.join(', ')})`;
  }
}

/** Where the vault's keys come from (`config/` compiles it). */
export interface VaultKeyConfig {
  /** Keys from `BERTH_VAULT_KEYS`, in order. */
  keys: readonly VaultKeySpec[];
  /** `BERTH_VAULT_KEY_FILE`: keys, one `id:base64` per line, read after `keys`. */
  keyFile: string | undefined;
  /** The key file generated (and then read) when neither of the above is set. */
  defaultKeyFile: string;
}

/** The loaded keyring, and what the caller should tell the operator about it. */
export interface LoadedKeyring {
  keyring: VaultKeyring;
  /** Where the keys came from, for logs. */
  source: string;
  /** Set when this call generated the default key file. */
  createdKeyFile?: string;
  /** Problems worth a warning (a key file others can read). */
  warnings: string[];
}

/**
 * Loads the keyring: `BERTH_VAULT_KEYS` first, then `BERTH_VAULT_KEY_FILE`; with neither,
 * the default key file in the data directory, generated (mode 600) when missing. With
 * `generate: false` a missing default file is an error instead (operator commands must not
 * invent a key the server does not have).
 */
export async function loadVaultKeyring(
  config: VaultKeyConfig,
  options: { generate?: boolean } = {},
): Promise<LoadedKeyring> {
  const warnings: string[] = [];
  const keys = [...config.keys];
  const sources: string[] = keys.length > 0 ? ['BERTH_VAULT_KEYS'] : [];
  if (config.keyFile !== undefined) {
    keys.push(...(await readKeyFile(config.keyFile, 'BERTH_VAULT_KEY_FILE', warnings)));
    sources.push(config.keyFile);
  }
  if (keys.length > 0) return { keyring: new VaultKeyring(keys), source: sources.join(' + '), warnings };

  const path = config.defaultKeyFile;
  let createdKeyFile: string | undefined;
  const exists = await stat(path).then(
    () => true,
    () => false,
  );
  if (!exists) {
    if (options.generate === false) {
      throw invalidRequest(
        `no vault key is configured and ${path} does not exist: set BERTH_VAULT_KEYS or BERTH_VAULT_KEY_FILE, or point --data-dir at the server's data directory`,
      );
    }
    // `wx`: two processes starting together never overwrite each other's key.
    await writeFile(
      path,
      `# Berth vault keys: the first line seals, every line opens. Keep a copy; without it\n# the vault's secrets are lost.\n${formatVaultKey(generateVaultKey())}\n`,
      { mode: 0o600, flag: 'wx' },
    ).then(
      () => {
        createdKeyFile = path;
      },
      (error: NodeJS.ErrnoException) => {
        if (error.code !== 'EEXIST') throw error;
      },
    );
    await chmod(path, 0o600);
  }
  keys.push(...(await readKeyFile(path, 'vault key file', warnings)));
  return { keyring: new VaultKeyring(keys), source: path, createdKeyFile, warnings };
}

async function readKeyFile(path: string, setting: string, warnings: string[]): Promise<VaultKeySpec[]> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (error) {
    throw invalidRequest(
      `${setting} ${path} cannot be read: ${(error as NodeJS.ErrnoException).code ?? error}`,
    );
  }
  const mode = (await stat(path)).mode & 0o777;
  if ((mode & 0o077) !== 0) {
    warnings.push(`${path} can be read by other users (mode ${mode.toString(8)}); chmod 600 it`);
  }
  const keys = parseVaultKeys(text, `${setting} ${path}`);
  if (keys.length === 0) throw invalidRequest(`${setting} ${path} holds no key`);
  return keys;
}
