/**
 * The suite's three tiers (README "Development"): `unit` needs no servers and no root; `integration` runs
 * against a real Temporal dev server (started once by the global setup), repository and process-driver
 * hosts; `system` adds QEMU, network namespaces and NFS (root), and the fault-injection suite.
 */
const base = {
  testEnvironment: 'node',
  transform: { '^.+\\.ts$': ['@swc/jest'] },
};

module.exports = {
  unit: { ...base, displayName: 'unit', testMatch: ['<rootDir>/test/unit/**/*.test.ts'] },
  integration: {
    ...base,
    displayName: 'integration',
    testMatch: ['<rootDir>/test/integration/**/*.test.ts'],
  },
  system: {
    ...base,
    displayName: 'system',
    testMatch: ['<rootDir>/test/system/**/*.test.ts', '<rootDir>/test/faults/**/*.test.ts'],
    setupFilesAfterEnv: ['<rootDir>/test/support/rootOnly.ts'],
  },
};
