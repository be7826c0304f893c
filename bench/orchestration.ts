import { promises as fs } from 'node:fs';
import path from 'node:path';
import { Client, Connection } from '@temporalio/client';
import type { temporal } from '@temporalio/proto';
import { taskFailureMessage, VspClient } from '../client/vspClient';
import { LocalCluster, type LocalClusterOptions } from '../deploy/devcluster/localCluster';
import { tailLog } from '../deploy/devcluster/processes';
import { createLogger, describeError } from '../logging/logger';
import type { TaskSpecInput } from '../spec/taskSpec';
import type { TaskPhase, TaskResult } from '../workflows/definitions';
import type { BenchReport } from './report';

const log = createLogger('bench.orchestration');

/** What the runner gives the cluster benchmarks: a Temporal server and a scratch folder it removes. */
export interface ClusterBenchEnv {
  temporalAddress: string;
  workDir: string;
  /** Fewer tasks, for a smoke run. */
  quick?: boolean;
  /** When set, the cluster's logs are copied to `<logsDir>/<benchmark>/` at the end. */
  logsDir?: string;
}

export interface BenchCluster {
  cluster: LocalCluster;
  vsp: VspClient;
}

/** The phases a completed lifecycle goes through, in order ('completed' is the end, not a phase). */
export const LIFECYCLE_PHASES: TaskPhase[] = [
  'validating',
  'placing',
  'staging-in',
  'creating',
  'starting',
  'running',
  'staging-out',
  'destroying',
];

export function median(xs: number[]): number {
  if (xs.length === 0) throw new Error('median of no values');
  const s = [...xs].sort((a, b) => a - b);
  const mid = Math.floor(s.length / 2);
  return s.length % 2 === 1 ? s[mid] : (s[mid - 1] + s[mid]) / 2;
}

export const round = (x: number, digits = 0): number => Number(x.toFixed(digits));

/**
 * Runs `fn` against a fresh local cluster (repository, control worker, host workers: real processes)
 * in `env.workDir/<name>`, always stopped afterwards. On failure the error carries the logs' last lines.
 */
export async function withBenchCluster<T>(
  env: ClusterBenchEnv,
  name: string,
  opts: Omit<LocalClusterOptions, 'temporalAddress' | 'baseDir'>,
  fn: (c: BenchCluster) => Promise<T>,
): Promise<T> {
  const baseDir = path.join(env.workDir, name);
  const cluster = new LocalCluster({ ...opts, temporalAddress: env.temporalAddress, baseDir });
  let connection: Connection | undefined;
  try {
    await cluster.start();
    connection = await Connection.connect({ address: env.temporalAddress });
    const vsp = new VspClient(new Client({ connection, namespace: 'default' }));
    return await fn({ cluster, vsp });
  } catch (err) {
    const logs = await fs.readdir(cluster.logDir).catch(() => [] as string[]);
    const tails = logs.map((f) => `--- ${f}\n${tailLog(path.join(cluster.logDir, f), 15)}`).join('\n');
    // The cause first: the summary shows only an error's first line.
    throw new Error(`${name}: ${describeError(err)}\ncluster logs:\n${tails}`, { cause: err });
  } finally {
    await connection?.close();
    await cluster.stop();
    if (env.logsDir)
      await fs.cp(cluster.logDir, path.join(env.logsDir, name), { recursive: true, force: true });
    await fs.rm(baseDir, { recursive: true, force: true });
  }
}

interface Lifecycle {
  taskId: string;
  result: TaskResult;
  /** Client side: the owners' submission (repository pre-flight, capability, workflow start). */
  submitMs: number;
  /** Client side: from submit() to result() resolving. */
  clientMs: number;
}

/**
 * Submits one task as its owner through the repository's task API (as owners do) and waits for its
 * result through Temporal; a failed task throws with the workflow's reason.
 */
export async function runLifecycle({ cluster, vsp }: BenchCluster, spec: TaskSpecInput): Promise<Lifecycle> {
  const t0 = performance.now();
  const { taskId } = await cluster.submitTask(spec.owner, spec);
  const submitMs = performance.now() - t0;
  try {
    const result = await vsp.result(taskId);
    return { taskId, result, submitMs, clientMs: performance.now() - t0 };
  } catch (err) {
    throw new Error(`task ${taskId} failed: ${taskFailureMessage(err)}`, { cause: err });
  }
}

const NOOP: TaskSpecInput = {
  owner: 'bench',
  driver: 'process',
  name: 'noop',
  command: 'true',
  timeLimitSec: 300,
};
const HOSTS = ['h1', 'h2'];
const WARMUP = 2;

type Row = BenchReport['rows'][number];

/** One table row: `values` summarised, the throughput columns filled only where they apply. */
function row(measure: string, values: number[], extra: { perMinute?: number; spread?: string } = {}): Row {
  return {
    measure,
    n: values.length,
    'median ms': values.length ? round(median(values)) : '-',
    'min ms': values.length ? round(Math.min(...values)) : '-',
    'max ms': values.length ? round(Math.max(...values)) : '-',
    'lifecycles/min': extra.perMinute ?? '',
    'tasks per host': extra.spread ?? '',
  };
}

type HistoryEvent = temporal.api.history.v1.IHistoryEvent;

/** Where one activity's time went, from its task's history (server clock). */
interface ActivityTimes {
  name: string;
  /** Scheduled -> started: Temporal handing the task to a poller (and the poller's worker taking it). */
  dispatchMs: number;
  /** Started -> closed: the activity's own work on its worker. */
  workMs: number;
  /** Closed -> the next workflow task completed: Temporal and the workflow reacting to the result. */
  reactMs: number;
}

/** What Temporal recorded of one lifecycle: its events, workflow tasks and activities' times. */
export interface HistoryTimes {
  events: number;
  workflowTasks: number;
  activities: ActivityTimes[];
}

const eventMs = (e: HistoryEvent | undefined): number =>
  e?.eventTime ? Number(e.eventTime.seconds ?? 0) * 1000 + Math.floor((e.eventTime.nanos ?? 0) / 1e6) : NaN;

export function historyTimes(events: HistoryEvent[]): HistoryTimes {
  const byId = new Map(events.map((e) => [Number(e.eventId), e]));
  const activities: ActivityTimes[] = [];
  for (const e of events) {
    const closed =
      e.activityTaskCompletedEventAttributes ??
      e.activityTaskFailedEventAttributes ??
      e.activityTaskTimedOutEventAttributes ??
      e.activityTaskCanceledEventAttributes;
    if (!closed) continue;
    const scheduled = byId.get(Number(closed.scheduledEventId));
    const started = byId.get(Number(closed.startedEventId));
    const reacted = events.find(
      (w) => Number(w.eventId) > Number(e.eventId) && w.workflowTaskCompletedEventAttributes,
    );
    activities.push({
      name: scheduled?.activityTaskScheduledEventAttributes?.activityType?.name ?? '?',
      dispatchMs: eventMs(started) - eventMs(scheduled),
      workMs: eventMs(e) - eventMs(started),
      reactMs: eventMs(reacted) - eventMs(e),
    });
  }
  return {
    events: events.length,
    workflowTasks: events.filter((e) => e.workflowTaskCompletedEventAttributes).length,
    activities,
  };
}

/**
 * Rows that split each activity of the lifecycles into Temporal's part (dispatch, then the workflow's
 * reaction to its result) and the worker's own work, in the order the lifecycle runs them.
 */
function temporalRows(histories: HistoryTimes[]): Row[] {
  const names = [...new Set(histories.flatMap((h) => h.activities.map((a) => a.name)))];
  return names.flatMap((name) => {
    const runs = histories.flatMap((h) => h.activities.filter((a) => a.name === name));
    return [
      row(
        `${name}: Temporal (dispatch + reaction)`,
        runs.map((a) => a.dispatchMs + a.reactMs),
      ),
      row(
        `${name}: its worker's work`,
        runs.map((a) => a.workMs),
      ),
    ];
  });
}

/** Per-phase times over sequential no-op lifecycles. */
async function sequential(bench: BenchCluster, count: number) {
  const runs: Lifecycle[] = [];
  for (let i = 0; i < count; i++) runs.push(await runLifecycle(bench, NOOP));
  const phase = (p: TaskPhase) => runs.map((r) => r.result.phaseMs[p] ?? 0);
  const total = runs.map((r) => LIFECYCLE_PHASES.reduce((sum, p) => sum + (r.result.phaseMs[p] ?? 0), 0));
  const overhead = runs.map((r, i) => total[i] - (r.result.phaseMs.running ?? 0));
  const client = runs.map((r) => r.clientMs);
  const histories = await Promise.all(
    runs.map(async (r) =>
      historyTimes((await bench.vsp.temporal.workflow.getHandle(r.taskId).fetchHistory()).events ?? []),
    ),
  );
  // The non-running time that no activity's own work accounts for (awaitVm's work is the running).
  const temporalPart = histories.map(
    (h, i) =>
      overhead[i] - h.activities.filter((a) => a.name !== 'awaitVm').reduce((sum, a) => sum + a.workMs, 0),
  );
  return {
    rows: [
      ...LIFECYCLE_PHASES.map((p) => row(`phase: ${p}`, phase(p))),
      row('workflow total (sum of phases)', total),
      row('workflow total minus running', overhead),
      row("of which Temporal's (minus the activities' own work)", temporalPart),
      ...temporalRows(histories),
      row(
        'history events per lifecycle (count)',
        histories.map((h) => h.events),
      ),
      row(
        'workflow tasks per lifecycle (count)',
        histories.map((h) => h.workflowTasks),
      ),
      row(
        'activities per lifecycle (count)',
        histories.map((h) => h.activities.length),
      ),
      row(
        'client submit (task API: pre-flight, capability, workflow start)',
        runs.map((r) => r.submitMs),
      ),
      row('client submit to result', client),
    ],
    total: median(total),
    overhead: median(overhead),
    temporalPart: median(temporalPart),
    activities: median(histories.map((h) => h.activities.length)),
    client: median(client),
  };
}

/** Closed loop: `concurrency` tasks always in flight until `total` have finished. */
async function throughput(bench: BenchCluster, concurrency: number, total: number) {
  let started = 0;
  const hosts = new Map<string, number>();
  const client: number[] = [];
  const failures: string[] = [];
  const t0 = performance.now();
  await Promise.all(
    Array.from({ length: concurrency }, async () => {
      while (started < total) {
        started++;
        try {
          const r = await runLifecycle(bench, NOOP);
          hosts.set(r.result.host, (hosts.get(r.result.host) ?? 0) + 1);
          client.push(r.clientMs);
        } catch (err) {
          failures.push((err as Error).message);
        }
      }
    }),
  );
  const elapsedMs = performance.now() - t0;
  if (failures.length > 0) log.warn({ concurrency, failures: failures.slice(0, 5) }, 'tasks failed');
  const perMinute = round((client.length / elapsedMs) * 60_000, 1);
  const spread = HOSTS.map((h) => `${h}: ${hosts.get(h) ?? 0}`).join(', ');
  const failed = failures.length ? `, ${failures.length} FAILED` : '';
  return {
    concurrency,
    perMinute,
    spread,
    row: row(
      `${concurrency} in flight: submit to result (${total} tasks in ${round(elapsedMs / 1000, 1)} s${failed})`,
      client,
      { perMinute, spread },
    ),
  };
}

/**
 * Orchestration overhead of the TaskLifecycle workflow with the process driver on two hosts: a no-op
 * task's phases one at a time, then lifecycles per minute at 1, 10 and 50 tasks in flight.
 */
export async function benchOrchestration(env: ClusterBenchEnv): Promise<BenchReport> {
  const sequentialCount = env.quick ? 10 : 20;
  // A smoke run leaves out the 50 in flight (minutes on a loaded machine).
  const levels = (env.quick ? [1, 10] : [1, 10, 50]).map((c) => ({
    c,
    total: env.quick ? Math.max(5, c) : Math.max(20, 3 * c),
  }));
  return withBenchCluster(
    env,
    'orchestration',
    { hosts: HOSTS, drivers: ['process'], owners: ['bench'] },
    async (bench) => {
      for (let i = 0; i < WARMUP; i++) await runLifecycle(bench, NOOP);
      const seq = await sequential(bench, sequentialCount);
      const rates = [];
      for (const { c, total } of levels) rates.push(await throughput(bench, c, total));
      return {
        name: 'orchestration',
        title: 'Orchestration overhead: TaskLifecycle with the process driver, two hosts',
        method:
          `A local cluster of real processes (Temporal dev server, repository, control worker, host workers ` +
          `${HOSTS.join(' and ')} with the process driver) on this machine. Task: \`true\`, no inputs. ` +
          `${WARMUP} warm-up lifecycles are not counted. Sequential part: ${sequentialCount} lifecycles one ` +
          `after another; phase times are the workflow's own phaseMs (workflow clock: the start of the ` +
          `workflow task that entered the phase, so a phase includes Temporal's dispatch of its activity); ` +
          `"client submit to result" is measured in the benchmark process from the owner's submission through the repository's task API (pre-flight, capability, workflow start: "client submit") to VspClient.result. ` +
          `"running" of a no-op task is the awaitVm round trip: the process driver finds the exit status at its first check (it polls every 500 ms after that). ` +
          `Throughput part: a closed loop keeping 1, 10 or 50 tasks in flight until the count is done; ` +
          `lifecycles/min = completed / elapsed; "tasks per host" is where the control worker placed them ` +
          `(live host with the fewest running tasks).`,
        rows: [...seq.rows, ...rates.map((r) => r.row)],
        summary: {
          'no-op lifecycle, workflow total (median ms)': round(seq.total),
          'no-op lifecycle, client submit to result (median ms)': round(seq.client),
          'no-op lifecycle minus running (median ms)': round(seq.overhead),
          "no-op lifecycle minus running, Temporal's part (median ms)": round(seq.temporalPart),
          'activities per no-op lifecycle (median)': seq.activities,
          ...Object.fromEntries(
            rates.map((r) => [`lifecycles/min, ${r.concurrency} in flight`, r.perMinute]),
          ),
          ...Object.fromEntries(rates.map((r) => [`tasks per host, ${r.concurrency} in flight`, r.spread])),
        },
      };
    },
  );
}
