import type Anthropic from '@anthropic-ai/sdk';

/** A streamed session event, loosely typed for assertions. */
export type StreamEvent = { type: string; id: string; [field: string]: unknown };

type ClientEvents = Parameters<Anthropic['beta']['sessions']['events']['send']>[1]['events'];

/**
 * Opens the session's stream, sends the events, and collects what the stream delivers until
 * the session goes idle (the way an SDK user drives a turn).
 */
export async function sendAndWaitIdle(
  client: Anthropic,
  sessionId: string,
  events: ClientEvents,
  /** Request options for the send (extra headers such as `traceparent`). */
  sendOptions?: { headers?: Record<string, string> },
): Promise<StreamEvent[]> {
  const stream = await client.beta.sessions.events.stream(sessionId);
  await client.beta.sessions.events.send(sessionId, { events }, sendOptions);
  const seen: StreamEvent[] = [];
  for await (const event of stream) {
    seen.push(event as unknown as StreamEvent);
    if (event.type === 'session.status_idle') break;
  }
  return seen;
}
