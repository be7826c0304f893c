import { mkdirSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import path from 'node:path';

import { startTemporalDevServer, type TemporalDevServer } from '../../deploy/devcluster/temporal';
import { repoRoot } from '../../deploy/devcluster/tools';
import { findLeftoverProcesses } from './leakCheck';
import { TEST_LOG_DIR_ENV, TEST_RUN_ID_ENV, temporalAddressFile, temporalUiFile } from './testRun';

/** Runs of logs kept under .vsp/test-logs/ (older ones are removed). */
const KEPT_LOG_RUNS = 5;

/** What global teardown needs; setup and teardown run in the same jest parent process. */
export interface SuiteHandle {
  temporal: TemporalDevServer;
  addressFile: string;
  runId: string;
}
export const SUITE_HANDLE_KEY = '__vspSuiteHandle';

/** Suites that started this recently may still be running (another terminal): their logs stay. */
const MIN_LOG_AGE_MS = 3600_000;

function pruneOldLogs(logsRoot: string): void {
  const runs = readdirSync(logsRoot).sort();
  for (const old of runs.slice(0, Math.max(0, runs.length - KEPT_LOG_RUNS + 1))) {
    const dir = path.join(logsRoot, old);
    if (Date.now() - statSync(dir).mtimeMs > MIN_LOG_AGE_MS) rmSync(dir, { recursive: true, force: true });
  }
}

/**
 * Ctrl-C or a CI timeout skips global teardown, and the servers and VMs the tests started run in process
 * groups of their own, so a signal would not reach them: kill every process of this run, then exit.
 */
function killSuiteProcessesOnSignals(runId: string): void {
  const onSignal = (code: number) => {
    const marker = { name: TEST_RUN_ID_ENV, value: runId };
    for (const p of findLeftoverProcesses({ rootPid: process.pid, marker, includeUnmarkedCommands: false })) {
      try {
        process.kill(p.pid, 'SIGKILL');
      } catch {
        // Already gone.
      }
    }
    process.exit(code);
  };
  process.once('SIGINT', () => onSignal(130));
  process.once('SIGTERM', () => onSignal(143));
}

/** Starts one in-memory Temporal dev server for the whole suite and tells the tests where it is. */
export default async function globalSetup(): Promise<void> {
  const runId = `${new Date().toISOString().replace(/[:.]/g, '-')}-${process.pid}`;
  const logsRoot = path.join(repoRoot(), '.vsp', 'test-logs');
  mkdirSync(logsRoot, { recursive: true });
  pruneOldLogs(logsRoot);
  const logDir = path.join(logsRoot, runId);
  mkdirSync(logDir, { recursive: true });
  // Every process the suite starts inherits the marker, so teardown finds leftovers even when orphaned.
  process.env[TEST_RUN_ID_ENV] = runId;
  process.env[TEST_LOG_DIR_ENV] = logDir;
  // vsp in tests reads no settings file of this machine's user (a running demo writes one).
  process.env.VSP_ENV_FILE = '';

  killSuiteProcessesOnSignals(runId);
  // With its web UI: the browser test takes screenshots of it.
  const temporal = await startTemporalDevServer({ logFile: path.join(logDir, 'temporal.log') });
  process.env.TEMPORAL_ADDRESS = temporal.address;
  const addressFile = temporalAddressFile(process.pid);
  writeFileSync(addressFile, `${temporal.address}\n`);
  writeFileSync(temporalUiFile(process.pid), `${temporal.uiUrl}\n`);
  const handle: SuiteHandle = { temporal, addressFile, runId };
  (globalThis as Record<string, unknown>)[SUITE_HANDLE_KEY] = handle;
  process.stderr.write(
    `\nvsp test run ${runId}: Temporal dev server at ${temporal.address}, logs in ${logDir}\n`,
  );
}
