/**
 * Child process for the durability test: opens the store described by argv[2] (JSON
 * `OpenStoreOptions`), appends to each session in argv[3] (JSON array of session keys) concurrently, and prints
 * `<sessionId> <seq>` for every acknowledged event until the parent kills it with SIGKILL.
 */

import type { SessionKey } from '../../src/store/event-store.js';
import { openStore } from '../../src/store/open-store.js';

const [optionsJson, sessionsJson] = process.argv.slice(2);
if (optionsJson === undefined || sessionsJson === undefined) {
  throw new Error('usage: append-until-killed <options-json> <session-keys-json>');
}
const store = await openStore(JSON.parse(optionsJson));
const sessions = JSON.parse(sessionsJson) as SessionKey[];

async function appendForever(session: SessionKey): Promise<never> {
  const sessionId = session.id;
  for (let count = 1; ; count++) {
    const result = await store.events.append(session, [
      { type: 'user.message', content: [{ type: 'text', text: `message ${count}` }] },
    ]);
    // Pipes are synchronous on Linux, so a printed ack has left this process before the next append.
    for (const stored of result.events) process.stdout.write(`${sessionId} ${stored.seq}\n`);
  }
}

await Promise.all(sessions.map(appendForever));
