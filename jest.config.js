/**
 * Integration, system and cluster tiers, serially in one run that shares one Temporal dev server (the
 * global setup starts it); `--selectProjects integration` (or `system`, `cluster`) runs one. `npm test`
 * runs the cluster tier in a run of its own, after the others, so its dom0s never load the machine while
 * the QEMU tests run. The unit tier has its own config (jest.unit.config.js): it starts nothing.
 */
const tiers = require('./test/tiers');

module.exports = {
  testTimeout: 180000,
  globalSetup: '<rootDir>/test/support/globalSetup.ts',
  globalTeardown: '<rootDir>/test/support/globalTeardown.ts',
  projects: [tiers.integration, tiers.system, tiers.cluster],
};
