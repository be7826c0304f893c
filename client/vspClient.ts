import { Client, WorkflowFailedError, WorkflowNotFoundError } from '@temporalio/client';
import { defineSearchAttributeKey, SearchAttributeType } from '@temporalio/common';
import { decodeFromPayloadsAtIndex } from '@temporalio/common/lib/internal-non-workflow';
import { CONTROL_TASK_QUEUE, SEARCH_ATTRIBUTES } from '../config/names';
import { connectClient } from '../config/temporal';
import { placementRequest } from '../scheduler/request';
import { neverFits } from '../scheduler/placement';
import { parseTaskSpec, TaskSpecError, type TaskSpec, type TaskSpecInput } from '../spec/taskSpec';
import { SchedulerClient } from './schedulerClient';
import { visibilityQuery, type TaskListFilter } from './taskFilter';
import { taskInput } from '../spec/taskInput';
import {
  cancelUpdate,
  localizeDisksUpdate,
  migrateUpdate,
  statusQuery,
  type MigrateRequest,
  resizeUpdate,
  type ResizeRequest,
  type TaskResult,
  type TaskStatus,
} from '../workflows/definitions';
import type { SchedulerSnapshot } from '../workflows/scheduling/definitions';

export interface TaskSummary {
  taskId: string;
  /** This run of the task: a task id used again (after the first run ended) names another run. */
  runId: string;
  status: string;
  owner?: string;
  phase?: string;
  host?: string;
  startTime: string;
}

const OWNER_KEY = defineSearchAttributeKey(SEARCH_ATTRIBUTES.owner, SearchAttributeType.KEYWORD);
const TERMINAL = new Set(['completed', 'failed', 'cancelled']);

/** A task's Temporal record as `vsp describe` shows it: search attributes as values, not protobuf maps. */
export interface TaskDescription {
  taskId: string;
  runId: string;
  type: string;
  /** Temporal's execution status: RUNNING, COMPLETED, FAILED, CANCELLED, TERMINATED, TIMED_OUT, ... */
  status: string;
  startTime: string;
  closeTime?: string;
  historyLength: number;
  /** Set at start (VspClient.submit; `temporal workflow start --static-summary`). */
  summary?: string;
  /** The workflow's current details (phase, owner, host, progress, command), as the Temporal UI shows them. */
  details?: string;
  searchAttributes: Record<string, unknown>;
}

/**
 * VSP's client library over Temporal: submit tasks (validated here first), follow them, cancel them.
 * Files go through the repository client (repository/client.ts).
 */
export class VspClient {
  constructor(readonly temporal: Client) {}

  static async connect(): Promise<VspClient> {
    return new VspClient(await connectClient());
  }

  /**
   * Validates the spec (throws TaskSpecError naming the bad fields) and starts its workflow with the
   * task's capability, minted by the repository (or `vsp task grant`) for this task id, owner and results
   * path: nothing starts a task without one.
   */
  async submit(
    input: TaskSpecInput,
    { taskId, capability }: { taskId: string; capability: string },
  ): Promise<{ taskId: string; runId: string }> {
    const spec = parseTaskSpec(input);
    await this.refuseUnschedulable(taskId, spec);
    const handle = await this.temporal.workflow.start('TaskLifecycle', {
      taskQueue: CONTROL_TASK_QUEUE,
      workflowId: taskId,
      // The raw spec: the workflow validates it again, deterministically, and fills the same defaults.
      args: [taskInput(input, capability)],
      staticSummary: `${spec.owner}: ${spec.name ?? spec.command.slice(0, 60)}`,
      // Listed under its owner from the start, before the workflow's first upsert.
      typedSearchAttributes: [{ key: OWNER_KEY, value: spec.owner }],
    });
    return { taskId, runId: handle.firstExecutionRunId };
  }

  /**
   * A task no host of the cluster could run even when empty is refused before it starts, saying what
   * each host is missing (TaskSpecError). A pre-flight only: without a running scheduler, before it has
   * surveyed the hosts, or when it does not answer at once (a burst of submissions), the task starts and
   * its placement decides (the scheduler refuses it there with the same reason).
   */
  private async refuseUnschedulable(taskId: string, spec: TaskSpec): Promise<void> {
    const scheduler = new SchedulerClient(this.temporal);
    const surveyed = (s: SchedulerSnapshot | undefined) =>
      s?.hosts.some((h) => h.inventory) ? s : undefined;
    const state = await scheduler
      .running()
      .then((running) => (running ? scheduler.state() : undefined))
      // Hosts not surveyed yet (a scheduler that has placed nothing): it looks at them first.
      .then(async (s) => (!s || surveyed(s) ? s : scheduler.state({ fresh: true })))
      .then(surveyed)
      .catch(() => undefined);
    if (!state) return;
    const request = placementRequest(taskId, spec, state.config, []);
    const why = neverFits(
      request,
      state.config,
      state.hosts.flatMap((h) => h.inventory ?? []),
    );
    if (why) throw new TaskSpecError([`resources: ${why}`]);
  }

  /**
   * The workflow's status, with the task's live progress: that travels in the heartbeats of the
   * pending `awaitVm` (no history event per change), read here from the workflow's description.
   */
  async status(taskId: string, runId?: string): Promise<TaskStatus> {
    const handle = this.temporal.workflow.getHandle(taskId, runId);
    const [status, description] = await Promise.all([
      handle.query(statusQuery),
      handle.describe().catch(() => undefined),
    ]);
    if (status.phase === 'queued') return { ...status, ...(await this.queuePosition(taskId, status)) };
    const waiting = description?.raw.pendingActivities?.find((a) => a.activityType?.name === 'awaitVm');
    if (!waiting?.heartbeatDetails?.payloads?.length || status.phase !== 'running') return status;
    const beat = await decodeFromPayloadsAtIndex<unknown>(
      this.temporal.options.loadedDataConverter,
      0,
      waiting.heartbeatDetails.payloads,
    ).catch(() => undefined);
    return { ...status, ...progressOf(beat) };
  }

  /** A queued task's place now, from the scheduler (the task's own record is from when it was queued). */
  private async queuePosition(taskId: string, status: TaskStatus): Promise<Pick<TaskStatus, 'queue'>> {
    const now = await new SchedulerClient(this.temporal).position(taskId).catch(() => undefined);
    return now ? { queue: now } : { queue: status.queue };
  }

  /** Calls `onStatus` on every change until the task ends; resolves with its result or throws its failure. */
  async watch(taskId: string, onStatus: (s: TaskStatus) => void, intervalMs = 1000): Promise<TaskResult> {
    const handle = this.temporal.workflow.getHandle(taskId);
    const result = handle.result() as Promise<TaskResult>;
    let done = false;
    void result.finally(() => (done = true)).catch(() => undefined);
    let last = '';
    while (!done) {
      try {
        const s = await this.status(taskId);
        const key = JSON.stringify(s);
        if (key !== last) onStatus(s);
        last = key;
        if (TERMINAL.has(s.phase)) break;
      } catch (err) {
        if (err instanceof WorkflowNotFoundError) throw err;
        // The workflow may be between tasks or its worker restarting: try again.
      }
      await Promise.race([result.catch(() => undefined), new Promise((r) => setTimeout(r, intervalMs))]);
    }
    // Ended between two polls: its last phases and final state are still to be shown.
    const final = await this.status(taskId).catch(() => undefined);
    if (final && JSON.stringify(final) !== last) onStatus(final);
    return result;
  }

  /** The task's Temporal record, decoded; its details from the workflow's metadata query (none without a worker). */
  async describe(taskId: string): Promise<TaskDescription> {
    const handle = this.temporal.workflow.getHandle(taskId);
    const d = await handle.describe();
    const metadata = await handle
      .query<{ currentDetails?: string }>('__temporal_workflow_metadata')
      .catch(() => undefined);
    const value = (v: unknown) => (v instanceof Date ? v.toISOString() : v);
    return {
      taskId,
      runId: d.runId,
      type: d.type,
      status: d.status.name,
      startTime: d.startTime.toISOString(),
      closeTime: d.closeTime?.toISOString(),
      historyLength: d.historyLength,
      summary: await d.staticSummary().catch(() => undefined),
      details: metadata?.currentDetails || undefined,
      searchAttributes: Object.fromEntries(
        d.typedSearchAttributes
          .getAll()
          .map((p) => [p.key.name, Array.isArray(p.value) ? p.value.map(value) : value(p.value)]),
      ),
    };
  }

  async result(taskId: string, runId?: string): Promise<TaskResult> {
    return (await this.temporal.workflow.getHandle(taskId, runId).result()) as TaskResult;
  }

  /** Cancels a running task; its VM is stopped, its logs kept in the repository. */
  async cancel(taskId: string, reason?: string): Promise<TaskStatus> {
    return this.temporal.workflow.getHandle(taskId).executeUpdate(cancelUpdate, { args: [{ reason }] });
  }

  /**
   * Live-migrates a running task's VM (to `host`, or where placement chooses); its disks stay where they
   * are. Resolves when the VM runs on the target; a failure leaves it running where it was.
   */
  async migrate(taskId: string, request: MigrateRequest = {}): Promise<TaskStatus> {
    return this.temporal.workflow.getHandle(taskId).executeUpdate(migrateUpdate, { args: [request] });
  }

  /** Changes a running task's CPU share on its host; resolves once it is in force. */
  async resize(taskId: string, request: ResizeRequest): Promise<TaskStatus> {
    return this.temporal.workflow.getHandle(taskId).executeUpdate(resizeUpdate, { args: [request] });
  }

  /**
   * Moves a running task's disks to the host where its VM runs, while it runs (storage evacuation);
   * resolves once the new storage host is recorded. A failure leaves the disks where they were.
   */
  async localizeDisks(taskId: string): Promise<TaskStatus> {
    return this.temporal.workflow.getHandle(taskId).executeUpdate(localizeDisksUpdate, { args: [] });
  }

  /** Tasks that pass the filter (every owner's unless `owner` is given), newest first. */
  async list(opts: TaskListFilter & { owner?: string } = {}): Promise<TaskSummary[]> {
    const out: TaskSummary[] = [];
    for await (const wf of this.temporal.workflow.list({ query: visibilityQuery(opts) })) {
      const sa = wf.typedSearchAttributes;
      const get = (name: string) => {
        const pair = sa.getAll().find((p) => p.key.name === name);
        return pair ? String(pair.value) : undefined;
      };
      out.push({
        taskId: wf.workflowId,
        runId: wf.runId,
        status: wf.status.name,
        owner: get(SEARCH_ATTRIBUTES.owner),
        phase: get(SEARCH_ATTRIBUTES.phase),
        host: get(SEARCH_ATTRIBUTES.host),
        startTime: wf.startTime.toISOString(),
      });
      if (out.length >= (opts.limit ?? 100)) break;
    }
    return out;
  }
}

type LiveProgress = Pick<TaskStatus, 'progress' | 'progressMessage' | 'behindDeadline'>;

/**
 * The progress in an awaitVm heartbeat (`{progress, message, phase, behindDeadline}`); whatever else it
 * holds is ignored.
 */
function progressOf(beat: unknown): LiveProgress {
  if (typeof beat !== 'object' || beat === null) return {};
  const { progress, message, behindDeadline } = beat as Record<string, unknown>;
  const out: LiveProgress = {};
  if (typeof progress === 'number' && progress >= 0 && progress <= 100) out.progress = progress;
  if (typeof message === 'string') out.progressMessage = message;
  if (behindDeadline === true) out.behindDeadline = true;
  return out;
}

/** The message a failed task's workflow ended with, cause included. */
export function taskFailureMessage(err: unknown): string {
  if (err instanceof WorkflowFailedError) {
    const parts: string[] = [];
    let e: unknown = err.cause;
    while (e instanceof Error && parts.length < 4) {
      parts.push(e.message);
      e = e.cause;
    }
    return parts.join(': ') || err.message;
  }
  return err instanceof Error ? err.message : String(err);
}
