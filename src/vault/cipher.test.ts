import { randomBytes } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { BerthError } from '../errors.js';
import { envelopeKeyId, open, seal } from './cipher.js';
import { VaultKeyring } from './keyring.js';

const keyA = { id: 'key-a', material: randomBytes(32) };
const keyB = { id: 'key-b', material: randomBytes(32) };
const context = { tenantId: 'tnt_one', recordId: 'vcrd_one' };
const CANARY = 'canary-7d1f0c8e-secret';

/** The BerthError a call throws (fails the test when it returns). */
function thrown(call: () => unknown): BerthError {
  try {
    call();
  } catch (error) {
    if (error instanceof BerthError) return error;
    throw error;
  }
  throw new Error('expected the call to throw');
}

describe('vault envelopes (AES-256-GCM)', () => {
  it('seals under the current key, names that key, and never holds the plaintext', () => {
    const keyring = new VaultKeyring([keyA, keyB]);
    const sealed = seal(keyring, context, CANARY);
    expect(sealed.keyId).toBe('key-a');
    expect(envelopeKeyId(sealed.sealed)).toBe('key-a');
    expect(sealed.sealed).not.toContain(CANARY);
    expect(Buffer.from(sealed.sealed.split('.')[3]!, 'base64url').includes(CANARY)).toBe(false);
    expect(open(keyring, context, sealed.sealed)).toBe(CANARY);
    // A fresh IV each time: the same secret never seals to the same text.
    expect(seal(keyring, context, CANARY).sealed).not.toBe(sealed.sealed);
  });

  it('opens what an older key sealed while a newer key is current', () => {
    const sealedUnderA = seal(new VaultKeyring([keyA]), context, CANARY);
    expect(open(new VaultKeyring([keyB, keyA]), context, sealedUnderA.sealed)).toBe(CANARY);
  });

  it('refuses, naming the key id, to open what a key that is not configured sealed', () => {
    const sealedUnderA = seal(new VaultKeyring([keyA]), context, CANARY);
    const error = thrown(() => open(new VaultKeyring([keyB]), context, sealedUnderA.sealed));
    expect(error.code).toBe('vault_failed');
    expect(error.message).toContain('"key-a"');
    expect(error.message).toContain('not configured');
    expect(error.message).toContain('key-b');
  });

  it('detects altered ciphertext, a ciphertext moved to another record or tenant, and wrong key material', () => {
    const keyring = new VaultKeyring([keyA]);
    const { sealed } = seal(keyring, context, CANARY);
    const parts = sealed.split('.');
    const body = Buffer.from(parts[3]!, 'base64url');
    body[0]! ^= 1;
    const flipped = [...parts.slice(0, 3), body.toString('base64url')].join('.');
    for (const [label, attempt] of [
      ['flipped bit', () => open(keyring, context, flipped)],
      ['other record', () => open(keyring, { ...context, recordId: 'vcrd_two' }, sealed)],
      ['other tenant', () => open(keyring, { ...context, tenantId: 'tnt_two' }, sealed)],
      [
        'wrong material under the same id',
        () => open(new VaultKeyring([{ id: 'key-a', material: randomBytes(32) }]), context, sealed),
      ],
    ] as const) {
      const error = thrown(attempt);
      expect(error.code, label).toBe('vault_failed');
      expect(error.message, label).toContain('failed authentication under vault key "key-a"');
      expect(error.message, label).not.toContain(CANARY);
    }
    expect(thrown(() => open(keyring, context, `${parts.slice(0, 3).join('.')}.AAAA`)).message).toContain(
      'truncated',
    );
    expect(thrown(() => open(keyring, context, 'plaintext?')).message).toContain(
      'not a Berth vault envelope',
    );
  });
});
