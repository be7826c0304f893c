import { promises as fs } from 'node:fs';
import path from 'node:path';
import {
  WorkflowFailedError,
  type WorkflowHandleWithFirstExecutionRunId as WorkflowHandle,
} from '@temporalio/client';
import { TestWorkflowEnvironment } from '@temporalio/testing';
import { Worker, type WorkflowBundle } from '@temporalio/worker';
import { VspClient } from '../../client/vspClient';
import { defineSearchAttributeKey, SearchAttributeType } from '@temporalio/common';
import { CONTROL_TASK_QUEUE, hostTaskQueue, SEARCH_ATTRIBUTES } from '../../config/names';
import { searchAttributeArgs } from '../../deploy/devcluster/temporal';
import { taskInput, type TaskTuning } from '../../spec/taskInput';
import type { TaskSpecInput } from '../../spec/taskSpec';
import {
  localizeDisksUpdate,
  migrateUpdate,
  cancelUpdate,
  statusQuery,
  type TaskResult,
  type TaskStatus,
} from '../../workflows/definitions';
import { replayFailures, recordHistory, runIds } from './support/historyFixture';
import { startWorkflowTestEnv } from './support/workflowEnv';
import { MockCluster, QUEUED_TASK } from './support/mockCluster';
import { placementGrantedSignal } from '../../workflows/scheduling/definitions';

/**
 * The TaskLifecycle workflow against stand-in activities (no repository, no VM) on a local Temporal dev
 * server started from the installed CLI (deploy/devcluster/tools.ts). Not the time-skipping test server:
 * the SDK downloads it at first use, which this project's machines cannot, and it does not skip time
 * while a client waits on an update (cancel, migrate). Every branch waits on explicit releases, and the
 * workflow's durations are cut short through the input's tuning instead.
 * `VSP_RECORD_HISTORIES=1` also writes each path's history to test/fixtures/histories/, which the last
 * test replays against the current workflow code.
 */
const FIXTURES = path.join(__dirname, '..', 'fixtures', 'histories');

/** Short durations for tests; the defaults (workflows/lifecycle/activities.ts) are minutes and days. */
const TUNING: TaskTuning = {
  hostQueueTimeoutSec: 1,
  hostStepAttempts: 2,
  hostRetryInitialMs: 10,
  repositoryRetrySec: 1,
};

let env: TestWorkflowEnvironment;
let bundle: WorkflowBundle;
const cluster = new MockCluster();
const workers: Worker[] = [];
let running: Promise<void>[] = [];

beforeAll(async () => {
  ({ env, bundle } = await startWorkflowTestEnv(require.resolve('../../workflows'), searchAttributeArgs()));
  const connection = env.nativeConnection;
  cluster.client = env.client;
  workers.push(
    await Worker.create({
      connection,
      taskQueue: CONTROL_TASK_QUEUE,
      workflowBundle: bundle,
      activities: cluster.control(),
    }),
  );
  // Hosts a and b have workers; host c never has one (a dead host).
  for (const h of ['a', 'b'])
    workers.push(
      await Worker.create({ connection, taskQueue: hostTaskQueue(h), activities: cluster.host(h) }),
    );
  running = workers.map((w) => w.run());
}, 60_000);

afterAll(async () => {
  for (const w of workers) w.shutdown();
  await Promise.all(running);
  await env?.teardown();
});

const capability = `vspcap_${Buffer.from('{}').toString('base64url')}.c2ln`;
let seq = 0;

async function start(
  name: string,
  spec: Partial<TaskSpecInput> = {},
  tuning: TaskTuning = {},
): Promise<WorkflowHandle> {
  const taskId = `unit-${name}-${Date.now()}-${seq++}`;
  return env.client.workflow.start('TaskLifecycle', {
    taskQueue: CONTROL_TASK_QUEUE,
    workflowId: taskId,
    args: [
      taskInput(
        { owner: 'alice', command: 'true', host: 'a', resultsPath: `results/${taskId}`, ...spec },
        capability,
        undefined,
        { ...TUNING, ...tuning },
      ),
    ],
  });
}

/** Polls the status query until `ok` holds (the workflow moves on its own; nothing here sleeps blind). */
async function until(h: WorkflowHandle, ok: (s: TaskStatus) => boolean): Promise<TaskStatus> {
  for (;;) {
    const s = await h.query(statusQuery).catch(() => undefined);
    if (s && ok(s)) return s;
    await new Promise((r) => setTimeout(r, 50));
  }
}

async function runningOn(h: WorkflowHandle, host: string): Promise<void> {
  await until(h, (s) => s.phase === 'running' && s.host === host);
  while (!cluster.isWaiting(host, h.workflowId)) await new Promise((r) => setTimeout(r, 20));
}

async function failureOf(h: WorkflowHandle): Promise<{ message: string; type?: string }> {
  const err = await h.result().then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(WorkflowFailedError);
  let e: unknown = (err as WorkflowFailedError).cause;
  const messages: string[] = [];
  let type: string | undefined;
  while (e instanceof Error) {
    messages.push(e.message);
    type ??= (e as { type?: string }).type;
    e = e.cause;
  }
  return { message: messages.join(': '), type };
}

/** The message chain of an update's refusal or failure (the client's error says only "Workflow Update failed"). */
async function refusal(update: Promise<unknown>): Promise<string> {
  const err = await update.then(
    () => undefined,
    (e: unknown) => e,
  );
  const messages: string[] = [];
  for (let e: unknown = err; e instanceof Error; e = e.cause) messages.push(e.message);
  return messages.join(': ') || 'accepted';
}

async function executionStatus(h: WorkflowHandle): Promise<string> {
  return (await h.describe()).status.name;
}

const record = (name: string, h: WorkflowHandle) => recordHistory(env, FIXTURES, name, h);
const PROGRESS_KEY = defineSearchAttributeKey(SEARCH_ATTRIBUTES.progress, SearchAttributeType.INT);

/** The details the Temporal UI shows on the task's page (the SDK's built-in metadata query). */
async function currentDetails(h: WorkflowHandle): Promise<string | undefined> {
  return ((await h.query('__temporal_workflow_metadata')) as { currentDetails?: string }).currentDetails;
}

test('completed: outputs staged out, VM destroyed after, capability released last', async () => {
  const h = await start('completed');
  await runningOn(h, 'a');
  const s = await h.query(statusQuery);
  expect(s).toMatchObject({ phase: 'running', host: 'a', storageHost: 'a', driver: 'process' });
  // Progress is not in the workflow's state (no signal per change): the client reads awaitVm's heartbeats.
  expect(s.progressMessage).toBeUndefined();
  const vsp = new VspClient(env.client);
  let live = await vsp.status(h.workflowId);
  while (live.progressMessage === undefined) live = await vsp.status(h.workflowId);
  expect(live).toMatchObject({
    phase: 'running',
    host: 'a',
    progressMessage: expect.stringMatching(/^beat \d+$/),
  });
  expect(live.progress).toEqual(expect.any(Number));
  cluster.release(h.workflowId);
  const result = (await h.result()) as TaskResult;
  expect(result).toMatchObject({ exitCode: 0, host: 'a', resultsPath: `results/${h.workflowId}` });
  expect(result.outputs.map((o) => o.path)).toEqual([`results/${h.workflowId}/outputs/o.txt`]);
  const order = cluster.calls.filter((c) => c.taskId === h.workflowId).map((c) => c.name);
  // Created and started in one host step; the console kept by stage-out; the capability ended by the
  // last destroyVm, after the VM is gone: a lifecycle with no step it does not need.
  expect(order).toEqual(['stageIn', 'launchVm', 'awaitVm', 'stageOut', 'destroyVm', 'releaseCapability']);
  const events = (await h.fetchHistory()).events ?? [];
  // Placement and its release are local activities (markers, no activity task).
  expect(events.flatMap((e) => e.activityTaskScheduledEventAttributes?.activityType?.name ?? [])).toEqual([
    'stageIn',
    'launchVm',
    'awaitVm',
    'stageOut',
    'destroyVm',
  ]);
  expect(cluster.called('placeTask')).not.toHaveLength(0);
  expect(result.logs.map((l) => l.path)).toContain(`results/${h.workflowId}/logs/console.log`);
  expect(await executionStatus(h)).toBe('COMPLETED');
  await record('completed', h);
});

test('a bare spec (the input before capabilities) fails at once saying how to start a task', async () => {
  const h = await env.client.workflow.start('TaskLifecycle', {
    taskQueue: CONTROL_TASK_QUEUE,
    workflowId: `unit-bare-${Date.now()}`,
    args: [{ owner: 'alice', command: 'true' }],
  });
  const f = await failureOf(h);
  expect(f.type).toBe('InvalidTaskSpec');
  expect(f.message).toMatch(/a bare task spec has no capability.*vsp task grant/);
  expect(await h.query(statusQuery)).toMatchObject({ phase: 'failed' });
  expect(await currentDetails(h)).toMatch(
    /^\*\*failed\*\* · invalid task spec: .*a bare task spec has no capability/,
  );
  expect(cluster.calls.filter((c) => c.taskId === h.workflowId)).toEqual([]);
});

test('failed: a non-zero exit fails the task after its outputs are kept', async () => {
  const h = await start('failed');
  await runningOn(h, 'a');
  cluster.release(h.workflowId, 3);
  const f = await failureOf(h);
  expect(f).toMatchObject({ type: 'TaskCommandFailed' });
  expect(f.message).toContain('exited with status 3');
  expect(cluster.called('stageOut', h.workflowId)).toHaveLength(1);
  expect(cluster.called('destroyVm', h.workflowId)).toHaveLength(1);
  await record('failed', h);
});

test('cancelled through the update: CANCELED, logs kept before the VM goes', async () => {
  const h = await start('cancel-update');
  await runningOn(h, 'a');
  await expect(refusal(h.executeUpdate(cancelUpdate, { args: [{ reason: 7 } as never] }))).resolves.toMatch(
    /invalid cancel request: reason/,
  );
  const s = await h.executeUpdate(cancelUpdate, { args: [{ reason: 'no longer needed' }] });
  expect(s.error).toBe('cancelled: no longer needed');
  await expect(h.result()).rejects.toThrow();
  expect(await executionStatus(h)).toBe('CANCELLED');
  const order = cluster.calls.filter((c) => c.taskId === h.workflowId).map((c) => c.name);
  expect(order.indexOf('collectLogs')).toBeGreaterThan(-1);
  expect(order.indexOf('collectLogs')).toBeLessThan(order.indexOf('destroyVm'));
  expect((await h.query(statusQuery)).phase).toBe('cancelled');
  await record('cancelled-update', h);
});

test('cancelled as a workflow (temporal workflow cancel): CANCELED, VM destroyed', async () => {
  const h = await start('cancel-workflow');
  await runningOn(h, 'a');
  await h.cancel();
  await expect(h.result()).rejects.toThrow();
  expect(await executionStatus(h)).toBe('CANCELLED');
  expect(cluster.called('collectLogs', h.workflowId)).toHaveLength(1);
  expect(cluster.called('destroyVm', h.workflowId)).toHaveLength(1);
  await record('cancelled-workflow', h);
});

test('malformed requests are refused by validators; a malformed progress signal changes nothing', async () => {
  const h = await start('validators');
  await runningOn(h, 'a');
  await expect(refusal(h.executeUpdate(migrateUpdate, { args: [{ host: 'Not A Host' }] }))).resolves.toMatch(
    /invalid migrate request: host: "Not A Host" is not a host name/,
  );
  await expect(
    refusal(h.executeUpdate(migrateUpdate, { args: [{ maxBandwidthMiBps: -1 } as never] })),
  ).resolves.toMatch(/maxBandwidthMiBps/);
  await expect(refusal(h.executeUpdate(migrateUpdate, { args: ['b' as never] }))).resolves.toMatch(
    /invalid migrate request/,
  );
  await h.signal('progress', { progress: 'lots' });
  await h.signal('progress');
  await h.signal('progress', { progress: 40, message: 'ok' });
  await until(h, (s) => s.progress === 40);
  // The step is in VspProgress (the Temporal UI's column) and in the details its task page shows.
  expect((await h.describe()).typedSearchAttributes.get(PROGRESS_KEY)).toBe(40);
  const details = () => currentDetails(h);
  expect(await details()).toMatch(
    /^\*\*running\*\* · owner \*\*alice\*\* · host \*\*a\*\* · \*\*40 %\*\* ok\n/,
  );
  cluster.release(h.workflowId);
  expect(((await h.result()) as TaskResult).exitCode).toBe(0);
  expect((await h.describe()).typedSearchAttributes.get(PROGRESS_KEY)).toBe(100);
  expect(await details()).toMatch(/^\*\*completed\*\* .* · \*\*100 %\*\*/);
});

test('migrated: the VM moves to b, the wait follows it, the task completes there', async () => {
  const h = await start('migrated');
  await runningOn(h, 'a');
  const s = await h.executeUpdate(migrateUpdate, { args: [{ host: 'b' }] });
  expect(s).toMatchObject({ host: 'b', storageHost: 'a' });
  await runningOn(h, 'b');
  cluster.release(h.workflowId);
  const result = (await h.result()) as TaskResult;
  expect(result).toMatchObject({ host: 'b', storageHost: 'a' });
  expect(result.migrations).toEqual([expect.objectContaining({ from: 'a', to: 'b', ok: true })]);
  // Stage-out reads the disks on their own host.
  expect(cluster.called('stageOut', h.workflowId).map((c) => c.host)).toEqual(['a']);
  await record('migrated', h);
});

test('disks localized after a migration (spec localizeDisksAfterMigration): b stores them, a drops its copy', async () => {
  const h = await start('localized', { localizeDisksAfterMigration: true });
  await runningOn(h, 'a');
  const s = await h.executeUpdate(migrateUpdate, { args: [{ host: 'b' }] });
  expect(s).toMatchObject({ host: 'b', storageHost: 'b' });
  expect(s.storageMoves).toEqual([expect.objectContaining({ from: 'a', to: 'b', ok: true, bytes: 4096 })]);
  // Switched on b, recorded with the scheduler, and only then dropped on a.
  const order = cluster.calls
    .filter((c) => ['localizeDisks', 'settleStorage', 'dropMovedDisks'].includes(c.name))
    .filter((c) => c.taskId === h.workflowId || c.host === 'control')
    .map((c) => `${c.name}@${c.host}`);
  expect(order.slice(-3)).toEqual(['localizeDisks@b', 'settleStorage@control', 'dropMovedDisks@a']);
  await runningOn(h, 'b');
  cluster.release(h.workflowId);
  const result = (await h.result()) as TaskResult;
  expect(result).toMatchObject({ host: 'b', storageHost: 'b' });
  expect(cluster.called('stageOut', h.workflowId).map((c) => c.host)).toEqual(['b']);
  expect(cluster.called('destroyVm', h.workflowId).map((c) => c.host)).toEqual(['b']);
  await record('localized-after-migration', h);
});

test('the localizeDisks update: refused while the disks are local, moves them after a migration', async () => {
  const h = await start('localize-update');
  await runningOn(h, 'a');
  await expect(refusal(h.executeUpdate(localizeDisksUpdate))).resolves.toMatch(/already on a/);
  expect(await h.executeUpdate(migrateUpdate, { args: [{ host: 'b' }] })).toMatchObject({ storageHost: 'a' });
  const s = await h.executeUpdate(localizeDisksUpdate);
  expect(s).toMatchObject({ host: 'b', storageHost: 'b' });
  expect(s.movingDisks).toBeUndefined();
  await runningOn(h, 'b');
  cluster.release(h.workflowId);
  expect(((await h.result()) as TaskResult).storageHost).toBe('b');
  await record('localized-by-update', h);
});

test("the cluster's localizeDisksAfterMigration applies unless the spec says otherwise", async () => {
  cluster.localizeAfterMigration = true;
  try {
    const [byCluster, optedOut] = await Promise.all([
      start('localize-cluster'),
      start('localize-opted-out', { localizeDisksAfterMigration: false }),
    ]);
    for (const h of [byCluster, optedOut]) await runningOn(h, 'a');
    expect(await byCluster.executeUpdate(migrateUpdate, { args: [{ host: 'b' }] })).toMatchObject({
      host: 'b',
      storageHost: 'b',
    });
    expect(await optedOut.executeUpdate(migrateUpdate, { args: [{ host: 'b' }] })).toMatchObject({
      host: 'b',
      storageHost: 'a',
    });
    expect(cluster.called('localizeDisks', optedOut.workflowId)).toEqual([]);
    for (const h of [byCluster, optedOut]) {
      await runningOn(h, 'b');
      cluster.release(h.workflowId);
      await h.result();
    }
  } finally {
    cluster.localizeAfterMigration = false;
  }
});

test('a failed disk move leaves the disks on their storage host: nothing dropped, stage-out reads them there', async () => {
  const h = await start('localize-failed');
  await runningOn(h, 'a');
  await h.executeUpdate(migrateUpdate, { args: [{ host: 'b' }] });
  cluster.failLocalize.add(h.workflowId);
  await expect(refusal(h.executeUpdate(localizeDisksUpdate))).resolves.toMatch(
    /could not move the disks .* from a to b: .*mirror of the data disk stopped.*; they stay on a/,
  );
  const s = await h.query(statusQuery);
  expect(s).toMatchObject({ host: 'b', storageHost: 'a' });
  expect(s.storageMoves).toEqual([expect.objectContaining({ from: 'a', to: 'b', ok: false })]);
  expect(cluster.called('dropMovedDisks', h.workflowId)).toEqual([]);
  await runningOn(h, 'b');
  cluster.release(h.workflowId);
  expect(((await h.result()) as TaskResult).storageHost).toBe('a');
  expect(cluster.called('stageOut', h.workflowId).map((c) => c.host)).toEqual(['a']);
});

test('migration rolled back: the target is cleaned, the task runs on where it was', async () => {
  const h = await start('rollback');
  await runningOn(h, 'a');
  cluster.failMigrateOut.add(h.workflowId);
  await expect(refusal(h.executeUpdate(migrateUpdate, { args: [{ host: 'b' }] }))).resolves.toMatch(
    /could not migrate/,
  );
  expect(cluster.called('abortIncoming')).toEqual(
    expect.arrayContaining([expect.objectContaining({ host: 'b' })]),
  );
  await runningOn(h, 'a');
  cluster.release(h.workflowId);
  const result = (await h.result()) as TaskResult;
  expect(result.host).toBe('a');
  expect(result.migrations).toEqual([
    expect.objectContaining({ ok: false, error: expect.stringContaining('refused') }),
  ]);
  await record('migration-rolled-back', h);
});

test('awaiting-repository: outputs wait on the host, then are stored; nothing destroyed before', async () => {
  const h = await start('awaiting');
  await runningOn(h, 'a');
  cluster.repositoryDown.add(h.workflowId);
  cluster.release(h.workflowId);
  const s = await until(h, (x) => x.phase === 'awaiting-repository');
  expect(s.awaitingRepository?.error).toContain('503');
  expect(cluster.called('destroyVm', h.workflowId)).toHaveLength(0);
  cluster.repositoryDown.delete(h.workflowId);
  const result = (await h.result()) as TaskResult;
  expect(result.outputs).toHaveLength(1);
  const order = cluster.calls.filter((c) => c.taskId === h.workflowId).map((c) => c.name);
  expect(order.lastIndexOf('stageOut')).toBeLessThan(order.indexOf('destroyVm'));
  await record('awaiting-repository', h);
});

test('past the retention the task fails saying its outputs were not stored', async () => {
  const h = await start('retention', {}, { repositoryRetentionSec: 1 });
  await runningOn(h, 'a');
  cluster.repositoryDown.add(h.workflowId);
  cluster.release(h.workflowId);
  const f = await failureOf(h);
  expect(f.type).toBe('OutputsNotStored');
  expect(f.message).toMatch(/the outputs were not stored: the repository was unavailable for 1 s/);
});

test('HostDown: a task on a host without a worker fails naming the host', async () => {
  cluster.dead.add('c');
  const h = await start('host-down', { host: 'c' });
  const f = await failureOf(h);
  expect(f.message).toMatch(/host c is down/);
  expect((await h.query(statusQuery)).error).toMatch(/host c is down/);
  await record('host-down', h);
});

test('HostDown: a host still within its liveness period is asked again when it would count as down', async () => {
  cluster.dead.add('c');
  cluster.dying.add('c');
  const h = await start('host-dying', { host: 'c' });
  const f = await failureOf(h);
  expect(f.message).toMatch(/host c is down/);
  // Once live-but-silent, then down: the task failed on the second answer, without trying the step again.
  const events = (await h.fetchHistory()).events ?? [];
  const scheduled = events.filter((e) => e.activityTaskScheduledEventAttributes?.activityType?.name);
  // Placement and its release are local activities: the dead host is left to its reaper, and the
  // task's resources go back to the scheduler (a marker each, no activity task).
  expect(scheduled.map((e) => e.activityTaskScheduledEventAttributes?.activityType?.name)).toEqual([
    'stageIn',
    'hostStatus',
    'hostStatus',
  ]);
  const localActivities = events.flatMap((e) =>
    e.markerRecordedEventAttributes?.markerName === 'core_local_activity' ? [e] : [],
  );
  expect(localActivities).toHaveLength(2);
});

test("HostDown with onHostFailure 'restart': placed again on a live host, completes there", async () => {
  cluster.dead.add('c');
  cluster.placeNext.push('c');
  const h = await start('restart', { host: undefined, onHostFailure: 'restart' });
  await runningOn(h, 'a');
  cluster.release(h.workflowId);
  const result = (await h.result()) as TaskResult;
  expect(result.host).toBe('a');
  expect((await h.query(statusQuery)).restartedFrom).toEqual(['c']);
  await record('host-restart', h);
});

test('continue-as-new while running, then migrate: host, migrations and results carried', async () => {
  const h = await start('continued', {}, { historyEventLimit: 40 });
  await runningOn(h, 'a');
  // Updates grow the history: keep asking until the task has moved to a new run.
  await until(h, (s) => s.phase === 'running');
  for (let i = 0; (await h.describe()).runId === h.firstExecutionRunId; i++)
    await h.signal('progress', { progress: i % 100 });
  await runningOn(h, 'a');
  await h.executeUpdate(migrateUpdate, { args: [{ host: 'b' }] });
  await runningOn(h, 'b');
  cluster.release(h.workflowId);
  const result = (await h.result()) as TaskResult;
  expect(result).toMatchObject({ host: 'b', storageHost: 'a', resultsPath: `results/${h.workflowId}` });
  expect(result.migrations).toEqual([expect.objectContaining({ from: 'a', to: 'b', ok: true })]);
  // One VM for the whole task: created once, stopped on b and removed with its disks on a, once.
  expect(cluster.called('launchVm', h.workflowId)).toHaveLength(1);
  expect(cluster.called('destroyVm', h.workflowId).map((c) => c.host)).toEqual(['b', 'a']);
  expect((await runIds(env.client, h)).length).toBeGreaterThan(1);
  await record('continued-as-new', h);
});

test('queued: no room now, the task waits in phase queued until the scheduler grants a host', async () => {
  const h = await start('queued', { name: QUEUED_TASK, host: undefined });
  const s = await until(h, (x) => x.phase === 'queued');
  expect(s.queue).toMatchObject({ position: 3, of: 5, why: 'a: full' });
  expect(cluster.called('stageIn', h.workflowId)).toEqual([]);
  await h.signal(placementGrantedSignal, { host: 'b' });
  await runningOn(h, 'b');
  expect((await h.query(statusQuery)).queue).toBeUndefined();
  // A second grant (a duplicate) changes nothing.
  await h.signal(placementGrantedSignal, { host: 'a' });
  cluster.release(h.workflowId);
  expect(((await h.result()) as TaskResult).host).toBe('b');
  expect(cluster.called('releasePlacement')).not.toHaveLength(0);
  await record('queued', h);
});

test('recorded histories replay against the current workflow', async () => {
  // Every generation of the workflow (pre-scheduler/: before reservations were released); the scheduler's
  // own histories replay in its test.
  const files = (await fs.readdir(FIXTURES, { recursive: true }))
    .filter((f) => f.endsWith('.json') && !f.startsWith(`scheduler${path.sep}`))
    .sort();
  expect(files.length).toBeGreaterThanOrEqual(20);
  const failures = await replayFailures(FIXTURES, files, bundle);
  expect(failures).toEqual([]);
});
