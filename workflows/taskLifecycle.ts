import {
  ApplicationFailure,
  CancellationScope,
  CancelledFailure,
  isCancellation,
  log,
  proxyActivities,
  setHandler,
  upsertSearchAttributes,
  workflowInfo,
  type ActivityFunctionWithOptions,
  type ActivityOptions,
} from '@temporalio/workflow';
import { defineSearchAttributeKey, SearchAttributeType } from '@temporalio/common';
import type { ControlActivities } from '../activities/control/createControlActivities';
import type { HostActivities } from '../activities/host/createHostActivities';
import type { AwaitResult, StageOutResult, TaskRef, VmHandle } from '../activities/types';
import { CONTROL_TASK_QUEUE, hostTaskQueue, SEARCH_ATTRIBUTES } from '../config/names';
import { parseTaskSpec, type TaskSpec } from '../spec/taskSpec';
import {
  cancelUpdate,
  migrateUpdate,
  type MigrateRequest,
  progressSignal,
  statusQuery,
  type TaskPhase,
  type TaskResult,
  type TaskStatus,
} from './definitions';

const SA = {
  owner: defineSearchAttributeKey(SEARCH_ATTRIBUTES.owner, SearchAttributeType.KEYWORD),
  host: defineSearchAttributeKey(SEARCH_ATTRIBUTES.host, SearchAttributeType.KEYWORD),
  storageHost: defineSearchAttributeKey(SEARCH_ATTRIBUTES.storageHost, SearchAttributeType.KEYWORD),
  phase: defineSearchAttributeKey(SEARCH_ATTRIBUTES.phase, SearchAttributeType.KEYWORD),
  driver: defineSearchAttributeKey(SEARCH_ATTRIBUTES.driver, SearchAttributeType.KEYWORD),
};

const control = proxyActivities<ControlActivities>({
  taskQueue: CONTROL_TASK_QUEUE,
  startToCloseTimeout: '30s',
  // No live host yet: keep trying for a while, then fail the task clearly.
  scheduleToCloseTimeout: '10m',
  retry: { initialInterval: '1s', maximumInterval: '15s' },
});

/**
 * Host-bound activities run on the host's own queue. Each has a schedule-to-close timeout because a
 * host's queue dies with its host: without it a task would wait forever for a dead machine. Every call
 * carries a summary that says what it does and where, shown in the web UI.
 */
function hostActivities(host: string, spec: TaskSpec) {
  const base: ActivityOptions = {
    taskQueue: hostTaskQueue(host),
    retry: { initialInterval: '1s', maximumInterval: '10s', maximumAttempts: 20 },
    // No worker on the host's queue for this long: the host is gone, fail now rather than at the end.
    scheduleToStartTimeout: '5m',
  };
  const options = {
    short: { ...base, startToCloseTimeout: '2m', scheduleToCloseTimeout: '15m' },
    transfer: { ...base, startToCloseTimeout: '2h', heartbeatTimeout: '30s', scheduleToCloseTimeout: '6h' },
    cleanup: { ...base, startToCloseTimeout: '10m', heartbeatTimeout: '30s', scheduleToCloseTimeout: '30m' },
    // The task's own time limit bounds the run; the margin covers boot and worker restarts.
    run: {
      ...base,
      startToCloseTimeout: `${spec.timeLimitSec + 600}s`,
      scheduleToCloseTimeout: `${spec.timeLimitSec + 1800}s`,
      heartbeatTimeout: '20s',
    },
  } satisfies Record<string, ActivityOptions>;
  const proxy = proxyActivities<HostActivities>(options.short);
  return <K extends keyof HostActivities>(
    kind: keyof typeof options,
    name: K,
    summary: string,
    ...args: Parameters<HostActivities[K]>
  ): Promise<Awaited<ReturnType<HostActivities[K]>>> =>
    (proxy[name] as unknown as ActivityFunctionWithOptions<HostActivities[K]>).executeWithOptions(
      { ...options[kind], summary: `${summary} on ${host}` },
      args,
    );
}

/** A VM folder name from the workflow id and run: unique per run, safe on any file system. */
function vmIdFor(workflowId: string, runId: string): string {
  const safe = workflowId.replace(/[^A-Za-z0-9_.-]/g, '-').replace(/^[^A-Za-z0-9]+/, '');
  return `${safe.slice(0, 80) || 'task'}-${runId.slice(0, 8)}`;
}

/**
 * One task's whole life: stage-in, placement, VM creation, execution, stage-out, destroy. Destroy and
 * log collection always run, on failure and on cancellation too.
 */
export async function TaskLifecycle(input: unknown): Promise<TaskResult> {
  const info = workflowInfo();
  const status: TaskStatus = { taskId: info.workflowId, phase: 'validating', timestamps: {} };
  const phaseMs: TaskResult['phaseMs'] = {};
  let phaseStart = Date.now();
  setHandler(statusQuery, () => status);

  const setPhase = (phase: TaskPhase) => {
    const now = Date.now();
    phaseMs[status.phase] = (phaseMs[status.phase] ?? 0) + (now - phaseStart);
    phaseStart = now;
    status.phase = phase;
    status.timestamps[phase] = new Date(now).toISOString();
    upsertSearchAttributes([{ key: SA.phase, value: phase }]);
  };
  setPhase('validating');

  let spec: TaskSpec;
  try {
    spec = parseTaskSpec(input);
  } catch (err) {
    status.error = (err as Error).message;
    setPhase('failed');
    throw ApplicationFailure.nonRetryable((err as Error).message, 'InvalidTaskSpec');
  }
  status.owner = spec.owner;
  upsertSearchAttributes([{ key: SA.owner, value: spec.owner }]);

  const ref: TaskRef = {
    taskId: info.workflowId,
    vmId: vmIdFor(info.workflowId, info.runId),
    spec,
    resultsPath: spec.resultsPath ?? `results/${vmIdFor(info.workflowId, info.runId)}`,
  };
  status.resultsPath = ref.resultsPath;

  const main = new CancellationScope();
  const finished = () =>
    ['completed', 'failed', 'cancelled', 'destroying', 'staging-out'].includes(status.phase);
  setHandler(
    cancelUpdate,
    ({ reason }) => {
      status.error = `cancelled${reason ? `: ${reason}` : ''}`;
      main.cancel();
      return status;
    },
    {
      validator: (_req: { reason?: string }) => {
        if (finished())
          throw new Error(`task ${info.workflowId} is already ${status.phase}; nothing to cancel`);
      },
    },
  );
  setHandler(migrateUpdate, () => status, {
    validator: (_req: MigrateRequest) => {
      if (status.phase !== 'running')
        throw new Error(`task ${info.workflowId} is not running (${status.phase})`);
      throw new Error(`the '${status.driver}' driver on host ${status.host} has no live migration`);
    },
  });
  setHandler(progressSignal, ({ progress, message }) => {
    status.progress = progress;
    status.progressMessage = message;
  });

  let host: string | undefined;
  let driver: string | undefined;
  let handle: VmHandle | undefined;
  let exit: AwaitResult | undefined;
  let staged: StageOutResult | undefined;
  let failure: unknown;

  try {
    await main.run(async () => {
      setPhase('placing');
      const placement = await control.placeTask(spec);
      host = placement.host;
      status.host = status.storageHost = host;
      upsertSearchAttributes([
        { key: SA.host, value: host },
        { key: SA.storageHost, value: host },
      ]);
      const call = hostActivities(host, spec);

      setPhase('staging-in');
      const stagedIn = await call(
        'transfer',
        'stageIn',
        `stage-in: ${spec.inputs.length} input file(s)`,
        ref,
      );
      driver = status.driver = stagedIn.driver;
      upsertSearchAttributes([{ key: SA.driver, value: driver }]);

      setPhase('creating');
      handle = await call('short', 'createVm', `create ${driver} VM ${ref.vmId}`, ref, driver);
      setPhase('starting');
      handle = await call('short', 'startVm', `start VM ${ref.vmId}`, handle);
      setPhase('running');
      exit = await call('run', 'awaitVm', `run the task in VM ${ref.vmId}`, handle);
      status.exitCode = exit.exitCode;
      if (exit.progress !== undefined) status.progress = exit.progress;

      setPhase('staging-out');
      staged = await call('transfer', 'stageOut', `stage-out to ${ref.resultsPath}`, ref, handle);
    });
  } catch (err) {
    failure = err;
    status.error = status.error ?? describe(err);
  }

  // Cleanup runs even when the workflow itself is being cancelled.
  await CancellationScope.nonCancellable(async () => {
    if (!host) return;
    const call = hostActivities(host, spec);
    setPhase('destroying');
    if (failure) {
      try {
        await call(
          'cleanup',
          'collectLogs',
          `keep the logs in ${ref.resultsPath}/logs`,
          ref,
          driver,
          status.error ?? 'failed',
        );
      } catch (err) {
        log.warn('could not collect the task logs', { error: describe(err) });
      }
    }
    try {
      await call('cleanup', 'destroyVm', `destroy VM ${ref.vmId}`, ref, handle);
    } catch (err) {
      // The outputs are safe in the repository; what is left on a dead host is its operator's to clear.
      status.cleanupError = describe(err);
      log.error('could not destroy the VM', { vmId: ref.vmId, host, error: status.cleanupError });
    }
  });

  if (failure) {
    if (isCancellation(failure)) {
      setPhase('cancelled');
      throw failure instanceof CancelledFailure ? failure : new CancelledFailure(status.error ?? 'cancelled');
    }
    setPhase('failed');
    throw failure;
  }
  if (exit?.timedOut || exit?.exitCode !== 0) {
    status.error = exit?.timedOut
      ? `the task ran past its time limit of ${spec.timeLimitSec} s`
      : `the task command exited with status ${exit?.exitCode}`;
    setPhase('failed');
    throw ApplicationFailure.nonRetryable(
      status.error,
      exit?.timedOut ? 'TaskTimedOut' : 'TaskCommandFailed',
      {
        exitCode: exit?.exitCode,
        resultsPath: ref.resultsPath,
      },
    );
  }
  setPhase('completed');
  return {
    taskId: info.workflowId,
    host: host ?? '',
    exitCode: exit.exitCode,
    resultsPath: ref.resultsPath,
    outputs: staged?.outputs ?? [],
    logs: staged?.logs ?? [],
    phaseMs,
  };
}

function describe(err: unknown): string {
  const parts: string[] = [];
  let e: unknown = err;
  while (e instanceof Error && parts.length < 4) {
    parts.push(e.message);
    e = e.cause;
  }
  return parts.join(': ') || String(err);
}
