import {
  ActivityCancellationType,
  ApplicationFailure,
  isCancellation,
  log,
  proxyActivities,
  proxyLocalActivities,
  sleep,
  type ActivityFunctionWithOptions,
  type ActivityOptions,
} from '@temporalio/workflow';
import type { ControlActivities, HostStatus } from '../../activities/control/createControlActivities';
import type { HostActivities } from '../../activities/host/createHostActivities';
import type { MigrationActivities } from '../../activities/host/migrationActivities';
import { CONTROL_TASK_QUEUE, hostTaskQueue } from '../../config/names';
import type { TaskTuning } from '../../spec/taskInput';
import { describe, isTimeout } from './failures';
import type { TaskState } from './state';

type HostBoundActivities = HostActivities & MigrationActivities;

/** The workflow's durations unless the input's `tuning` says otherwise (spec/taskInput.ts). */
export const TUNING_DEFAULTS: Required<Omit<TaskTuning, 'historyEventLimit'>> = {
  repositoryRetentionSec: 7 * 24 * 3600,
  repositoryRetrySec: 60,
  // With the run's 10 s heartbeat timeout and a retry that nobody picks up within this, a dead host shows
  // in 15 s; the task then fails once the host's liveness period (VSP_HOST_LIVENESS_SEC) confirms it, well
  // within two periods. A live but busy host is asked again.
  hostQueueTimeoutSec: 5,
  hostStepAttempts: 20,
  hostRetryInitialMs: 1000,
};

export function tuned<K extends keyof typeof TUNING_DEFAULTS>(t: TaskState, key: K): number {
  return t.tuning[key] ?? TUNING_DEFAULTS[key];
}

export const control = proxyActivities<ControlActivities>({
  taskQueue: CONTROL_TASK_QUEUE,
  startToCloseTimeout: '30s',
  // No live host yet: keep trying for a while, then fail the task clearly.
  scheduleToCloseTimeout: '10m',
  retry: { initialInterval: '1s', maximumInterval: '15s' },
});

/**
 * Placement and its release as local activities (patch `vsp-local-placement`): the control worker that
 * runs the workflow asks the scheduler itself, with no activity task to dispatch and no workflow task
 * for the result. Both are idempotent (the scheduler answers a repeated request with what it granted),
 * so a retried or replayed call is safe; their bounds are the activities' own.
 */
export const LOCAL_PLACEMENT_PATCH = 'vsp-local-placement';

export const localControl = proxyLocalActivities<ControlActivities>({
  startToCloseTimeout: '30s',
  scheduleToCloseTimeout: '10m',
  retry: { initialInterval: '1s', maximumInterval: '15s' },
});

/**
 * Histories from before the scheduler (workflows/scheduler.ts) neither released their placement nor
 * settled their migrations: those steps run where this patch is in effect (every new run).
 */
export const SCHEDULER_PATCH = 'vsp-scheduler-reservations';

/** A task's reservation goes back to the scheduler; bounded, and a failure only logged (see cleanUp). */
export const reservations = proxyActivities<ControlActivities>({
  taskQueue: CONTROL_TASK_QUEUE,
  startToCloseTimeout: '30s',
  scheduleToCloseTimeout: '10m',
  retry: { initialInterval: '1s', maximumInterval: '15s' },
});

/** A migration target is chosen now or not at all: the task keeps running meanwhile. */
export const migrationControl = proxyActivities<ControlActivities>({
  taskQueue: CONTROL_TASK_QUEUE,
  startToCloseTimeout: '30s',
  scheduleToCloseTimeout: '1m',
  retry: { initialInterval: '1s', maximumInterval: '5s' },
});

/** The cancel update's request for the workflow's own cancellation; bounded, the task stops anyway. */
export const cancellation = proxyActivities<ControlActivities>({
  taskQueue: CONTROL_TASK_QUEUE,
  startToCloseTimeout: '10s',
  scheduleToCloseTimeout: '1m',
  retry: { initialInterval: '1s', maximumInterval: '5s' },
});

/** Asked only after a host step timed out; an answer that does not come soon is no answer. */
const liveness = proxyActivities<ControlActivities>({
  taskQueue: CONTROL_TASK_QUEUE,
  startToCloseTimeout: '10s',
  scheduleToCloseTimeout: '1m',
  retry: { initialInterval: '1s', maximumInterval: '5s', maximumAttempts: 3 },
});

/**
 * Options per kind of host step. Every one has a short schedule-to-start (a host's queue dies with its
 * host: nobody picking a step up is the first sign) and a schedule-to-close, so no task waits forever
 * for a dead machine.
 */
function hostOptions(t: TaskState, host: string) {
  const base: ActivityOptions = {
    taskQueue: hostTaskQueue(host),
    retry: {
      initialInterval: tuned(t, 'hostRetryInitialMs'),
      maximumInterval: '10s',
      maximumAttempts: tuned(t, 'hostStepAttempts'),
    },
    scheduleToStartTimeout: `${tuned(t, 'hostQueueTimeoutSec')}s`,
  };
  const limit = t.spec.timeLimitSec;
  return {
    short: { ...base, startToCloseTimeout: '2m', scheduleToCloseTimeout: '15m' },
    // Creating and starting heartbeat: a worker killed mid-step is retried within seconds.
    vm: { ...base, startToCloseTimeout: '2m', heartbeatTimeout: '10s', scheduleToCloseTimeout: '15m' },
    transfer: { ...base, startToCloseTimeout: '2h', heartbeatTimeout: '20s', scheduleToCloseTimeout: '6h' },
    cleanup: { ...base, startToCloseTimeout: '10m', heartbeatTimeout: '20s', scheduleToCloseTimeout: '30m' },
    // The task's own time limit bounds the run; the margin covers boot and worker restarts.
    run: {
      ...base,
      startToCloseTimeout: `${limit + 600}s`,
      scheduleToCloseTimeout: `${limit + 1800}s`,
      // Twice the hosts' longest heartbeat throttle (VSP_HOST_HEARTBEAT_SEC, 5 s): a dead host shows soon.
      heartbeatTimeout: '10s',
    },
    // Migration steps are bounded tightly: the VM keeps running at the source while they wait.
    migrate: {
      ...base,
      scheduleToStartTimeout: '1m',
      startToCloseTimeout: '2m',
      scheduleToCloseTimeout: '4m',
      retry: { ...base.retry, maximumAttempts: 3 },
    },
    migrateOut: {
      ...base,
      scheduleToStartTimeout: '1m',
      startToCloseTimeout: '15m',
      heartbeatTimeout: '30s',
      scheduleToCloseTimeout: '20m',
      retry: { ...base.retry, maximumAttempts: 3 },
    },
    // A disk move copies whole disks while the VM runs: long, heartbeating, bounded. A cancelled one is
    // waited for: it may have switched the drives already, and then its result says where the disks are.
    storage: {
      ...base,
      cancellationType: ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
      scheduleToStartTimeout: '1m',
      startToCloseTimeout: '1h',
      heartbeatTimeout: '30s',
      scheduleToCloseTimeout: '2h',
      retry: { ...base.retry, maximumAttempts: 3 },
    },
    // The end of the capability: the repository refuses it anyway once it expires.
    release: {
      ...base,
      startToCloseTimeout: '30s',
      scheduleToCloseTimeout: '2m',
      retry: { ...base.retry, maximumAttempts: 5 },
    },
    // A target that does not answer soon is gone, and with it whatever it had prepared.
    rollback: {
      ...base,
      scheduleToStartTimeout: '20s',
      startToCloseTimeout: '1m',
      scheduleToCloseTimeout: '2m',
      retry: { ...base.retry, maximumAttempts: 3 },
    },
  } satisfies Record<string, ActivityOptions>;
}

export type HostStepKind = keyof ReturnType<typeof hostOptions>;
export type HostCall = <K extends keyof HostBoundActivities>(
  kind: HostStepKind,
  name: K,
  summary: string,
  ...args: Parameters<HostBoundActivities[K]>
) => Promise<Awaited<ReturnType<HostBoundActivities[K]>>>;

/**
 * Host-bound steps on `host`'s own queue, each with a summary (what it does and where, shown in the web
 * UI). Failures come back as they are: the migration saga handles its own.
 */
export function hostSteps(t: TaskState, host: string): HostCall {
  const options = hostOptions(t, host);
  const proxy = proxyActivities<HostBoundActivities>(options.short);
  return (kind, name, summary, ...args) =>
    (
      proxy[name] as unknown as ActivityFunctionWithOptions<HostBoundActivities[typeof name]>
    ).executeWithOptions({ ...options[kind], summary: `${summary} on ${host}` }, args);
}

/** A live host whose step keeps timing out is busy, not dead: after this many rounds its error stands. */
const LIVE_HOST_ROUNDS = 60;

/**
 * Like hostSteps, and a step that times out (nobody picked it up, or its heartbeats stopped) asks the
 * control queue whether the host lives: a dead one fails the step with `HostDown` naming the host, a
 * live one gets the step again.
 */
export function onHost(t: TaskState, host: string): HostCall {
  const call = hostSteps(t, host);
  return async function withLiveness<K extends keyof HostBoundActivities>(
    kind: HostStepKind,
    name: K,
    summary: string,
    ...args: Parameters<HostBoundActivities[K]>
  ): Promise<Awaited<ReturnType<HostBoundActivities[K]>>> {
    for (let round = 1; ; round++) {
      try {
        return await call(kind, name, summary, ...args);
      } catch (err) {
        if (isCancellation(err) || !isTimeout(err)) throw err;
        const seen = await hostStatus(host);
        if (!seen || round >= LIVE_HOST_ROUNDS) throw err;
        if (!seen.live) throw hostDown(host, seen, summary, err);
        // A host that missed its heartbeats may be dying: ask again when it would count as down, rather
        // than spend another step's timeouts on it.
        if (seen.downAtMs !== undefined && seen.downAtMs > Date.now()) {
          await sleep(seen.downAtMs - Date.now() + 1000);
          const again = await hostStatus(host);
          if (again && !again.live) throw hostDown(host, again, summary, err);
        }
        log.warn('a step on a live host timed out: trying again', { host, step: name, error: describe(err) });
      }
    }
  };
}

/** The host's liveness, or undefined when the control queue cannot tell (the caller keeps its error). */
async function hostStatus(host: string): Promise<HostStatus | undefined> {
  try {
    return await liveness.hostStatus(host);
  } catch (err) {
    if (isCancellation(err)) throw err;
    log.warn('could not ask whether a host lives', { host, error: describe(err) });
    return undefined;
  }
}

function hostDown(host: string, seen: HostStatus, step: string, cause: unknown): ApplicationFailure {
  const ago =
    seen.lastSeenMs === undefined
      ? 'never seen'
      : `last seen ${Math.round((Date.now() - seen.lastSeenMs) / 1000)} s ago`;
  return ApplicationFailure.create({
    message: `host ${host} is down (its worker was ${ago}); step: ${step}`,
    type: 'HostDown',
    nonRetryable: true,
    details: [{ host, lastSeenMs: seen.lastSeenMs }],
    cause: cause instanceof Error ? cause : undefined,
  });
}
