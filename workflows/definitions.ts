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
  /** ISO time each phase began. */
  timestamps: Partial<Record<TaskPhase, string>>;
  progress?: number;
  progressMessage?: string;
  exitCode?: number;
  error?: string;
  /** Set when the VM could not be destroyed (its host gone): the task's data is safe, its host is not clean. */
  cleanupError?: string;
  resultsPath?: string;
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
}

export interface MigrateRequest {
  /** Target host; placement chooses when absent. */
  host?: string;
}

export const statusQuery = defineQuery<TaskStatus>('status');
/** Cancels the task: the VM is stopped, its logs kept, its host folder removed. */
export const cancelUpdate = defineUpdate<TaskStatus, [{ reason?: string }]>('cancel');
/** Live migration (arrives with the per-host NFS storage); rejected with a clear reason until then. */
export const migrateUpdate = defineUpdate<TaskStatus, [MigrateRequest]>('migrate');
/** Host workers report the task's progress (coarse, rate-limited) so the status query shows it. */
export const progressSignal = defineSignal<[{ progress: number; message?: string }]>('progress');
