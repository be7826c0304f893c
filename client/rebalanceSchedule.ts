import {
  ScheduleAlreadyRunning,
  ScheduleNotFoundError,
  ScheduleOverlapPolicy,
  type Client,
} from '@temporalio/client';
import { CONTROL_TASK_QUEUE } from '../config/names';
import type { RebalanceConfig } from '../scheduler/model';

/** The Temporal Schedule whose ticks start rebalancing rounds (workflows/scheduler.ts RebalanceTick). */
export const REBALANCE_SCHEDULE_ID = 'vsp-rebalance';

/**
 * Makes the rebalancing Schedule match the configuration: created or its period updated when
 * rebalancing is on, deleted when it is off. A tick while the last still runs is skipped.
 */
export async function syncRebalanceSchedule(client: Client, cfg: RebalanceConfig | undefined): Promise<void> {
  const handle = client.schedule.getHandle(REBALANCE_SCHEDULE_ID);
  if (!cfg || cfg.everySec <= 0) {
    await handle.delete().catch((err: unknown) => {
      if (!(err instanceof ScheduleNotFoundError)) throw err;
    });
    return;
  }
  const options = {
    spec: { intervals: [{ every: `${cfg.everySec}s` }] },
    action: {
      type: 'startWorkflow' as const,
      workflowType: 'RebalanceTick',
      taskQueue: CONTROL_TASK_QUEUE,
      args: [],
      workflowRunTimeout: '1m',
    },
    policies: { overlap: ScheduleOverlapPolicy.SKIP },
  };
  try {
    await handle.update((prev) => ({
      ...prev,
      spec: options.spec,
      policies: { ...prev.policies, ...options.policies },
    }));
  } catch (err) {
    if (!(err instanceof ScheduleNotFoundError)) throw err;
    // Another control worker starting at the same moment may have made it first: that one serves.
    await client.schedule.create({ scheduleId: REBALANCE_SCHEDULE_ID, ...options }).catch((e: unknown) => {
      if (!(e instanceof ScheduleAlreadyRunning)) throw e;
    });
  }
}
