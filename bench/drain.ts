import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { SchedulerClient } from '../client/schedulerClient';
import { startNamespaceCluster, type NamespaceCluster } from '../deploy/devcluster/namespaceCluster';
import { createLogger } from '../logging/logger';
import type { TaskStatus } from '../workflows/definitions';
import { drainUpdate, undrainUpdate } from '../workflows/scheduling/definitions';
import type { BenchReport } from './report';

const log = createLogger('bench.drain');
const OWNER = 'bench';
const SAMPLE_MS = 250;

/** Polls `check` until it yields a value; fails past `timeoutMs`. */
async function until<T>(what: string, check: () => Promise<T | undefined>, timeoutMs: number): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await check();
    if (v !== undefined) return v;
    if (Date.now() > deadline) throw new Error(`${what}: not within ${timeoutMs} ms`);
    await sleep(SAMPLE_MS);
  }
}

/**
 * Time to drain a host with 4 VMs: two namespace test hosts (nfs-ganesha exports), the whole stack (Temporal,
 * control and host workers, the scheduler), QEMU under TCG. Four idle VM tasks run on a; `drain a` (default
 * --max-parallel 2) live-migrates them to b and then moves their disks (storage evacuation). Measured from
 * the drain update: until a holds no VM, and until it is `drained` (no VM, no disk).
 */
export async function benchDrain(o: { workDir: string; quick: boolean }): Promise<BenchReport> {
  const vms = o.quick ? 2 : 4;
  const maxParallel = 2;
  let ns: NamespaceCluster | undefined;
  let vmsGoneMs = 0;
  let drainedMs = 0;
  let statuses: TaskStatus[] = [];
  try {
    ns = await startNamespaceCluster({
      hosts: ['a', 'b'],
      prefix: 'vspbdr-',
      subnet: '10.77.53',
      owners: [OWNER],
      logDir: path.join(o.workDir, 'drain-logs'),
      hostEnv: { VSP_HOST_HEARTBEAT_SEC: '2' },
    });
    const { cluster, vsp } = ns;
    const scheduler = new SchedulerClient(ns.client);
    const ids: string[] = [];
    for (let i = 0; i < vms; i++)
      ids.push(
        (
          await cluster.submitTask(OWNER, {
            owner: OWNER,
            driver: 'qemu',
            host: 'a',
            memoryMiB: 128,
            timeLimitSec: 3600,
            command: 'mkdir -p out; while true; do date > out/clock; sleep 1; done',
          })
        ).taskId,
      );
    await until(
      `${vms} VM tasks running on a`,
      async () => {
        const s = await Promise.all(ids.map((id) => vsp.status(id)));
        return s.every((x) => x.phase === 'running' && x.host === 'a') ? true : undefined;
      },
      600_000,
    );
    const t0 = Date.now();
    await scheduler.update(drainUpdate, { host: 'a', maxParallel });
    await until(
      'host a drained',
      async () => {
        const a = (await scheduler.state({ fresh: true })).hosts.find((h) => h.host === 'a');
        if (!vmsGoneMs && a?.tasks.length === 0) vmsGoneMs = Date.now() - t0;
        return a?.state === 'drained' ? true : undefined;
      },
      1_800_000,
    );
    drainedMs = Date.now() - t0;
    statuses = (await Promise.all(ids.map((id) => vsp.status(id)))) as TaskStatus[];
    log.info({ vmsGoneMs, drainedMs }, 'drained');
    await scheduler.update(undrainUpdate, { host: 'a' });
    for (const id of ids) await vsp.cancel(id, 'bench done');
    await Promise.all(ids.map((id) => vsp.result(id).catch(() => undefined)));
  } finally {
    await ns?.stop();
  }
  return {
    name: 'drain',
    title: `Time to drain a host with ${vms} VMs (live migration, then storage evacuation)`,
    method:
      `Two namespace test hosts (nfs-ganesha exports), Temporal dev server, control and host workers, the ` +
      `scheduler workflow; QEMU under TCG. ${vms} idle VM tasks (128 MiB) on a, each writing a file every ` +
      `second; \`drain a\` with max-parallel ${maxParallel}: each VM live-migrates to b (memory only), then its ` +
      'disks are mirrored to b while it runs and a drops them. Times from the drain update, sampled every ' +
      `${SAMPLE_MS} ms from the scheduler's state (fresh host survey).`,
    rows: statuses.map((s) => {
      const m = s.migrations?.at(-1);
      const d = s.storageMoves?.at(-1);
      return {
        task: s.taskId,
        'now on': `${s.host} (disks on ${s.storageHost})`,
        'migration ms': m?.totalTimeMs ?? '',
        'downtime ms': m?.downtimeMs ?? '',
        'disk move ms': d?.mirrorMs ?? '',
        'disk MiB (virtual)': d?.bytes !== undefined ? Number((d.bytes / 1024 ** 2).toFixed(0)) : '',
      };
    }),
    summary: {
      [`no VM left on a (${vms} VMs), s`]: (vmsGoneMs / 1000).toFixed(1),
      'drained (no VM, no disk), s': (drainedMs / 1000).toFixed(1),
      'per VM, s': (drainedMs / 1000 / vms).toFixed(1),
    },
  };
}
