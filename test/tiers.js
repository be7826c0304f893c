/**
 * The suite's tiers (README "Development"): `unit` needs no servers and no root; `integration` runs
 * against a real Temporal dev server (started once by the global setup), repository and process-driver
 * hosts; `system` adds QEMU, network namespaces and NFS (root), and the fault-injection suite; `cluster`
 * runs on the virtual cluster of real Xen hosts (deploy/vmcluster/), which its own global setup brings up
 * once per run, only when the tier runs (a project's global setup runs only for a selected project);
 * `scale` needs the engines a provider scales out on: PostgreSQL (deploy/postgres/), the S3 server and
 * the Temporal server on PostgreSQL (deploy/temporal/), which its tests start themselves.
 */
const base = {
  testEnvironment: 'node',
  transform: { '^.+\\.ts$': ['@swc/jest'] },
  // Lazy imports name the compiled file (`await import('./s3Bytes.js')`, as Node needs); jest loads the source.
  moduleNameMapper: { '^(\\.{1,2}/.*)\\.js$': '$1' },
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
  scale: { ...base, displayName: 'scale', testMatch: ['<rootDir>/test/scale/**/*.test.ts'] },
  cluster: {
    ...base,
    displayName: 'cluster',
    testMatch: ['<rootDir>/test/cluster/**/*.test.ts'],
    setupFilesAfterEnv: ['<rootDir>/test/support/rootOnly.ts'],
    globalSetup: '<rootDir>/test/cluster/globalSetup.ts',
    globalTeardown: '<rootDir>/test/cluster/globalTeardown.ts',
  },
};
