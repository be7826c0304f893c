import { WithStartWorkflowOperation, WorkflowNotFoundError, type Client } from '@temporalio/client';
import type { UpdateDefinition } from '@temporalio/common';
import { CONTROL_TASK_QUEUE, SCHEDULER_WORKFLOW_ID } from '../config/names';
import type { SchedulerConfig } from '../scheduler/model';
import {
  queuePositionQuery,
  refreshUpdate,
  schedulerStateQuery,
  type QueuePosition,
  type SchedulerInput,
  type SchedulerSnapshot,
} from '../workflows/scheduling/definitions';

/**
 * The cluster's scheduler workflow (workflows/scheduler.ts) from outside: its updates, its state. A
 * control worker passes its configuration, and the scheduler is started with it if it does not run yet;
 * other callers (the CLI, the repository) address the running one.
 */
export class SchedulerClient {
  constructor(
    readonly temporal: Client,
    private readonly startWith?: SchedulerConfig,
  ) {}

  private get handle() {
    return this.temporal.workflow.getHandle(SCHEDULER_WORKFLOW_ID);
  }

  async update<Ret, Arg>(def: UpdateDefinition<Ret, [Arg]>, arg: Arg): Promise<Ret> {
    const args: [Arg] = [arg];
    if (!this.startWith) return this.handle.executeUpdate(def, { args });
    const input: SchedulerInput = { config: this.startWith };
    return this.temporal.workflow.executeUpdateWithStart(def, {
      args,
      startWorkflowOperation: new WithStartWorkflowOperation('Scheduler', {
        workflowId: SCHEDULER_WORKFLOW_ID,
        taskQueue: CONTROL_TASK_QUEUE,
        args: [input],
        workflowIdConflictPolicy: 'USE_EXISTING',
        staticSummary: 'the cluster scheduler: capacity, placements, queue',
      }),
    });
  }

  /** Whether the cluster's scheduler runs (a closed one, e.g. terminated, answers queries only with a worker). */
  async running(): Promise<boolean> {
    const d = await this.handle.describe().catch((err: unknown) => {
      if (err instanceof WorkflowNotFoundError) return undefined;
      throw err;
    });
    return d?.status.name === 'RUNNING';
  }

  /** The scheduler's state as it is, or (`fresh`) after it looked at every host again. */
  state(opts: { fresh?: boolean } = {}): Promise<SchedulerSnapshot> {
    return opts.fresh ? this.handle.executeUpdate(refreshUpdate) : this.handle.query(schedulerStateQuery);
  }

  position(taskId: string): Promise<QueuePosition | undefined> {
    return this.handle.query(queuePositionQuery, taskId);
  }
}
