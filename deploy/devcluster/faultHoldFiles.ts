import path from 'node:path';

/**
 * The files through which a fault test and the activity holds preloaded into its workers (faultHolds.ts)
 * talk, in the folder named by VSP_FAULT_DIR:
 *
 *   <workflowId>.<activity>.<point>.hold   made by the test: hold that activity at `point`
 *   <workflowId>.<activity>.<point>.held   made by the worker once held: `{pid, attempt}`
 *
 * `before`: the activity has started, its body has not run. `after`: its body has run, its result is not
 * reported yet (a worker killed then leaves the work done and Temporal unaware). Removing the `.hold` file
 * releases it.
 */
export const FAULT_DIR_ENV = 'VSP_FAULT_DIR';
export type HoldPoint = 'before' | 'after';

export function holdFile(dir: string, workflowId: string, activity: string, point: HoldPoint): string {
  return path.join(dir, `${workflowId}.${activity}.${point}.hold`);
}

export function heldFile(dir: string, workflowId: string, activity: string, point: HoldPoint): string {
  return path.join(dir, `${workflowId}.${activity}.${point}.held`);
}
