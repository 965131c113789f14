import { randomFillSync } from 'node:crypto';

/** Resource id prefixes, so an id says what it names. */
export type IdPrefix =
  | 'agent'
  | 'env'
  | 'sesn'
  | 'sevt'
  | 'key'
  | 'tnt'
  | 'user'
  | 'toolu'
  | 'sbx'
  | 'vlt'
  | 'vcrd'
  | 'skill';

/** Crockford base32, lower case (ids are shown lower case). */
const ALPHABET = '0123456789abcdefghjkmnpqrstvwxyz';
const TIME_LENGTH = 10;
const RANDOM_LENGTH = 16;

/** Random bytes drawn from the CSPRNG in blocks, not one call per character. */
const pool = new Uint8Array(4096);
let poolOffset = pool.length;

/** The 80 random bits of the newest id, as 16 base32 digits. */
const digits = new Uint8Array(RANDOM_LENGTH);
let lastTime = -1;
let encodedTime = '';

function encodeTime(time: number): string {
  let text = '';
  for (let index = 0; index < TIME_LENGTH; index++) {
    text = ALPHABET[time % 32]! + text;
    time = Math.floor(time / 32);
  }
  return text;
}

function freshDigits(): void {
  if (poolOffset + RANDOM_LENGTH > pool.length) {
    randomFillSync(pool);
    poolOffset = 0;
  }
  // 256 is a multiple of 32, so the low five bits of a uniform byte are uniform.
  for (let index = 0; index < RANDOM_LENGTH; index++) digits[index] = pool[poolOffset++]! & 31;
}

/** Adds one to the random digits; false when they wrap around (all were 31). */
function incrementDigits(): boolean {
  for (let index = RANDOM_LENGTH - 1; index >= 0; index--) {
    if (digits[index]! < 31) {
      digits[index]!++;
      return true;
    }
    digits[index] = 0;
  }
  return false;
}

/**
 * A monotonic ULID (26 characters, lower case): 48 bits of milliseconds, then 80 random bits
 * that are incremented, not redrawn, within one millisecond, so ids made by this process sort
 * in creation order even when the clock stands still or steps back.
 */
function nextUlid(): string {
  const now = Date.now();
  if (now > lastTime) {
    lastTime = now;
    encodedTime = encodeTime(now);
    freshDigits();
  } else if (!incrementDigits()) {
    // 2^80 ids in one millisecond: borrow the next millisecond rather than repeat an id.
    lastTime++;
    encodedTime = encodeTime(lastTime);
    freshDigits();
  }
  let text = encodedTime;
  for (let index = 0; index < RANDOM_LENGTH; index++) text += ALPHABET[digits[index]!]!;
  return text;
}

/** A new sortable, unique id such as `sesn_01jh...`. */
export function newId(prefix: IdPrefix): string {
  return `${prefix}_${nextUlid()}`;
}
