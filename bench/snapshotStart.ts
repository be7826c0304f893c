import { promises as fs } from 'node:fs';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { FIRST_LINE, HOST, oneTask, POLL_MS, type Run } from './lifecycle';
import { LIFECYCLE_PHASES, median, round, withBenchCluster, type ClusterBenchEnv } from './orchestration';
import type { BenchReport } from './report';

/** How long the benchmark waits for the host's background snapshot build (one TCG boot and a save). */
const BUILD_WAIT_MS = 10 * 60_000;

/** The snapshot's state file once the host has published it, with its size. */
async function untilSnapshot(snapshotsDir: string): Promise<{ state: string; bytes: number }> {
  const deadline = Date.now() + BUILD_WAIT_MS;
  for (;;) {
    for (const key of await fs.readdir(snapshotsDir).catch(() => [] as string[])) {
      if (key.startsWith('.')) continue;
      const state = path.join(snapshotsDir, key, 'state');
      const st = await fs.stat(state).catch(() => undefined);
      if (st) return { state, bytes: st.size };
    }
    if (Date.now() > deadline) throw new Error(`no snapshot in ${snapshotsDir} after ${BUILD_WAIT_MS} ms`);
    await sleep(200);
  }
}

/**
 * The lifecycle benchmark's task on a host with snapshots on (VSP_QEMU_SNAPSHOTS=on): the first task
 * boots while the host builds its snapshot in the background; the next ones restore from it.
 */
export async function benchSnapshotStart(env: ClusterBenchEnv): Promise<BenchReport> {
  const warmRuns = env.quick ? 1 : 5;
  return withBenchCluster(
    env,
    'snapshot-start',
    {
      hosts: [HOST],
      drivers: ['qemu'],
      hostEnv: { VSP_ACCEL: 'tcg', VSP_QEMU_SNAPSHOTS: 'on' },
      owners: ['bench'],
    },
    async (bench) => {
      const store = bench.cluster.storeDir(HOST);
      const ctx = { bench, vmsDir: path.join(store, 'vms') };
      const cold = await oneTask(ctx);
      const snapshot = await untilSnapshot(path.join(store, 'snapshots'));
      const warm: Run[] = [];
      for (let i = 0; i < warmRuns; i++) warm.push(await oneTask(ctx));

      const total = (r: Run) => LIFECYCLE_PHASES.reduce((sum, p) => sum + (r.phaseMs[p] ?? 0), 0);
      // One row per task: the per-phase table is the lifecycle benchmark's.
      const rows = [cold, ...warm].map((r, i) => ({
        task: i === 0 ? 'first (boots)' : `restored ${i}`,
        'startVm to first output line ms': round(r.bootToFirstLineMs),
        'starting phase ms': round(r.phaseMs.starting ?? 0),
        'running phase ms': round(r.phaseMs.running ?? 0),
        'workflow total ms': round(total(r)),
        'client submit to result ms': round(r.clientMs),
      }));
      const w = (f: (r: Run) => number) => round(median(warm.map(f)));
      return {
        name: 'snapshot-start',
        title: 'QEMU (TCG) task start from a snapshot: startVm to first output, one-second task',
        method:
          `As the lifecycle benchmark (one host worker with the QEMU driver under TCG, the task ` +
          `\`echo ${FIRST_LINE} && sleep 1\`, 1 vCPU, 256 MiB, one task at a time, the console polled every ` +
          `${POLL_MS} ms), with VSP_QEMU_SNAPSHOTS=on. The first task boots while the host builds its ` +
          `snapshot in the background; the benchmark waits for the snapshot (` +
          `${(snapshot.bytes / 1024 ** 2).toFixed(1)} MiB of saved state), then runs ${warm.length} tasks ` +
          `that restore from it (medians). Compare with the lifecycle benchmark's boot figures.`,
        rows,
        summary: {
          'restored: startVm to first output line, TCG (median ms)': w((r) => r.bootToFirstLineMs),
          'restored: one-second task, client submit to result (median ms)': w((r) => r.clientMs),
          'restored: one-second task, workflow total (median ms)': w(total),
          'snapshot saved state (MiB)': round(snapshot.bytes / 1024 ** 2),
        },
      };
    },
  );
}
