import { z } from 'zod';
import { filterFromQuery, type TaskListFilter } from '../../client/taskFilter';
import { ResizeRequestSchema } from '../../workflows/definitions';
import type { TaskApi } from '../http/taskApi';
import { checkTaskId, TaskApiError } from './taskAdmission';

/**
 * The task endpoints' requests, parsed and dispatched to a TaskApi: what httpApi.ts needs at all times.
 * Kept apart from taskApi.ts, whose Temporal client (~50 MiB resident) is loaded only when the repository
 * is started with a Temporal connection.
 */

/** What can be done to one task besides reading it. */
export type TaskAction = 'cancel' | 'migrate' | 'resize' | 'result';

export interface TaskRequest {
  method: string;
  owner: string;
  /** The task id (percent-decoded), for a request on one task. */
  taskId?: string;
  action?: TaskAction;
  query: URLSearchParams;
  /** Reads the request's JSON body (undefined when there is none). */
  body(): Promise<unknown>;
}

/** How many of an owner's tasks a listing returns, newest first. */
export const TASK_LIST_LIMIT = 200;

export const TEMPORAL_NOT_CONFIGURED =
  'tasks are not available: this repository has no Temporal connection (start it with VSP_REPO_TEMPORAL=1)';

/** What an audit record calls a task request. */
export function taskAction(method: string, taskId: string | undefined, action?: TaskAction): string {
  if (action !== undefined) return `task-${action}`;
  if (taskId !== undefined) return method === 'GET' ? 'task-status' : method;
  return method === 'POST' ? 'task-submit' : method === 'GET' ? 'task-list' : method;
}

const CancelRequest = z.object({ reason: z.string().max(1000).optional() }).strict();
const MigrateRequestSchema = z
  .object({
    host: z
      .string()
      .regex(/^[a-z0-9][a-z0-9-]{0,62}$/)
      .optional(),
    maxBandwidthMiBps: z.number().positive().max(1_000_000).optional(),
  })
  .strict();

function parseBody<T>(schema: z.ZodType<T>, body: unknown, what: string): T {
  const r = schema.safeParse(body ?? {});
  if (r.success) return r.data;
  throw new TaskApiError(
    400,
    `${what}: ${r.error.issues.map((i) => `${i.path.join('.') || 'body'}: ${i.message}`).join('; ')}`,
  );
}

function listLimit(query: URLSearchParams): number {
  const raw = query.get('limit');
  if (raw === null) return TASK_LIST_LIMIT;
  const n = Number(raw);
  if (!/^\d{1,4}$/.test(raw) || n < 1 || n > TASK_LIST_LIMIT)
    throw new TaskApiError(400, `limit must be a whole number from 1 to ${TASK_LIST_LIMIT}`);
  return n;
}

/** A listing's filter and limit from its query (`running=1`, `phase`, `host`, `since`, `limit`). */
function listFilter(query: URLSearchParams): TaskListFilter {
  try {
    return { ...filterFromQuery(query), limit: listLimit(query) };
  } catch (err) {
    if (err instanceof TaskApiError) throw err;
    throw new TaskApiError(400, (err as Error).message, { cause: err });
  }
}

/** `?runId=`: one run of a task whose id was used again (a UUID, as Temporal makes them). */
function runIdOf(query: URLSearchParams): string | undefined {
  const runId = query.get('runId');
  if (runId === null) return undefined;
  if (!/^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i.test(runId))
    throw new TaskApiError(400, 'runId must be a run id as the task list gives it (a UUID)');
  return runId;
}

/** Answers one task request with its status and JSON body; throws TaskApiError. */
export async function taskRequest(
  api: TaskApi | undefined,
  req: TaskRequest,
): Promise<{ status: number; body: unknown }> {
  if (!api) throw new TaskApiError(503, TEMPORAL_NOT_CONFIGURED);
  const { method, owner } = req;
  const only = (allowed: string) => {
    if (method !== allowed) throw new TaskApiError(405, `${method} is not allowed here (use ${allowed})`);
  };
  if (req.taskId === undefined) {
    if (method === 'GET')
      return { status: 200, body: { tasks: await api.list(owner, listFilter(req.query)) } };
    if (method === 'POST') return { status: 201, body: await api.submit(owner, await req.body()) };
    throw new TaskApiError(405, `${method} is not allowed on a task list (use GET or POST)`);
  }
  const taskId = checkTaskId(req.taskId);
  switch (req.action) {
    case undefined:
      only('GET');
      return { status: 200, body: await api.get(owner, taskId, runIdOf(req.query)) };
    case 'cancel': {
      only('POST');
      const { reason } = parseBody(CancelRequest, await req.body(), 'cancel request');
      return { status: 200, body: await api.cancel(owner, taskId, reason) };
    }
    case 'migrate': {
      only('POST');
      const request = parseBody(MigrateRequestSchema, await req.body(), 'migrate request');
      return { status: 200, body: await api.migrate(owner, taskId, request) };
    }
    case 'resize': {
      only('POST');
      const request = parseBody(ResizeRequestSchema, await req.body(), 'resize request');
      return { status: 200, body: await api.resize(owner, taskId, request) };
    }
    case 'result':
      only('GET');
      return { status: 200, body: await api.result(owner, taskId) };
  }
}
