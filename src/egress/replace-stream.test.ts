import { Readable } from 'node:stream';
import { text } from 'node:stream/consumers';
import { describe, expect, it } from 'vitest';
import { replaceAll, replacingStream } from './replace-stream.js';

async function throughStream(chunks: string[], replacements: { from: string; to: string }[]) {
  const matches: number[] = [];
  const output = await text(
    Readable.from(chunks.map((chunk) => Buffer.from(chunk))).pipe(
      replacingStream(replacements, (index) => matches.push(index)),
    ),
  );
  return { output, matches };
}

describe('replace stream', () => {
  it('finds a needle wherever the chunks split it', async () => {
    const input = 'head PLACEHOLDER middle PLACEHOLDER tail PLACEHOLDER';
    const replacements = [{ from: 'PLACEHOLDER', to: 'the-secret' }];
    const expected = input.replaceAll('PLACEHOLDER', 'the-secret');
    for (let first = 0; first <= input.length; first++) {
      for (const second of [first, first + 1, first + 7, input.length]) {
        const cut = Math.min(second, input.length);
        const { output, matches } = await throughStream(
          [input.slice(0, first), input.slice(first, cut), input.slice(cut)],
          replacements,
        );
        expect(output, `split at ${first}/${cut}`).toBe(expected);
        expect(matches).toEqual([0, 0, 0]);
      }
    }
  });

  it('finds needles delivered one byte at a time', async () => {
    const input = 'aaSECRETbbSECRETSECRET';
    const { output } = await throughStream([...input], [{ from: 'SECRET', to: 'P' }]);
    expect(output).toBe('aaPbbPP');
  });

  it('never scans replaced text again', () => {
    // A replacement whose output contains another needle stays as written.
    const result = replaceAll(Buffer.from('A B'), [
      { from: 'A', to: 'B-from-A' },
      { from: 'B', to: 'C' },
    ]);
    expect(result.toString()).toBe('B-from-A C');
  });

  it('prefers the earliest match, then the longest', () => {
    const result = replaceAll(Buffer.from('xabcx'), [
      { from: 'bc', to: '2' },
      { from: 'abc', to: '3' },
      { from: 'ab', to: '1' },
    ]);
    expect(result.toString()).toBe('x3x');
  });

  it('keeps multi-byte text intact', async () => {
    const { output } = await throughStream(['héllo wörld ', 'sécret', ' ✓'], [{ from: 'sécret', to: '[p]' }]);
    expect(output).toBe('héllo wörld [p] ✓');
  });

  it('passes a stream through unchanged when there is nothing to replace', async () => {
    const { output } = await throughStream(['abc', 'def'], []);
    expect(output).toBe('abcdef');
  });
});
