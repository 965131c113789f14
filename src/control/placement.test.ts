import { describe, expect, it } from 'vitest';
import { PlacementRing } from './placement.js';

const ids = (count: number) => Array.from({ length: count }, (_, index) => `sesn_${index.toString(36)}`);

/** Places `keys` one by one, each seeing the loads the earlier ones made. */
function placeAll(ring: PlacementRing, keys: readonly string[]) {
  const loads = new Map<string, number>();
  const where = new Map<string, string>();
  for (const key of keys) {
    const node = ring.place(key, loads)!;
    where.set(key, node);
    loads.set(node, (loads.get(node) ?? 0) + 1);
  }
  return { loads, where };
}

describe('session placement', () => {
  it('spreads 10,000 sessions over 3 nodes with the busiest at most 1.25 × the average', () => {
    const { loads } = placeAll(new PlacementRing(['node-a', 'node-b', 'node-c']), ids(10_000));
    const counts = [...loads.values()];
    expect(counts).toHaveLength(3);
    expect(Math.max(...counts) / (10_000 / 3)).toBeLessThanOrEqual(1.25);
  });

  it('is stable: the same inputs place the same way, in any node order', () => {
    const keys = ids(500);
    const first = placeAll(new PlacementRing(['a', 'b', 'c']), keys).where;
    const second = placeAll(new PlacementRing(['c', 'a', 'b']), keys).where;
    expect(second).toEqual(first);
  });

  it('moves only the sessions of a node that leaves (with loads not binding)', () => {
    const keys = ids(2000);
    const before = new PlacementRing(['a', 'b', 'c', 'd']);
    const after = new PlacementRing(['a', 'b', 'c']);
    let moved = 0;
    for (const key of keys) {
      const was = before.place(key)!;
      const now = after.place(key)!;
      if (was !== 'd') expect(now).toBe(was);
      else moved++;
    }
    // Node d held about a quarter.
    expect(moved).toBeGreaterThan(2000 * 0.15);
    expect(moved).toBeLessThan(2000 * 0.35);
  });

  it('skips a node at capacity, and has nowhere to place on an empty ring', () => {
    const ring = new PlacementRing(['a', 'b']);
    const home = ring.place('sesn_x')!;
    const other = home === 'a' ? 'b' : 'a';
    expect(ring.place('sesn_x', new Map([[home, 100]]))).toBe(other);
    expect(new PlacementRing([]).place('sesn_x')).toBeUndefined();
  });
});
