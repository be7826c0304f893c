import os from 'node:os';
import path from 'node:path';

/**
 * What jest's global setup shares with the tests. Env variables reach the tests (with --runInBand they run
 * in the same process; workers inherit the env); the address file is the fallback when a test's env was
 * replaced.
 */
export const TEST_RUN_ID_ENV = 'VSP_TEST_RUN_ID';
export const TEST_LOG_DIR_ENV = 'VSP_TEST_LOG_DIR';

/** The file in which global setup leaves the Temporal address, keyed by the jest parent's pid. */
export function temporalAddressFile(jestPid: number): string {
  return path.join(os.tmpdir(), `vsp-jest-${jestPid}.temporal-address`);
}

/** Where the suite's Temporal web UI address is written (screenshots of it: webPage.test.ts). */
export function temporalUiFile(jestPid: number): string {
  return path.join(os.tmpdir(), `vsp-jest-${jestPid}.temporal-ui`);
}

/**
 * Folder for this run's logs (.vsp/test-logs/<run>/), kept after the run so a failed test's logs can be
 * read. Outside jest (no global setup), a folder for this process.
 */
export function testLogDir(): string {
  return process.env[TEST_LOG_DIR_ENV] ?? path.join(os.tmpdir(), `vsp-test-logs-${process.pid}`);
}
