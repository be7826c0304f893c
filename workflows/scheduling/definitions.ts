import { defineQuery, defineSignal, defineUpdate } from '@temporalio/workflow';
import type {
  BalanceRecord,
  DrainOrder,
  HostSummary,
  PlacementRequest,
  PlaceResult,
  QueueEntry,
  QueuePosition,
  Reservation,
  Resources,
  SchedulerConfig,
  SchedulerState,
} from '../../scheduler/model';

export type { QueuePosition };

/** The scheduler workflow's interface (workflows/scheduler.ts), shared by it, the control worker and clients. */

export interface SchedulerInput {
  config: SchedulerConfig;
  /** The previous run's state (continue-as-new). */
  state?: SchedulerState;
  /** Continue as new past this many history events (default 10 000, or Temporal's suggestion). */
  historyEventLimit?: number;
  /** Reservations of tasks whose workflow is gone are looked for this often (default 600 s). */
  sweepEverySec?: number;
}

export interface MoveRequest {
  taskId: string;
  owner: string;
  /** Where the task's VM runs now, and what it holds there (adopted if the scheduler had no record). */
  current: string;
  resources: Resources;
  /** The driver its VM runs under: the target must offer it. */
  driver: string;
  /** The target asked for; the scheduler chooses when absent. */
  requested?: string;
}

export interface SettleMoveRequest {
  taskId: string;
  /** The host the VM runs on after the attempt. */
  host: string;
}

export interface SettleStorageRequest {
  taskId: string;
  /** The host whose store holds the task's disks now. */
  storageHost: string;
}

export interface DrainRequest {
  host: string;
  /** Seconds from now after which process tasks still there are cancelled (default: none). */
  deadlineSec?: number;
  /** Migrations under way at once (default 2). */
  maxParallel?: number;
}

export interface SchedulerSnapshot {
  config: SchedulerConfig;
  hosts: HostSummary[];
  /** Every task's grant (its host, resources, driver). */
  reservations: Reservation[];
  queue: QueueEntry[];
  surveyedAt?: string;
  decisions: number;
  /** Rebalancing's rounds and moves (absent before its first round). */
  balance?: BalanceRecord;
}

export const placeUpdate = defineUpdate<PlaceResult, [PlacementRequest]>('place');
export const releaseUpdate = defineUpdate<void, [{ taskId: string }]>('release');
export const reserveMoveUpdate = defineUpdate<{ host: string } | { refused: string }, [MoveRequest]>(
  'reserveMove',
);
export const settleMoveUpdate = defineUpdate<void, [SettleMoveRequest]>('settleMove');
export const settleStorageUpdate = defineUpdate<void, [SettleStorageRequest]>('settleStorage');
export const drainUpdate = defineUpdate<DrainOrder, [DrainRequest]>('drain');
export const undrainUpdate = defineUpdate<void, [{ host: string }]>('undrain');
export const configureUpdate = defineUpdate<SchedulerConfig, [SchedulerConfig]>('configure');
export const schedulerStateQuery = defineQuery<SchedulerSnapshot>('state');
/** The state after a fresh look at every host (liveness, inventory): what `vsp host list` shows. */
export const refreshUpdate = defineUpdate<SchedulerSnapshot, []>('refresh');
export const queuePositionQuery = defineQuery<QueuePosition | undefined, [string]>('position');

/** A rebalancing round (the Temporal Schedule's tick, workflows/scheduler.ts RebalanceTick). */
export const rebalanceSignal = defineSignal('rebalance');

/** The scheduler to a queued task: capacity is granted on `host`. */
export const placementGrantedSignal = defineSignal<[{ host: string }]>('placementGranted');
