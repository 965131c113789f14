import { describeSandboxAdversarial } from '../adversarial.test-suite.js';
import { gvisorHostView } from '../driver-contract.test-suite.js';
import { createGvisorDriver, type GvisorDriver } from './gvisor-driver.js';

describeSandboxAdversarial('gvisor', {
  createDriver: () => createGvisorDriver(),
  cleanup: (driver) => (driver as GvisorDriver).destroyAll(),
  ownKernel: true,
  hostView: gvisorHostView,
});
