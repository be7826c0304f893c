import type { TaskSpecInput } from '../spec/taskSpec';
import type { TaskView } from '../repository/http/taskApi';
import type { MigrateRequest, ResizeRequest, TaskResult, TaskStatus } from '../workflows/definitions';
import { filterToQuery, type TaskListFilter } from './taskFilter';
import type { TaskSummary } from './vspClient';

export type { TaskSummary, TaskView };

/**
 * The owners' client library: tasks through the repository's authenticated task API (`/v1/owners/<o>/
 * tasks`), with an owner token (VSP_TOKEN). The task's owner is whoever the token belongs to; the
 * repository mints the task's capability. (`VspClient`, over a Temporal connection, is the operators'
 * and the repository's own path.)
 */

/**
 * A refused or failed call: `status` is the HTTP status, 0 when there was no usable reply; `reason` is
 * the server's message alone (for a failed task's result, its failure), `message` says what was asked too.
 */
export class TaskClientError extends Error {
  constructor(
    readonly status: number,
    readonly reason: string,
    what: string,
    options?: { cause?: unknown },
  ) {
    super(`${what}: ${status ? `${status} ` : ''}${reason}`, options);
    this.name = 'TaskClientError';
  }
}

/** What the token is: an owner's, or an admin or service (host) credential. */
export interface WhoAmI {
  kind: string;
  owner?: string;
}

/** One task: its record (execution status, times, outputs once done) merged with its live status. */
export type TaskDetails = TaskView & Partial<Omit<TaskStatus, keyof TaskView>>;

/** A task spec as an owner submits it: `owner` may be left out (it is the token's; another is refused). */
export type OwnerTaskSpec = Omit<TaskSpecInput, 'owner'> & { owner?: string };

export interface SubmittedTask {
  taskId: string;
  runId: string;
  resultsPath: string;
}

export interface TaskClientOptions {
  /** The repository's base URL (VSP_REPOSITORY_URL). */
  url: string;
  /** An owner token (VSP_TOKEN). */
  token: string;
  /**
   * Whose tasks to address; default: the token's owner (from `/v1/whoami`). The repository refuses
   * another owner's name with 403.
   */
  owner?: string;
}

const TERMINAL_PHASES = new Set<string>(['completed', 'failed', 'cancelled']);

export class TaskClient {
  private readonly base: URL;
  private readonly token: string;
  private owner?: Promise<string>;

  constructor(opts: TaskClientOptions) {
    let base: URL;
    try {
      base = new URL(opts.url);
    } catch (err) {
      throw new Error(`repository URL ${JSON.stringify(opts.url)} is not a valid URL`, { cause: err });
    }
    if (base.protocol !== 'http:' && base.protocol !== 'https:')
      throw new Error(`repository URL ${opts.url} must be http:// or https://`);
    if (typeof opts.token !== 'string' || opts.token.length === 0)
      throw new Error('the token is empty: set VSP_TOKEN to an owner token (vsp token create)');
    this.base = base;
    this.token = opts.token;
    if (opts.owner !== undefined) this.owner = Promise.resolve(opts.owner);
  }

  /** Who the token authenticates. */
  async whoami(): Promise<WhoAmI> {
    return this.call<WhoAmI>('GET', '/v1/whoami', 'who am I');
  }

  /** The owner whose tasks this client addresses: given, or the token's own. */
  ownerName(): Promise<string> {
    this.owner ??= this.whoami().then((me) => {
      if (me.kind !== 'owner' || !me.owner)
        throw new TaskClientError(
          0,
          `it is a${/^[aeiou]/.test(me.kind) ? 'n' : ''} ${me.kind} token, not an owner's (tasks belong to owners: use an owner token)`,
          'the token',
        );
      return me.owner;
    });
    // A failed lookup is not cached: the next call asks again.
    this.owner.catch(() => (this.owner = undefined));
    return this.owner;
  }

  /**
   * Submits a task. The repository fixes its owner (the token's) and results path, checks the spec and
   * its inputs before anything runs, and starts it with a capability for this task alone.
   */
  async submit(spec: OwnerTaskSpec, opts: { taskId?: string } = {}) {
    const body = opts.taskId === undefined ? { spec } : { spec, taskId: opts.taskId };
    return this.call<SubmittedTask>('POST', await this.tasksPath(), 'submit the task', body);
  }

  /** The owner's tasks that pass the filter, newest first. */
  async list(filter: TaskListFilter = {}): Promise<TaskSummary[]> {
    const query = filterToQuery(filter);
    const q = query.size ? `?${query.toString()}` : '';
    return (await this.call<{ tasks: TaskSummary[] }>('GET', `${await this.tasksPath()}${q}`, 'list tasks'))
      .tasks;
  }

  async status(taskId: string): Promise<TaskDetails> {
    return this.call<TaskDetails>('GET', await this.taskPath(taskId), `status of task ${taskId}`);
  }

  /** The completed task's result; a failed one throws with its failure (422), a running one with 409. */
  async result(taskId: string): Promise<TaskResult> {
    return this.call<TaskResult>('GET', `${await this.taskPath(taskId)}/result`, `result of task ${taskId}`);
  }

  /**
   * Polls the status, calling `onStatus` on every change, until the task ends; resolves with its result
   * or throws its failure (TaskClientError 422 with the task's error).
   */
  async watch(
    taskId: string,
    onStatus: (s: TaskDetails) => void = () => undefined,
    intervalMs = 1000,
  ): Promise<TaskResult> {
    let last = '';
    for (;;) {
      const s = await this.status(taskId);
      const key = JSON.stringify(s);
      if (key !== last) onStatus(s);
      last = key;
      if (s.status !== 'RUNNING' || (s.phase !== undefined && TERMINAL_PHASES.has(s.phase))) {
        try {
          return await this.result(taskId);
        } catch (err) {
          // The last phase is set just before the workflow returns: its result follows at once.
          if (!(err instanceof TaskClientError && err.status === 409)) throw err;
        }
      }
      await new Promise((r) => setTimeout(r, intervalMs));
    }
  }

  /** Cancels a running task: its VM is stopped, its logs kept. 409 if it has already ended. */
  async cancel(taskId: string, reason?: string): Promise<TaskStatus> {
    const body = reason === undefined ? {} : { reason };
    return this.call<TaskStatus>(
      'POST',
      `${await this.taskPath(taskId)}/cancel`,
      `cancel task ${taskId}`,
      body,
    );
  }

  /**
   * Live-migrates a running task's VM; resolves once it runs on the target. A refused or failed
   * migration (409/422) throws with its cause; the VM then runs where it was.
   */
  async migrate(taskId: string, request: MigrateRequest = {}): Promise<TaskStatus> {
    return this.call<TaskStatus>(
      'POST',
      `${await this.taskPath(taskId)}/migrate`,
      `migrate task ${taskId}`,
      request,
    );
  }

  /** Changes a running task's CPU share (422 with the cause when it could not). */
  async resize(taskId: string, request: ResizeRequest): Promise<TaskStatus> {
    return this.call<TaskStatus>(
      'POST',
      `${await this.taskPath(taskId)}/resize`,
      `resize task ${taskId}`,
      request,
    );
  }

  /**
   * The task's log (its output and its VM's console, as its host sent them while it ran; a task that
   * never sent one shows its stored task.log): the bytes from `offset` on, as they arrive. With `follow`
   * the stream stays open and carries new bytes until the task ends. 404 for an unknown task; `signal`
   * stops it.
   */
  async logs(
    taskId: string,
    opts: { follow?: boolean; offset?: number; signal?: AbortSignal } = {},
  ): Promise<AsyncIterable<Uint8Array>> {
    const query = new URLSearchParams();
    if (opts.follow) query.set('follow', '1');
    if (opts.offset !== undefined) {
      if (!Number.isSafeInteger(opts.offset) || opts.offset < 0)
        throw new TaskClientError(
          0,
          `it must be a whole number of bytes, not ${opts.offset}`,
          'the log offset',
        );
      query.set('offset', String(opts.offset));
    }
    const q = query.size ? `?${query.toString()}` : '';
    const what = `log of task ${taskId}`;
    const res = await this.request('GET', `${await this.taskPath(taskId)}/logs${q}`, what, undefined, {
      accept: 'text/plain',
      signal: opts.signal,
    });
    if (!res.ok) throw await this.refusal(res, what);
    const body = res.body;
    return (async function* () {
      if (!body) return;
      const reader = body.getReader();
      try {
        for (;;) {
          const { done, value } = await reader.read();
          if (done) return;
          yield value;
        }
      } finally {
        reader.releaseLock();
        await body.cancel().catch(() => undefined);
      }
    })();
  }

  /** The task's log so far, as text (from `offset` on). */
  async logText(taskId: string, opts: { offset?: number } = {}): Promise<string> {
    const chunks: Uint8Array[] = [];
    for await (const c of await this.logs(taskId, opts)) chunks.push(c);
    return Buffer.concat(chunks).toString('utf8');
  }

  private async tasksPath(): Promise<string> {
    return `/v1/owners/${encodeURIComponent(await this.ownerName())}/tasks`;
  }

  private async taskPath(taskId: string): Promise<string> {
    if (typeof taskId !== 'string' || taskId === '')
      throw new TaskClientError(0, 'it is empty', 'the task id');
    return `${await this.tasksPath()}/${encodeURIComponent(taskId)}`;
  }

  private async request(
    method: string,
    apiPath: string,
    what: string,
    body?: unknown,
    opts: { accept?: string; signal?: AbortSignal } = {},
  ): Promise<Response> {
    const url = new URL(this.base.pathname.replace(/\/+$/, '') + apiPath, this.base);
    try {
      return await fetch(url, {
        method,
        headers: {
          Authorization: `Bearer ${this.token}`,
          Accept: opts.accept ?? 'application/json',
          ...(body === undefined ? {} : { 'Content-Type': 'application/json' }),
        },
        body: body === undefined ? undefined : JSON.stringify(body),
        signal: opts.signal,
      });
    } catch (err) {
      if (opts.signal?.aborted) throw err;
      const cause = (err as { cause?: { message?: string } }).cause?.message ?? (err as Error).message;
      const reason = `the repository at ${this.base.origin} did not answer: ${cause}`;
      throw new TaskClientError(0, reason, what, { cause: err });
    }
  }

  /** A refused call's error, with the server's message. */
  private async refusal(res: Response, what: string): Promise<TaskClientError> {
    const text = await res.text().catch(() => '');
    let message: unknown;
    try {
      message = (JSON.parse(text) as { error?: unknown } | undefined)?.error;
    } catch {
      // not JSON: the status text says it
    }
    return new TaskClientError(res.status, typeof message === 'string' ? message : res.statusText, what);
  }

  private async call<T>(method: string, apiPath: string, what: string, body?: unknown): Promise<T> {
    const res = await this.request(method, apiPath, what, body);
    if (!res.ok) throw await this.refusal(res, what);
    const text = await res.text();
    try {
      return (text === '' ? undefined : JSON.parse(text)) as T;
    } catch (err) {
      throw new TaskClientError(res.status, "the repository's answer is not JSON", what, { cause: err });
    }
  }
}
