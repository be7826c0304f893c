import type { ExitResult, VmHandle } from '../drivers/types';
import type { TaskSpec } from '../spec/taskSpec';

/** Messages between the workflow and its activities (plain JSON). */

export interface TaskRef {
  /** The workflow id; names the task in the repository and logs. */
  taskId: string;
  /** Names the VM folder on its host (workflow id + run, made safe for file names). */
  vmId: string;
  spec: TaskSpec;
  /** Repository folder (owner's space) for outputs and logs. */
  resultsPath: string;
  /** The task's capability (spec/capability.ts): the bearer credential for this task's transfers. */
  capability: string;
}

/** A host's liveness as the control queue sees it (pollers and heartbeats of its worker). */
export interface HostStatus {
  live: boolean;
  /** When the host's worker was last seen (Unix ms), if ever. */
  lastSeenMs?: number;
}

export interface StageInResult {
  driver: string;
  files: number;
  bytes: number;
}

export interface AwaitResult extends ExitResult {
  progress?: number;
}

export interface UploadedFile {
  path: string;
  size: number;
  sha256: string;
}

export interface StageOutResult {
  outputs: UploadedFile[];
  logs: UploadedFile[];
}

export interface Placement {
  host: string;
  /** Running tasks the host had when chosen. */
  load: number;
}

export type { VmHandle };
