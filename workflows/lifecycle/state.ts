import { CancellationScope, upsertSearchAttributes, workflowInfo } from '@temporalio/workflow';
import { defineSearchAttributeKey, SearchAttributeType } from '@temporalio/common';
import type { ConsoleSegment } from '../../activities/host/consoleSegments';
import type { AwaitResult, StageOutResult, TaskRef, UploadedFile, VmHandle } from '../../activities/types';
import { SEARCH_ATTRIBUTES } from '../../config/names';
import type { TaskTuning } from '../../spec/taskInput';
import type { TaskSpec, TaskSpecInput } from '../../spec/taskSpec';
import type { MigrationRecord, TaskPhase, TaskResult, TaskStatus } from '../definitions';

const SA = {
  owner: defineSearchAttributeKey(SEARCH_ATTRIBUTES.owner, SearchAttributeType.KEYWORD),
  host: defineSearchAttributeKey(SEARCH_ATTRIBUTES.host, SearchAttributeType.KEYWORD),
  storageHost: defineSearchAttributeKey(SEARCH_ATTRIBUTES.storageHost, SearchAttributeType.KEYWORD),
  phase: defineSearchAttributeKey(SEARCH_ATTRIBUTES.phase, SearchAttributeType.KEYWORD),
  driver: defineSearchAttributeKey(SEARCH_ATTRIBUTES.driver, SearchAttributeType.KEYWORD),
};

/** Why the wait for the VM was stopped without the task being cancelled. */
export type WaitStop = 'migration' | 'continue-as-new';

/**
 * Everything one task's workflow knows, in one object that every chapter (taskLifecycle.ts) and the
 * migration saga and cleanup (this folder) read and change.
 */
export interface TaskState {
  spec: TaskSpec;
  /** The task's capability, also in `ref` for the host steps. */
  capability: string;
  specInput: TaskSpecInput;
  tuning: TaskTuning;
  ref: TaskRef;
  status: TaskStatus;
  phaseMs: TaskResult['phaseMs'];
  phaseStart: number;
  /** Where the VM runs and where its disks live; a migration changes the first only. */
  host?: string;
  storageHost?: string;
  driver?: string;
  handle?: VmHandle;
  exit?: AwaitResult;
  staged?: StageOutResult;
  consoleLogs: UploadedFile[];
  failure?: unknown;
  /** Everything the task does before cleanup; cancelling it cancels the task. */
  main: CancellationScope;
  /** The current wait for the VM; a migration or a continue-as-new stops it, and says so here. */
  wait?: { scope: CancellationScope; stoppedFor?: WaitStop };
  migrating: boolean;
  migrations: MigrationRecord[];
  /** Where the VM's console was written, host by host; a segment ends when the VM leaves its host. */
  consoleSegments: ConsoleSegment[];
  /** Hosts the VM left uploading their console segments, awaited before the last host joins them. */
  keepingConsoles: Promise<void>[];
  /** Set when this run hands the task to a new run (continue-as-new) instead of finishing it. */
  continuing: boolean;
  /** Set by the cancel update (the reason, maybe empty). */
  cancelReason?: string;
  /** Set once the task asked the scheduler for a place: cleanup gives it back. */
  placementAsked?: boolean;
  /** The host the scheduler granted while the task was queued (its grant signal). */
  granted?: string;
  /** The disks follow the VM after its migration (spec, else the cluster's default). */
  localizeAfterMigration?: boolean;
}

/** What a run hands to the next when it continues as new: the running task, where it is, its past. */
export interface Carried {
  vmId: string;
  resultsPath: string;
  host: string;
  storageHost: string;
  driver: string;
  handle: VmHandle;
  consoleSegments: ConsoleSegment[];
  migrations: MigrationRecord[];
  phaseMs: TaskResult['phaseMs'];
  status: TaskStatus;
}

export function newTaskState(
  spec: TaskSpec,
  specInput: TaskSpecInput,
  capability: string,
  tuning: TaskTuning,
): TaskState {
  const info = workflowInfo();
  const vmId = vmIdFor(info.workflowId, info.runId);
  return {
    spec,
    capability,
    specInput,
    tuning,
    ref: {
      taskId: info.workflowId,
      vmId,
      spec,
      // Fixed at submission by whoever minted the capability; this default only for operators' own specs.
      resultsPath: spec.resultsPath ?? `results/${info.workflowId}`,
      capability,
    },
    status: { taskId: info.workflowId, owner: spec.owner, vmId, phase: 'validating', timestamps: {} },
    phaseMs: {},
    phaseStart: Date.now(),
    consoleLogs: [],
    main: new CancellationScope(),
    migrating: false,
    migrations: [],
    consoleSegments: [],
    keepingConsoles: [],
    continuing: false,
  };
}

/** A task state for the status query before the input could be read: it only fails. */
export function invalidTaskStatus(): TaskStatus {
  return { taskId: workflowInfo().workflowId, phase: 'validating', timestamps: {} };
}

/** Takes up a task where the previous run left it (continue-as-new). */
export function resumeFrom(t: TaskState, c: Carried): void {
  Object.assign(t.ref, { vmId: c.vmId, resultsPath: c.resultsPath });
  Object.assign(t, {
    host: c.host,
    storageHost: c.storageHost,
    driver: c.driver,
    handle: c.handle,
    consoleSegments: c.consoleSegments,
    migrations: c.migrations,
    phaseMs: c.phaseMs,
    status: c.status,
  });
  t.status.migrating = undefined;
  // A running task holds its placement: this run gives it back at the end.
  t.placementAsked = true;
}

export function carriedOf(t: TaskState): Carried {
  return {
    vmId: t.ref.vmId,
    resultsPath: t.ref.resultsPath,
    host: t.host as string,
    storageHost: t.storageHost as string,
    driver: t.driver as string,
    handle: t.handle as VmHandle,
    consoleSegments: t.consoleSegments,
    migrations: t.migrations,
    // The current phase's time so far; the next run counts on from its own start.
    phaseMs: {
      ...t.phaseMs,
      [t.status.phase]: (t.phaseMs[t.status.phase] ?? 0) + (Date.now() - t.phaseStart),
    },
    status: t.status,
  };
}

export function phaseAttribute(phase: TaskPhase) {
  return { key: SA.phase, value: phase };
}

export function setPhase(t: TaskState, phase: TaskPhase): void {
  const now = Date.now();
  t.phaseMs[t.status.phase] = (t.phaseMs[t.status.phase] ?? 0) + (now - t.phaseStart);
  t.phaseStart = now;
  t.status.phase = phase;
  t.status.timestamps[phase] = new Date(now).toISOString();
  upsertSearchAttributes([phaseAttribute(phase)]);
}

export function recordOwner(t: TaskState): void {
  upsertSearchAttributes([{ key: SA.owner, value: t.spec.owner }]);
}

export function recordDriver(t: TaskState, driver: string): void {
  t.driver = t.status.driver = driver;
  upsertSearchAttributes([{ key: SA.driver, value: driver }]);
}

export function recordAddress(t: TaskState): void {
  const address = t.handle?.state.nicAddress;
  t.status.address = typeof address === 'string' ? address.split('/')[0] : undefined;
}

export function recordWhere(t: TaskState): void {
  t.status.host = t.host;
  t.status.storageHost = t.storageHost;
  recordAddress(t);
  upsertSearchAttributes([
    { key: SA.host, value: t.host ?? '' },
    { key: SA.storageHost, value: t.storageHost ?? '' },
  ]);
}

/** Phases after which the task cannot be cancelled nor moved: its outputs are being kept. */
export function isFinishing(t: TaskState): boolean {
  return ['staging-out', 'awaiting-repository', 'destroying', 'completed', 'failed', 'cancelled'].includes(
    t.status.phase,
  );
}

/** A VM folder name from the workflow id and run: unique per run, safe on any file system. */
export function vmIdFor(workflowId: string, runId: string): string {
  const safe = workflowId.replace(/[^A-Za-z0-9_.-]/g, '-').replace(/^[^A-Za-z0-9]+/, '');
  return `${safe.slice(0, 80) || 'task'}-${runId.slice(0, 8)}`;
}
