import { monotonicFactory } from 'ulid';

const nextUlid = monotonicFactory();

/** Resource id prefixes, so an id says what it names. */
export type IdPrefix = 'agent' | 'env' | 'sesn' | 'sevt' | 'key' | 'tnt' | 'user' | 'toolu' | 'sbx';

/** A new sortable, unique id such as `sesn_01JH...`. */
export function newId(prefix: IdPrefix): string {
  return `${prefix}_${nextUlid().toLowerCase()}`;
}
