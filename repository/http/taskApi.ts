import {
  WorkflowExecutionAlreadyStartedError,
  WorkflowNotFoundError,
  WorkflowUpdateFailedError,
  type WorkflowExecutionDescription,
} from '@temporalio/client';
import { defineSearchAttributeKey, SearchAttributeType } from '@temporalio/common';
import { SEARCH_ATTRIBUTES } from '../../config/names';
import type { TaskListFilter } from '../../client/taskFilter';
import { taskFailureMessage, type TaskSummary, type VspClient } from '../../client/vspClient';
import { describeError, type Logger } from '../../logging/logger';
import { TaskSpecError } from '../../spec/taskSpec';
import {
  type MigrationRecord,
  type ResizeRequest,
  type TaskPhase,
  type TaskResult,
  type TaskStatus,
} from '../../workflows/definitions';
import type { CapabilityKeys } from '../accounts/capabilities';
import type { MetadataStore } from '../store/metadataStore';
import { admitTask, submissionOf, TaskApiError } from '../tasks/taskAdmission';

/**
 * The owners' task API (`/v1/owners/<owner>/tasks[/<id>[/cancel|migrate|resize|result]]`): the one front door
 * through which owners submit, list, follow, cancel and migrate their tasks (the web page, `vsp`).
 * Routing and authentication stay in httpApi.ts, shared with the file API; this module answers for an
 * owner already authorised there. Submission admits the task first (taskAdmission.ts: owner fixed,
 * pre-flight, capability minted) and only then starts its workflow; a task whose VspOwner is another
 * owner's is answered as one that does not exist (404), and the refusal audited as denied.
 */

/**
 * The repository's task endpoints (`/v1/owners/<owner>/tasks[/<id>]`), for the web page: list an owner's
 * tasks from Temporal's visibility (by VspOwner), submit one, and show one with its outputs. Routing and
 * authentication stay in httpApi.ts, shared with the file API; this module answers for an owner already
 * authorised there, and never shows a task whose VspOwner is another owner's.
 */

type FileRef = TaskResult['outputs'][number];

/** One task as the page shows it: where it is in its life, and what it left in the repository. */
export interface TaskView {
  taskId: string;
  /** The run shown: a task id used again names a new run, and each run is shown as itself. */
  runId: string;
  /** Temporal's execution status: RUNNING, COMPLETED, FAILED, CANCELED, TERMINATED, TIMED_OUT. */
  status: string;
  phase?: TaskPhase;
  /** While queued: its place in the scheduler's queue. */
  queue?: TaskStatus['queue'];
  progress?: number;
  progressMessage?: string;
  /** ISO time each phase began (the page shows how long each took). */
  timestamps?: TaskStatus['timestamps'];
  host?: string;
  storageHost?: string;
  address?: string;
  migrations?: MigrationRecord[];
  startTime: string;
  closeTime?: string;
  exitCode?: number;
  error?: string;
  resultsPath?: string;
  outputs?: FileRef[];
  logs?: FileRef[];
}

/** Where a task's log is: its latest run's capability (none for a task started without one). */
export interface LogSource {
  capabilityId?: string;
  resultsPath?: string;
  running: boolean;
}

/** The admission's needs: the metadata DB (pre-flight, capability records) and the signing key. */
export interface TaskAdmissionDeps {
  db: MetadataStore;
  keys: CapabilityKeys;
}

const OWNER_KEY = defineSearchAttributeKey(SEARCH_ATTRIBUTES.owner, SearchAttributeType.KEYWORD);
const PHASE_KEY = defineSearchAttributeKey(SEARCH_ATTRIBUTES.phase, SearchAttributeType.KEYWORD);
const HOST_KEY = defineSearchAttributeKey(SEARCH_ATTRIBUTES.host, SearchAttributeType.KEYWORD);

/** How the repository server makes its TaskApi over `vsp`, given the admission's needs it owns. */
export function taskApiOver(vsp: VspClient): (log: Logger, admission: TaskAdmissionDeps) => TaskApi {
  return (log, admission) => new TaskApi(vsp, log, admission);
}

export class TaskApi {
  constructor(
    private readonly vsp: VspClient,
    private readonly log: Logger,
    private readonly admission: TaskAdmissionDeps,
  ) {}

  async list(owner: string, filter: TaskListFilter): Promise<TaskSummary[]> {
    return this.temporal('list tasks', () => this.vsp.list({ ...filter, owner }));
  }

  /**
   * Starts a task for `owner` (the authenticated owner; a spec naming another is refused): admitted
   * first (pre-flight, capability), so nothing starts unless every check passed.
   */
  async submit(
    owner: string,
    body: unknown,
  ): Promise<{ taskId: string; runId: string; resultsPath: string }> {
    const { spec, taskId } = submissionOf(body);
    const task = await admitTask(this.admission, { owner, spec, taskId, mintedBy: `owner:${owner}` });
    try {
      const started = await this.vsp.submit(task.input, {
        taskId: task.taskId,
        capability: task.capability,
      });
      this.log.info({ owner, taskId: task.taskId, capabilityId: task.claims.id }, 'task submitted');
      return { ...started, resultsPath: task.claims.results };
    } catch (err) {
      // Never started: its capability must not outlive the refusal.
      await this.admission.db.revokeCapability(task.claims.id);
      if (err instanceof TaskSpecError) throw new TaskApiError(400, err.message, { cause: err });
      if (err instanceof WorkflowExecutionAlreadyStartedError)
        throw new TaskApiError(409, `taskId: a task ${task.taskId} is already running`, { cause: err });
      throw this.unavailable('submit the task', err);
    }
  }

  /**
   * The task's description, if it is `owner`'s. Another owner's task is answered as one that does not
   * exist (its existence is not theirs to learn), but audited as denied.
   */
  private async owned(owner: string, taskId: string, runId?: string): Promise<WorkflowExecutionDescription> {
    const handle = this.vsp.temporal.workflow.getHandle(taskId, runId);
    const notFound = `no such task: ${taskId}`;
    const desc = await handle.describe().catch((err: unknown) => {
      throw err instanceof WorkflowNotFoundError
        ? new TaskApiError(404, notFound)
        : this.unavailable('describe the task', err);
    });
    // VspOwner is set when the workflow starts (VspClient.submit) from the admitted owner.
    if (desc.type !== 'TaskLifecycle') throw new TaskApiError(404, notFound);
    if (desc.typedSearchAttributes.get(OWNER_KEY) !== owner)
      throw new TaskApiError(404, notFound, { denied: true });
    return desc;
  }

  /**
   * The task, if it is `owner`'s (404 otherwise, as for a task that does not exist): the run `runId`, or
   * the latest.
   */
  async get(owner: string, taskId: string, runId?: string): Promise<TaskView> {
    const desc = await this.owned(owner, taskId, runId);
    const view: TaskView = {
      taskId,
      runId: desc.runId,
      status: desc.status.name,
      phase: desc.typedSearchAttributes.get(PHASE_KEY) as TaskPhase | undefined,
      host: desc.typedSearchAttributes.get(HOST_KEY) || undefined,
      startTime: desc.startTime.toISOString(),
      closeTime: desc.closeTime?.toISOString(),
    };
    // The status query is richer than visibility (error, exit code, results path), but a closed task's
    // query needs a worker to replay it: without one, visibility is what there is.
    try {
      const s = await this.vsp.status(taskId, desc.runId);
      Object.assign(view, {
        phase: s.phase,
        queue: s.queue,
        progress: s.progress,
        progressMessage: s.progressMessage,
        timestamps: s.timestamps,
        host: s.host ?? view.host,
        storageHost: s.storageHost,
        address: s.address,
        migrations: s.migrations,
        exitCode: s.exitCode,
        error: s.error,
        resultsPath: s.resultsPath,
      });
    } catch (err) {
      this.log.debug(
        { taskId, err: describeError(err) },
        'task status query failed; showing visibility only',
      );
    }
    if (desc.status.name === 'COMPLETED') {
      const result = await this.temporal('read the task result', () => this.vsp.result(taskId, desc.runId));
      Object.assign(view, {
        exitCode: result.exitCode,
        host: result.host,
        resultsPath: result.resultsPath,
        outputs: result.outputs,
        logs: result.logs,
      });
    } else if (desc.status.name !== 'RUNNING' && view.error === undefined) {
      view.error = await this.vsp.result(taskId, desc.runId).then(
        () => undefined,
        (err: unknown) => taskFailureMessage(err),
      );
    }
    return view;
  }

  /** Cancels the owner's running task (409 once it has ended). */
  async cancel(owner: string, taskId: string, reason: string | undefined): Promise<TaskStatus> {
    await this.running(owner, taskId);
    return this.update('cancel', 409, () => this.vsp.cancel(taskId, reason));
  }

  /** Live-migrates the owner's running task; 422 with the cause when it could not move. */
  async migrate(
    owner: string,
    taskId: string,
    request: { host?: string; maxBandwidthMiBps?: number },
  ): Promise<TaskStatus> {
    await this.running(owner, taskId);
    return this.update('migrate', 422, () => this.vsp.migrate(taskId, request));
  }

  /** Changes the CPU share of the owner's running task; 422 with the cause when it could not. */
  async resize(owner: string, taskId: string, request: ResizeRequest): Promise<TaskStatus> {
    await this.running(owner, taskId);
    return this.update('resize', 422, () => this.vsp.resize(taskId, request));
  }

  /** The result of the owner's task: 409 while it runs, 422 with the failure when it did not complete. */
  async result(owner: string, taskId: string): Promise<TaskResult> {
    const desc = await this.owned(owner, taskId);
    if (desc.status.name === 'RUNNING') {
      const phase = await this.vsp.status(taskId).then(
        (s) => s.phase,
        () => desc.typedSearchAttributes.get(PHASE_KEY) ?? 'running',
      );
      throw new TaskApiError(409, `still ${phase}`);
    }
    try {
      return await this.vsp.result(taskId);
    } catch (err) {
      if (desc.status.name === 'COMPLETED') throw this.unavailable('read the task result', err);
      throw new TaskApiError(422, taskFailureMessage(err), { cause: err });
    }
  }

  /**
   * Where the owner's task keeps its live log (its latest run's capability, see liveLogs.ts) and
   * whether that run is still going; 404 as for the other routes when it is not the owner's.
   */
  async logSource(owner: string, taskId: string): Promise<LogSource> {
    const desc = await this.owned(owner, taskId);
    const cap = await this.admission.db.latestCapability(owner, taskId);
    return {
      capabilityId: cap?.id,
      resultsPath: cap?.results,
      running: desc.status.name === 'RUNNING',
    };
  }

  private async running(owner: string, taskId: string): Promise<void> {
    const desc = await this.owned(owner, taskId);
    if (desc.status.name !== 'RUNNING')
      throw new TaskApiError(409, `task ${taskId} has already ended (${desc.status.name})`);
  }

  /** An update on the task; its refusal or failure reaches the client with `status` and its cause. */
  private async update<T>(what: string, status: number, fn: () => Promise<T>): Promise<T> {
    try {
      return await fn();
    } catch (err) {
      if (err instanceof WorkflowUpdateFailedError || err instanceof WorkflowNotFoundError)
        throw new TaskApiError(
          status,
          `${what} refused: ${err.cause ? describeError(err.cause) : err.message}`,
          { cause: err },
        );
      throw this.unavailable(what, err);
    }
  }

  private async temporal<T>(what: string, fn: () => Promise<T>): Promise<T> {
    try {
      return await fn();
    } catch (err) {
      throw this.unavailable(what, err);
    }
  }

  /** Temporal failed us: the client hears that, the log hears why. */
  private unavailable(what: string, err: unknown): TaskApiError {
    this.log.error({ err: describeError(err) }, `could not ${what} through Temporal`);
    return new TaskApiError(502, `could not ${what}: Temporal did not answer (try again)`, { cause: err });
  }
}
