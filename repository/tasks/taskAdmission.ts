import { randomUUID } from 'node:crypto';
import os from 'node:os';
import { OWNER_NAME } from '../../spec/repoPath';
import type { CapabilityClaims } from '../../spec/capability';
import { taskInput, type TaskInput } from '../../spec/taskInput';
import {
  BASE_IMAGE_PREFIX,
  BASE_IMAGES_FOLDER,
  imageRepoPath,
  parseTaskSpec,
  TaskSpecError,
  type TaskSpec,
  type TaskSpecInput,
} from '../../spec/taskSpec';
import { AuditLog, defaultAuditLogPath } from '../accounts/auditLog';
import {
  CAPABILITY_MARGIN_SEC,
  isUnder,
  loadCapabilityKeys,
  mintCapability,
  type CapabilityKeys,
} from '../accounts/capabilities';
import type { MetadataStore } from '../store/metadataStore';
import { backendSettingsFromEnv, openMetadata } from '../store/backend';

/**
 * Admitting a task, before anything starts on any host: the spec's owner and results path are fixed
 * (the owner is who authenticated, never what the spec says), the pre-flight checks run against the
 * repository's metadata, and the task's capability is minted. Shared by the owners' task API
 * (taskApi.ts) and the operators' `vsp task grant`; both only start the workflow once this succeeds.
 */

/** A refused task request, with its HTTP status; `denied` marks an access refusal for the audit log. */
export class TaskApiError extends Error {
  constructor(
    readonly status: number,
    message: string,
    options?: { cause?: unknown; denied?: boolean },
  ) {
    super(message, options);
    this.name = 'TaskApiError';
    this.denied = options?.denied ?? false;
  }
  readonly denied: boolean;
}

export const MAX_TASK_ID_LENGTH = 1000;
const MIB = 1024 * 1024;

/** Files a task adds besides its outputs: task.log, console.log, and failure.txt if it fails. */
const LOG_FILES = 3;

export function checkTaskId(taskId: unknown): string {
  if (
    typeof taskId !== 'string' ||
    taskId === '' ||
    taskId.length > MAX_TASK_ID_LENGTH ||
    // eslint-disable-next-line no-control-regex
    /[\x00-\x1f\x7f]/.test(taskId)
  )
    throw new TaskApiError(
      400,
      `taskId must be 1-${MAX_TASK_ID_LENGTH} characters without control characters`,
    );
  return taskId;
}

/** The default results folder of a task: its own, under the owner's results/. */
export function defaultResultsPath(taskId: string): string {
  return `results/${taskId.replace(/\//g, '_')}`;
}

/** A submission body: a bare spec (the web page) or `{spec, taskId?}`. */
export function submissionOf(body: unknown): { spec: Record<string, unknown>; taskId?: string } {
  const isObject = (v: unknown): v is Record<string, unknown> =>
    typeof v === 'object' && v !== null && !Array.isArray(v);
  if (!isObject(body)) throw new TaskApiError(400, 'the request body must be a task spec (a JSON object)');
  if (!('spec' in body)) return { spec: body };
  const extra = Object.keys(body).filter((k) => k !== 'spec' && k !== 'taskId');
  if (extra.length > 0) throw new TaskApiError(400, `unknown field(s) beside spec: ${extra.join(', ')}`);
  if (!isObject(body.spec)) throw new TaskApiError(400, 'spec must be a JSON object');
  return { spec: body.spec, taskId: body.taskId === undefined ? undefined : checkTaskId(body.taskId) };
}

export interface AdmittedTask {
  taskId: string;
  /** The spec as the workflow gets it (owner and resultsPath filled in). */
  input: TaskSpecInput;
  spec: TaskSpec;
  capability: string;
  claims: CapabilityClaims;
}

export interface AdmissionRequest {
  /** Who the task runs for: the authenticated owner (API) or the operator's --owner. */
  owner: string;
  spec: Record<string, unknown>;
  taskId?: string;
  /** Recorded with the capability: `owner:<name>` or `admin:cli`. */
  mintedBy: string;
}

/** Fixes the spec, runs the pre-flight and mints the capability; throws TaskApiError naming the field. */
export async function admitTask(
  deps: { db: MetadataStore; keys: CapabilityKeys },
  req: AdmissionRequest,
  nowMs = Date.now(),
): Promise<AdmittedTask> {
  const { owner } = req;
  const given = req.spec.owner;
  if (given !== undefined && given !== owner)
    throw new TaskApiError(403, `spec.owner ${JSON.stringify(given)} is not the caller's owner ${owner}`, {
      denied: true,
    });
  const name = typeof req.spec.name === 'string' ? `${req.spec.name.replace(/[^A-Za-z0-9_-]/g, '_')}-` : '';
  const taskId = req.taskId ?? `${owner}-${name}${randomUUID().slice(0, 8)}`;
  const input = {
    ...req.spec,
    owner,
    resultsPath: req.spec.resultsPath ?? defaultResultsPath(taskId),
  } as TaskSpecInput;
  let spec: TaskSpec;
  try {
    spec = parseTaskSpec(input);
  } catch (err) {
    if (err instanceof TaskSpecError) throw new TaskApiError(400, err.message, { cause: err });
    throw err;
  }
  await preflight(deps.db, spec, nowMs);
  const { token, claims } = await mintCapability(
    deps.db,
    deps.keys,
    {
      owner,
      taskId,
      read: spec.inputs,
      image: spec.image === 'default' ? undefined : imageRepoPath(spec.image),
      results: spec.resultsPath!,
      exp: Math.ceil(nowMs / 1000) + spec.timeLimitSec + CAPABILITY_MARGIN_SEC,
    },
    req.mintedBy,
  );
  return { taskId, input, spec, capability: token, claims };
}

/**
 * The pre-flight checks: what a host would otherwise find out only after staging, or never. Reads the
 * metadata DB only (no file store), so the admin command can run it next to a running server.
 */
export async function preflight(db: MetadataStore, spec: TaskSpec, nowMs = Date.now()): Promise<void> {
  const { owner } = spec;
  if (!OWNER_NAME.test(owner)) throw new TaskApiError(400, `owner ${JSON.stringify(owner)} is invalid`);
  const row = await db.getOwner(owner);
  if (!row) throw new TaskApiError(404, `owner: no such owner: ${owner}`);
  if (row.disabled) throw new TaskApiError(403, `owner: ${owner} is disabled`, { denied: true });

  for (const [i, input] of spec.inputs.entries()) {
    if (await fileOf(db, owner, input)) continue;
    const what = (await isFolder(db, owner, input))
      ? 'is a folder, not a file'
      : `is not in ${owner}'s space`;
    throw new TaskApiError(404, `inputs[${i}]: ${input} ${what}`);
  }

  if (spec.image !== 'default') {
    const p = imageRepoPath(spec.image);
    const file = await fileOf(db, owner, p);
    if (!file)
      throw new TaskApiError(
        404,
        spec.image.startsWith(BASE_IMAGE_PREFIX)
          ? `image: the provider has no base image ${spec.image.slice(BASE_IMAGE_PREFIX.length)}`
          : `image: ${p} is not in ${owner}'s space`,
      );
    const info = await db.getImageInfo(file.sha256);
    if (info?.status === 'invalid')
      throw new TaskApiError(400, `image: ${p} is not a usable VM image: ${info.error ?? 'invalid'}`);
  }

  const results = spec.resultsPath!;
  if (isUnder(results, BASE_IMAGES_FOLDER))
    throw new TaskApiError(403, `resultsPath: ${BASE_IMAGES_FOLDER}/ is the provider's, read-only`, {
      denied: true,
    });
  if (await db.getFile(owner, results))
    throw new TaskApiError(409, `resultsPath: ${results} is an existing file`);
  const parts = results.split('/');
  for (let i = 1; i < parts.length; i++) {
    const parent = parts.slice(0, i).join('/');
    if (await db.getFile(owner, parent))
      throw new TaskApiError(409, `resultsPath: ${parent} is a file, so ${results} cannot be a folder`);
  }
  // Another task that may still write there (its capability neither revoked nor expired).
  const sharing = (await db.liveCapabilities(owner, Math.floor(nowMs / 1000))).find(
    (c) => isUnder(c.results, results) || isUnder(results, c.results),
  );
  if (sharing)
    throw new TaskApiError(
      409,
      `resultsPath: ${results} overlaps ${sharing.results}, the results folder of task ${sharing.taskId}`,
    );
  const held = await db.listFiles(owner, `${results}/`);
  if (held.length > 0)
    throw new TaskApiError(
      409,
      `resultsPath: ${results} already holds ${held.length} file(s) (e.g. ${held[0].path}); choose a free folder`,
    );

  const usage = await db.usage(owner);
  const room = spec.outputRoomMiB * MIB;
  if (row.quotaBytes !== undefined && usage.bytes + room > row.quotaBytes)
    throw new TaskApiError(
      413,
      `outputRoomMiB: ${spec.outputRoomMiB} MiB of outputs would not fit in ${owner}'s quota ` +
        `(${Math.max(0, row.quotaBytes - usage.bytes)} of ${row.quotaBytes} bytes left)`,
    );
  if (row.quotaFiles !== undefined && usage.files + LOG_FILES > row.quotaFiles)
    throw new TaskApiError(
      413,
      `resultsPath: ${owner}'s quota of ${row.quotaFiles} files leaves no room for the task's logs ` +
        `(${usage.files} stored)`,
    );
}

async function fileOf(
  db: MetadataStore,
  owner: string,
  repoPath: string,
): Promise<{ sha256: string } | undefined> {
  if (isUnder(repoPath, BASE_IMAGES_FOLDER))
    return await db.getBaseImage(repoPath.slice(BASE_IMAGES_FOLDER.length + 1));
  return await db.getFile(owner, repoPath);
}

async function isFolder(db: MetadataStore, owner: string, repoPath: string): Promise<boolean> {
  return (await db.folderExists(owner, repoPath)) || (await db.listFiles(owner, `${repoPath}/`)).length > 0;
}

/**
 * `vsp task grant`: the operators' way to start a task with the Temporal CLI. Runs the same admission
 * as the task API against the data dir (safe next to a running server: SQLite WAL, the key file made
 * once) and returns the workflow input; audited as `admin:cli` with the local user name.
 */
export async function grantTask(
  dataDir: string,
  req: { owner: string; spec: unknown; taskId?: string },
): Promise<{ taskId: string; input: TaskInput }> {
  const audit = AuditLog.open(defaultAuditLogPath(dataDir));
  const user = `admin:cli(${os.userInfo().username})`;
  let db: MetadataStore | undefined;
  try {
    db = await openMetadata(dataDir, backendSettingsFromEnv(process.env));
    const { spec } = submissionOf(req.spec);
    const task = await admitTask(
      { db, keys: loadCapabilityKeys(dataDir) },
      { owner: req.owner, spec, taskId: req.taskId && checkTaskId(req.taskId), mintedBy: user },
    );
    audit.record({
      protocol: 'cli',
      user,
      owner: req.owner,
      task: task.taskId,
      action: 'task-grant',
      path: `task:${task.taskId}`,
      result: 'ok',
      detail: `capability ${task.claims.id}, expires ${new Date(task.claims.exp * 1000).toISOString()}`,
    });
    return { taskId: task.taskId, input: taskInput(task.input, task.capability) };
  } catch (err) {
    audit.record({
      protocol: 'cli',
      user,
      owner: req.owner,
      task: req.taskId,
      action: 'task-grant',
      result: err instanceof TaskApiError && err.denied ? 'denied' : 'failed',
      detail: (err as Error).message,
    });
    throw err;
  } finally {
    await db?.close();
    audit.close();
  }
}
