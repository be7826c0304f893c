/**
 * Integration, system, scale and cluster tiers, serially in one run that shares one Temporal dev server
 * (the global setup starts it); `--selectProjects integration` (or `system`, `scale`, `cluster`) runs one. `npm test`
 * (test/all-tiers.sh) runs integration and system in one jest run, then the cluster tier in another, never
 * beside the QEMU tests. The unit tier has its own config (jest.unit.config.js): it starts nothing.
 */
const tiers = require('./test/tiers');

module.exports = {
  testTimeout: 180000,
  testSequencer: '<rootDir>/test/sequencer.js',
  globalSetup: '<rootDir>/test/support/globalSetup.ts',
  globalTeardown: '<rootDir>/test/support/globalTeardown.ts',
  projects: [tiers.integration, tiers.system, tiers.scale, tiers.cluster],
};
