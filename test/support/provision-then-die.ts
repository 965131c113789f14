// Child process for the bwrap lifeline test: provisions a persistent sandbox and SIGKILLs
// itself after argv[3] milliseconds, often in the middle of provisioning.
import { createBwrapDriver } from '../../src/sandbox/bwrap/bwrap-driver.js';

const [workdir, delayText] = process.argv.slice(2);
setTimeout(() => process.kill(process.pid, 'SIGKILL'), Number(delayText));
await createBwrapDriver().provision({ sessionId: 'lifeline', workdir: workdir!, limits: {} });
await new Promise(() => undefined);
