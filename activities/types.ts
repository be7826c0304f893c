import type { ExitResult, VmHandle } from '../drivers/types';
import type { TaskSpec } from '../spec/taskSpec';
import type { QueuePosition } from '../workflows/scheduling/definitions';

/** Messages between the workflow and its activities (plain JSON). */

export interface TaskRef {
  /** The workflow id; names the task in the repository and logs. */
  taskId: string;
  /** Names the VM folder on its host (workflow id + run, made safe for file names). */
  vmId: string;
  spec: TaskSpec;
  /** Repository folder (owner's space) for outputs and logs. */
  resultsPath: string;
  /** The task's capability (spec/capability.ts): hosts present it as the bearer for this task's transfers. */
  capability: string;
}

export interface StageInResult {
  driver: string;
  files: number;
  bytes: number;
}

/** A VM created and started in one step (launchVm); `createdAtMs` is the host's clock when it was ready. */
export interface LaunchResult {
  handle: VmHandle;
  createdAtMs: number;
}

export type AwaitResult = ExitResult;

export interface UploadedFile {
  path: string;
  size: number;
  sha256: string;
}

export interface StageOutResult {
  outputs: UploadedFile[];
  logs: UploadedFile[];
  /** The console, when stage-out kept it too (a VM that never left its storage host). */
  console?: UploadedFile[];
}

/** Where the scheduler put a task, or its place in the queue (it then waits for the grant signal). */
export type Placement = { host: string } | { queued: QueuePosition };

export type { VmHandle };
