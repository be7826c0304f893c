import {
  allHandlersFinished,
  ApplicationFailure,
  CancellationScope,
  CancelledFailure,
  condition,
  continueAsNew,
  isCancellation,
  log,
  patched,
  setCurrentDetails,
  setHandler,
  upsertSearchAttributes,
  workflowInfo,
} from '@temporalio/workflow';
import type { AwaitResult, VmHandle } from '../activities/types';
import { parseTaskInput, taskInput } from '../spec/taskInput';
import { commandFailure, statusQuery, type TaskResult } from './definitions';
import { control, LOCAL_PLACEMENT_PATCH, localControl, onHost } from './lifecycle/activities';
import { cleanUp } from './lifecycle/cleanup';
import { describe, ownFailureType } from './lifecycle/failures';
import { untilStored } from './lifecycle/repositoryWait';
import { handleRequests } from './lifecycle/requests';
import {
  carriedOf,
  enterPhaseAt,
  invalidTaskStatus,
  newTaskState,
  phaseAttribute,
  recordAddress,
  recordDriver,
  recordOwner,
  recordProgress,
  recordWhere,
  resumeFrom,
  setPhase,
  vmIdFor,
  type Carried,
  type TaskState,
} from './lifecycle/state';

/**
 * One task's whole life, chapter by chapter: validate, place, stage in, create, start, run, stage out,
 * clean up. Cleanup (logs, console, destroy, capability) runs on every path. A task whose host dies is
 * failed with `HostDown` or restarted elsewhere (spec `onHostFailure`); a task that runs long continues
 * as new, carrying where its VM is, and the next run waits for it again.
 */
export async function TaskLifecycle(input: unknown): Promise<TaskResult> {
  const t = validate(input);
  let workflowCancelled = false;
  CancellationScope.current().cancelRequested.catch(() => (workflowCancelled = true));
  handleRequests(t);
  try {
    await t.main.run(() => live(t));
    if (t.continuing) await handOver(t);
  } catch (err) {
    t.failure = err;
    t.status.error ??= describe(err);
  }
  // Outside the try: continueAsNew ends this run by throwing.
  if (t.continuing && !t.failure)
    await continueAsNew<typeof TaskLifecycle>(taskInput(t.specInput, t.capability, carriedOf(t), t.tuning));
  await cleanUp(t);
  // A cancel through the update asked for the workflow's own cancellation: it ends CANCELED once that lands.
  if (t.cancelReason !== undefined && !workflowCancelled)
    await condition(() => workflowCancelled, '1m').catch(() => undefined);
  return finish(t);
}

/**
 * The input is read once, here: a malformed one fails at once, and so does a bare spec (from before
 * capabilities), with a message that says how to start a task now.
 */
function validate(input: unknown): TaskState {
  let parsed;
  try {
    parsed = parseTaskInput<Carried>(input);
  } catch (err) {
    const status = { ...invalidTaskStatus(), phase: 'failed' as const, error: (err as Error).message };
    setHandler(statusQuery, () => status);
    upsertSearchAttributes([phaseAttribute('failed')]);
    setCurrentDetails(`**failed** · ${status.error}`);
    throw ApplicationFailure.nonRetryable((err as Error).message, 'InvalidTaskSpec');
  }
  const t = newTaskState(parsed.spec, parsed.specInput, parsed.capability, parsed.tuning);
  if (parsed.carried) resumeFrom(t, parsed.carried);
  else setPhase(t, 'validating');
  recordOwner(t);
  t.status.resultsPath = t.ref.resultsPath;
  return t;
}

/** The task from placement to its stored outputs; a dead host under a 'restart' task sends it back to placement. */
async function live(t: TaskState): Promise<void> {
  for (;;) {
    try {
      if (!t.handle) await bringUp(t);
      const exit = await run(t);
      if (exit === 'continue-as-new') {
        t.continuing = true;
        return;
      }
      await stageOut(t, exit);
      return;
    } catch (err) {
      if (!mayRestart(t, err)) throw err;
      restartElsewhere(t, err);
    }
  }
}

/** Place, stage in, create, start. */
async function bringUp(t: TaskState): Promise<void> {
  const host = await place(t);
  t.host = t.storageHost = host;
  recordWhere(t);
  const call = onHost(t, host);

  setPhase(t, 'staging-in');
  const stagedIn = await call(
    'transfer',
    'stageIn',
    `stage-in: ${t.spec.inputs.length} input file(s)`,
    t.ref,
  );
  recordDriver(t, stagedIn.driver);

  setPhase(t, 'creating');
  if (patched(LAUNCH_PATCH)) {
    t.consoleSegments.push({ n: 1, host, since: new Date().toISOString() });
    // Until launchVm answers, the VM is known by its id only: a cancel or failure meanwhile must still
    // stop whatever it started (drivers find a VM's process from its folder).
    t.handle = { driver: stagedIn.driver, vmId: t.ref.vmId, host, storageHost: host, state: {} };
    const launched = await call(
      'vm',
      'launchVm',
      `create and start ${stagedIn.driver} VM ${t.ref.vmId}`,
      t.ref,
      stagedIn.driver,
    );
    // One step on the host: 'starting' began when it says the VM was created (within this step's time).
    enterPhaseAt(t, 'starting', Math.min(Math.max(launched.createdAtMs, t.phaseStart), Date.now()));
    t.handle = launched.handle;
  } else {
    t.handle = await call(
      'vm',
      'createVm',
      `create ${stagedIn.driver} VM ${t.ref.vmId}`,
      t.ref,
      stagedIn.driver,
    );
    setPhase(t, 'starting');
    t.consoleSegments.push({ n: 1, host, since: new Date().toISOString() });
    t.handle = await call('vm', 'startVm', `start VM ${t.ref.vmId}`, t.handle);
  }
  recordAddress(t);
}

/** Runs that create and start the VM in one host step (launchVm) rather than two. */
export const LAUNCH_PATCH = 'vsp-launch-vm';

/**
 * The scheduler grants the task's resources on a host now, or queues it: the task then waits, in phase
 * `queued`, for the scheduler's grant signal.
 */
async function place(t: TaskState): Promise<string> {
  setPhase(t, 'placing');
  t.placementAsked = true;
  const restartedFrom = t.status.restartedFrom;
  // After a host died under it, the task goes wherever a live host is, even if it named the dead one.
  const placer = patched(LOCAL_PLACEMENT_PATCH) ? localControl : control;
  const placed = await placer.placeTask(
    restartedFrom ? { ...t.spec, host: undefined } : t.spec,
    restartedFrom ? { exclude: restartedFrom } : {},
  );
  if ('host' in placed) return placed.host;
  setPhase(t, 'queued');
  t.status.queue = placed.queued;
  await condition(() => t.granted !== undefined);
  t.status.queue = undefined;
  return t.granted as string;
}

/**
 * Waits for the task to end, following its VM from host to host; returns 'continue-as-new' instead when
 * the history has grown long (Temporal's suggestion, or the input's `tuning.historyEventLimit`).
 */
async function run(t: TaskState): Promise<AwaitResult | 'continue-as-new'> {
  if (t.status.phase !== 'running') setPhase(t, 'running');
  for (;;) {
    const scope = new CancellationScope();
    const wait: NonNullable<TaskState['wait']> = { scope };
    const [host, vm] = [t.host as string, t.handle as VmHandle];
    t.wait = wait;
    try {
      const ended = await scope.run(() =>
        Promise.race([
          onHost(t, host)('run', 'awaitVm', `run the task in VM ${t.ref.vmId}`, vm, {
            share: t.status.cpuShare,
            deadline: t.spec.deadline,
            runningSince: t.status.timestamps.running,
          }),
          condition(() => !t.migrating && historyIsLong(t)).then(() => 'continue-as-new' as const),
        ]),
      );
      if (ended === 'continue-as-new') wait.stoppedFor = 'continue-as-new';
      else return ended;
    } catch (err) {
      // Cancelling the task cancels this scope too: only a wait stopped for a migration resumes.
      if (!(isCancellation(err) && wait.stoppedFor === 'migration' && !t.main.consideredCancelled)) throw err;
    } finally {
      t.wait = undefined;
      // Stops whichever of the two is still pending (the wait's heartbeats carry the cancellation).
      scope.cancel();
    }
    if (wait.stoppedFor === 'continue-as-new') return 'continue-as-new';
    await condition(() => !t.migrating);
  }
}

function historyIsLong(t: TaskState): boolean {
  const info = workflowInfo();
  const limit = t.tuning.historyEventLimit;
  return info.continueAsNewSuggested || (limit !== undefined && info.historyLength >= limit);
}

/** Stage-out reads the disks on their own host and waits for an unavailable repository (bounded). */
async function stageOut(t: TaskState, exit: AwaitResult): Promise<void> {
  t.exit = exit;
  t.status.exitCode = exit.exitCode;
  if (exit.progress !== undefined) {
    t.status.progress = exit.progress;
    t.status.progressMessage = exit.progressMessage;
    recordProgress(t);
  }
  // A migration that began as the task ended settles before stage-out reads the disks.
  await condition(() => !t.migrating);
  setPhase(t, 'staging-out');
  const storageHost = t.storageHost as string;
  // A VM that never left its storage host has its console there: stage-out keeps it too, and cleanup
  // then needs no collectConsole step (decided by the result, so older histories replay as they were).
  const [segment, ...moved] = t.consoleSegments;
  const segments = segment?.host === storageHost && moved.length === 0 ? [segment] : undefined;
  t.staged = await untilStored(t, 'the outputs', () =>
    onHost(t, storageHost)(
      'transfer',
      'stageOut',
      `stage-out to ${t.ref.resultsPath}`,
      t.ref,
      t.handle as VmHandle,
      // A command that failed leaves its reason in logs/failure.txt (an argument only: replay-safe).
      exit,
      segments,
    ),
  );
  if (t.staged.console) t.consoleLogs = t.staged.console;
}

/** At most this many restarts after host failures: a task that kills its hosts is not placed forever. */
const MAX_RESTARTS = 3;

function mayRestart(t: TaskState, err: unknown): boolean {
  return (
    ownFailureType(err) === 'HostDown' &&
    t.spec.onHostFailure === 'restart' &&
    !t.main.consideredCancelled &&
    ['placing', 'queued', 'staging-in', 'creating', 'starting', 'running'].includes(t.status.phase) &&
    (t.status.restartedFrom?.length ?? 0) < MAX_RESTARTS
  );
}

/** Forgets the dead host (its reaper clears it) and starts over under a new VM id, from placement. */
function restartElsewhere(t: TaskState, err: unknown): void {
  const dead = t.host as string;
  log.warn('the task host is down: the task starts again elsewhere', { host: dead, error: describe(err) });
  t.status.restartedFrom = [...(t.status.restartedFrom ?? []), dead];
  const info = workflowInfo();
  t.ref.vmId = t.status.vmId = `${vmIdFor(info.workflowId, info.runId)}-r${t.status.restartedFrom.length}`;
  Object.assign(t, {
    host: undefined,
    storageHost: undefined,
    handle: undefined,
    driver: undefined,
    granted: undefined,
  });
  t.consoleSegments = [];
  t.keepingConsoles = [];
  t.status.progress = t.status.progressMessage = undefined;
}

/**
 * Before the task moves to a new run, the updates under way finish; a cancel that came meanwhile ends
 * the task here instead.
 */
async function handOver(t: TaskState): Promise<void> {
  await condition(allHandlersFinished);
  if (t.cancelReason !== undefined) throw new CancelledFailure(t.status.error ?? 'cancelled');
  log.info('continuing as new', { historyLength: workflowInfo().historyLength, host: t.host });
}

function finish(t: TaskState): TaskResult {
  const { failure, exit, spec, ref } = t;
  if (failure) {
    if (isCancellation(failure) || t.cancelReason !== undefined) {
      setPhase(t, 'cancelled');
      // Thrown in a cancelled workflow, this ends it CANCELED; else (the self-cancel refused) FAILED.
      throw failure instanceof CancelledFailure
        ? failure
        : new CancelledFailure(t.status.error ?? 'cancelled');
    }
    setPhase(t, 'failed');
    throw failure;
  }
  const commandError = exit ? commandFailure(exit, spec.timeLimitSec) : 'the task command never ended';
  if (!exit || commandError !== undefined) {
    t.status.error = commandError;
    setPhase(t, 'failed');
    throw ApplicationFailure.nonRetryable(
      t.status.error,
      exit?.timedOut ? 'TaskTimedOut' : 'TaskCommandFailed',
      {
        exitCode: exit?.exitCode,
        resultsPath: ref.resultsPath,
      },
    );
  }
  setPhase(t, 'completed');
  recordProgress(t, 100);
  return {
    taskId: ref.taskId,
    host: t.host ?? '',
    storageHost: t.storageHost,
    exitCode: exit.exitCode,
    resultsPath: ref.resultsPath,
    outputs: t.staged?.outputs ?? [],
    logs: [...(t.staged?.logs ?? []), ...t.consoleLogs],
    phaseMs: t.phaseMs,
    migrations: t.migrations,
  };
}
