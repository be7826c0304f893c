import { promises as fs } from 'node:fs';
import path from 'node:path';
import type { WorkflowHandleWithFirstExecutionRunId as WorkflowHandle } from '@temporalio/client';
import { TestWorkflowEnvironment } from '@temporalio/testing';
import { Worker, type WorkflowBundle } from '@temporalio/worker';
import { SchedulerClient } from '../../client/schedulerClient';
import { CONTROL_TASK_QUEUE, SCHEDULER_WORKFLOW_ID } from '../../config/names';
import {
  DEFAULT_SCHEDULER_CONFIG,
  MiB,
  type HostInventory,
  type HostView,
  type PlacementRequest,
  type SchedulerConfig,
} from '../../scheduler/model';
import {
  drainUpdate,
  placeUpdate,
  releaseUpdate,
  reserveMoveUpdate,
  settleMoveUpdate,
  settleStorageUpdate,
  undrainUpdate,
  configureUpdate,
  type SchedulerSnapshot,
} from '../../workflows/scheduling/definitions';
import { replayFailures, recordHistory, runIds } from './support/historyFixture';
import { startWorkflowTestEnv } from './support/workflowEnv';

/**
 * The scheduler workflow (workflows/scheduler.ts) on a local Temporal dev server, with stand-in
 * activities: hosts' views set by the test, a drain's migrations done through the scheduler's own
 * reserveMove/settleMove updates (as a task's migration does). Queued tasks are GrantReceiver workflows
 * that end with the host the scheduler's signal grants. `VSP_RECORD_HISTORIES=1` records the histories
 * the last test replays.
 */
const FIXTURES = path.join(__dirname, '..', 'fixtures', 'histories', 'scheduler');

let env: TestWorkflowEnvironment;
let bundle: WorkflowBundle;
let worker: Worker;
let running: Promise<void>;
const views = new Map<string, HostView>();
const calls: string[] = [];
/** Tasks whose workflows the stand-in goneTasks reports as ended. */
const gone = new Set<string>();

function inventory(host: string, memoryMiB: number, drivers = ['qemu', 'process']): HostInventory {
  return {
    host,
    vcpus: 2,
    memoryMiB,
    storeTotalBytes: 10 * 1024 * MiB,
    storeFreeBytes: 9 * 1024 * MiB,
    drivers,
    defaultDriver: 'qemu',
    cachedImages: [],
    labels: {},
    workerStartedAt: '2026-01-01T00:00:00Z',
    reportedAt: '2026-01-01T00:00:00Z',
  };
}

function setHost(host: string, memoryMiB: number, live = true): void {
  views.set(host, { host, live, reason: live ? 'live' : 'down', inventory: inventory(host, memoryMiB) });
}

beforeAll(async () => {
  ({ env, bundle } = await startWorkflowTestEnv(require.resolve('./support/schedulerTestWorkflows')));
  const scheduler = new SchedulerClient(env.client);
  worker = await Worker.create({
    connection: env.nativeConnection,
    taskQueue: CONTROL_TASK_QUEUE,
    workflowBundle: bundle,
    activities: {
      surveyHosts: async (hosts: string[]) => {
        calls.push('surveyHosts');
        return hosts.flatMap((h) => views.get(h) ?? []);
      },
      // A task's migration as the lifecycle does it: a target from the scheduler, then the settled move.
      migrateTask: async ({ taskId, to }: { taskId: string; to?: string }) => {
        calls.push(`migrateTask ${taskId}`);
        const state = await scheduler.state();
        const from = state.hosts.find((h) => h.tasks.includes(taskId))?.host as string;
        const target = await scheduler.update(reserveMoveUpdate, {
          taskId,
          owner: 'alice',
          current: from,
          resources: { vcpus: 1, memoryMiB: 256, diskMiB: 1 },
          driver: 'qemu',
          ...(to ? { requested: to } : {}),
        });
        if ('refused' in target) throw new Error(target.refused);
        await scheduler.update(settleMoveUpdate, { taskId, host: target.host });
        return 'moved';
      },
      // A task's disk move as the lifecycle does it: settled where its VM runs.
      localizeTask: async ({ taskId }: { taskId: string }) => {
        calls.push(`localizeTask ${taskId}`);
        const r = (await scheduler.state()).reservations.find((x) => x.taskId === taskId);
        await scheduler.update(settleStorageUpdate, { taskId, storageHost: r?.host as string });
        return 'moved';
      },
      cancelTask: async ({ taskId }: { taskId: string }) => void calls.push(`cancelTask ${taskId}`),
      goneTasks: async (ids: string[]) => ids.filter((id) => gone.has(id)),
    },
  });
  running = worker.run();
}, 120_000);

afterAll(async () => {
  worker?.shutdown();
  await running;
  await env?.teardown();
});

let seq = 0;
function req(over: Partial<PlacementRequest> = {}): PlacementRequest {
  return {
    taskId: `sched-task-${seq++}`,
    owner: 'alice',
    resources: { vcpus: 1, memoryMiB: 256, diskMiB: 1 },
    labels: {},
    priority: 0,
    image: 'default',
    exclude: [],
    ...over,
  };
}

/** A fresh scheduler for `hosts`, started by its first update as a control worker starts it. */
function schedulerFor(
  hosts: string[],
  historyEventLimit?: number,
  over: Partial<SchedulerConfig> = {},
  sweepEverySec?: number,
): SchedulerClient {
  return new SchedulerClient(env.client, {
    config: { ...DEFAULT_SCHEDULER_CONFIG, hosts, ...over },
    ...(sweepEverySec !== undefined ? { sweepEverySec } : {}),
    ...(historyEventLimit !== undefined ? { historyEventLimit } : {}),
  });
}

const handle = () => env.client.workflow.getHandle(SCHEDULER_WORKFLOW_ID);

/** The scheduler's current run (right after its first update: the first run of this test's chain). */
async function currentRun(): Promise<string> {
  return (await handle().describe()).runId;
}

/** Ends this test's scheduler, recording its runs from `firstRun` when asked. */
async function finish(name: string, firstRun: string): Promise<void> {
  await env.client.workflow.getHandle(SCHEDULER_WORKFLOW_ID, await currentRun()).terminate('test over');
  const chain = Object.assign(handle(), { firstExecutionRunId: firstRun }) as unknown as WorkflowHandle;
  await recordHistory(env, FIXTURES, name, chain);
}

/**
 * Host a (512 MiB) filled by two tasks of 256 MiB; a third (a GrantReceiver) asks next. Returns them, the
 * third's answer and the scheduler's first run.
 */
async function fullHostAndOneMore(s: SchedulerClient) {
  const [t1, t2, t3] = [req(), req(), req()];
  const receiver = await env.client.workflow.start('GrantReceiver', {
    taskQueue: CONTROL_TASK_QUEUE,
    workflowId: t3.taskId,
  });
  expect(await s.update(placeUpdate, t1)).toEqual({ host: 'a' });
  const first = await currentRun();
  expect(await s.update(placeUpdate, t2)).toEqual({ host: 'a' });
  return { t1, t2, t3, receiver, first, third: await s.update(placeUpdate, t3) };
}

test('capacity, queue and grant: the third task waits, then starts where the first ended', async () => {
  setHost('a', 512);
  const s = schedulerFor(['a']);
  const { t1, t2, t3, receiver, first, third } = await fullHostAndOneMore(s);
  expect(third).toEqual({
    queued: expect.objectContaining({
      position: 1,
      of: 1,
      why: expect.stringMatching(/a: full: 256 MiB memory short/),
    }),
  });
  // Asked again (a retried activity), the answer is the same: no second place in the queue.
  expect(await s.update(placeUpdate, t3)).toMatchObject({ queued: { position: 1, of: 1 } });
  expect(await s.position(t3.taskId)).toMatchObject({ position: 1 });
  await s.update(releaseUpdate, { taskId: t1.taskId });
  expect(await receiver.result()).toBe('a');
  const state = await s.state();
  expect(state.hosts[0]).toMatchObject({ host: 'a', state: 'ready', tasks: [t2.taskId, t3.taskId] });
  expect(state.hosts[0].allocated.memoryMiB).toBe(512);
  expect(state.queue).toEqual([]);
  // Too big for any host, even empty: refused, saying what is missing.
  expect(await s.update(placeUpdate, req({ resources: { vcpus: 1, memoryMiB: 4096, diskMiB: 1 } }))).toEqual({
    refused: expect.stringMatching(
      /no host can ever run this task: a: too small even when empty: 3584 MiB memory short/,
    ),
  });
  await finish('scheduler-queue', first);
});

test('drain: VM tasks move off the host, process tasks stay; drained, then ready again', async () => {
  setHost('a', 1024);
  setHost('b', 1024);
  const s = schedulerFor(['a', 'b']);
  const vms = [req({ host: 'a' }), req({ host: 'a' })];
  const proc = req({ host: 'a', driver: 'process' });
  for (const r of [...vms, proc]) expect(await s.update(placeUpdate, r)).toEqual({ host: 'a' });
  const first = await currentRun();
  const order = await s.update(drainUpdate, { host: 'a', maxParallel: 1 });
  expect(order.maxParallel).toBe(1);
  // Drained: no new task goes there.
  expect(await s.update(placeUpdate, req())).toEqual({ host: 'b' });
  // Moved, and their disks too (storage evacuation): a holds only the process task.
  const moved = async () => {
    const st = await s.state();
    const a = st.hosts.find((h) => h.host === 'a');
    return a?.tasks.length === 1 && !a.storedTasks ? st : undefined;
  };
  let state;
  while (!(state = await moved())) await new Promise((r) => setTimeout(r, 50));
  expect(state.hosts.map((h) => [h.host, h.state, h.tasks.length])).toEqual([
    ['a', 'draining', 1],
    ['b', 'ready', 3],
  ]);
  expect(calls.filter((c) => c.startsWith('migrateTask'))).toEqual(vms.map((v) => `migrateTask ${v.taskId}`));
  expect(calls.filter((c) => c.startsWith('localizeTask')).sort()).toEqual(
    vms.map((v) => `localizeTask ${v.taskId}`).sort(),
  );
  await s.update(releaseUpdate, { taskId: proc.taskId });
  expect((await s.state()).hosts[0]).toMatchObject({ host: 'a', state: 'drained', tasks: [] });
  await s.update(undrainUpdate, { host: 'a' });
  expect((await s.state()).hosts[0]).toMatchObject({ host: 'a', state: 'ready' });
  expect(await s.update(placeUpdate, req())).toEqual({ host: 'a' });
  await finish('scheduler-drain', first);
});

test('continue-as-new: reservations and the queue are carried to the next run', async () => {
  setHost('a', 512);
  const s = schedulerFor(['a'], 40);
  const placed = [req(), req()];
  for (const r of placed) await s.update(placeUpdate, r);
  const first = await currentRun();
  const waiting = [req({ priority: 1 }), req()];
  for (const r of waiting) await s.update(placeUpdate, r);
  // Placements and refreshes grow the history past its limit.
  while ((await currentRun()) === first)
    await s.update(placeUpdate, req({ resources: { vcpus: 1, memoryMiB: 9999, diskMiB: 1 } }));
  const state = await s.state();
  expect(state.hosts[0].tasks).toEqual(placed.map((r) => r.taskId));
  expect(state.queue.map((e) => e.request.taskId)).toEqual(waiting.map((r) => r.taskId));
  const chain = Object.assign(handle(), { firstExecutionRunId: first }) as unknown as WorkflowHandle;
  expect((await runIds(env.client, chain)).length).toBeGreaterThan(1);
  await finish('scheduler-continued', first);
});

test('rebalancing: Schedule ticks move VMs one at a time until balanced, across runs; pack empties a host', async () => {
  setHost('a', 1024);
  setHost('b', 1024, false);
  const rebalance = { everySec: 60, threshold: 0.01, maxInFlight: 1 };
  const s = schedulerFor(['a', 'b'], 60, { rebalance });
  // b is down: all three go to a.
  const vms = [req(), req(), req()];
  for (const r of vms) expect(await s.update(placeUpdate, r)).toEqual({ host: 'a' });
  const first = await currentRun();
  setHost('b', 1024);
  const tick = () =>
    env.client.workflow.execute('RebalanceTick', {
      taskQueue: CONTROL_TASK_QUEUE,
      workflowId: `tick-${seq++}`,
    });
  /** The state once the scheduler has finished round `n` (its moves ended, nothing more to gain). */
  const afterRound = async (n: number): Promise<SchedulerSnapshot> => {
    for (;;) {
      const st = await s.state();
      if (st.balance && st.balance.rounds >= n && st.balance.balanced) return st;
      await new Promise((r) => setTimeout(r, 50));
    }
  };
  const movesBefore = calls.filter((c) => c.startsWith('migrateTask')).length;
  await tick();
  let st = await afterRound(1);
  expect(st.hosts.map((h) => [h.host, h.tasks.length])).toEqual([
    ['a', 2],
    ['b', 1],
  ]);
  expect(st.balance).toMatchObject({ rounds: 1, moved: 1, failed: 0, inFlight: {} });
  // Balanced: the next round moves nothing (2/1 and 1/2 are equally even).
  await tick();
  st = await afterRound(2);
  expect(st.balance).toMatchObject({ rounds: 2, moved: 1 });
  // Pack: the least used host (b) is emptied into a.
  await s.update(configureUpdate, { ...st.config, policy: 'pack' });
  await tick();
  st = await afterRound(3);
  expect(st.hosts.map((h) => [h.host, h.tasks.length])).toEqual([
    ['a', 3],
    ['b', 0],
  ]);
  expect(st.balance).toMatchObject({ rounds: 3, moved: 2, failed: 0 });
  expect(calls.filter((c) => c.startsWith('migrateTask')).length - movesBefore).toBe(2);
  // Its history past 60 events, the scheduler continued as new meanwhile and planned on from its state.
  const chain = Object.assign(handle(), { firstExecutionRunId: first }) as unknown as WorkflowHandle;
  expect((await runIds(env.client, chain)).length).toBeGreaterThan(1);
  await finish('scheduler-rebalance', first);
});

test('sweep: what a task whose workflow ended without releasing holds is given back, and the queue moves on', async () => {
  setHost('a', 512);
  const s = schedulerFor(['a'], undefined, {}, 1);
  const { t1, t2, t3, receiver, first, third } = await fullHostAndOneMore(s);
  expect(third).toMatchObject({ queued: { position: 1 } });
  // t1's workflow ends without its release (an operator terminated it): the next sweep frees its place.
  gone.add(t1.taskId);
  expect(await receiver.result()).toBe('a');
  const state = await s.state();
  expect(state.reservations.map((r) => r.taskId).sort()).toEqual([t2.taskId, t3.taskId].sort());
  expect(state.queue).toEqual([]);
  await finish('scheduler-sweep', first);
});

test('recorded scheduler histories replay against the current workflow', async () => {
  const files = (await fs.readdir(FIXTURES)).filter((f) => f.endsWith('.json')).sort();
  expect(files.length).toBeGreaterThanOrEqual(3);
  const failures = await replayFailures(FIXTURES, files, bundle);
  expect(failures).toEqual([]);
});
