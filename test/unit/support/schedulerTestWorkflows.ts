import { condition, setHandler } from '@temporalio/workflow';
import { placementGrantedSignal } from '../../../workflows/scheduling/definitions';

export { RebalanceTick, Scheduler } from '../../../workflows/scheduler';

/** Stands for a queued task in the scheduler's tests: ends with the host the scheduler granted. */
export async function GrantReceiver(): Promise<string> {
  let host: string | undefined;
  setHandler(placementGrantedSignal, (g) => void (host ??= g.host));
  await condition(() => host !== undefined);
  return host as string;
}
