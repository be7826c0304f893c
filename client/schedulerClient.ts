import { setTimeout as sleep } from 'node:timers/promises';
import { WithStartWorkflowOperation, WorkflowNotFoundError, type Client } from '@temporalio/client';
import type { UpdateDefinition } from '@temporalio/common';
import { CONTROL_TASK_QUEUE, SCHEDULER_WORKFLOW_ID } from '../config/names';
import {
  queuePositionQuery,
  refreshUpdate,
  schedulerStateQuery,
  type QueuePosition,
  type SchedulerInput,
  type SchedulerSnapshot,
} from '../workflows/scheduling/definitions';

/** How long an update is sent again while Temporal pushes back. */
const PUSHBACK_RETRY_MS = 120_000;

/** gRPC's RESOURCE_EXHAUSTED and UNAVAILABLE. */
const PUSHBACK_CODES = [8, 14];

function isPushBack(err: unknown): boolean {
  for (let e: unknown = err; e instanceof Error; e = e.cause)
    // The gRPC error itself, or as an update-with-start's operation error (a plain Error with its code).
    if (PUSHBACK_CODES.includes((e as { code?: unknown }).code as number)) return true;
  return false;
}

/**
 * The cluster's scheduler workflow (workflows/scheduler.ts) from outside: its updates, its state. A
 * control worker passes its input (configuration), and the scheduler is started with it if it does not run yet;
 * other callers (the CLI, the repository) address the running one.
 */
export class SchedulerClient {
  constructor(
    readonly temporal: Client,
    private readonly startWith?: SchedulerInput,
  ) {}

  private get handle() {
    return this.temporal.workflow.getHandle(SCHEDULER_WORKFLOW_ID);
  }

  /**
   * Sends an update, again while Temporal pushes back: the server admits 10 updates in flight per
   * workflow (RESOURCE_EXHAUSTED) and aborts admitted ones when the run hands over (UNAVAILABLE).
   */
  async update<Ret, Arg>(def: UpdateDefinition<Ret, [Arg]>, arg: Arg): Promise<Ret> {
    const deadline = Date.now() + PUSHBACK_RETRY_MS;
    for (let delay = 20; ; delay = Math.min(delay * 2, 1000)) {
      try {
        return await this.updateOnce(def, arg);
      } catch (err) {
        if (!isPushBack(err) || Date.now() > deadline) throw err;
        await sleep(delay / 2 + Math.random() * delay);
      }
    }
  }

  private async updateOnce<Ret, Arg>(def: UpdateDefinition<Ret, [Arg]>, arg: Arg): Promise<Ret> {
    const args: [Arg] = [arg];
    if (!this.startWith) return this.handle.executeUpdate(def, { args });
    return this.temporal.workflow.executeUpdateWithStart(def, {
      args,
      startWorkflowOperation: new WithStartWorkflowOperation('Scheduler', {
        workflowId: SCHEDULER_WORKFLOW_ID,
        taskQueue: CONTROL_TASK_QUEUE,
        args: [this.startWith],
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
