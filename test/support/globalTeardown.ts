import { rmSync } from 'node:fs';

import { stopAll } from '../../deploy/devcluster/processes';
import { hostCgroupCpu, removeCpuParent } from '../../drivers/cpuShare';
import { SUITE_HANDLE_KEY, type SuiteHandle } from './globalSetup';
import { awaitNoLeftovers } from './leakCheck';
import { TEST_RUN_ID_ENV, temporalUiFile } from './testRun';

/** Stops the suite's Temporal server, then fails the run if any process the suite started is still alive. */
export default async function globalTeardown(): Promise<void> {
  const handle = (globalThis as Record<string, unknown>)[SUITE_HANDLE_KEY] as SuiteHandle | undefined;
  if (handle) {
    await handle.temporal.stop();
    rmSync(handle.addressFile, { force: true });
    rmSync(temporalUiFile(process.pid), { force: true });
  }
  await stopAll();
  // The CPU-share tests' VMs each removed their own group; the parent of those groups goes too.
  if (process.getuid?.() === 0)
    await hostCgroupCpu()
      .then(removeCpuParent)
      .catch(() => undefined);

  const left = await awaitNoLeftovers({
    rootPid: process.pid,
    marker: { name: TEST_RUN_ID_ENV, value: handle?.runId ?? process.env[TEST_RUN_ID_ENV] ?? '' },
    // Only in CI is every temporal/qemu process on the machine the suite's own.
    includeUnmarkedCommands: process.env.CI === 'true',
  });
  if (left.length === 0) return;
  const list = left.map((p) => `  pid ${p.pid} (${p.reason}): ${p.cmdline}`).join('\n');
  for (const p of left) {
    try {
      process.kill(p.pid, 'SIGKILL');
    } catch {
      // Already gone.
    }
  }
  throw new Error(`the test suite left ${left.length} process(es) running (now killed):\n${list}`);
}
