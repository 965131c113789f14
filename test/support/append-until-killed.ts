/**
 * Child process for the durability test: opens the store described by argv[2] (JSON
 * `OpenStoreOptions`), appends to each session in argv[3] (JSON array) concurrently, and prints
 * `<sessionId> <seq>` for every acknowledged event until the parent kills it with SIGKILL.
 */
import { openStore } from '../../src/store/open-store.js';

const [optionsJson, sessionIdsJson] = process.argv.slice(2);
if (optionsJson === undefined || sessionIdsJson === undefined) {
  throw new Error('usage: append-until-killed <options-json> <session-ids-json>');
}
const store = await openStore(JSON.parse(optionsJson));
const sessionIds = JSON.parse(sessionIdsJson) as string[];

async function appendForever(sessionId: string): Promise<never> {
  for (let count = 1; ; count++) {
    const result = await store.events.append(sessionId, [
      { type: 'user.message', content: [{ type: 'text', text: `message ${count}` }] },
    ]);
    // Pipes are synchronous on Linux, so a printed ack has left this process before the next append.
    for (const stored of result.events) process.stdout.write(`${sessionId} ${stored.seq}\n`);
  }
}

await Promise.all(sessionIds.map(appendForever));
