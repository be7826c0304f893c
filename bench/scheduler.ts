import { performance } from 'node:perf_hooks';
import { Client, Connection } from '@temporalio/client';
import { NativeConnection, Worker } from '@temporalio/worker';
import { SchedulerClient } from '../client/schedulerClient';
import { CONTROL_TASK_QUEUE, SCHEDULER_WORKFLOW_ID } from '../config/names';
import {
  DEFAULT_SCHEDULER_CONFIG,
  emptySchedulerState,
  MiB,
  type HostView,
  type PlacementRequest,
  type PlaceResult,
  type QueueEntry,
  type SchedulerState,
} from '../scheduler/model';
import { choose, eligibleHosts, grantsFromQueue, insertionIndex } from '../scheduler/placement';
import { WORKFLOW_BUNDLE } from '../workers/bundleWorkflows';
import { placeUpdate, releaseUpdate } from '../workflows/scheduling/definitions';
import type { BenchReport } from './report';

/**
 * Placement decisions per second with 500 tasks queued:
 *  - in process, the pure decisions (scheduler/placement.ts): a new task's placement (choose + queue
 *    insertion) and a full pass over the queue when capacity frees (grantsFromQueue), on 2 and 50 hosts;
 *  - through Temporal: the scheduler workflow (real dev server, the built workflow bundle, a worker in this
 *    process whose host survey answers with two hosts sized for 6 tasks of the process driver each):
 *    512 place updates, 10 in flight (12 granted, 500 queued), then releases with the 500 waiting (each a
 *    grant pass and the head's signal).
 */
const TASKS = 512;
const IN_FLIGHT = 10;

function views(n: number): Record<string, HostView> {
  const out: Record<string, HostView> = {};
  for (let i = 0; i < n; i++) {
    const host = `h${i}`;
    out[host] = {
      host,
      live: true,
      reason: 'bench',
      inventory: {
        host,
        vcpus: 2,
        memoryMiB: 6 * 256,
        storeTotalBytes: 100 * 1024 * MiB,
        storeFreeBytes: 90 * 1024 * MiB,
        drivers: ['process'],
        cachedImages: [],
        labels: {},
        workerStartedAt: '',
        reportedAt: '',
      },
    };
  }
  return out;
}

function request(i: number): PlacementRequest {
  return {
    taskId: `bench-sched-${i}`,
    owner: 'alice',
    resources: { vcpus: 1, memoryMiB: 256, diskMiB: 320 },
    driver: 'process',
    labels: {},
    priority: i % 3,
    image: 'default',
    exclude: [],
  };
}

/** Runs `fn(0..n-1)`, `width` at a time. */
async function inPool(n: number, width: number, fn: (i: number) => Promise<unknown>): Promise<void> {
  let next = 0;
  await Promise.all(
    Array.from({ length: width }, async () => {
      for (let i = next++; i < n; i = next++) await fn(i);
    }),
  );
}

/** The pure decisions: a full cluster with `queued` waiting, `hosts` hosts. */
function pure(hosts: number, queued: number, rounds: number) {
  const s: SchedulerState = {
    ...emptySchedulerState({ ...DEFAULT_SCHEDULER_CONFIG, hosts: Object.keys(views(hosts)) }),
    views: views(hosts),
  };
  let i = 0;
  for (const h of s.config.hosts)
    for (let k = 0; k < 6; k++, i++)
      s.reservations[`r${i}`] = {
        taskId: `r${i}`,
        owner: 'a',
        host: h,
        resources: request(0).resources,
        since: '',
      };
  for (let k = 0; k < queued; k++) {
    const e: QueueEntry = { request: request(k), seq: s.seq++, since: '', why: '' };
    s.queue.splice(insertionIndex(s.queue, e), 0, e);
  }
  let t0 = performance.now();
  for (let k = 0; k < rounds; k++) {
    const r = request(queued + k);
    if ('host' in choose(r, eligibleHosts(s), s.config)) throw new Error('the cluster should be full');
    const e: QueueEntry = { request: r, seq: s.seq++, since: '', why: '' };
    s.queue.splice(insertionIndex(s.queue, e), 0, e);
    s.queue.pop();
  }
  const placePerSec = rounds / ((performance.now() - t0) / 1000);
  // Capacity frees one task's worth on one host: the pass finds the queue's first fit.
  delete s.reservations.r0;
  t0 = performance.now();
  for (let k = 0; k < rounds; k++) if (grantsFromQueue(s).length !== 1) throw new Error('one grant expected');
  const passPerSec = rounds / ((performance.now() - t0) / 1000);
  return { placePerSec, passPerSec };
}

export async function benchScheduler(env: { temporalAddress: string; quick: boolean }): Promise<BenchReport> {
  const rows: Record<string, string | number>[] = [];
  const rounds = env.quick ? 200 : 2000;
  for (const hosts of [2, 50]) {
    const p = pure(hosts, 500, rounds);
    rows.push({
      where: 'in process (pure)',
      hosts,
      queued: 500,
      'placements/s': Math.round(p.placePerSec),
      'queue passes/s (grant on release)': Math.round(p.passPerSec),
    });
  }

  const connection = await Connection.connect({ address: env.temporalAddress });
  const client = new Client({ connection, namespace: 'default' });
  const native = await NativeConnection.connect({ address: env.temporalAddress });
  const hostViews = views(2);
  const worker = await Worker.create({
    connection: native,
    taskQueue: CONTROL_TASK_QUEUE,
    workflowBundle: { codePath: WORKFLOW_BUNDLE },
    activities: { surveyHosts: async (hosts: string[]) => hosts.map((h) => hostViews[h]) },
  });
  const running = worker.run();
  const scheduler = new SchedulerClient(client, {
    config: { ...DEFAULT_SCHEDULER_CONFIG, hosts: Object.keys(hostViews) },
  });
  try {
    // Stand-ins for the queued tasks: workflows that take the scheduler's grant signal (a host's liveness
    // record for a host that has no worker: it waits, and buffers the signal).
    await inPool(TASKS, 20, (i) =>
      client.workflow.start('HostLiveness', {
        taskQueue: CONTROL_TASK_QUEUE,
        workflowId: request(i).taskId,
        args: [{ host: 'bench-none', heartbeatSec: 60 }],
      }),
    );
    const t0 = performance.now();
    // As many senders as Temporal admits updates in flight per workflow (10): more only get pushed back.
    const results: PlaceResult[] = [];
    await inPool(
      TASKS,
      IN_FLIGHT,
      async (i) => (results[i] = await scheduler.update(placeUpdate, request(i))),
    );
    const burstMs = performance.now() - t0;
    const granted = results.filter((r) => 'host' in r).length;
    const queued = results.filter((r) => 'queued' in r).length;
    if (granted !== 12 || queued !== 500)
      throw new Error(`expected 12 granted and 500 queued, got ${granted}/${queued}`);
    const releases = env.quick ? 5 : 20;
    const granted0 = results.flatMap((r, i) => ('host' in r ? [request(i).taskId] : []));
    const t1 = performance.now();
    for (let k = 0; k < releases; k++)
      await scheduler.update(releaseUpdate, { taskId: granted0[k % granted0.length] });
    const releaseMs = (performance.now() - t1) / releases;
    rows.push({
      where: 'scheduler workflow (Temporal dev server)',
      hosts: 2,
      queued,
      'placements/s': Math.round(TASKS / (burstMs / 1000)),
      'queue passes/s (grant on release)': Math.round(1000 / releaseMs),
    });
    return {
      name: 'scheduler',
      title: 'Scheduler: placement decisions per second with 500 tasks queued',
      method:
        `In process: ${rounds} placements of a task that finds the cluster full (choose over every host, then ` +
        'insertion into the priority-ordered queue of 500), and as many grant passes over the 500 when one ' +
        "task's capacity frees. Through Temporal: the scheduler workflow (the built bundle, a worker in this " +
        `process, hosts surveyed by a stand-in activity: 2 hosts x 6 tasks), ${TASKS} place updates, ${IN_FLIGHT} in flight at a time (what Temporal admits per workflow) ` +
        `(12 granted, 500 queued), then ${releases} release updates one after another, each freeing one task's ` +
        "room with 500 waiting (a grant pass and the head's grant signal; the queued tasks are stand-in workflows that take it).",
      rows,
      summary: {
        'placements/s through the scheduler workflow (512, 10 in flight)': Math.round(
          TASKS / (burstMs / 1000),
        ),
        'release + grant pass latency with 500 queued': `${releaseMs.toFixed(1)} ms`,
        'pure placements/s (500 queued, 50 hosts)': rows[1]['placements/s'],
      },
    };
  } finally {
    await inPool(TASKS + 1, 20, (i) =>
      client.workflow
        .getHandle(i === TASKS ? SCHEDULER_WORKFLOW_ID : request(i).taskId)
        .terminate('bench over')
        .catch(() => undefined),
    );
    worker.shutdown();
    await running;
    await native.close();
    await connection.close();
  }
}
