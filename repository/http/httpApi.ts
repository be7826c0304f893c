import type { IncomingMessage, ServerResponse } from 'node:http';
import { finished, PassThrough } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { MAX_PATH_BYTES, normaliseFilePath, OWNER_NAME } from '../../spec/repoPath';
import { describeError, type Logger } from '../../logging/logger';
import {
  AccessDenied,
  authenticate,
  authorise,
  identify,
  principalLabel,
  type Access,
  type Principal,
} from '../accounts/auth';
import { claimedCapability, type CapabilityKeys } from '../accounts/capabilities';
import { CAPABILITY_PREFIX } from '../../spec/capability';
import { remoteOf, type AuditEvent, type AuditLog } from '../accounts/auditLog';
import { StoreError, type FileStore, type StoreErrorCode } from '../store/fileStore';
import type { MetadataStore } from '../store/metadataStore';
import { parseRange } from './byteRange';
import { UploadError, type Uploads } from '../store/resumableUploads';
import { LoginRateLimited, type LoginThrottle } from '../accounts/loginThrottle';
import type { TaskApi } from './taskApi';
import { TaskApiError } from '../tasks/taskAdmission';
import { taskAction, taskRequest, type TaskAction } from '../tasks/taskRequests';
import { serveWebAsset, type WebAssets } from './webAssets';
import { adminRequest, AdminApiError } from './adminApi';
import { imageRequest, ImageApiError } from './imageApi';
import type { ImageStore } from '../store/imageStore';
import type { LiveLogStore } from '../tasks/liveLogs';
import { LiveLogError } from '../tasks/liveLogs';
import { appendTaskLog, serveTaskLog } from './logsApi';
import { HttpError, readSmallBody } from './requestBody';

/**
 * The repository's HTTP API (v1): routing, auth, validation and streaming. Paths are taken from the
 * raw request target and decoded here, never resolved by a URL parser, so `%2e%2e` reaches
 * normaliseRepoPath as `..` and is refused rather than silently collapsed.
 */

export interface HttpApiDeps {
  db: MetadataStore;
  store: FileStore;
  maxFileBytes: number;
  log: Logger;
  audit: AuditLog;
  uploads: Uploads;
  /** Counts failed token logins per address (tokens are unguessable, so not per account). */
  loginThrottle: LoginThrottle;
  /** The web page's files, served at `/` (webAssets.ts). */
  web?: WebAssets;
  /** The task endpoints (taskApi.ts); without Temporal they answer 503. */
  tasks?: TaskApi;
  /** Owners' images and the provider's base images (imageStore.ts). */
  images?: ImageStore;
  /** Verify task capabilities presented as bearer tokens (capabilities.ts). */
  keys: CapabilityKeys;
  /** Tasks' live logs (liveLogs.ts), sent by their hosts, read by owners at `tasks/<id>/logs`. */
  liveLogs?: LiveLogStore;
}

/** What a request did, filled in as it is understood, recorded in the audit log when it ends. */
type AuditDraft = Omit<AuditEvent, 'result' | 'protocol'>;

const ACTIONS: Record<string, string> = { PUT: 'upload', GET: 'download', HEAD: 'stat', DELETE: 'delete' };

const STORE_STATUS: Record<StoreErrorCode, number> = {
  'not-found': 404,
  'too-large': 413,
  'quota-exceeded': 413,
  'checksum-mismatch': 400,
  'size-mismatch': 400,
  conflict: 409,
  corrupt: 500,
};

/** How long a refused upload's remaining body is still read (so the client sees the reply, not a reset). */
const DRAIN_MS = 2000;

const SHA256_HEX = /^[0-9a-f]{64}$/;

/**
 * Requests other than PUT and PATCH (which stream files, bounded by the file size limit or the upload
 * session) carry at most a small JSON object.
 */
export const MAX_JSON_BODY = 64 * 1024;
const JSON_TOO_LARGE = `request body is larger than ${MAX_JSON_BODY} bytes`;

/** What the audit log calls a host's append to a task's live log (recorded only when refused). */
const LOG_APPEND = 'task-log-append';

const UPLOAD_ACTIONS: Record<string, string> = {
  POST: 'upload-start',
  PATCH: 'upload-append',
  HEAD: 'upload-status',
  DELETE: 'upload-abort',
};

type Route =
  | { kind: 'health' }
  | { kind: 'list'; owner: string; query: URLSearchParams }
  | { kind: 'file'; owner: string; rawPath: string }
  | { kind: 'uploads'; owner: string; id?: string }
  | { kind: 'tasks'; owner: string; id?: string; action?: TaskAction; query: URLSearchParams }
  | { kind: 'task-logs'; owner: string; id: string; query: URLSearchParams }
  | { kind: 'images'; owner: string }
  | { kind: 'whoami' }
  | { kind: 'capability-self' }
  | { kind: 'admin'; path: string; query: URLSearchParams };

function route(target: string): Route | undefined {
  const q = target.indexOf('?');
  const pathname = q < 0 ? target : target.slice(0, q);
  const query = new URLSearchParams(q < 0 ? '' : target.slice(q + 1));
  if (pathname === '/v1/health') return { kind: 'health' };
  if (pathname === '/v1/whoami') return { kind: 'whoami' };
  if (pathname === '/v1/capabilities/self') return { kind: 'capability-self' };
  const u = /^\/v1\/owners\/([^/]+)\/uploads(?:\/([A-Za-z0-9_-]+))?$/.exec(pathname);
  if (u) return { kind: 'uploads', owner: decodeComponent(u[1], 'owner name'), id: u[2] };
  if (pathname.startsWith('/v1/admin/')) return { kind: 'admin', path: pathname.slice(10), query };
  const img = /^\/v1\/owners\/([^/]+)\/images$/.exec(pathname);
  if (img) return { kind: 'images', owner: decodeComponent(img[1], 'owner name') };
  const t = /^\/v1\/owners\/([^/]+)\/tasks(?:\/([^/]+)(?:\/(cancel|migrate|resize|result|logs))?)?$/.exec(
    pathname,
  );
  if (t?.[3] === 'logs')
    return {
      kind: 'task-logs',
      owner: decodeComponent(t[1], 'owner name'),
      id: decodeComponent(t[2], 'task id'),
      query,
    };
  if (t) {
    const id = t[2] === undefined ? undefined : decodeComponent(t[2], 'task id');
    const action = t[3] as TaskAction | undefined;
    return { kind: 'tasks', owner: decodeComponent(t[1], 'owner name'), id, action, query };
  }
  const m = /^\/v1\/owners\/([^/]+)\/files(\/.*)?$/.exec(pathname);
  if (!m) return undefined;
  const owner = decodeComponent(m[1], 'owner name');
  if (m[2] === undefined) return { kind: 'list', owner, query };
  return { kind: 'file', owner, rawPath: m[2].slice(1) };
}

function decodeComponent(raw: string, what: string): string {
  try {
    return decodeURIComponent(raw);
  } catch {
    throw new HttpError(400, `${what} is not valid percent-encoding of UTF-8`);
  }
}

function bearerToken(req: IncomingMessage): string | undefined {
  const header = req.headers.authorization;
  if (header === undefined) return undefined;
  const m = /^Bearer\s+(\S+)\s*$/i.exec(header);
  if (!m)
    throw new HttpError(401, "Authorization header must be 'Bearer <token>'", {
      'WWW-Authenticate': 'Bearer',
    });
  return m[1];
}

function checkOwnerName(owner: string): void {
  if (!OWNER_NAME.test(owner)) {
    throw new HttpError(400, `owner name ${JSON.stringify(owner)} is invalid: it must match ${OWNER_NAME}`);
  }
}

function checkPath(raw: string): string {
  return checkRepoPath(decodeComponent(raw, 'path'));
}

/** Every path the HTTP API takes names a file. */
function checkRepoPath(p: string): string {
  try {
    return normaliseFilePath(p);
  } catch (err) {
    throw new HttpError(400, (err as Error).message);
  }
}

/** A list prefix need not be a whole path ("out" matches "output/a"), but gets the same character rules. */
function checkPrefix(prefix: string | null): string {
  if (prefix === null || prefix === '') return '';
  // eslint-disable-next-line no-control-regex
  if (/[\x00-\x1f\x7f]/.test(prefix)) throw new HttpError(400, 'prefix contains a NUL or control character');
  if (prefix.startsWith('/')) throw new HttpError(400, 'prefix is absolute; use a relative path');
  if (Buffer.byteLength(prefix) > MAX_PATH_BYTES)
    throw new HttpError(400, `prefix is longer than ${MAX_PATH_BYTES} bytes`);
  return prefix.normalize('NFC');
}

function sendJson(
  res: ServerResponse,
  status: number,
  body: unknown,
  headers: Record<string, string> = {},
): void {
  const text = JSON.stringify(body);
  res.writeHead(status, {
    ...headers,
    'Content-Type': 'application/json; charset=utf-8',
    'Content-Length': Buffer.byteLength(text),
  });
  res.end(text);
}

/**
 * Replying before the request body is read: close the connection afterwards, but keep reading for a
 * moment so the client gets to see the reply instead of a connection reset.
 */
function discardUnreadBody(req: IncomingMessage, res: ServerResponse): void {
  if (req.complete) return;
  res.setHeader('Connection', 'close');
  // A detached body may be holding the request paused by backpressure: let go of it first.
  req.unpipe();
  req.resume();
  setTimeout(() => req.socket.destroy(), DRAIN_MS).unref();
}

/** The request's Content-Length, if it announced one. */
function declaredLength(req: IncomingMessage): number | undefined {
  const raw = req.headers['content-length'];
  return raw === undefined ? undefined : Number(raw);
}

/** Reads a small JSON body (413 over MAX_JSON_BODY, 408 when it does not arrive in time). */
async function readJson(req: IncomingMessage): Promise<unknown> {
  const body = await readSmallBody(req, MAX_JSON_BODY, JSON_TOO_LARGE);
  try {
    return JSON.parse(body.toString('utf8')) as unknown;
  } catch {
    throw new HttpError(400, 'request body is not valid JSON');
  }
}

function hasBody(req: IncomingMessage): boolean {
  const length = req.headers['content-length'];
  return length === undefined ? req.headers['transfer-encoding'] !== undefined : length !== '0';
}

/**
 * The request body as a stream its consumer may destroy (a refusal) without killing the socket, so the
 * reply still goes out. The request's end or abort is watched with `finished`, which also keeps its
 * errors handled; so are the body's, whenever they come (before the consumer attaches or after it is
 * done): they reach the consumer's pipeline, never the process.
 */
function detachedBody(req: IncomingMessage): PassThrough {
  const body = new PassThrough({ highWaterMark: 1 << 20 });
  finished(body, () => undefined);
  finished(req, (err) => {
    if (err || !req.complete)
      body.destroy(new Error('the client went away during the upload', { cause: err }));
  });
  req.pipe(body);
  return body;
}

export function createRequestHandler(
  deps: HttpApiDeps,
): (req: IncomingMessage, res: ServerResponse) => Promise<void> {
  const { db, store, log, audit } = deps;

  function fileHeaders(info: { size: number; sha256: string; mtime: string }): Record<string, string> {
    return {
      ETag: `"${info.sha256}"`,
      'X-Content-SHA256': info.sha256,
      'X-File-Mtime': info.mtime,
      'Last-Modified': new Date(info.mtime).toUTCString(),
      'Accept-Ranges': 'bytes',
    };
  }

  async function upload(
    req: IncomingMessage,
    res: ServerResponse,
    owner: string,
    repoPath: string,
  ): Promise<number> {
    const expectedSize = declaredLength(req);
    if (expectedSize !== undefined && expectedSize > deps.maxFileBytes) {
      throw new HttpError(
        413,
        `file of ${expectedSize} bytes is larger than the limit of ${deps.maxFileBytes} bytes`,
      );
    }
    const shaHeader = req.headers['x-content-sha256'];
    let expectedSha256: string | undefined;
    if (shaHeader !== undefined) {
      expectedSha256 = String(shaHeader).trim().toLowerCase();
      if (!SHA256_HEX.test(expectedSha256))
        throw new HttpError(400, 'X-Content-SHA256 must be 64 hex digits');
    }
    const info = await store.write(owner, repoPath, detachedBody(req), {
      maxBytes: deps.maxFileBytes,
      expectedSha256,
      expectedSize,
    });
    log.info({ owner, path: repoPath, size: info.size }, 'file stored');
    sendJson(res, 201, info);
    return info.size;
  }

  async function download(
    req: IncomingMessage,
    res: ServerResponse,
    owner: string,
    repoPath: string,
  ): Promise<void> {
    const file = await store.open(owner, repoPath);
    const { info } = file;
    const headers = fileHeaders(info);
    const etag = headers.ETag;
    if (req.headers['if-none-match'] === etag) {
      await file.close();
      res.writeHead(304, headers).end();
      return;
    }
    const ifRange = req.headers['if-range'];
    const range = parseRange(
      ifRange === undefined || ifRange === etag ? req.headers.range : undefined,
      info.size,
    );
    if (range.kind === 'unsatisfiable') {
      await file.close();
      throw new HttpError(416, `range ${req.headers.range} is outside the file's ${info.size} bytes`, {
        'Content-Range': `bytes */${info.size}`,
      });
    }
    const [start, end] = range.kind === 'partial' ? [range.start, range.end] : [0, info.size - 1];
    headers['Content-Type'] = 'application/octet-stream';
    headers['Content-Length'] = String(end - start + 1);
    if (range.kind === 'partial') headers['Content-Range'] = `bytes ${start}-${end}/${info.size}`;
    res.writeHead(range.kind === 'partial' ? 206 : 200, headers);
    if (req.method === 'HEAD' || info.size === 0) {
      await file.close();
      res.end();
      return;
    }
    try {
      await pipeline(file.createReadStream({ start, end }), res);
    } catch (err) {
      log.debug({ owner, path: repoPath, err: describeError(err) }, 'download ended early');
    }
  }

  /** Resumable uploads: POST starts one, HEAD tells its offset, PATCH appends at it, DELETE drops it. */
  async function resumable(
    req: IncomingMessage,
    res: ServerResponse,
    owner: string,
    id: string | undefined,
    draft: AuditDraft,
    allowWrite: (repoPath: string) => Promise<void>,
  ): Promise<void> {
    const method = req.method ?? 'GET';
    if (id === undefined) {
      if (method !== 'POST')
        throw new HttpError(405, `${method} is not allowed on uploads`, { Allow: 'POST' });
      const request = await readJson(req);
      const target = (request as { path?: unknown } | null)?.path;
      draft.path = typeof target === 'string' ? checkRepoPath(target) : undefined;
      await allowWrite(draft.path ?? '');
      const session = await deps.uploads.create(owner, request);
      draft.path = session.path;
      sendJson(res, 201, session, {
        Location: `/v1/owners/${owner}/uploads/${session.id}`,
        'Upload-Offset': '0',
        'Upload-Length': String(session.size),
      });
      return;
    }
    draft.path = `upload:${id}`;
    switch (method) {
      case 'HEAD':
      case 'GET': {
        const s = await deps.uploads.get(owner, id);
        draft.path = s.path;
        await allowWrite(s.path);
        const headers = {
          'Upload-Offset': String(s.offset),
          'Upload-Length': String(s.size),
          'Cache-Control': 'no-store',
        };
        if (method === 'GET') sendJson(res, 200, s, headers);
        else res.writeHead(200, headers).end();
        return;
      }
      case 'PATCH': {
        const raw = req.headers['upload-offset'];
        if (typeof raw !== 'string' || !/^\d{1,16}$/.test(raw.trim()))
          throw new HttpError(400, 'Upload-Offset header must be a whole number of bytes');
        const s = await deps.uploads.get(owner, id);
        draft.path = s.path;
        await allowWrite(s.path);
        const result = await deps.uploads.append(
          owner,
          id,
          Number(raw.trim()),
          detachedBody(req),
          declaredLength(req),
        );
        if (!result.done) {
          res
            .writeHead(204, { 'Upload-Offset': String(result.offset), 'Upload-Length': String(s.size) })
            .end();
          return;
        }
        draft.action = 'upload';
        draft.bytes = result.info.size;
        sendJson(res, 201, result.info, {
          'Upload-Offset': String(result.info.size),
          'Upload-Length': String(result.info.size),
        });
        return;
      }
      case 'DELETE':
        await allowWrite((await deps.uploads.get(owner, id)).path);
        await deps.uploads.abort(owner, id);
        res.writeHead(204).end();
        return;
      default:
        throw new HttpError(405, `${method} is not allowed on an upload`, {
          Allow: 'GET, HEAD, PATCH, DELETE',
        });
    }
  }

  async function handle(req: IncomingMessage, res: ServerResponse, draft: AuditDraft): Promise<void> {
    const method = req.method ?? 'GET';
    if (method !== 'PUT' && method !== 'PATCH' && (declaredLength(req) ?? 0) > MAX_JSON_BODY)
      throw new HttpError(413, JSON_TOO_LARGE);
    if (deps.web && serveWebAsset(deps.web, req, res)) return;
    const r = route(req.url ?? '/');
    if (!r) throw new HttpError(404, `no such endpoint: ${method} ${(req.url ?? '').split('?')[0]}`);
    if (r.kind === 'health') {
      if (method !== 'GET' && method !== 'HEAD')
        throw new HttpError(405, 'health accepts GET', { Allow: 'GET, HEAD' });
      sendJson(res, 200, { ok: true });
      return;
    }
    if (r.kind === 'admin') {
      const out = await adminRequest(deps, {
        method,
        path: r.path,
        query: r.query,
        token: bearerToken(req),
        guard: (login) => deps.loginThrottle.guard({ address: req.socket.remoteAddress }, login),
        json: () => readJson(req),
        body: () => detachedBody(req),
        audit: draft,
      });
      if (out.body === undefined) res.writeHead(out.status).end();
      else sendJson(res, out.status, out.body);
      return;
    }
    const token = bearerToken(req);
    const claimed = token?.startsWith(CAPABILITY_PREFIX) ? claimedCapability(token) : undefined;
    // A refused capability is audited under the id and task it claims; an accepted one under its own.
    if (claimed) [draft.user, draft.task] = [`capability:${claimed.id}`, claimed.taskId];
    // Failed logins are counted per address (a missing token is no guess).
    const login = async <T>(fn: (token: string | undefined) => T): Promise<T> =>
      token === undefined
        ? fn(token)
        : deps.loginThrottle.guard({ address: req.socket.remoteAddress }, () => fn(token));
    if (r.kind === 'whoami') {
      draft.action = 'whoami';
      const p = await login((t) => identify(db, t, deps.keys));
      draft.user = principalLabel(p);
      sendJson(
        res,
        200,
        p.kind === 'capability'
          ? { kind: p.kind, owner: p.owner, taskId: p.claims.taskId }
          : p.kind === 'owner'
            ? { kind: p.kind, owner: p.owner }
            : { kind: p.kind },
      );
      return;
    }
    if (r.kind === 'capability-self') {
      draft.action = 'capability-revoke';
      if (method !== 'DELETE') throw new HttpError(405, `${method} is not allowed here`, { Allow: 'DELETE' });
      const p = await login((t) => authenticate(db, t, deps.keys));
      draft.user = principalLabel(p);
      if (p.kind !== 'capability')
        throw new AccessDenied(403, 'only a task capability can revoke itself (bearer: the capability)');
      [draft.owner, draft.task] = [p.owner, p.claims.taskId];
      await db.revokeCapability(p.claims.id);
      log.info({ owner: p.owner, taskId: p.claims.taskId, capabilityId: p.claims.id }, 'capability revoked');
      res.writeHead(204).end();
      return;
    }
    draft.owner = r.owner;
    draft.action =
      r.kind === 'list'
        ? 'list'
        : r.kind === 'uploads'
          ? (UPLOAD_ACTIONS[method] ?? method)
          : (ACTIONS[method] ?? method);
    if (r.kind === 'file') draft.path = r.rawPath;
    if (r.kind === 'tasks')
      [draft.action, draft.path] = [taskAction(method, r.id, r.action), r.id && `task:${r.id}`];
    if (r.kind === 'images') draft.action = 'list-images';
    if (r.kind === 'task-logs')
      [draft.action, draft.path] = [method === 'POST' ? LOG_APPEND : 'task-logs', `task:${r.id}`];
    const principal: Principal = await login((t) => authenticate(db, t, deps.keys));
    draft.user = principalLabel(principal);
    if (principal.kind === 'capability') draft.task = principal.claims.taskId;
    checkOwnerName(r.owner);
    const allow = (access: Access): Promise<void> => authorise(db, principal, r.owner, access);
    if (r.kind === 'list') {
      const prefix = checkPrefix(r.query.get('prefix'));
      await allow({ op: 'list', prefix });
      if (method !== 'GET')
        throw new HttpError(405, `${method} is not allowed on a file list`, { Allow: 'GET' });
      sendJson(res, 200, { files: await store.list(r.owner, prefix) });
      return;
    }
    if (r.kind === 'task-logs') {
      if (!deps.liveLogs) throw new HttpError(503, 'this repository keeps no live logs');
      const logs = { ...deps, liveLogs: deps.liveLogs };
      if (method === 'POST') return appendTaskLog(logs, req, res, principal, r.owner, r.id, r.query);
      if (method !== 'GET')
        throw new HttpError(405, `${method} is not allowed on a task log`, { Allow: 'GET, POST' });
      await allow({ op: 'account' });
      return serveTaskLog(logs, req, res, r.owner, r.id, r.query);
    }
    if (r.kind === 'uploads')
      return resumable(req, res, r.owner, r.id, draft, (path) => allow({ op: 'write', path }));
    if (r.kind === 'images' || r.kind === 'tasks') await allow({ op: 'account' });
    if (r.kind === 'images') {
      const out = await imageRequest(deps.images, method, r.owner);
      sendJson(res, out.status, out.body);
      return;
    }
    if (r.kind === 'tasks') {
      const out = await taskRequest(deps.tasks, {
        method,
        owner: r.owner,
        taskId: r.id,
        action: r.action,
        query: r.query,
        // cancel and migrate may come without a body
        body: () => (hasBody(req) ? readJson(req) : Promise.resolve(undefined)),
      });
      sendJson(res, out.status, out.body);
      return;
    }
    const repoPath = checkPath(r.rawPath);
    draft.path = repoPath;
    await allow({ op: method === 'GET' || method === 'HEAD' ? 'read' : 'write', path: repoPath });
    switch (method) {
      case 'PUT':
        draft.bytes = await upload(req, res, r.owner, repoPath);
        return;
      case 'GET':
      case 'HEAD':
        return download(req, res, r.owner, repoPath);
      case 'DELETE':
        if (!(await store.delete(r.owner, repoPath))) throw new HttpError(404, `no such file: ${repoPath}`);
        log.info({ owner: r.owner, path: repoPath }, 'file deleted');
        res.writeHead(204).end();
        return;
      default:
        throw new HttpError(405, `${method} is not allowed on a file`, { Allow: 'GET, HEAD, PUT, DELETE' });
    }
  }

  return async (req, res) => {
    const draft: AuditDraft = {
      action: 'request',
      remote: remoteOf(req.socket.remoteAddress, req.socket.remotePort),
    };
    try {
      await handle(req, res, draft);
      // A running task's host appends to its log every half second: only refusals are worth a record.
      if (draft.action !== LOG_APPEND && (draft.owner !== undefined || draft.user !== undefined))
        audit.record({ protocol: 'http', ...draft, result: 'ok' });
    } catch (err) {
      audit.record({
        protocol: 'http',
        ...draft,
        result:
          err instanceof AccessDenied ||
          err instanceof LoginRateLimited ||
          (err instanceof TaskApiError && err.denied) ||
          (err instanceof HttpError && err.status === 401)
            ? 'denied'
            : 'failed',
        detail: err instanceof Error ? err.message : String(err),
      });
      if (req.destroyed && !req.complete) {
        log.info({ url: req.url, err: describeError(err) }, 'upload abandoned by the client');
        return;
      }
      let status = 500;
      let message = 'internal error';
      let headers: Record<string, string> = {};
      if (err instanceof HttpError) [status, message, headers] = [err.status, err.message, err.headers];
      else if (err instanceof TaskApiError) [status, message] = [err.status, err.message];
      else if (err instanceof AdminApiError) [status, message] = [err.status, err.message];
      else if (err instanceof ImageApiError)
        [status, message, headers] = [err.status, err.message, err.headers];
      else if (err instanceof UploadError)
        [status, message, headers] = [err.status, err.message, err.headers];
      else if (err instanceof AccessDenied) [status, message] = [err.status, err.message];
      else if (err instanceof LiveLogError) [status, message] = [err.status, err.message];
      else if (err instanceof LoginRateLimited)
        [status, message, headers] = [429, err.message, { 'Retry-After': String(err.retryAfterSeconds) }];
      else if (err instanceof StoreError) [status, message] = [STORE_STATUS[err.code], err.message];
      if (status === 401) headers['WWW-Authenticate'] = 'Bearer';
      if (status >= 500)
        log.error({ method: req.method, url: req.url, err: describeError(err) }, 'request failed');
      if (res.headersSent) {
        res.destroy();
        return;
      }
      discardUnreadBody(req, res);
      sendJson(res, status, { error: message }, headers);
    }
  };
}
