/**
 * The scheduler's vocabulary: what hosts report, what a task asks for, what the scheduler grants. Plain
 * data (JSON through Temporal), no Node APIs: the scheduler workflow imports this.
 */

export const MiB = 1024 * 1024;

export interface Resources {
  vcpus: number;
  memoryMiB: number;
  diskMiB: number;
}

/**
 * What a host worker reports of itself, in every liveness heartbeat (activities/host/hostLiveness.ts):
 * read with the host's liveness, without a history event per report.
 */
export interface HostInventory {
  host: string;
  /** Physical vCPUs and memory (configured, or the machine's). */
  vcpus: number;
  memoryMiB: number;
  /** The VM store's file system. */
  storeTotalBytes: number;
  storeFreeBytes: number;
  drivers: string[];
  /** The driver a task that names none gets here (none: this host runs only tasks that name a driver). */
  defaultDriver?: string;
  /** kvm, tcg (QEMU) or xen; absent on a host without a VM driver. */
  accelerator?: string;
  /** Base images in the host's cache, by content hash, with the names tasks used for them. */
  cachedImages: { sha256: string; names: string[] }[];
  labels: Record<string, string>;
  workerStartedAt: string;
  reportedAt: string;
}

/** A host as the scheduler last saw it: its liveness verdict and its inventory. */
export interface HostView {
  host: string;
  live: boolean;
  /** Why it counts as live or down (from its heartbeat). */
  reason: string;
  inventory?: HostInventory;
}

export type PlacementPolicy = 'spread' | 'pack';

export interface SchedulerConfig {
  /** The cluster's hosts (the control worker's VSP_HOSTS). */
  hosts: string[];
  policy: PlacementPolicy;
  /** Prefer a host that has the task's base image cached. */
  locality: boolean;
  /** vCPUs granted per physical vCPU, memory per MiB, store MiB per MiB. */
  cpuOvercommit: number;
  memoryOvercommit: number;
  diskOvercommit: number;
  /** Store space a task reserves beyond its output room (overlay, logs, staged inputs). */
  taskDiskMiB: number;
  /** Keep an owner's service tasks (tasks with ports) on different hosts where one has room (placement and rebalancing). */
  antiAffinity?: boolean;
  /** Rebalancing by live migration on a Temporal Schedule; absent or everySec 0: off. */
  rebalance?: RebalanceConfig;
}

export interface RebalanceConfig {
  /** The Schedule's period: a round looks for moves this often. */
  everySec: number;
  /** Smallest gain of the cluster score worth a move (spread). */
  threshold: number;
  /** Live migrations of a round under way at once. */
  maxInFlight: number;
}

/** What rebalancing has done (the state query; tests and operators watch its rounds). */
export interface BalanceRecord {
  /** Rounds started (Schedule ticks that found the scheduler). */
  rounds: number;
  lastRoundAt?: string;
  /** Whether the last plan found no move worth making. */
  balanced: boolean;
  /** A round is wanted or under way: the next run (continue-as-new) takes it up. */
  active: boolean;
  /** Moves done and failed, all time. */
  moved: number;
  failed: number;
  /** Failed moves per task: one that failed REBALANCE_ATTEMPTS times is not tried again. */
  failures: Record<string, number>;
  /** Moves under way: task -> its target. */
  inFlight: Record<string, string>;
}

export const DEFAULT_SCHEDULER_CONFIG: Omit<SchedulerConfig, 'hosts'> = {
  policy: 'spread',
  locality: true,
  cpuOvercommit: 4,
  memoryOvercommit: 1,
  diskOvercommit: 1,
  taskDiskMiB: 256,
};

/** What a task asks of the scheduler (built from its spec by the control worker). */
export interface PlacementRequest {
  taskId: string;
  owner: string;
  resources: Resources;
  /** The driver the task names; absent: a host's default VM driver. */
  driver?: string;
  /** Constraints from the spec: this host only; hosts whose labels include these. */
  host?: string;
  labels: Record<string, string>;
  /** Higher first; FIFO within a priority. */
  priority: number;
  /** The spec's image ('default', 'base:<name>', an owner path): locality. */
  image: string;
  /** Hosts the task must not go to (they died under it). */
  exclude: string[];
  /** A service task (it has ports): anti-affinity keeps an owner's apart. */
  service?: boolean;
}

/** A task's grant: its resources on a host, and on a second one while it migrates there. */
export interface Reservation {
  taskId: string;
  owner: string;
  host: string;
  resources: Resources;
  /** The driver its VM runs under (a drain migrates VMs; process tasks run to their end). */
  driver?: string;
  since: string;
  /** A migration under way: the target's share is held until the move settles. */
  movingTo?: string;
  /** The spec's constraints, which a rebalancing move keeps to: the host it asked for, labels. */
  pinned?: boolean;
  labels?: Record<string, string>;
  service?: boolean;
  /** Where its disks are when not on `host` (it migrated, memory only): a drain of that host moves them. */
  storageHost?: string;
}

export interface QueueEntry {
  request: PlacementRequest;
  /** Arrival order, for FIFO within a priority. */
  seq: number;
  since: string;
  /** Why it waits: host by host, what is missing (from the last try). */
  why: string;
}

export type HostState = 'ready' | 'draining' | 'drained' | 'down';

export interface DrainOrder {
  since: string;
  /** ISO time after which tasks that could not move are cancelled. */
  deadline?: string;
  maxParallel: number;
}

/** The scheduler workflow's whole state, carried across continue-as-new. */
export interface SchedulerState {
  config: SchedulerConfig;
  views: Record<string, HostView>;
  /** When the views were last refreshed (workflow time, ms). */
  surveyedAtMs: number;
  drains: Record<string, DrainOrder>;
  reservations: Record<string, Reservation>;
  /** Failed drain migrations per task: one that keeps failing stays until the drain's deadline. */
  drainAttempts?: Record<string, number>;
  queue: QueueEntry[];
  seq: number;
  /** Placement decisions made (grants, refusals, queueings), for the bench and operators. */
  decisions: number;
  balance?: BalanceRecord;
}

/** A queued task's place. */
export interface QueuePosition {
  /** 1-based, in queue order. */
  position: number;
  of: number;
  since: string;
  /** Why it waits: what each host is missing, or the tasks ahead of it. */
  why?: string;
}

/** A scheduler that has seen no host and granted nothing yet. */
export function emptySchedulerState(config: SchedulerConfig): SchedulerState {
  return {
    config,
    views: {},
    surveyedAtMs: 0,
    drains: {},
    reservations: {},
    queue: [],
    seq: 0,
    decisions: 0,
  };
}

export type PlaceResult = { host: string } | { queued: QueuePosition } | { refused: string };

/** One host's line in `vsp host list` and the scheduler's state query. */
export interface HostSummary {
  host: string;
  state: HostState;
  reason: string;
  capacity?: Resources;
  allocated: Resources;
  free?: Resources;
  inventory?: HostInventory;
  drain?: DrainOrder;
  tasks: string[];
  /** Tasks running elsewhere whose disks this host's store holds. */
  storedTasks?: string[];
}
