import { WorkflowNotFoundError } from '@temporalio/client';
import { defineSearchAttributeKey, SearchAttributeType } from '@temporalio/common';
import { SEARCH_ATTRIBUTES } from '../config/names';
import { taskFailureMessage, type TaskSummary, type VspClient } from '../client/vspClient';
import { describeError, type Logger } from '../logging/logger';
import { TaskSpecError, type TaskSpecInput } from '../spec/taskSpec';
import type { TaskPhase, TaskResult } from '../workflows/definitions';

/**
 * The repository's task endpoints (`/v1/owners/<owner>/tasks[/<id>]`), for the web page: list an owner's
 * tasks from Temporal's visibility (by VspOwner), submit one, and show one with its outputs. Routing and
 * authentication stay in httpApi.ts, shared with the file API; this module answers for an owner already
 * authorised there, and never shows a task whose VspOwner is another owner's.
 */

/** A refusal with its HTTP status, mapped by httpApi.ts. */
export class TaskApiError extends Error {
  constructor(
    readonly status: number,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
    this.name = 'TaskApiError';
  }
}

type FileRef = TaskResult['outputs'][number];

/** One task as the page shows it: where it is in its life, and what it left in the repository. */
export interface TaskView {
  taskId: string;
  /** Temporal's execution status: RUNNING, COMPLETED, FAILED, CANCELED, TERMINATED, TIMED_OUT. */
  status: string;
  phase?: TaskPhase;
  host?: string;
  startTime: string;
  closeTime?: string;
  exitCode?: number;
  error?: string;
  resultsPath?: string;
  outputs?: FileRef[];
  logs?: FileRef[];
}

export interface TaskRequest {
  method: string;
  owner: string;
  /** The task id (percent-decoded), for a request on one task. */
  taskId?: string;
  /** Reads the request's JSON body (POST only). */
  body(): Promise<unknown>;
}

const OWNER_KEY = defineSearchAttributeKey(SEARCH_ATTRIBUTES.owner, SearchAttributeType.KEYWORD);
const PHASE_KEY = defineSearchAttributeKey(SEARCH_ATTRIBUTES.phase, SearchAttributeType.KEYWORD);
const HOST_KEY = defineSearchAttributeKey(SEARCH_ATTRIBUTES.host, SearchAttributeType.KEYWORD);

/** How many of an owner's tasks a listing returns, newest first. */
export const TASK_LIST_LIMIT = 200;
const MAX_TASK_ID_LENGTH = 1000;

export const TEMPORAL_NOT_CONFIGURED =
  'tasks are not available: this repository has no Temporal connection (start it with VSP_REPO_TEMPORAL=1)';

/** What an audit record calls a task request. */
export function taskAction(method: string, taskId: string | undefined): string {
  if (taskId !== undefined) return method === 'GET' ? 'task-status' : method;
  return method === 'POST' ? 'task-submit' : method === 'GET' ? 'task-list' : method;
}

/** Answers one task request with its status and JSON body; throws TaskApiError. */
export async function taskRequest(
  api: TaskApi | undefined,
  req: TaskRequest,
): Promise<{ status: number; body: unknown }> {
  if (!api) throw new TaskApiError(503, TEMPORAL_NOT_CONFIGURED);
  if (req.taskId === undefined) {
    if (req.method === 'GET') return { status: 200, body: { tasks: await api.list(req.owner) } };
    if (req.method === 'POST') return { status: 201, body: await api.submit(req.owner, await req.body()) };
    throw new TaskApiError(405, `${req.method} is not allowed on a task list (use GET or POST)`);
  }
  if (req.method !== 'GET') throw new TaskApiError(405, `${req.method} is not allowed on a task (use GET)`);
  return { status: 200, body: await api.get(req.owner, checkTaskId(req.taskId)) };
}

function checkTaskId(taskId: string): string {
  // eslint-disable-next-line no-control-regex
  if (taskId === '' || taskId.length > MAX_TASK_ID_LENGTH || /[\x00-\x1f\x7f]/.test(taskId))
    throw new TaskApiError(
      400,
      `task id must be 1-${MAX_TASK_ID_LENGTH} characters without control characters`,
    );
  return taskId;
}

export class TaskApi {
  constructor(
    private readonly vsp: VspClient,
    private readonly log: Logger,
  ) {}

  async list(owner: string): Promise<TaskSummary[]> {
    return this.temporal('list tasks', () => this.vsp.list({ owner, limit: TASK_LIST_LIMIT }));
  }

  /** Starts a task for `owner`: the spec's owner is the signed-in owner, whether given or not. */
  async submit(owner: string, spec: unknown): Promise<{ taskId: string; runId: string }> {
    if (typeof spec !== 'object' || spec === null || Array.isArray(spec))
      throw new TaskApiError(400, 'the task spec must be a JSON object');
    const given = (spec as { owner?: unknown }).owner;
    if (given !== undefined && given !== owner)
      throw new TaskApiError(403, `spec.owner ${JSON.stringify(given)} is not the signed-in owner ${owner}`);
    try {
      // The rest of the spec is VspClient's to check (TaskSpecError names every bad field).
      const started = await this.vsp.submit({ ...spec, owner } as TaskSpecInput);
      this.log.info({ owner, taskId: started.taskId }, 'task submitted from the web API');
      return started;
    } catch (err) {
      if (err instanceof TaskSpecError) throw new TaskApiError(400, err.message);
      throw this.unavailable('submit the task', err);
    }
  }

  /** The task, if it is `owner`'s (404 otherwise, as for a task that does not exist). */
  async get(owner: string, taskId: string): Promise<TaskView> {
    const handle = this.vsp.temporal.workflow.getHandle(taskId);
    const notFound = new TaskApiError(404, `no such task: ${taskId}`);
    const desc = await handle.describe().catch((err: unknown) => {
      throw err instanceof WorkflowNotFoundError ? notFound : this.unavailable('describe the task', err);
    });
    // Until the workflow has validated the spec its owner is unknown: shown to nobody yet.
    if (desc.type !== 'TaskLifecycle' || desc.typedSearchAttributes.get(OWNER_KEY) !== owner) throw notFound;
    const view: TaskView = {
      taskId,
      status: desc.status.name,
      phase: desc.typedSearchAttributes.get(PHASE_KEY) as TaskPhase | undefined,
      host: desc.typedSearchAttributes.get(HOST_KEY) || undefined,
      startTime: desc.startTime.toISOString(),
      closeTime: desc.closeTime?.toISOString(),
    };
    // The status query is richer than visibility (error, exit code, results path), but a closed task's
    // query needs a worker to replay it: without one, visibility is what there is.
    try {
      const s = await this.vsp.status(taskId);
      Object.assign(view, {
        phase: s.phase,
        host: s.host ?? view.host,
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
      const result = await this.temporal('read the task result', () => this.vsp.result(taskId));
      Object.assign(view, {
        exitCode: result.exitCode,
        host: result.host,
        resultsPath: result.resultsPath,
        outputs: result.outputs,
        logs: result.logs,
      });
    } else if (desc.status.name !== 'RUNNING' && view.error === undefined) {
      view.error = await this.vsp.result(taskId).then(
        () => undefined,
        (err: unknown) => taskFailureMessage(err),
      );
    }
    return view;
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
