import { defineQuery, defineSignal, defineUpdate } from '@temporalio/workflow';
import { z } from 'zod';
import { HOST_NAME } from '../config/names';
import type { CpuShare } from '../drivers/types';
import type { QueuePosition } from './scheduling/definitions';

/** What a task's workflow exposes to clients; shared by the workflow, the client library and the CLI. */

export type TaskPhase =
  | 'validating'
  | 'placing'
  /** No host has room now: the task waits in the scheduler's queue (TaskStatus.queue says where). */
  | 'queued'
  | 'staging-in'
  | 'creating'
  | 'starting'
  | 'running'
  | 'staging-out'
  /** Outputs or logs wait on their host for the repository to come back (bounded by the retention). */
  | 'awaiting-repository'
  | 'destroying'
  | 'completed'
  | 'failed'
  | 'cancelled';

export interface TaskStatus {
  taskId: string;
  owner?: string;
  /** The VM's folder name in its host's store (operators, tests). */
  vmId?: string;
  phase: TaskPhase;
  /** Host running the VM. */
  host?: string;
  /** Host whose store holds the VM's disks. */
  storageHost?: string;
  driver?: string;
  /** The VM's address on the cluster's VM network (service VMs), the same on every host it runs on. */
  address?: string;
  /** ISO time each phase began. */
  timestamps: Partial<Record<TaskPhase, string>>;
  progress?: number;
  progressMessage?: string;
  exitCode?: number;
  error?: string;
  /** Since when (ISO) the outputs wait for the repository, and until when they are kept for it. */
  awaitingRepository?: { since: string; until: string; error: string };
  /** While queued: the task's place in the scheduler's queue (read from the scheduler by clients). */
  queue?: QueuePosition;
  /** Hosts that died under the task and were left for another (spec `onHostFailure: 'restart'`). */
  restartedFrom?: string[];
  /** Set when the VM could not be destroyed (its host gone): the task's data is safe, its host is not clean. */
  cleanupError?: string;
  resultsPath?: string;
  /** The migration under way, if any. */
  migrating?: { to: string; step: MigrationStep };
  /** Every migration tried, in order, with its figures or its error. */
  migrations?: MigrationRecord[];
  /** The CPU share asked for with the resize update (absent: the host's default, uncapped). */
  cpuShare?: CpuShare;
  /** Set while the task's progress lags its `deadline`: its CPU share is raised meanwhile. */
  behindDeadline?: boolean;
  /** The disk move under way, if any: from the storage host to the host where the VM runs. */
  movingDisks?: { from: string; to: string };
  /** Every disk move tried (storage evacuation), in order. */
  storageMoves?: StorageMoveRecord[];
}

/** A running VM's disks mirrored from their storage host to the host where it runs (storage evacuation). */
export interface StorageMoveRecord {
  from: string;
  to: string;
  startedAt: string;
  ok: boolean;
  /** Bytes mirrored (the disks' virtual sizes) and the time to the switch. */
  bytes?: number;
  mirrorMs?: number;
  /** Why it failed; the disks then stay where they were. */
  error?: string;
  /** Set when the former storage host could not drop its copy (its reaper or operator will). */
  dropError?: string;
}

export type MigrationStep = 'choosing-target' | 'preparing' | 'transferring' | 'finishing' | 'rolling-back';

export interface MigrationRecord {
  from: string;
  to: string;
  /** Host whose store holds the disks (unchanged by a migration). */
  storageHost: string;
  startedAt: string;
  ok: boolean;
  /** From QEMU's query-migrate at completion. */
  totalTimeMs?: number;
  downtimeMs?: number;
  ramTransferredBytes?: number;
  diskTransferredBytes?: number;
  /** Why it failed; the VM then runs where it ran before. */
  error?: string;
}

export interface TaskResult {
  taskId: string;
  host: string;
  exitCode: number;
  resultsPath: string;
  outputs: { path: string; size: number; sha256: string }[];
  logs: { path: string; size: number; sha256: string }[];
  /** Milliseconds spent in each phase. */
  phaseMs: Partial<Record<TaskPhase, number>>;
  /** Host whose store held the disks (where stage-out ran). */
  storageHost?: string;
  migrations?: MigrationRecord[];
}

/**
 * Why a task whose command ran did not succeed (a time limit, a status other than 0), or undefined: the
 * workflow's failure and the task's `logs/failure.txt` say the same.
 */
export function commandFailure(
  exit: { exitCode: number; timedOut: boolean },
  timeLimitSec: number,
): string | undefined {
  if (exit.timedOut) return `the task ran past its time limit of ${timeLimitSec} s`;
  if (exit.exitCode !== 0) return `the task command exited with status ${exit.exitCode}`;
  return undefined;
}

/** The update's arguments, checked in its validator: a malformed request never reaches the handler. */
export const MigrateRequestSchema = z
  .object({
    /** Target host; placement chooses when absent. */
    host: z
      .string()
      .refine((h) => HOST_NAME.test(h), { error: (iss) => `${JSON.stringify(iss.input)} is not a host name` })
      .optional(),
    /** Caps this migration's transfer rate (MiB/s); default: the source host's configuration. */
    maxBandwidthMiBps: z
      .number()
      .positive('maxBandwidthMiBps must be a positive number of MiB/s')
      .finite()
      .optional(),
  })
  .strict();
export type MigrateRequest = z.infer<typeof MigrateRequestSchema>;

/** A running task's new CPU share (`vsp task resize`); fields absent keep their current value. */
export const ResizeRequestSchema = z
  .object({
    /** Percent of one physical CPU (150 = one and a half); 0 lifts the cap. */
    capPercent: z
      .number()
      .int('capPercent must be a whole number of percent')
      .min(0, 'capPercent must be at least 0 (0 lifts the cap)')
      .max(6400, 'capPercent must be at most 6400 (64 CPUs)')
      .optional(),
    /** Weight against other tasks under contention; 100 is the default. */
    weight: z
      .number()
      .int('weight must be a whole number')
      .min(1, 'weight must be at least 1')
      .max(10000, 'weight must be at most 10000')
      .optional(),
  })
  .strict()
  .refine((r) => r.capPercent !== undefined || r.weight !== undefined, 'give capPercent, weight or both');
export type ResizeRequest = z.infer<typeof ResizeRequestSchema>;

export const CancelRequestSchema = z.object({ reason: z.string().max(1000).optional() }).strict();
export type CancelRequest = z.infer<typeof CancelRequestSchema>;

export const ProgressReportSchema = z.object({
  progress: z.number().min(0).max(100),
  message: z.string().max(1000).optional(),
});
export type ProgressReport = z.infer<typeof ProgressReportSchema>;

/** A request's issues in one message, each naming its field. */
export function requestProblems(what: string, error: z.ZodError): string {
  return `invalid ${what} request: ${error.issues.map((i) => `${i.path.join('.') || 'request'}: ${i.message}`).join('; ')}`;
}

export const statusQuery = defineQuery<TaskStatus>('status');
/** Cancels the task: the VM is stopped, its logs kept, its host folder removed. */
export const cancelUpdate = defineUpdate<TaskStatus, [CancelRequest]>('cancel');
/**
 * Live-migrates a running task's VM (memory only; its disks stay on their storage host). Resolves with
 * the status once the VM runs on the target; fails with the reason when it could not move, the VM then
 * still running where it was.
 */
export const migrateUpdate = defineUpdate<TaskStatus, [MigrateRequest]>('migrate');
/** Changes a running task's CPU share on its host; resolves with the status once it is in force. */
export const resizeUpdate = defineUpdate<TaskStatus, [ResizeRequest]>('resize');
/**
 * Moves a running task's disks from their storage host to the host where its VM runs, while it runs
 * (storage evacuation); the former storage host then drops its copy. Resolves with the status once the
 * new storage host is recorded; fails with the reason when the disks could not move (they stay).
 */
export const localizeDisksUpdate = defineUpdate<TaskStatus, []>('localizeDisks');
/**
 * The task's progress in steps (the host sends it each time the report crosses a 10 % step): the
 * workflow records it in `VspProgress` and its details. Every report travels in awaitVm's heartbeats,
 * which the status merges; a signal per report would grow the history. Malformed input is ignored
 * (signals have no validator).
 */
export const progressSignal = defineSignal<[ProgressReport]>('progress');
