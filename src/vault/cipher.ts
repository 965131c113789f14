import { createCipheriv, createDecipheriv, randomBytes } from 'node:crypto';
import { BerthError } from '../errors.js';
import type { SealedSecret } from '../store/vault-store.js';
import type { VaultKeyring } from './keyring.js';

/**
 * AES-256-GCM envelopes: `v1.<key id>.<iv>.<ciphertext><tag>` (base64url). The envelope names
 * the key that sealed it, so any configured key opens what it sealed. The associated data binds
 * a ciphertext to its record (tenant and record id): moved to another row, it no longer opens.
 */

const VERSION = 'v1';
const IV_BYTES = 12;
const TAG_BYTES = 16;

/** What an envelope belongs to; authenticated, not encrypted. */
export interface SealContext {
  tenantId: string;
  /** The record's id (a credential id). */
  recordId: string;
}

function associatedData(context: SealContext): Buffer {
  return Buffer.from(`berth.vault.${VERSION}\u0000${context.tenantId}\u0000${context.recordId}`, 'utf8');
}

/** Seals a plaintext under the keyring's current key. */
export function seal(keyring: VaultKeyring, context: SealContext, plaintext: string): SealedSecret {
  const keyId = keyring.currentKeyId;
  const key = keyring.materialOf(keyId)!;
  const iv = randomBytes(IV_BYTES);
  const cipher = createCipheriv('aes-256-gcm', key, iv, { authTagLength: TAG_BYTES });
  cipher.setAAD(associatedData(context));
  const ciphertext = Buffer.concat([cipher.update(plaintext, 'utf8'), cipher.final(), cipher.getAuthTag()]);
  return {
    keyId,
    sealed: `${VERSION}.${keyId}.${iv.toString('base64url')}.${ciphertext.toString('base64url')}`,
  };
}

/** The key id an envelope names, or undefined when it is not an envelope. */
export function envelopeKeyId(sealed: string): string | undefined {
  const parts = sealed.split('.');
  return parts.length === 4 && parts[0] === VERSION ? parts[1] : undefined;
}

/**
 * Opens an envelope. Fails with `vault_failed` naming the record and the key id when the key is
 * not configured, and when authentication fails (altered ciphertext, an envelope moved from
 * another record, or wrong material under that key id): never returns garbage.
 */
export function open(keyring: VaultKeyring, context: SealContext, sealed: string): string {
  const parts = sealed.split('.');
  const what = `the secret of ${context.recordId}`;
  if (parts.length !== 4 || parts[0] !== VERSION) {
    throw new BerthError('vault_failed', `${what} is not a Berth vault envelope (${VERSION})`);
  }
  const [, keyId, ivText, bodyText] = parts as [string, string, string, string];
  const key = keyring.materialOf(keyId);
  if (key === undefined) {
    throw new BerthError(
      'vault_failed',
      `${what} is sealed with vault key "${keyId}", which is not configured here (configured: ${keyring.keyIds.join(', ')}); add it to BERTH_VAULT_KEYS or BERTH_VAULT_KEY_FILE`,
      { details: { keyId, recordId: context.recordId } },
    );
  }
  const iv = Buffer.from(ivText, 'base64url');
  const body = Buffer.from(bodyText, 'base64url');
  if (iv.length !== IV_BYTES || body.length < TAG_BYTES) {
    throw new BerthError('vault_failed', `${what} (vault key "${keyId}") is truncated`, {
      details: { keyId, recordId: context.recordId },
    });
  }
  try {
    const decipher = createDecipheriv('aes-256-gcm', key, iv, { authTagLength: TAG_BYTES });
    decipher.setAAD(associatedData(context));
    decipher.setAuthTag(body.subarray(body.length - TAG_BYTES));
    return Buffer.concat([
      decipher.update(body.subarray(0, body.length - TAG_BYTES)),
      decipher.final(),
    ]).toString('utf8');
  } catch {
    throw new BerthError(
      'vault_failed',
      `${what} failed authentication under vault key "${keyId}": the stored ciphertext was altered or moved from another record, or the material configured for "${keyId}" is not the key that sealed it`,
      { details: { keyId, recordId: context.recordId } },
    );
  }
}
