import type { IncomingMessage, ServerResponse } from 'node:http';
import { pipeline } from 'node:stream/promises';
import { describeError, type Logger } from '../../logging/logger';
import { AccessDenied, type Principal } from '../accounts/auth';
import type { FileStore } from '../store/fileStore';
import type { MetadataStore } from '../store/metadataStore';
import { LiveLogError, MAX_APPEND_BYTES, type LiveLogStore } from '../tasks/liveLogs';
import { TaskApiError } from '../tasks/taskAdmission';
import { TEMPORAL_NOT_CONFIGURED } from '../tasks/taskRequests';
import { readSmallBody } from './requestBody';
import type { TaskApi } from './taskApi';

/**
 * A task's log route, `/v1/owners/<owner>/tasks/<id>/logs`:
 * - GET (the owner): `200 text/plain; charset=utf-8`, the log so far (`?offset=<n>`: from byte n); with
 *   `?follow=1` the reply stays open and carries new bytes as they land, and ends when the task has.
 *   The log is the live log its host sent (liveLogs.ts); a task that ended without one (it never ran,
 *   or its host predates live logs) shows its stored `logs/task.log` instead. 404 for an unknown task.
 * - POST (the task's own capability: its host): appends the body (`?offset=<n>`: these are the bytes
 *   from n on, so a retry adds nothing twice), answering `{size, full}`.
 */

export interface LogsRouteDeps {
  liveLogs: LiveLogStore;
  tasks?: TaskApi;
  store: FileStore;
  db: MetadataStore;
  log: Logger;
}

/** How long a follower waits for new bytes before it looks whether the task has ended. */
const FOLLOW_POLL_MS = 1000;
/** A follower asks Temporal whether the task still runs this often (its capability is checked each poll). */
const TEMPORAL_CHECK_MS = 5000;

function offsetParam(query: URLSearchParams): number | undefined {
  const raw = query.get('offset');
  if (raw === null) return undefined;
  if (!/^\d{1,15}$/.test(raw))
    throw new LiveLogError(400, `offset must be a whole number of bytes, got '${raw}'`);
  return Number(raw);
}

function followParam(query: URLSearchParams): boolean {
  const raw = query.get('follow');
  if (raw === null || raw === '0' || raw === 'false') return false;
  if (raw === '' || raw === '1' || raw === 'true') return true;
  throw new LiveLogError(400, `follow must be 1 or 0, got '${raw}'`);
}

/** The host of a task appends to its live log: only with that task's own capability. */
export async function appendTaskLog(
  deps: LogsRouteDeps,
  req: IncomingMessage,
  res: ServerResponse,
  principal: Principal,
  owner: string,
  taskId: string,
  query: URLSearchParams,
): Promise<void> {
  if (principal.kind !== 'capability' || principal.owner !== owner || principal.claims.taskId !== taskId)
    throw new AccessDenied(403, `only task ${taskId}'s own capability may append to its log`);
  const offset = offsetParam(query);
  const bytes = await readSmallBody(
    req,
    MAX_APPEND_BYTES,
    `an append carries at most ${MAX_APPEND_BYTES} bytes`,
  );
  const result = await deps.liveLogs.append(owner, principal.claims.id, offset, bytes);
  const text = JSON.stringify(result);
  res.writeHead(200, {
    'Content-Type': 'application/json; charset=utf-8',
    'Content-Length': Buffer.byteLength(text),
  });
  res.end(text);
}

/** The owner reads (and with `follow`, follows) the task's log. */
export async function serveTaskLog(
  deps: LogsRouteDeps,
  req: IncomingMessage,
  res: ServerResponse,
  owner: string,
  taskId: string,
  query: URLSearchParams,
): Promise<void> {
  if (!deps.tasks) throw new TaskApiError(503, TEMPORAL_NOT_CONFIGURED);
  const tasks = deps.tasks;
  let offset = offsetParam(query) ?? 0;
  const follow = followParam(query);
  const source = await tasks.logSource(owner, taskId);
  const cap = source.capabilityId;
  const { liveLogs } = deps;

  // A follower may wait long between lines: the task's end (or the client leaving) ends the reply.
  if (follow) req.socket.setTimeout(0);
  const stop = new AbortController();
  res.on('close', () => stop.abort());
  res.writeHead(200, {
    'Content-Type': 'text/plain; charset=utf-8',
    'Cache-Control': 'no-store',
    'X-Content-Type-Options': 'nosniff',
  });
  // A follower sees the reply at once, not with the first bytes.
  res.flushHeaders();
  const send = async (chunk: Buffer): Promise<void> => {
    if (!res.write(chunk))
      await new Promise<void>((resolve) => {
        const done = (): void => {
          res.off('drain', done);
          stop.signal.removeEventListener('abort', done);
          resolve();
        };
        res.on('drain', done);
        stop.signal.addEventListener('abort', done);
      });
  };

  let running = source.running;
  let checkedAt = Date.now();
  /** Whether the run is over: its capability ended (its last step), or Temporal says it closed. */
  const ended = async (): Promise<boolean> => {
    const row = cap === undefined ? undefined : await deps.db.getCapability(cap);
    if (row && (row.revoked !== undefined || row.expires * 1000 <= Date.now())) return true;
    if (Date.now() - checkedAt >= TEMPORAL_CHECK_MS) {
      checkedAt = Date.now();
      running = (await tasks.logSource(owner, taskId)).running;
    }
    return !running;
  };

  let over = !running;
  try {
    for (;;) {
      const chunk = cap === undefined ? Buffer.alloc(0) : await liveLogs.read(owner, cap, offset);
      if (stop.signal.aborted) return;
      if (chunk.length > 0) {
        await send(chunk);
        offset += chunk.length;
        continue;
      }
      if (!follow || over) break;
      if (cap === undefined) await new Promise((r) => setTimeout(r, FOLLOW_POLL_MS));
      else await liveLogs.waitForGrowth(owner, cap, FOLLOW_POLL_MS, stop.signal);
      if (stop.signal.aborted) return;
      // One more read after the end is seen: the bytes sent just before it.
      over = await ended();
    }
    const live = cap === undefined ? 0 : await liveLogs.size(owner, cap);
    if (live === 0 && over && source.resultsPath)
      await sendStoredLog(deps.store, owner, `${source.resultsPath}/logs/task.log`, offset, res);
  } catch (err) {
    deps.log.warn({ owner, taskId, err: describeError(err) }, 'task log stream broke off');
    res.destroy();
    return;
  }
  res.end();
}

/** The stored task log from `offset` on, if there is one (no live log was sent for this run). */
async function sendStoredLog(
  store: FileStore,
  owner: string,
  repoPath: string,
  offset: number,
  res: ServerResponse,
): Promise<void> {
  const file = await store.open(owner, repoPath).catch(() => undefined);
  if (!file) return;
  if (offset >= file.info.size) {
    await file.close();
    return;
  }
  await pipeline(file.createReadStream({ start: offset, end: file.info.size - 1 }), res, { end: false });
}
