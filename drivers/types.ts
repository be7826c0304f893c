/**
 * Hypervisor driver interface, modelled on Nomad's task drivers: a driver turns a prepared VM folder
 * into a running workload and back. Every method is idempotent, because host activities call them and
 * Temporal retries activities. A driver returns a serialisable handle that `recover` accepts, so a
 * restarted worker re-attaches to the VMs its predecessor started.
 */

export interface DriverCapabilities {
  /** Memory-only live migration between hosts that share the VM's disks. */
  liveMigration: boolean;
  /** 'process': a host process under its own uid and namespaces; 'vm': inside a guest. */
  isolation: 'process' | 'vm';
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
  /** The task's last progress report, read once it ended: a line printed just before the end counts too. */
  progress?: number;
  progressMessage?: string;
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
  /**
   * Changes the running VM's CPU share (QEMU and process tasks: a cgroup; Xen: the credit scheduler).
   * Absent: the driver cannot, and a resize is refused on its hosts.
   */
  setCpuShare?(handle: VmHandle, share: CpuShare): Promise<void>;
}

/** A task's CPU share: what `vsp task resize` sets and a deadline raises. */
export interface CpuShare {
  /** At most this percent of one physical CPU (150 = one and a half); absent or 0: no cap. */
  capPercent?: number;
  /** Relative weight against other tasks when CPUs are contended; 100 is the default. */
  weight?: number;
}

/* ---- Live migration (issue 4): memory only; the disks stay in the storage host's store. ---- */

/** A disk of a VM, named by the host whose store holds it and its path inside that store. */
export interface VmDiskRef {
  storageHost: string;
  /** Relative to the store root, e.g. 'vms/<vmId>/root.qcow2'. */
  path: string;
}

/** What the source host tells the target: enough to start the same VM there, waiting for its memory. */
export interface MigrationSource {
  config: VmConfig;
  /** The VM's handle where it runs now. */
  handle: VmHandle;
  /** Root overlay, data disk and the overlay's base image, by locator. */
  disks: { root: VmDiskRef; data: VmDiskRef; base?: VmDiskRef };
}

/** A VM prepared on the target host, waiting for the source to send its memory. Serialisable. */
export interface IncomingVm {
  vmId: string;
  /** The target host. */
  host: string;
  /** Where the source sends the memory, e.g. 'tcp:10.77.0.2:47123'. */
  uri: string;
  /**
   * Present when the target accepts only TLS from the source it was prepared for: the source must
   * present its cluster certificate and check that the target's names `hostname`.
   */
  tls?: { hostname: string };
  /** The VM's handle once it runs on the target. */
  handle: VmHandle;
}

export interface MigrationProgress {
  /** QEMU's migration status: setup, active, device, completed, failed... */
  status: string;
  transferredBytes: number;
  remainingBytes: number;
  totalBytes: number;
  elapsedMs: number;
}

export interface MigrationOptions {
  /** Longest pause of the guest at switch-over (QEMU downtime-limit), ms. */
  downtimeLimitMs?: number;
  /** Bytes per second; unset: QEMU's default. */
  maxBandwidthBytesPerSec?: number;
  /** Cancel (and keep the VM at the source) after this long. */
  timeoutMs?: number;
  onProgress?: (progress: MigrationProgress) => void;
  signal?: AbortSignal;
}

export interface MigrationResult {
  vmId: string;
  from: string;
  to: string;
  totalTimeMs: number;
  downtimeMs: number;
  ramTransferredBytes: number;
  /** Bytes of disk sent by the migration stream: 0, since the target reads the disks in place. */
  diskTransferredBytes: number;
}

/**
 * A driver that live-migrates VMs between hosts. Protocol: `describeForMigration` on the source,
 * `prepareIncoming` on the target, `migrate` on the source (on success the source VM is gone), then
 * `finishIncoming` on the target; on any failure `abortIncoming` on the target, and the VM keeps running
 * at the source. Every step is idempotent.
 */
export interface MigratableDriver extends HypervisorDriver {
  describeForMigration(handle: VmHandle): Promise<MigrationSource>;
  prepareIncoming(source: MigrationSource): Promise<IncomingVm>;
  migrate(handle: VmHandle, target: IncomingVm, options: MigrationOptions): Promise<MigrationResult>;
  /** Waits until the VM runs on this host and records it here; returns its handle. */
  finishIncoming(incoming: IncomingVm): Promise<VmHandle>;
  /** Stops the incoming VM and removes its traces; refuses if it already runs (the VM would be lost). */
  abortIncoming(incoming: IncomingVm): Promise<void>;
}

export function isMigratable(driver: HypervisorDriver): driver is MigratableDriver {
  return driver.capabilities.liveMigration && 'prepareIncoming' in driver && 'migrate' in driver;
}

/* ---- Storage evacuation (issue 12): a running VM's disks follow it to the host where it runs. ---- */

export interface DiskMoveProgress {
  /** Bytes mirrored so far and in all, over every disk. */
  doneBytes: number;
  totalBytes: number;
  elapsedMs: number;
  /** Every disk is mirrored and kept in step: the switch comes next. */
  ready: boolean;
}

export interface DiskMoveOptions {
  onProgress?: (progress: DiskMoveProgress) => void;
  signal?: AbortSignal;
  /** Give up (and keep the disks where they are) after this long. */
  timeoutMs?: number;
}

export interface DiskMoveResult {
  /** The VM's handle with this host as its storage host. */
  handle: VmHandle;
  /** The storage host the disks left (the same as handle.storageHost when they were local already). */
  from: string;
  /** Bytes mirrored (virtual sizes of the disks), and how long the mirror took to the switch. */
  bytes: number;
  elapsedMs: number;
}

/**
 * A driver that moves a running VM's disks from their storage host into the store of the host where
 * the VM runs, while it runs, then switches the VM over to them. Protocol: `localizeDisks` on the host
 * where the VM runs (the new storage host is recorded there and returned), then, once the caller has
 * recorded it too, `dropMovedDisks` on the former storage host. Both idempotent.
 */
export interface DiskLocalizingDriver extends HypervisorDriver {
  localizeDisks(handle: VmHandle, options: DiskMoveOptions): Promise<DiskMoveResult>;
  /** Removes the VM's folder from this former storage host; refuses while the VM runs or is stored here. */
  dropMovedDisks(handle: VmHandle): Promise<void>;
}

export function canLocalizeDisks(driver: HypervisorDriver): driver is DiskLocalizingDriver {
  return 'localizeDisks' in driver && 'dropMovedDisks' in driver;
}
