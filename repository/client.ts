import { createReadStream, promises as fs } from 'node:fs';
import { createHash, randomBytes } from 'node:crypto';
import http, { type IncomingMessage, type OutgoingHttpHeaders } from 'node:http';
import https from 'node:https';
import path from 'node:path';
import { Readable, Transform, type Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { normaliseRepoPath, OWNER_NAME } from '../spec/repoPath';
import { writeDurably } from '../lib/durableWrite';
import type { ImageEntry } from './store/imageStore';

export type { ImageEntry };

/**
 * Client for the repository's HTTP API, used by the CLI (uploading inputs, fetching outputs) and by
 * host workers (service token). Built on node:http so uploads and downloads stream with flat memory
 * and an early refusal (413, 401) is read while the body is still being sent.
 */

export interface FileInfo {
  path: string;
  size: number;
  sha256: string;
  /** ISO 8601, UTC. */
  mtime: string;
}

/**
 * What a failed call means for whoever retries it:
 * - `unavailable`: no usable reply (unreachable, connection broken, corrupt bytes) or a 5xx/408/429:
 *   the same call may pass later;
 * - `refused`: the repository answered no (401, 403, 404, 409, 413...): repeating it changes nothing;
 * - `invalid`: the call was never sent (a bad owner name or path): the caller's mistake.
 */
export type RepositoryErrorKind = 'unavailable' | 'refused' | 'invalid';

function kindOfStatus(status: number): RepositoryErrorKind {
  return status === 0 || status >= 500 || status === 408 || status === 429 ? 'unavailable' : 'refused';
}

/**
 * A failed call. `status` is the HTTP status (404, 401, 403, 413, ...) with the server's message, or
 * 0 when there was no usable reply: the server was unreachable, the connection broke, or downloaded
 * bytes did not match their checksum. `kind` says whether retrying can help.
 */
export class RepositoryError extends Error {
  readonly kind: RepositoryErrorKind;

  constructor(
    readonly status: number,
    message: string,
    options?: { cause?: unknown; kind?: RepositoryErrorKind },
  ) {
    super(message, options);
    this.name = 'RepositoryError';
    this.kind = options?.kind ?? kindOfStatus(status);
  }
}

/** A failed resumable upload; pass `uploadId` (when set) back in the options to continue it. */
export class ResumableUploadError extends RepositoryError {
  constructor(
    status: number,
    message: string,
    readonly uploadId: string | undefined,
    options?: { cause?: unknown; kind?: RepositoryErrorKind },
  ) {
    super(status, message, options);
    this.name = 'ResumableUploadError';
  }
}

export interface ResumableUploadOptions {
  /** Bytes sent per request (default 16 MiB): what an interruption can cost at most. */
  chunkBytes?: number;
  /** Called whenever the server has acknowledged more bytes. */
  onProgress?: (stored: number, total: number) => void;
  /** Continue this session (from ResumableUploadError.uploadId) rather than starting a new one. */
  uploadId?: string;
  /** Transport failures in a row that are retried from the server's offset (default 3). */
  retries?: number;
  /** Stops the upload; the session stays on the server until it expires, ready to be resumed. */
  signal?: AbortSignal;
}

/** For a single transfer: stop it, and follow its bytes (`total` when known). */
export interface TransferOptions {
  signal?: AbortSignal;
  onProgress?: (bytes: number, total: number | undefined) => void;
}

const DEFAULT_CHUNK_BYTES = 16 << 20;
const DEFAULT_RETRIES = 3;
const RETRY_DELAY_MS = 250;

const MAX_ERROR_BODY = 64 * 1024;

async function sha256OfFile(file: string): Promise<string> {
  const hash = createHash('sha256');
  for await (const chunk of createReadStream(file, { highWaterMark: 1 << 20 })) hash.update(chunk as Buffer);
  return hash.digest('hex');
}

function offsetOf(res: IncomingMessage): number | undefined {
  const raw = res.headers['upload-offset'];
  return typeof raw === 'string' && /^\d+$/.test(raw) ? Number(raw) : undefined;
}

function checkOwner(owner: string): void {
  if (!OWNER_NAME.test(owner))
    throw new RepositoryError(0, `owner name ${JSON.stringify(owner)} must match ${OWNER_NAME}`, {
      kind: 'invalid',
    });
}

function checkPath(repoPath: string): string {
  try {
    return normaliseRepoPath(repoPath);
  } catch (err) {
    throw new RepositoryError(0, (err as Error).message, { cause: err, kind: 'invalid' });
  }
}

/** The reply body as text; beyond `limit` bytes the reply is cut off (error bodies are short). */
async function readBody(res: IncomingMessage, limit = Infinity): Promise<string> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of res as AsyncIterable<Buffer>) {
    size += chunk.length;
    if (size > limit) {
      res.destroy();
      break;
    }
    chunks.push(chunk);
  }
  return Buffer.concat(chunks).toString('utf8');
}

/** Turns a non-success reply into a RepositoryError carrying the server's `{error}` message. */
async function failure(res: IncomingMessage, what: string): Promise<RepositoryError> {
  const status = res.statusCode ?? 0;
  let message = `${res.statusMessage ?? 'error'}`;
  try {
    const text = await readBody(res, MAX_ERROR_BODY);
    const parsed = JSON.parse(text) as { error?: unknown };
    if (typeof parsed.error === 'string') message = parsed.error;
  } catch {
    // No JSON body (e.g. a HEAD reply): the status line is all there is.
  }
  return new RepositoryError(status, `${what}: ${status} ${message}`);
}

/** Throws unless what was received is the file the headers announced. */
function checkReceived(p: string, info: FileInfo, got: { size: number; sha256: string }): void {
  if (got.size !== info.size || got.sha256 !== info.sha256)
    throw new RepositoryError(
      0,
      `download of ${p} is corrupt: got ${got.size} bytes with SHA-256 ${got.sha256}, expected ${info.size} with ${info.sha256}`,
    );
}

function infoFromHeaders(repoPath: string, res: IncomingMessage): FileInfo {
  const sha256 = res.headers['x-content-sha256'];
  const mtime = res.headers['x-file-mtime'];
  const size = Number(res.headers['content-length']);
  if (typeof sha256 !== 'string' || typeof mtime !== 'string' || !Number.isSafeInteger(size)) {
    throw new RepositoryError(
      0,
      `reply for ${repoPath} lacks X-Content-SHA256, X-File-Mtime or Content-Length`,
    );
  }
  return { path: repoPath, size, sha256, mtime };
}

export class RepositoryClient {
  private readonly base: URL;
  private readonly token: string;

  constructor(opts: { url: string; token: string }) {
    let base: URL;
    try {
      base = new URL(opts.url);
    } catch (err) {
      throw new Error(`repository URL ${JSON.stringify(opts.url)} is not a valid URL`, { cause: err });
    }
    if (base.protocol !== 'http:' && base.protocol !== 'https:') {
      throw new Error(`repository URL ${opts.url} must be http:// or https://`);
    }
    if (typeof opts.token !== 'string' || opts.token.length === 0)
      throw new Error('repository token is empty');
    this.base = base;
    this.token = opts.token;
  }

  /** Uploads a local file or a stream; the server stores it atomically and returns what it stored. */
  async upload(
    owner: string,
    repoPath: string,
    source: string | NodeJS.ReadableStream,
    opts: { sha256?: string; size?: number } & TransferOptions = {},
  ): Promise<FileInfo> {
    checkOwner(owner);
    const p = checkPath(repoPath);
    let size = opts.size;
    let body: NodeJS.ReadableStream;
    if (typeof source === 'string') {
      size ??= (await fs.stat(source)).size;
      body = createReadStream(source, { highWaterMark: 1 << 20 });
    } else {
      body = source;
    }
    if (opts.onProgress) {
      const onProgress = opts.onProgress;
      let sent = 0;
      body = (body as Readable).pipe(
        new Transform({
          highWaterMark: 1 << 20,
          transform(chunk: Buffer, _enc, done) {
            sent += chunk.length;
            onProgress(sent, size);
            done(null, chunk);
          },
        }),
      );
    }
    const headers: OutgoingHttpHeaders = { 'Content-Type': 'application/octet-stream' };
    if (size !== undefined) headers['Content-Length'] = size;
    if (opts.sha256 !== undefined) headers['X-Content-SHA256'] = opts.sha256;
    const res = await this.send('PUT', this.filePath(owner, p), headers, body, true, opts.signal);
    if (res.statusCode !== 201) throw await failure(res, `upload of ${p}`);
    return JSON.parse(await readBody(res)) as FileInfo;
  }

  /**
   * Downloads to `destFile` atomically (a temp file of its own, renamed once complete), verifying the
   * SHA-256 on the way, and fsynced unless `sync` is false (for a caller that syncs the whole file
   * system after, e.g. a data disk being staged).
   */
  async download(
    owner: string,
    repoPath: string,
    destFile: string,
    opts: TransferOptions & { sync?: boolean } = {},
  ): Promise<FileInfo> {
    const { p, res, info } = await this.getFile(owner, repoPath, opts.signal);
    const dest = path.resolve(destFile);
    const tmp = path.join(
      path.dirname(dest),
      `.${path.basename(dest)}.${randomBytes(6).toString('hex')}.part`,
    );
    try {
      const onChunk = opts.onProgress && ((received: number) => opts.onProgress?.(received, info.size));
      return await writeDurably(res, tmp, { onChunk, sync: opts.sync }, async ({ size, sha256 }) => {
        checkReceived(p, info, { size, sha256 });
        await fs.rename(tmp, dest);
        return info;
      });
    } catch (err) {
      if (err instanceof RepositoryError) throw err;
      opts.signal?.throwIfAborted();
      throw new RepositoryError(0, `download of ${p} to ${dest} failed`, { cause: err });
    } finally {
      res.destroy();
    }
  }

  /** The file's GET, answered 200: the body to read, and what its headers announce. */
  private async getFile(owner: string, repoPath: string, signal?: AbortSignal) {
    checkOwner(owner);
    const p = checkPath(repoPath);
    const res = await this.send('GET', this.filePath(owner, p), {}, undefined, true, signal);
    if (res.statusCode !== 200) throw await failure(res, `download of ${p}`);
    return { p, res, info: infoFromHeaders(p, res) };
  }

  /**
   * Streams the file into `dest` (standard output, a socket: anything not a file to rename into place),
   * verifying its size and SHA-256 on the way. `dest` is not ended, so standard output stays usable. A
   * mismatch throws once the bytes are written: whatever read them must discard them.
   */
  async downloadTo(
    owner: string,
    repoPath: string,
    dest: Writable,
    opts: TransferOptions = {},
  ): Promise<FileInfo> {
    const { p, res, info } = await this.getFile(owner, repoPath, opts.signal);
    const hash = createHash('sha256');
    let size = 0;
    const count = new Transform({
      transform(chunk: Buffer, _enc, done) {
        size += chunk.length;
        hash.update(chunk);
        opts.onProgress?.(size, info.size);
        done(null, chunk);
      },
    });
    try {
      await pipeline(res, count, dest, { end: false });
    } catch (err) {
      opts.signal?.throwIfAborted();
      throw new RepositoryError(0, `download of ${p} failed`, { cause: err });
    } finally {
      res.destroy();
    }
    checkReceived(p, info, { size, sha256: hash.digest('hex') });
    return info;
  }

  /** The file's bytes (or an inclusive byte range of them) as a stream; destroy it if not read to the end. */
  async downloadStream(
    owner: string,
    repoPath: string,
    range?: { start: number; end?: number },
  ): Promise<Readable> {
    checkOwner(owner);
    const p = checkPath(repoPath);
    const headers: OutgoingHttpHeaders = {};
    if (range !== undefined) {
      if (
        !Number.isSafeInteger(range.start) ||
        range.start < 0 ||
        (range.end !== undefined && range.end < range.start)
      ) {
        throw new RepositoryError(0, `invalid byte range ${JSON.stringify(range)}`, { kind: 'invalid' });
      }
      headers.Range = `bytes=${range.start}-${range.end ?? ''}`;
    }
    const res = await this.send('GET', this.filePath(owner, p), headers);
    if (res.statusCode !== 200 && res.statusCode !== 206) throw await failure(res, `download of ${p}`);
    return res;
  }

  /** The file's metadata, or undefined if there is no such file. */
  async stat(owner: string, repoPath: string): Promise<FileInfo | undefined> {
    checkOwner(owner);
    const p = checkPath(repoPath);
    const res = await this.send('HEAD', this.filePath(owner, p));
    res.resume();
    if (res.statusCode === 404) return undefined;
    if (res.statusCode !== 200) throw await failure(res, `stat of ${p}`);
    return infoFromHeaders(p, res);
  }

  /** Files whose path starts with `prefix` (a string prefix: "out" matches "output/a"), sorted by path. */
  async list(owner: string, prefix?: string): Promise<FileInfo[]> {
    checkOwner(owner);
    const query = prefix ? `?prefix=${encodeURIComponent(prefix)}` : '';
    const res = await this.send('GET', `/v1/owners/${owner}/files${query}`);
    if (res.statusCode !== 200) throw await failure(res, `list of ${owner}'s files`);
    return (JSON.parse(await readBody(res)) as { files: FileInfo[] }).files;
  }

  /**
   * The owner's images (files under `images/`) and the provider's base images, with format, sizes,
   * checksum and status ('inspecting' for a moment after an upload); `name` is what a task spec names.
   */
  async listImages(owner: string): Promise<ImageEntry[]> {
    checkOwner(owner);
    const res = await this.send('GET', `/v1/owners/${owner}/images`);
    if (res.statusCode !== 200) throw await failure(res, `list of ${owner}'s images`);
    return (JSON.parse(await readBody(res)) as { images: ImageEntry[] }).images;
  }

  /** Returns false if there was no such file. */
  async delete(owner: string, repoPath: string): Promise<boolean> {
    checkOwner(owner);
    const p = checkPath(repoPath);
    const res = await this.send('DELETE', this.filePath(owner, p));
    if (res.statusCode === 204) {
      res.resume();
      return true;
    }
    if (res.statusCode === 404) {
      const err = await failure(res, `delete of ${p}`);
      if (/no such file/.test(err.message)) return false;
      throw err;
    }
    throw await failure(res, `delete of ${p}`);
  }

  /**
   * Uploads a local file in chunks through a resumable session: transport failures are retried from
   * the offset the server holds, and a failed call throws a ResumableUploadError whose `uploadId`
   * continues the upload in a later call. The file appears on the server only once complete and
   * verified against the SHA-256 computed here before sending.
   */
  async uploadResumable(
    owner: string,
    repoPath: string,
    localFile: string,
    opts: ResumableUploadOptions = {},
  ): Promise<FileInfo> {
    checkOwner(owner);
    const p = checkPath(repoPath);
    const chunkBytes = opts.chunkBytes ?? DEFAULT_CHUNK_BYTES;
    const retries = opts.retries ?? DEFAULT_RETRIES;
    if (!Number.isSafeInteger(chunkBytes) || chunkBytes <= 0)
      throw new RepositoryError(0, `chunkBytes ${chunkBytes} is not a positive whole number`, {
        kind: 'invalid',
      });
    if (!Number.isSafeInteger(retries) || retries < 0)
      throw new RepositoryError(0, `retries ${retries} is not a non-negative whole number`, {
        kind: 'invalid',
      });
    let uploadId = opts.uploadId;
    const wrap = (err: unknown): ResumableUploadError => {
      if (err instanceof ResumableUploadError) return err;
      const status = err instanceof RepositoryError ? err.status : 0;
      const message = err instanceof Error ? err.message : String(err);
      return new ResumableUploadError(status, `resumable upload of ${p}: ${message}`, uploadId, {
        cause: err,
        kind: err instanceof RepositoryError ? err.kind : undefined,
      });
    };
    try {
      const { size } = await fs.stat(localFile);
      let offset: number;
      if (uploadId === undefined) {
        const request = JSON.stringify({ path: p, size, sha256: await sha256OfFile(localFile) });
        const res = await this.send(
          'POST',
          `/v1/owners/${owner}/uploads`,
          { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(request) },
          Readable.from([request]),
        );
        if (res.statusCode !== 201) throw await failure(res, 'start');
        const session = JSON.parse(await readBody(res)) as { id: string; offset: number };
        uploadId = session.id;
        offset = session.offset;
      } else {
        offset = await this.uploadOffset(owner, uploadId, size);
      }
      let failures = 0;
      for (;;) {
        opts.signal?.throwIfAborted();
        const end = Math.min(size, offset + chunkBytes);
        const body =
          end > offset
            ? createReadStream(localFile, { start: offset, end: end - 1, highWaterMark: 1 << 20 })
            : Readable.from([]);
        const stop = (): void => void body.destroy(new Error('upload aborted'));
        opts.signal?.addEventListener('abort', stop, { once: true });
        let res: IncomingMessage;
        try {
          res = await this.send(
            'PATCH',
            `/v1/owners/${owner}/uploads/${uploadId}`,
            {
              'Content-Type': 'application/offset+octet-stream',
              'Content-Length': end - offset,
              'Upload-Offset': offset,
            },
            body,
          );
        } catch (err) {
          opts.signal?.throwIfAborted();
          if (!(err instanceof RepositoryError) || ++failures > retries) throw err;
          await new Promise((r) => setTimeout(r, RETRY_DELAY_MS * failures));
          offset = await this.uploadOffset(owner, uploadId, size);
          continue;
        } finally {
          opts.signal?.removeEventListener('abort', stop);
        }
        if (res.statusCode === 201) {
          const info = JSON.parse(await readBody(res)) as FileInfo;
          opts.onProgress?.(size, size);
          return info;
        }
        const serverOffset = offsetOf(res);
        if (res.statusCode === 204 && serverOffset !== undefined) {
          res.resume();
          failures = 0;
          offset = serverOffset;
          opts.onProgress?.(offset, size);
          continue;
        }
        // Out of step (e.g. a retried chunk that did arrive): continue from where the server is.
        if (res.statusCode === 409 && serverOffset !== undefined && ++failures <= retries) {
          res.resume();
          offset = serverOffset;
          continue;
        }
        throw await failure(res, `append at ${offset}`);
      }
    } catch (err) {
      throw wrap(err);
    }
  }

  /** The bytes a resumable upload session holds; it must be for a file of `size` bytes. */
  private async uploadOffset(owner: string, uploadId: string, size: number): Promise<number> {
    if (!/^[A-Za-z0-9_-]+$/.test(uploadId))
      throw new RepositoryError(0, `upload id ${JSON.stringify(uploadId)} is malformed`, { kind: 'invalid' });
    const res = await this.send('HEAD', `/v1/owners/${owner}/uploads/${uploadId}`);
    res.resume();
    if (res.statusCode !== 200) throw await failure(res, `status of upload ${uploadId}`);
    const offset = offsetOf(res);
    const length = Number(res.headers['upload-length']);
    if (offset === undefined) throw new RepositoryError(0, `upload ${uploadId}: reply lacks Upload-Offset`);
    if (length !== size)
      throw new RepositoryError(
        0,
        `upload ${uploadId} is for ${length} bytes but the local file has ${size}`,
      );
    return offset;
  }

  /**
   * Revokes the credential this client presents (a task's capability): true when revoked now, false
   * when it no longer worked (revoked or expired before), which is the same end.
   */
  async revokeSelf(): Promise<boolean> {
    const res = await this.send('DELETE', '/v1/capabilities/self');
    if (res.statusCode !== 204 && res.statusCode !== 401)
      throw await failure(res, 'revoke of the capability');
    res.resume();
    return res.statusCode === 204;
  }

  /**
   * Appends to a running task's live log (the client presents that task's capability): `bytes` are the
   * log's from `offset` on (the end when undefined). Resolves with the log's size after it and whether
   * it is full; a gap (409) or refusal throws.
   */
  async appendTaskLog(
    owner: string,
    taskId: string,
    offset: number | undefined,
    bytes: Buffer,
    signal?: AbortSignal,
  ): Promise<{ size: number; full: boolean }> {
    checkOwner(owner);
    const q = offset === undefined ? '' : `?offset=${offset}`;
    const res = await this.send(
      'POST',
      `/v1/owners/${owner}/tasks/${encodeURIComponent(taskId)}/logs${q}`,
      { 'Content-Type': 'application/octet-stream', 'Content-Length': bytes.length },
      Readable.from([bytes]),
      true,
      signal,
    );
    if (res.statusCode !== 200) throw await failure(res, `append to the log of task ${taskId}`);
    return JSON.parse(await readBody(res)) as { size: number; full: boolean };
  }

  /** True if the server answers its health check. */
  async health(): Promise<boolean> {
    try {
      const res = await this.send('GET', '/v1/health', {}, undefined, false);
      res.resume();
      return res.statusCode === 200;
    } catch {
      return false;
    }
  }

  private filePath(owner: string, p: string): string {
    return `/v1/owners/${owner}/files/${p.split('/').map(encodeURIComponent).join('/')}`;
  }

  /**
   * Sends a request, streaming `body` with backpressure, and resolves with the reply as soon as its
   * headers arrive - even before the body is sent, so an early refusal is seen. Transport failures
   * become RepositoryError(0).
   */
  private send(
    method: string,
    apiPath: string,
    headers: OutgoingHttpHeaders = {},
    body?: NodeJS.ReadableStream,
    auth = true,
    signal?: AbortSignal,
  ): Promise<IncomingMessage> {
    const url = new URL(this.base.pathname.replace(/\/+$/, '') + apiPath, this.base);
    const transport = url.protocol === 'https:' ? https : http;
    const allHeaders: OutgoingHttpHeaders = auth
      ? { ...headers, Authorization: `Bearer ${this.token}` }
      : headers;
    return new Promise((resolve, reject) => {
      let answered = false;
      // Aborting destroys the request and its reply: a download or upload under way stops at once.
      const req = transport.request(url, { method, headers: allHeaders, signal });
      req.on('response', (res) => {
        answered = true;
        // A refusal mid-upload: stop sending once the reply has been read.
        if (body !== undefined && (res.statusCode ?? 0) >= 400) res.once('end', () => req.destroy());
        resolve(res);
      });
      req.on('error', (err) => {
        if (answered) return;
        if (signal?.aborted) reject(signal.reason);
        else reject(new RepositoryError(0, `${method} ${url.href} failed: ${err.message}`, { cause: err }));
      });
      if (body === undefined) {
        req.end();
        return;
      }
      pipeline(body, req).catch((err: unknown) => {
        if (!answered) {
          req.destroy();
          reject(new RepositoryError(0, `${method} ${url.href} failed while sending`, { cause: err }));
        }
      });
    });
  }
}
