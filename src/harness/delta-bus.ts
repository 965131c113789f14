import { type SessionKey, sessionKeyString } from '../store/event-store.js';
/**
 * Streaming deltas of agent messages while the model writes them. They go to live
 * subscribers only and are never stored: the stored `agent.message` is the truth.
 * Shapes follow the official SDK's `event_start` / `event_delta` stream events.
 */
export type DeltaEvent =
  | { type: 'event_start'; event: { id: string; type: 'agent.message' | 'agent.thinking' } }
  | {
      type: 'event_delta';
      event_id: string;
      delta: { type: 'content_delta'; content: { type: 'text'; text: string }; index: number };
    };

export type DeltaListener = (session: SessionKey, delta: DeltaEvent) => void;

/** In-process fan-out of deltas, keyed by session id. */
export class DeltaBus {
  readonly #listeners = new Map<string, Set<DeltaListener>>();

  /** Delivers a delta to the session's subscribers; a throwing listener is dropped. */
  publish(session: SessionKey, delta: DeltaEvent): void {
    const listeners = this.#listeners.get(sessionKeyString(session));
    if (!listeners) return;
    for (const listener of listeners) {
      try {
        listener(session, delta);
      } catch {
        listeners.delete(listener);
      }
    }
  }

  /** Subscribes to a session's deltas; returns the unsubscribe function. */
  subscribe(session: SessionKey, listener: DeltaListener): () => void {
    const sessionId = sessionKeyString(session);
    let listeners = this.#listeners.get(sessionId);
    if (!listeners) {
      listeners = new Set();
      this.#listeners.set(sessionId, listeners);
    }
    listeners.add(listener);
    return () => {
      listeners.delete(listener);
      if (listeners.size === 0) this.#listeners.delete(sessionId);
    };
  }
}
