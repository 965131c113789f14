/**
 * Replaces byte strings in a buffer or a stream in one left-to-right pass: at each position the
 * earliest match wins (the longest one when two start there), and replaced text is never
 * scanned again. A stream holds back the last `longest needle - 1` unmatched bytes until the
 * next chunk (or the end) shows whether they start a match, so a needle split across chunks is
 * still found. Used to swap placeholders for secrets on the way out and secrets for
 * placeholders on the way back.
 */
import { Transform, type TransformCallback } from 'node:stream';

export interface Replacement {
  from: string;
  to: string;
}

interface Needle {
  index: number;
  from: Buffer;
  to: Buffer;
}

/** The replacements as bytes; empty `from`s dropped. */
function needlesOf(replacements: readonly Replacement[]): Needle[] {
  return replacements.flatMap((replacement, index) =>
    replacement.from.length === 0
      ? []
      : [{ index, from: Buffer.from(replacement.from), to: Buffer.from(replacement.to) }],
  );
}

/**
 * Replaces every match that starts before `limit` in `text`. Returns the output parts and where
 * the unconsumed input starts (at least `limit` unless a match ran past it).
 */
function replaceUpTo(
  text: Buffer,
  needles: readonly Needle[],
  limit: number,
  onMatch: ((index: number) => void) | undefined,
): { parts: Buffer[]; consumed: number } {
  const parts: Buffer[] = [];
  // Next occurrence of each needle at or after `position` (-1: none left).
  const next = needles.map((needle) => text.indexOf(needle.from));
  let position = 0;
  for (;;) {
    let best = -1;
    for (let index = 0; index < needles.length; index++) {
      if (next[index]! >= 0 && next[index]! < position)
        next[index] = text.indexOf(needles[index]!.from, position);
      const at = next[index]!;
      if (at < 0 || at >= limit) continue;
      if (
        best < 0 ||
        at < next[best]! ||
        (at === next[best]! && needles[index]!.from.length > needles[best]!.from.length)
      ) {
        best = index;
      }
    }
    if (best < 0) break;
    const needle = needles[best]!;
    const at = next[best]!;
    parts.push(text.subarray(position, at), needle.to);
    onMatch?.(needle.index);
    position = at + needle.from.length;
  }
  const consumed = Math.max(position, limit);
  parts.push(text.subarray(position, consumed));
  return { parts, consumed };
}

/**
 * `text` with every `from` replaced by its `to`; `onMatch` hears the index (in `replacements`)
 * of each replacement made.
 */
export function replaceAll(
  text: Buffer,
  replacements: readonly Replacement[],
  onMatch?: (index: number) => void,
): Buffer {
  const needles = needlesOf(replacements);
  if (needles.length === 0) return text;
  const { parts } = replaceUpTo(text, needles, text.length, onMatch);
  return parts.length === 1 ? parts[0]! : Buffer.concat(parts);
}

/** A Transform that applies `replacements` to the whole stream (see `replaceAll`). */
export function replacingStream(
  replacements: readonly Replacement[],
  onMatch?: (index: number) => void,
): Transform {
  const needles = needlesOf(replacements);
  const keep = Math.max(0, ...needles.map((needle) => needle.from.length - 1));
  let held: Buffer = Buffer.alloc(0);
  return new Transform({
    transform(chunk: Buffer, _encoding, callback: TransformCallback) {
      const text = held.length > 0 ? Buffer.concat([held, chunk]) : chunk;
      // Matches starting before `limit` end inside `text`; later bytes may start a match.
      const { parts, consumed } = replaceUpTo(text, needles, Math.max(0, text.length - keep), onMatch);
      held = Buffer.from(text.subarray(consumed));
      callback(null, parts.length === 1 ? parts[0] : Buffer.concat(parts));
    },
    flush(callback: TransformCallback) {
      const { parts } = replaceUpTo(held, needles, held.length, onMatch);
      callback(null, Buffer.concat(parts));
    },
  });
}
