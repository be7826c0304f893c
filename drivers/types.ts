/**
 * Hypervisor driver interface, modelled on Nomad's task drivers: a driver turns a prepared VM folder
 * into a running workload and back. Every method is idempotent, because host activities call them and
 * Temporal retries activities. A driver returns a serialisable handle that `recover` accepts, so a
 * restarted worker re-attaches to the VMs its predecessor started.
 */

export interface DriverCapabilities {
  /** Memory-only live migration between hosts that share the VM's disks. */
  liveMigration: boolean;
  /** 'none': the task runs as a host process (no isolation); 'vm': inside a guest. */
  isolation: 'none' | 'vm';
  /** How the task's home reaches it: a host folder, or an ext4 data-disk image. */
  homeStaging: 'directory' | 'disk-image';
}

/** What the workflow asks of a VM, already validated (see spec/taskSpec.ts). */
export interface VmConfig {
  vmId: string;
  owner: string;
  command: string;
  vcpus: number;
  memoryMiB: number;
  /** Absolute path of the cached base image (storage/imageCache) for drivers that boot one. */
  baseImage?: string;
  /** TCP ports a service task listens on; empty for batch tasks. */
  ports: number[];
  timeLimitSec: number;
}

/** Serialisable: stored in the VM folder's state file and passed between activities. */
export interface VmHandle {
  driver: string;
  vmId: string;
  /** Host that runs the VM now. */
  host: string;
  /** Host whose store holds the VM's folder and disks. */
  storageHost: string;
  /** Driver-specific facts needed to re-attach (pid, start time, QMP socket, accelerator...). */
  state: Record<string, string | number | boolean>;
}

export type VmPhase = 'created' | 'running' | 'exited' | 'missing';

export interface VmStatus {
  phase: VmPhase;
  /** Exit status of the task command, once exited. */
  exitCode?: number;
  /** Last progress the task reported (0..100), if any. */
  progress?: number;
  progressMessage?: string;
  details: Record<string, string | number | boolean>;
}

export interface ExitResult {
  exitCode: number;
  /** True when the driver ended the VM because the time limit ran out. */
  timedOut: boolean;
}

export interface WaitOptions {
  /** Called at least every few seconds while the VM runs; activities turn this into heartbeats. */
  onProgress: (status: VmStatus) => void;
  signal: AbortSignal;
}

export interface HypervisorDriver {
  readonly name: string;
  readonly capabilities: DriverCapabilities;
  /** Prepares the VM in its folder (disks, config); does not run the task. */
  create(config: VmConfig): Promise<VmHandle>;
  /** Starts the task; a second call for a VM that already started is a no-op, never a second run. */
  start(handle: VmHandle): Promise<VmHandle>;
  /** Resolves when the task ends or the time limit runs out. */
  wait(handle: VmHandle, options: WaitOptions): Promise<ExitResult>;
  inspect(handle: VmHandle): Promise<VmStatus>;
  /** Re-attaches to a VM after a worker restart; returns its status ('missing' if it is gone). */
  recover(handle: VmHandle): Promise<VmStatus>;
  /** Stops the task: graceful first, forced after `timeoutMs`. */
  stop(handle: VmHandle, timeoutMs: number): Promise<void>;
  /** Stops if needed and removes every trace of the VM on this host. */
  destroy(handle: VmHandle): Promise<void>;
}
