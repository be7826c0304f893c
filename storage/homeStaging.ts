import type { VmPaths } from './vmStore';

/** Files taken out of a finished task's home, ready for upload. */
export interface ExtractedOutputs {
  /** Folder holding the task's outputs (may be empty). */
  outputsDir: string;
  /** The task's stdout+stderr, if it produced one. */
  taskLog?: string;
}

/** What a task's home must hold: its input files (paths relative to the home, sizes) and its output room. */
export interface StagingPlan {
  files: { path: string; size: number }[];
  outputRoomBytes: number;
}

/**
 * How a task's inputs become its home and its outputs come back: a plain folder for the process
 * driver, an ext4 data-disk image for VMs (the paper's mechanism). The workflow never sees which.
 */
export interface HomeStaging {
  readonly kind: 'directory' | 'disk-image';
  /**
   * Whether build() makes the downloaded inputs durable as a whole (a data disk fsynced once), so that
   * each download need not be fsynced on its own.
   */
  readonly syncsInputs: boolean;
  /**
   * Readies `vm.inputsDir` for the inputs, before they are downloaded there: for a data disk, the disk
   * itself mounted there, so that they land once. Optional: build() also takes a plain folder of them.
   */
  prepare(vm: VmPaths, plan: StagingPlan, opts?: { signal?: AbortSignal }): Promise<void>;
  /**
   * Builds the home from the inputs downloaded into `vm.inputsDir`, leaving `outputRoomBytes` free;
   * `signal` stops the tools it runs (the activity was cancelled or its attempt timed out).
   */
  build(vm: VmPaths, outputRoomBytes: number, opts?: { signal?: AbortSignal }): Promise<{ bytes: number }>;
  /** Copies `outputDir` (relative to the home) and the task log into `vm.outboxDir`. */
  extract(vm: VmPaths, outputDir: string): Promise<ExtractedOutputs>;
}
