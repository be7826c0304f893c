import { constants as fsc, promises as fs } from 'node:fs';
import { createHash, randomBytes, type Hash } from 'node:crypto';
import path from 'node:path';
import { Transform, type Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { z } from 'zod';
import { normaliseRepoPath } from '../spec/repoPath';
import { describeError, type Logger } from '../logging/logger';
import { fileSink } from './fileSink';
import { StoreError, type FileStore } from './fileStore';
import type { FileRow } from './metadataDb';

/**
 * Resumable uploads by offset (HTTP: POST creates a session, PATCH appends at `Upload-Offset`, HEAD
 * tells the offset). The bytes gather in a private partial file outside the owner's space, hashed as
 * they are written; when the last one arrives the checksum is compared and FileStore.adopt checks the
 * quota and renames the partial file into place (no second copy), so a file is visible only once
 * complete. Sessions live in memory: a restart drops them with their partial files (the store's other
 * temp files go the same way), so the running hash never has to outlive the process.
 */

export const DEFAULT_UPLOAD_EXPIRY_MS = 24 * 3600_000;
/** Bounds the disk an owner can hold in partial files that the quota does not see yet. */
const MAX_SESSIONS_PER_OWNER = 64;
const SHA256_HEX = /^[0-9a-f]{64}$/;

/** A refusal with the HTTP status it maps to (and headers such as the current Upload-Offset). */
export class UploadError extends Error {
  constructor(
    readonly status: number,
    message: string,
    readonly headers: Record<string, string> = {},
  ) {
    super(message);
    this.name = 'UploadError';
  }
}

export const createUploadRequest = z.object({
  path: z.string(),
  size: z.number().int().nonnegative(),
  sha256: z
    .string()
    .transform((s) => s.toLowerCase())
    .refine((s) => SHA256_HEX.test(s), 'sha256 must be 64 hex digits')
    .optional(),
});
export type CreateUploadRequest = z.infer<typeof createUploadRequest>;

export interface UploadSessionInfo {
  id: string;
  path: string;
  size: number;
  sha256?: string;
  /** Bytes received so far. */
  offset: number;
  /** ISO 8601; every append pushes it back. */
  expires: string;
}

interface Session {
  id: string;
  owner: string;
  path: string;
  size: number;
  sha256?: string;
  offset: number;
  expiresAt: number;
  partial: string;
  /** SHA-256 of the partial file's `offset` bytes, extended by each append. */
  hash: Hash;
  /** An append or the commit is running: a second append waits its turn by being refused. */
  busy: boolean;
}

export type AppendResult = { done: false; offset: number } | { done: true; info: FileRow };

export interface ResumableUploadsOptions {
  dataDir: string;
  store: FileStore;
  maxFileBytes: number;
  log: Logger;
  expiryMs?: number;
}

export class ResumableUploads {
  private readonly sessions = new Map<string, Session>();
  private readonly sweeper: NodeJS.Timeout;

  private constructor(
    private readonly dir: string,
    private readonly store: FileStore,
    private readonly maxFileBytes: number,
    private readonly log: Logger,
    private readonly expiryMs: number,
  ) {
    this.sweeper = setInterval(() => void this.sweep(), Math.min(60_000, Math.max(100, expiryMs / 4)));
    this.sweeper.unref();
  }

  /** Clears partial files a previous run left (their sessions died with it). */
  static async open(opts: ResumableUploadsOptions): Promise<ResumableUploads> {
    const expiryMs = opts.expiryMs ?? DEFAULT_UPLOAD_EXPIRY_MS;
    if (!Number.isSafeInteger(expiryMs) || expiryMs <= 0)
      throw new Error(`upload expiry ${expiryMs} ms is not a positive whole number`);
    const dir = path.join(opts.dataDir, 'partial-uploads');
    await fs.rm(dir, { recursive: true, force: true });
    await fs.mkdir(dir, { recursive: true, mode: 0o700 });
    return new ResumableUploads(dir, opts.store, opts.maxFileBytes, opts.log, expiryMs);
  }

  /** Starts a session for `req.path` in `owner`'s space, refusing early what could never be stored. */
  async create(owner: string, body: unknown): Promise<UploadSessionInfo> {
    const parsed = createUploadRequest.safeParse(body);
    if (!parsed.success) {
      const issue = parsed.error.issues[0];
      throw new UploadError(400, `upload request: ${issue.path.join('.') || 'body'}: ${issue.message}`);
    }
    const req = parsed.data;
    let repoPath: string;
    try {
      repoPath = normaliseRepoPath(req.path);
    } catch (err) {
      throw new UploadError(400, (err as Error).message);
    }
    if (req.size > this.maxFileBytes)
      throw new UploadError(
        413,
        `file of ${req.size} bytes is larger than the limit of ${this.maxFileBytes} bytes`,
      );
    const mine = [...this.sessions.values()].filter((s) => s.owner === owner);
    if (mine.length >= MAX_SESSIONS_PER_OWNER)
      throw new UploadError(
        429,
        `${owner} already has ${mine.length} unfinished uploads; finish or delete some`,
      );
    // The other sessions' bytes are reserved too, so many sessions cannot outgrow the quota together.
    const reserved = mine.reduce((sum, s) => sum + s.size, 0);
    this.store.precheckWrite(owner, repoPath, req.size + reserved);
    const id = randomBytes(18).toString('base64url');
    const partial = path.join(this.dir, id);
    await (await fs.open(partial, fsc.O_WRONLY | fsc.O_CREAT | fsc.O_EXCL | fsc.O_NOFOLLOW, 0o600)).close();
    const s: Session = {
      id,
      owner,
      path: repoPath,
      size: req.size,
      sha256: req.sha256,
      offset: 0,
      expiresAt: Date.now() + this.expiryMs,
      partial,
      hash: createHash('sha256'),
      busy: false,
    };
    this.sessions.set(id, s);
    this.log.info({ owner, path: repoPath, size: req.size, id }, 'resumable upload started');
    return describe(s);
  }

  get(owner: string, id: string): UploadSessionInfo {
    return describe(this.find(owner, id));
  }

  /**
   * Appends `body` at `offset`, which must be the session's current offset (else 409 with the right
   * one). Whatever arrives before a disconnect is kept. On the last byte the file is committed.
   */
  async append(owner: string, id: string, offset: number, body: Readable): Promise<AppendResult> {
    const s = this.find(owner, id);
    if (s.busy) throw new UploadError(409, 'another request is appending to this upload', offsetHeader(s));
    if (offset !== s.offset)
      throw new UploadError(
        409,
        `Upload-Offset ${offset} does not match the ${s.offset} bytes received`,
        offsetHeader(s),
      );
    s.busy = true;
    try {
      const room = s.size - s.offset;
      let received = 0;
      const meter = new Transform({
        highWaterMark: 1 << 20,
        transform: (chunk: Buffer, _enc, done) => {
          received += chunk.length;
          if (received > room)
            done(
              new UploadError(
                400,
                `more bytes than the ${s.size} announced for this upload`,
                offsetHeader(s),
              ),
            );
          else done(null, chunk);
        },
      });
      const handle = await fs.open(s.partial, fsc.O_WRONLY | fsc.O_APPEND | fsc.O_NOFOLLOW);
      let written = s.offset;
      const onWritten = (chunk: Buffer): void => {
        s.hash.update(chunk);
        written += chunk.length;
      };
      try {
        await pipeline(body, meter, fileSink(handle, { onWritten }));
      } finally {
        // Keep what did arrive, durably, so a resume continues from there. A write that failed partway
        // may have left part of a chunk that was never hashed: it goes, so file and hash stay in step.
        if ((await handle.stat()).size !== written) await handle.truncate(written);
        await handle.sync();
        s.offset = written;
        s.expiresAt = Date.now() + this.expiryMs;
        await handle.close();
      }
      if (s.offset < s.size) return { done: false, offset: s.offset };
      return { done: true, info: await this.commit(s) };
    } finally {
      s.busy = false;
    }
  }

  /** Drops a session and its bytes. */
  async abort(owner: string, id: string): Promise<void> {
    const s = this.find(owner, id);
    if (s.busy)
      throw new UploadError(409, 'the upload is busy; retry once its request ends', offsetHeader(s));
    await this.drop(s);
  }

  async close(): Promise<void> {
    clearInterval(this.sweeper);
    await Promise.all([...this.sessions.values()].map((s) => this.drop(s)));
  }

  /** Sessions of other owners are as invisible as unknown ones. */
  private find(owner: string, id: string): Session {
    const s = this.sessions.get(id);
    if (!s || s.owner !== owner || s.expiresAt <= Date.now())
      throw new UploadError(404, `no such upload: ${id}`);
    return s;
  }

  private async commit(s: Session): Promise<FileRow> {
    try {
      const sha256 = s.hash.digest('hex');
      if (s.sha256 !== undefined && sha256 !== s.sha256) {
        throw new StoreError(
          'checksum-mismatch',
          `content SHA-256 is ${sha256} but ${s.sha256} was announced; nothing stored`,
        );
      }
      const info = await this.store.adopt(s.owner, s.path, s.partial, { size: s.offset, sha256 });
      this.log.info({ owner: s.owner, path: s.path, size: info.size, id: s.id }, 'resumable upload stored');
      return info;
    } finally {
      // Stored, or refused for good (checksum, quota, a folder in the way): the session is over either way.
      await this.drop(s);
    }
  }

  private async drop(s: Session): Promise<void> {
    this.sessions.delete(s.id);
    await fs.rm(s.partial, { force: true });
  }

  private async sweep(): Promise<void> {
    const now = Date.now();
    for (const s of [...this.sessions.values()]) {
      if (s.busy || s.expiresAt > now) continue;
      try {
        await this.drop(s);
        this.log.info({ owner: s.owner, path: s.path, id: s.id }, 'resumable upload expired');
      } catch (err) {
        this.log.warn({ id: s.id, err: describeError(err) }, 'could not remove an expired upload');
      }
    }
  }
}

function describe(s: Session): UploadSessionInfo {
  return {
    id: s.id,
    path: s.path,
    size: s.size,
    ...(s.sha256 !== undefined && { sha256: s.sha256 }),
    offset: s.offset,
    expires: new Date(s.expiresAt).toISOString(),
  };
}

function offsetHeader(s: Session): Record<string, string> {
  return { 'Upload-Offset': String(s.offset), 'Upload-Length': String(s.size) };
}
