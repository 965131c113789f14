/**
 * Replaces byte strings in a stream, also where one straddles two chunks: the last
 * `longest needle - 1` bytes are held back until the next chunk (or the end) shows whether they
 * start a match. Used to swap placeholders for secrets on the way out and secrets for
 * placeholders on the way back.
 */
import { Transform, type TransformCallback } from 'node:stream';

export interface Replacement {
  from: string;
  to: string;
}

/** `text` with every `from` replaced by its `to`, in order of the list. */
export function replaceAll(text: Buffer, replacements: readonly Replacement[]): Buffer {
  let result = text;
  for (const { from, to } of replacements) {
    if (from.length === 0 || result.indexOf(from) < 0) continue;
    const parts: Buffer[] = [];
    const needle = Buffer.from(from);
    const value = Buffer.from(to);
    let start = 0;
    for (let at = result.indexOf(needle); at >= 0; at = result.indexOf(needle, start)) {
      parts.push(result.subarray(start, at), value);
      start = at + needle.length;
    }
    parts.push(result.subarray(start));
    result = Buffer.concat(parts);
  }
  return result;
}

/** A Transform that applies `replacements` to the whole stream. */
export function replacingStream(replacements: readonly Replacement[]): Transform {
  const active = replacements.filter((replacement) => replacement.from.length > 0);
  const keep = Math.max(0, ...active.map((replacement) => Buffer.byteLength(replacement.from) - 1));
  let held: Buffer = Buffer.alloc(0);
  return new Transform({
    transform(chunk: Buffer, _encoding, callback: TransformCallback) {
      const text = replaceAll(held.length > 0 ? Buffer.concat([held, chunk]) : chunk, active);
      // Hold back a tail that could be the start of a needle completed by the next chunk.
      const cut = Math.max(0, text.length - keep);
      held = Buffer.from(text.subarray(cut));
      callback(null, text.subarray(0, cut));
    },
    flush(callback: TransformCallback) {
      callback(null, held);
    },
  });
}
