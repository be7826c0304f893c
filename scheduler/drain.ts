import type { Reservation, SchedulerState } from './model';

/** A task whose drain migration failed this many times is left for the deadline. */
export const DRAIN_ATTEMPTS = 3;

export interface DrainActions {
  /** VM tasks to live-migrate off their draining host now. */
  migrate: string[];
  /** VM tasks running elsewhere whose disks a draining host holds: their disks move to where they run. */
  localize: string[];
  /** Tasks still on a draining host past its deadline: cancelled. */
  cancel: string[];
}

/** The host whose store holds a task's disks. */
export function storageHostOf(r: Reservation): string {
  return r.storageHost ?? r.host;
}

/**
 * What the drains need now: migrate each VM task off its draining host, and move the disks of each VM
 * task the draining host stores for another host (storage evacuation), at most `maxParallel` at once
 * per host (counting those under way, `moving`: task -> host), each at most DRAIN_ATTEMPTS times; past
 * the deadline, cancel what is still there (process tasks, VMs that could not move).
 */
export function drainActions(
  state: SchedulerState,
  moving: Map<string, string>,
  nowMs: number,
): DrainActions {
  const out: DrainActions = { migrate: [], localize: [], cancel: [] };
  for (const [host, order] of Object.entries(state.drains)) {
    const expired = order.deadline !== undefined && Date.parse(order.deadline) <= nowMs;
    let busy = [...moving.values()].filter((h) => h === host).length;
    for (const r of Object.values(state.reservations)) {
      if (r.host !== host || r.movingTo || moving.has(r.taskId)) continue;
      const vm = r.driver !== undefined && r.driver !== 'process';
      const attempts = state.drainAttempts?.[r.taskId] ?? 0;
      if (vm && attempts < DRAIN_ATTEMPTS && busy < order.maxParallel) {
        out.migrate.push(r.taskId);
        busy++;
      } else if (expired && (!vm || attempts >= DRAIN_ATTEMPTS)) out.cancel.push(r.taskId);
    }
    for (const r of Object.values(state.reservations)) {
      if (storageHostOf(r) !== host || r.host === host || r.movingTo || moving.has(r.taskId)) continue;
      const vm = r.driver !== undefined && r.driver !== 'process';
      if (vm && (state.drainAttempts?.[r.taskId] ?? 0) < DRAIN_ATTEMPTS && busy < order.maxParallel) {
        out.localize.push(r.taskId);
        busy++;
      }
    }
  }
  return out;
}
