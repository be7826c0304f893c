import type { SchedulerState } from './model';

/** A task whose drain migration failed this many times is left for the deadline. */
export const DRAIN_ATTEMPTS = 3;

export interface DrainActions {
  /** VM tasks to live-migrate off their draining host now. */
  migrate: string[];
  /** Tasks still on a draining host past its deadline: cancelled. */
  cancel: string[];
}

/**
 * What the drains need now: migrate each VM task off its draining host, at most `maxParallel` at
 * once per host (counting those under way, `moving`: task -> host), each at most DRAIN_ATTEMPTS times;
 * past the deadline, cancel what is still there (process tasks, VMs that could not move).
 */
export function drainActions(
  state: SchedulerState,
  moving: Map<string, string>,
  nowMs: number,
): DrainActions {
  const out: DrainActions = { migrate: [], cancel: [] };
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
  }
  return out;
}
