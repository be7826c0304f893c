/**
 * Integration, system and cluster tiers, serially in one run that shares one Temporal dev server (the
 * global setup starts it); `--selectProjects integration` (or `system`, `cluster`) runs one. `npm test`
 * runs integration and system; the cluster tier runs on its own (`npm run test:cluster`), never beside the
 * QEMU tests, and joins `npm test` once its Xen lifecycle tests exist. The unit tier has its own config (jest.unit.config.js): it starts nothing.
 */
const tiers = require('./test/tiers');

module.exports = {
  testTimeout: 180000,
  globalSetup: '<rootDir>/test/support/globalSetup.ts',
  globalTeardown: '<rootDir>/test/support/globalTeardown.ts',
  projects: [tiers.integration, tiers.system, tiers.cluster],
};
