import {
  ActivityFailure,
  ApplicationFailure,
  CancellationScope,
  CancelledFailure,
  condition,
  isCancellation,
  log,
  patched,
  proxyActivities,
  setHandler,
  upsertSearchAttributes,
  workflowInfo,
  type ActivityFunctionWithOptions,
  type ActivityOptions,
} from '@temporalio/workflow';
import { defineSearchAttributeKey, SearchAttributeType } from '@temporalio/common';
import type { ControlActivities } from '../activities/control/createControlActivities';
import type { ConsoleSegment } from '../activities/host/consoleSegments';
import type { HostActivities } from '../activities/host/createHostActivities';
import type { MigrationActivities } from '../activities/host/migrationActivities';
import type { AwaitResult, StageOutResult, TaskRef, UploadedFile, VmHandle } from '../activities/types';
import type { IncomingVm } from '../drivers/types';
import { CONTROL_TASK_QUEUE, HOST_NAME, hostTaskQueue, SEARCH_ATTRIBUTES } from '../config/names';
import { parseTaskSpec, type TaskSpec } from '../spec/taskSpec';
import { parseTaskInput } from '../spec/taskInput';
import {
  cancelUpdate,
  migrateUpdate,
  type MigrateRequest,
  type MigrationRecord,
  type MigrationStep,
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

/** A migration target is chosen now or not at all: the task keeps running meanwhile. */
const migrationControl = proxyActivities<ControlActivities>({
  taskQueue: CONTROL_TASK_QUEUE,
  startToCloseTimeout: '30s',
  scheduleToCloseTimeout: '1m',
  retry: { initialInterval: '1s', maximumInterval: '5s' },
});

type HostBoundActivities = HostActivities & MigrationActivities;

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
    // A target that does not answer soon is gone, and with it whatever it had prepared.
    rollback: {
      ...base,
      scheduleToStartTimeout: '20s',
      startToCloseTimeout: '1m',
      scheduleToCloseTimeout: '2m',
      retry: { ...base.retry, maximumAttempts: 3 },
    },
  } satisfies Record<string, ActivityOptions>;
  const proxy = proxyActivities<HostBoundActivities>(options.short);
  return <K extends keyof HostBoundActivities>(
    kind: keyof typeof options,
    name: K,
    summary: string,
    ...args: Parameters<HostBoundActivities[K]>
  ): Promise<Awaited<ReturnType<HostBoundActivities[K]>>> =>
    (proxy[name] as unknown as ActivityFunctionWithOptions<HostBoundActivities[K]>).executeWithOptions(
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
    // Interim: the versioned input (spec/taskInput.ts) or, until every caller sends it, a bare spec.
    spec =
      typeof input === 'object' && input !== null && 'v' in input
        ? parseTaskInput(input).spec
        : parseTaskSpec(input);
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
  setHandler(progressSignal, ({ progress, message }) => {
    status.progress = progress;
    status.progressMessage = message;
  });

  /** Where the VM runs and where its disks live; a migration changes the first only. */
  let host: string | undefined;
  let storageHost: string | undefined;
  let driver: string | undefined;
  let handle: VmHandle | undefined;
  let exit: AwaitResult | undefined;
  let staged: StageOutResult | undefined;
  let failure: unknown;
  /** The scope of the current wait for the VM; a migration cancels it and the wait resumes on the target. */
  let waitScope: CancellationScope | undefined;
  let migrating = false;
  let waitCancelledForMigration = false;
  const migrations: MigrationRecord[] = [];
  /** Where the VM's console was written, host by host; a segment ends when the VM leaves its host. */
  const consoleSegments: ConsoleSegment[] = [];
  /** Hosts the VM left uploading their console segments, awaited before the last host joins them. */
  const keepingConsoles: Promise<void>[] = [];
  let consoleLogs: UploadedFile[] = [];

  const recordAddress = () => {
    const address = handle?.state.nicAddress;
    status.address = typeof address === 'string' ? address.split('/')[0] : undefined;
  };
  const recordWhere = () => {
    status.host = host;
    status.storageHost = storageHost;
    recordAddress();
    upsertSearchAttributes([
      { key: SA.host, value: host ?? '' },
      { key: SA.storageHost, value: storageHost ?? '' },
    ]);
  };

  setHandler(migrateUpdate, (req) => migrate(req), {
    validator: (req: MigrateRequest) => {
      const id = info.workflowId;
      if (status.phase !== 'running' || !handle || !host)
        throw new Error(`task ${id} is not running (it is ${status.phase}): only a running task can migrate`);
      if (migrating) throw new Error(`task ${id} is already migrating to ${status.migrating?.to}`);
      if (typeof req !== 'object' || req === null) throw new Error('a migrate request is an object');
      if (req.host !== undefined && (typeof req.host !== 'string' || !HOST_NAME.test(req.host)))
        throw new Error(`${JSON.stringify(req.host)} is not a host name`);
      if (req.host === host) throw new Error(`task ${id} already runs on host ${host}`);
      const bw = req.maxBandwidthMiBps;
      if (bw !== undefined && !(typeof bw === 'number' && Number.isFinite(bw) && bw > 0))
        throw new Error(`maxBandwidthMiBps must be a positive number of MiB/s, not ${JSON.stringify(bw)}`);
    },
  });

  /**
   * Live migration, step by step (activities/host/migrationActivities.ts): describe on the source,
   * prepare on the target, stop waiting at the source, send the memory, take over on the target. Until
   * the memory is sent the VM runs at the source, which every failure falls back to after removing what
   * the target prepared; once it is sent the VM is on the target, where the wait resumes.
   */
  async function migrate(req: MigrateRequest): Promise<TaskStatus> {
    migrating = true;
    const from = host as string;
    const fromHandle = handle as VmHandle;
    const vmId = fromHandle.vmId;
    const record: MigrationRecord = {
      from,
      to: req.host ?? '(placement)',
      storageHost: storageHost ?? from,
      startedAt: new Date().toISOString(),
      ok: false,
    };
    const step = (s: MigrationStep) => (status.migrating = { to: record.to, step: s });
    let incoming: IncomingVm | undefined;
    let left = false;
    try {
      step('choosing-target');
      record.to = (await migrationControl.chooseMigrationTarget({ current: from, requested: req.host })).host;
      const to = record.to;
      const src = hostActivities(from, spec);
      const dst = hostActivities(to, spec);
      step('preparing');
      const source = await src(
        'migrate',
        'describeMigrationSource',
        `describe VM ${vmId} for migration to ${to}`,
        fromHandle,
      );
      incoming = await dst('migrate', 'prepareIncoming', `prepare VM ${vmId} to arrive from ${from}`, source);
      if (!waitScope) throw new Error('the task ended before its VM could move');
      step('transferring');
      waitCancelledForMigration = true;
      waitScope.cancel();
      const result = await src('migrateOut', 'migrateOut', `send the memory of VM ${vmId} to ${to}`, {
        handle: fromHandle,
        target: incoming,
        maxBandwidthBytesPerSec: req.maxBandwidthMiBps
          ? Math.round(req.maxBandwidthMiBps * 1024 ** 2)
          : undefined,
      });
      // The source QEMU is gone: the VM runs on the target now, or nowhere.
      left = true;
      movedTo(to, from, incoming.handle);
      Object.assign(record, {
        totalTimeMs: result.totalTimeMs,
        downtimeMs: result.downtimeMs,
        ramTransferredBytes: result.ramTransferredBytes,
        diskTransferredBytes: result.diskTransferredBytes,
      });
      step('finishing');
      handle = await dst('migrate', 'finishIncoming', `take over VM ${vmId} on ${to}`, incoming);
      record.ok = true;
      log.info('VM migrated', { ...record });
      return status;
    } catch (err) {
      let why = describe(err);
      if (incoming && !left) {
        step('rolling-back');
        const taken = await rollBack(incoming);
        if (taken) {
          // The memory had been sent after all (a retried step): the VM runs on the target.
          movedTo(record.to, from, taken);
          record.ok = true;
          return status;
        }
      } else if (left) {
        why = `the VM left ${from} but ${record.to} did not take it over: ${why}`;
      }
      record.error = why;
      log.warn('migration failed', { ...record });
      throw ApplicationFailure.nonRetryable(
        `could not migrate task ${info.workflowId} from ${from} to ${record.to}: ${why}; it runs on ${host}`,
        'MigrationFailed',
        { ...record },
      );
    } finally {
      migrations.push(record);
      status.migrations = migrations;
      status.migrating = undefined;
      migrating = false;
    }
  }

  /** The VM left `from` for `to`: it runs there now, and `from` keeps the console it wrote. */
  function movedTo(to: string, from: string, vm: VmHandle): void {
    host = to;
    handle = vm;
    recordWhere();
    const now = new Date().toISOString();
    const left = consoleSegments.at(-1);
    if (!left || left.host !== from) return;
    left.until = now;
    consoleSegments.push({ n: left.n + 1, host: to, since: now });
    const segment = { ...left };
    keepingConsoles.push(
      hostActivities(from, spec)(
        'migrate',
        'keepConsoleSegment',
        `keep the console of ${from}`,
        ref,
        segment,
      ).then(
        () => undefined,
        (err: unknown) =>
          log.warn('the console of a host the VM left is lost', { from, error: describe(err) }),
      ),
    );
  }

  /**
   * Removes what the target prepared. Returns the VM's handle there in the one case where the target
   * refuses because the VM already runs on it (the migration completed after all): it is finished then.
   */
  async function rollBack(incoming: IncomingVm): Promise<VmHandle | undefined> {
    const dst = hostActivities(incoming.host, spec);
    try {
      await dst('rollback', 'abortIncoming', `remove incoming VM ${incoming.vmId}`, incoming);
      return undefined;
    } catch (err) {
      if (failureType(err) === 'IncomingAlreadyRunning')
        // It runs there: record it there even if taking over fails; the wait on that host then decides.
        return dst('migrate', 'finishIncoming', `take over VM ${incoming.vmId}`, incoming).catch(
          (e: unknown) => {
            log.error('the VM runs on the target, which could not take it over', { error: describe(e) });
            return incoming.handle;
          },
        );
      // A target that cannot be reached is down, and what it prepared is gone with it.
      log.warn('could not remove the incoming VM', { host: incoming.host, error: describe(err) });
      return undefined;
    }
  }

  /** Waits for the task to end, following its VM from host to host. */
  async function runToExit(): Promise<AwaitResult> {
    for (;;) {
      const scope = new CancellationScope();
      const [where, vm] = [host as string, handle as VmHandle];
      waitScope = scope;
      try {
        return await scope.run(() =>
          hostActivities(where, spec)('run', 'awaitVm', `run the task in VM ${ref.vmId}`, vm),
        );
      } catch (err) {
        // Cancelling the task cancels this scope too: only a wait stopped for a migration resumes.
        if (!(isCancellation(err) && waitCancelledForMigration && !main.consideredCancelled)) throw err;
      } finally {
        waitScope = undefined;
      }
      await condition(() => !migrating);
      waitCancelledForMigration = false;
    }
  }

  try {
    await main.run(async () => {
      setPhase('placing');
      const placement = await control.placeTask(spec);
      host = storageHost = placement.host;
      recordWhere();
      const call = hostActivities(placement.host, spec);

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
      // Histories from before console segments replay without them (their console went with stage-out).
      if (patched('console-segments'))
        consoleSegments.push({ n: 1, host: placement.host, since: new Date().toISOString() });
      handle = await call('short', 'startVm', `start VM ${ref.vmId}`, handle);
      recordAddress();
      setPhase('running');
      exit = await runToExit();
      status.exitCode = exit.exitCode;
      if (exit.progress !== undefined) status.progress = exit.progress;
      // A migration that began as the task ended settles before stage-out reads the disks.
      await condition(() => !migrating);

      setPhase('staging-out');
      // The disks never moved: their own host reads them locally.
      staged = await hostActivities(storageHost, spec)(
        'transfer',
        'stageOut',
        `stage-out to ${ref.resultsPath}`,
        ref,
        handle,
      );
    });
  } catch (err) {
    failure = err;
    status.error = status.error ?? describe(err);
  }

  // Cleanup runs even when the workflow itself is being cancelled.
  await CancellationScope.nonCancellable(async () => {
    // A migration under way ends first (its steps are bounded): then the VM is in one known place.
    await condition(() => !migrating);
    if (!host || !storageHost) return;
    const atStorage = hostActivities(storageHost, spec);
    setPhase('destroying');
    if (failure) {
      try {
        await atStorage(
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
    if (consoleSegments.length > 0) {
      await Promise.all(keepingConsoles);
      try {
        consoleLogs = await hostActivities(host, spec)(
          'cleanup',
          'collectConsole',
          `keep the console in ${ref.resultsPath}/logs`,
          ref,
          consoleSegments,
        );
      } catch (err) {
        log.warn('could not collect the console', { error: describe(err) });
      }
    }
    try {
      // Stop the VM where it runs first: its disks must not vanish under it.
      if (host !== storageHost)
        await hostActivities(host, spec)('cleanup', 'destroyVm', `stop VM ${ref.vmId}`, ref, handle);
      await atStorage('cleanup', 'destroyVm', `destroy VM ${ref.vmId}`, ref, handle);
    } catch (err) {
      // The outputs are safe in the repository; what is left on a dead host is its operator's to clear.
      status.cleanupError = describe(err);
      log.error('could not destroy the VM', {
        vmId: ref.vmId,
        host,
        storageHost,
        error: status.cleanupError,
      });
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
    storageHost,
    exitCode: exit.exitCode,
    resultsPath: ref.resultsPath,
    outputs: staged?.outputs ?? [],
    logs: [...(staged?.logs ?? []), ...consoleLogs],
    phaseMs,
    migrations,
  };
}

/** The type of the innermost ApplicationFailure in a chain of causes. */
function failureType(err: unknown): string | undefined {
  let type: string | undefined;
  for (let e: unknown = err; e instanceof Error; e = e.cause)
    if (e instanceof ApplicationFailure) type = e.type ?? undefined;
  return type;
}

function describe(err: unknown): string {
  const parts: string[] = [];
  let e: unknown = err;
  while (e instanceof Error && parts.length < 4) {
    // The wrapper around an activity's own failure says nothing the cause does not.
    if (!(e instanceof ActivityFailure)) parts.push(e.message);
    e = e.cause;
  }
  return parts.join(': ') || String(err);
}
