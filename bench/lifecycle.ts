import { promises as fs } from 'node:fs';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import type { TaskSpecInput } from '../spec/taskSpec';
import type { TaskPhase } from '../workflows/definitions';
import {
  LIFECYCLE_PHASES,
  median,
  round,
  runLifecycle,
  withBenchCluster,
  type BenchCluster,
  type ClusterBenchEnv,
} from './orchestration';
import type { BenchReport } from './report';

export const HOST = 'q1';
export const FIRST_LINE = 'VSP-PROGRESS 1 first-line';
export const TASK: TaskSpecInput = {
  owner: 'bench',
  name: 'sleep1',
  driver: 'qemu',
  command: `echo ${FIRST_LINE} && sleep 1`,
  timeLimitSec: 300,
};
export const POLL_MS = 20;

/** Wall-clock times (ms since the epoch) the benchmark saw on the VM's console. */
interface ConsoleTimes {
  /** The console log appeared: QEMU has opened it, i.e. the VM process runs. */
  opened?: number;
  /** The task's first output line is on the console. */
  firstLine?: number;
}

/**
 * Watches the host's VM store while one task runs there alone: the single VM folder is the task's.
 * Resolves when `stop` is aborted.
 */
async function watchConsole(vmsDir: string, stop: AbortSignal): Promise<ConsoleTimes> {
  const seen: ConsoleTimes = {};
  while (!stop.aborted && seen.firstLine === undefined) {
    const vms = await fs.readdir(vmsDir).catch(() => [] as string[]);
    if (vms.length > 1) throw new Error(`more than one VM in ${vmsDir}: ${vms.join(', ')}`);
    if (vms.length === 1) {
      const text = await fs.readFile(path.join(vmsDir, vms[0], 'console.log'), 'utf8').catch(() => undefined);
      if (text !== undefined) seen.opened ??= Date.now();
      if (text?.split('\n').some((l) => l.replace(/\r$/, '') === FIRST_LINE)) seen.firstLine = Date.now();
    }
    await sleep(POLL_MS);
  }
  return seen;
}

export interface Run {
  phaseMs: Partial<Record<TaskPhase, number>>;
  clientMs: number;
  /** startVm scheduled (workflow's 'starting' timestamp) to the first output line on the console. */
  bootToFirstLineMs: number;
  /** startVm scheduled to the console log appearing (activity dispatch + QEMU launch). */
  launchMs: number;
}

export async function oneTask(env: { bench: BenchCluster; vmsDir: string }): Promise<Run> {
  const stop = new AbortController();
  const watching = watchConsole(env.vmsDir, stop.signal);
  let lifecycle;
  try {
    lifecycle = await runLifecycle(env.bench, TASK);
  } finally {
    stop.abort();
  }
  const seen = await watching;
  const status = await env.bench.vsp.status(lifecycle.result.taskId);
  const startVm = Date.parse(status.timestamps.starting ?? '');
  if (!Number.isFinite(startVm))
    throw new Error(`task ${lifecycle.result.taskId} has no 'starting' timestamp`);
  if (seen.firstLine === undefined || seen.opened === undefined)
    throw new Error(`task ${lifecycle.result.taskId}: "${FIRST_LINE}" never seen on the console`);
  return {
    phaseMs: lifecycle.result.phaseMs,
    clientMs: lifecycle.clientMs,
    bootToFirstLineMs: seen.firstLine - startVm,
    launchMs: seen.opened - startVm,
  };
}

/**
 * A QEMU VM's lifecycle under TCG on one host: boot to the task's first output line, and the whole
 * lifecycle of a one-second task, phase by phase.
 */
export async function benchLifecycle(env: ClusterBenchEnv): Promise<BenchReport> {
  const warmRuns = env.quick ? 1 : 5;
  return withBenchCluster(
    env,
    'lifecycle',
    { hosts: [HOST], drivers: ['qemu'], hostEnv: { VSP_ACCEL: 'tcg' }, owners: ['bench'] },
    async (bench) => {
      const ctx = { bench, vmsDir: path.join(bench.cluster.storeDir(HOST), 'vms') };
      // The first task on a fresh host also fills the host's image cache with the appliance's root image.
      const cold = await oneTask(ctx);
      const warm: Run[] = [];
      for (let i = 0; i < warmRuns; i++) warm.push(await oneTask(ctx));

      const total = (r: Run) => LIFECYCLE_PHASES.reduce((s, p) => s + (r.phaseMs[p] ?? 0), 0);
      const measures: [string, (r: Run) => number][] = [
        ...LIFECYCLE_PHASES.map((p): [string, (r: Run) => number] => [
          `phase: ${p}`,
          (r) => r.phaseMs[p] ?? 0,
        ]),
        ['workflow total (sum of phases)', total],
        ['client submit to result', (r) => r.clientMs],
        ['startVm to console opened (dispatch + QEMU launch)', (r) => r.launchMs],
        ['startVm to first output line (boot)', (r) => r.bootToFirstLineMs],
      ];
      const rows = measures.map(([measure, f]) => ({
        measure,
        'cold run ms': round(f(cold)),
        [`warm median ms (n=${warm.length})`]: round(median(warm.map(f))),
        'warm min ms': round(Math.min(...warm.map(f))),
        'warm max ms': round(Math.max(...warm.map(f))),
      }));
      const w = (f: (r: Run) => number) => round(median(warm.map(f)));
      return {
        name: 'lifecycle',
        title: 'QEMU (TCG) task lifecycle: boot to first output, one-second task phase by phase',
        method:
          `A local cluster of real processes (Temporal dev server, repository, control worker, one host ` +
          `worker with the QEMU driver, VSP_ACCEL=tcg: KVM does not work on these machines). Task: ` +
          `\`echo ${FIRST_LINE} && sleep 1\` in the default appliance (1 vCPU, 256 MiB), no inputs; one ` +
          `task at a time. The cold run is the first task on the fresh host (it also fills the host's image ` +
          `cache); then ${warm.length} warm runs, medians. Phase times are the workflow's phaseMs. Boot to ` +
          `first output line: from the workflow's 'starting' timestamp (the workflow task that schedules ` +
          `startVm, so it includes the activity's dispatch and the QEMU launch) to the moment the benchmark, ` +
          `polling the VM's console log every ${POLL_MS} ms, sees the task's first line; the guest copies ` +
          `VSP-PROGRESS lines to the serial console as the task prints them. "Console opened" is when the ` +
          `console log first exists (QEMU opens it on launch). Both clocks are this machine's wall clock; ` +
          `the polling adds up to ${POLL_MS} ms.`,
        rows,
        summary: {
          'boot to first output line, TCG (warm median ms)': w((r) => r.bootToFirstLineMs),
          'one-second task, workflow total (warm median ms)': w(total),
          'one-second task, client submit to result (warm median ms)': w((r) => r.clientMs),
          'one-second task, running phase (warm median ms)': w((r) => r.phaseMs.running ?? 0),
          'cold first task, client submit to result (ms)': round(cold.clientMs),
        },
      };
    },
  );
}
