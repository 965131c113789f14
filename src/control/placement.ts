/**
 * Where a session lives when no node holds it: consistent hashing with bounded loads (Mirrokni,
 * Thorup and Zadimoghaddam, 2018). Each node owns many points on a hash ring; a session goes to
 * the first node clockwise from its own hash whose load is under `ceil(factor × average)`,
 * counting the session being placed. Placement is stable (the same session, nodes and loads give
 * the same node; a node joining or leaving moves only the sessions it takes or held) and the
 * busiest node carries at most `factor` times the average.
 */
import { createHash } from 'node:crypto';

/** Points per node on the ring: enough that shares differ by a few percent with 3 nodes. */
const POINTS_PER_NODE = 160;
/** Most a node may carry, as a multiple of the average (the target is ≤ 1.25). */
export const DEFAULT_LOAD_FACTOR = 1.25;

function hash64(text: string): bigint {
  return createHash('sha256').update(text).digest().readBigUInt64BE(0);
}

/** A ring over a set of nodes; build once per membership change, place many times. */
export class PlacementRing {
  readonly nodes: readonly string[];
  readonly #points: { at: bigint; node: string }[];

  constructor(nodes: Iterable<string>) {
    this.nodes = [...new Set(nodes)].sort();
    this.#points = this.nodes
      .flatMap((node) =>
        Array.from({ length: POINTS_PER_NODE }, (_, index) => ({ at: hash64(`${node}#${index}`), node })),
      )
      .sort((a, b) => (a.at < b.at ? -1 : a.at > b.at ? 1 : a.node < b.node ? -1 : 1));
  }

  /**
   * The node for `key`, given each node's current load (sessions it holds; missing means 0).
   * Undefined when the ring has no nodes.
   */
  place(
    key: string,
    loads: ReadonlyMap<string, number> = new Map(),
    factor = DEFAULT_LOAD_FACTOR,
  ): string | undefined {
    const points = this.#points;
    if (points.length === 0) return undefined;
    let total = 1;
    for (const node of this.nodes) total += loads.get(node) ?? 0;
    // Rounded down (so the bound holds exactly), but never below an even share.
    const capacity = Math.max(
      Math.ceil(total / this.nodes.length),
      Math.floor((factor * total) / this.nodes.length),
    );
    const at = hash64(key);
    // First point at or after the key's hash (binary search), then clockwise.
    let low = 0;
    let high = points.length;
    while (low < high) {
      const middle = (low + high) >>> 1;
      if (points[middle]!.at < at) low = middle + 1;
      else high = middle;
    }
    const tried = new Set<string>();
    for (let step = 0; step < points.length && tried.size < this.nodes.length; step++) {
      const node = points[(low + step) % points.length]!.node;
      if (tried.has(node)) continue;
      tried.add(node);
      if ((loads.get(node) ?? 0) < capacity) return node;
    }
    // Unreachable with factor ≥ 1 (some node is always under capacity); kept total for safety.
    return points[low % points.length]!.node;
  }
}
