import { defineQuery, defineSignal, defineUpdate } from '@temporalio/workflow';

/** What a task's workflow exposes to clients; shared by the workflow, the client library and the CLI. */

export type TaskPhase =
  | 'validating'
  | 'placing'
  | 'staging-in'
  | 'creating'
  | 'starting'
  | 'running'
  | 'staging-out'
  | 'destroying'
  | 'completed'
  | 'failed'
  | 'cancelled';

export interface TaskStatus {
  taskId: string;
  owner?: string;
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
  /** Set when the VM could not be destroyed (its host gone): the task's data is safe, its host is not clean. */
  cleanupError?: string;
  resultsPath?: string;
  /** The migration under way, if any. */
  migrating?: { to: string; step: MigrationStep };
  /** Every migration tried, in order, with its figures or its error. */
  migrations?: MigrationRecord[];
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

export interface MigrateRequest {
  /** Target host; placement chooses when absent. */
  host?: string;
  /** Caps this migration's transfer rate (MiB/s); default: the source host's configuration. */
  maxBandwidthMiBps?: number;
}

export const statusQuery = defineQuery<TaskStatus>('status');
/** Cancels the task: the VM is stopped, its logs kept, its host folder removed. */
export const cancelUpdate = defineUpdate<TaskStatus, [{ reason?: string }]>('cancel');
/**
 * Live-migrates a running task's VM (memory only; its disks stay on their storage host). Resolves with
 * the status once the VM runs on the target; fails with the reason when it could not move, the VM then
 * still running where it was.
 */
export const migrateUpdate = defineUpdate<TaskStatus, [MigrateRequest]>('migrate');
/** Host workers report the task's progress (coarse, rate-limited) so the status query shows it. */
export const progressSignal = defineSignal<[{ progress: number; message?: string }]>('progress');
