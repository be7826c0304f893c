import {
  CancellationScope,
  patched,
  setCurrentDetails,
  upsertSearchAttributes,
  workflowInfo,
} from '@temporalio/workflow';
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
  progress: defineSearchAttributeKey(SEARCH_ATTRIBUTES.progress, SearchAttributeType.INT),
};

/** Runs that record the task's progress in `VspProgress` (upserts older histories lack). */
export const PROGRESS_PATCH = 'vsp-progress-attribute';

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
  /** The last destroyVm ended the task's capability too (its result said so). */
  capabilityReleased?: boolean;
  /** The `VspProgress` last upserted: the same value is not upserted again. */
  recordedProgress?: number;
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
  enterPhaseAt(t, phase, Date.now());
  upsertSearchAttributes([phaseAttribute(phase)]);
}

/**
 * The task entered `phase` at `at` (ms; not before the current phase began): its times and status,
 * without the search attribute, for a phase that began inside a host step and ends as that step does.
 */
export function enterPhaseAt(t: TaskState, phase: TaskPhase, at: number): void {
  t.phaseMs[t.status.phase] = (t.phaseMs[t.status.phase] ?? 0) + (at - t.phaseStart);
  t.phaseStart = at;
  t.status.phase = phase;
  t.status.timestamps[phase] = new Date(at).toISOString();
  showDetails(t);
}

/**
 * The task's progress (whole percent) in `VspProgress`, where the Temporal UI's list and queries see it,
 * and in its details. Progress reaches the workflow in steps (the host's progress signal), at the end of
 * the run (awaitVm's result), and as 100 once completed: a few upserts per task, never one per report.
 */
export function recordProgress(t: TaskState, progress = t.status.progress): void {
  showDetails(t);
  if (progress === undefined) return;
  const value = Math.round(progress);
  if (value === t.recordedProgress || !patched(PROGRESS_PATCH)) return;
  t.recordedProgress = value;
  upsertSearchAttributes([{ key: SA.progress, value }]);
}

/**
 * The current details the Temporal UI shows on the task's page (markdown): phase, owner, host, progress
 * and the command. Workflow state, answered from queries: no history event.
 */
export function showDetails(t: TaskState): void {
  const s = t.status;
  const where = t.host
    ? `${t.host}${t.storageHost && t.storageHost !== t.host ? ` (disks on ${t.storageHost})` : ''}`
    : 'none yet';
  const progress = s.phase === 'completed' ? 100 : s.progress;
  const pct =
    progress === undefined
      ? ''
      : ` · **${Math.round(progress)} %**${s.progressMessage ? ` ${s.progressMessage}` : ''}`;
  const command = t.spec.command.replace(/`/g, "'").slice(0, 300);
  setCurrentDetails(
    `**${s.phase}** · owner **${t.spec.owner}** · host **${where}**${pct}\n\n` +
      `${t.spec.name ? `${t.spec.name}: ` : ''}\`${command}\`${s.error ? `\n\n${s.error}` : ''}`,
  );
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
  showDetails(t);
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
