import { describeSandboxAdversarial } from '../adversarial.test-suite.js';
import { type BwrapDriver, createBwrapDriver } from './bwrap-driver.js';

describeSandboxAdversarial('bwrap', {
  createDriver: () => createBwrapDriver(),
  cleanup: (driver) => (driver as BwrapDriver).destroyAll(),
});
