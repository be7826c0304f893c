import { constants as fsc, createReadStream, promises as fs } from 'node:fs';
import { createHash, randomBytes, type Hash } from 'node:crypto';
import path from 'node:path';
import type { Readable } from 'node:stream';
import { z } from 'zod';
import { normaliseFilePath } from '../../spec/repoPath';
import { describeError, type Logger } from '../../logging/logger';
import { hashBefore, streamInto, writtenBefore } from '../../lib/durableWrite';
import { fsyncFile } from '../../storage/durableFile';
import { StoreError, type FileStore } from './fileStore';
import type { FileRow } from './metadataDb';
import type { MetadataStore } from './metadataStore';

/**
 * Resumable uploads by offset (HTTP: POST creates a session, PATCH appends at `Upload-Offset`, HEAD
 * tells the offset). The bytes gather in a private partial file outside the owner's space, hashed as
 * they are written; when the last one arrives the checksum is compared and FileStore.adopt checks the
 * quota and renames the partial file into place (no second copy), so a file is visible only once
 * complete. Sessions outlive a restart: each is a row in the metadata database whose offset counts only
 * bytes already fsynced in its partial file (so after a crash the file is cut back to it), and the running
 * hash, which cannot be saved, is recomputed from the partial file when a session is next used.
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

/**
 * Checks a request to start an upload before anything is kept: its fields, its size against the limit,
 * the owner's number of unfinished uploads and (with their sizes reserved, so many sessions cannot
 * outgrow it together) the quota.
 */
export async function admitUpload(
  store: FileStore,
  owner: string,
  body: unknown,
  maxFileBytes: number,
  unfinished: { size: number }[],
): Promise<{ req: CreateUploadRequest; repoPath: string }> {
  const parsed = createUploadRequest.safeParse(body);
  if (!parsed.success) {
    const issue = parsed.error.issues[0];
    throw new UploadError(400, `upload request: ${issue.path.join('.') || 'body'}: ${issue.message}`);
  }
  const req = parsed.data;
  let repoPath: string;
  try {
    repoPath = normaliseFilePath(req.path);
  } catch (err) {
    throw new UploadError(400, (err as Error).message);
  }
  if (req.size > maxFileBytes)
    throw new UploadError(413, `file of ${req.size} bytes is larger than the limit of ${maxFileBytes} bytes`);
  if (unfinished.length >= MAX_SESSIONS_PER_OWNER)
    throw new UploadError(
      429,
      `${owner} already has ${unfinished.length} unfinished uploads; finish or delete some`,
    );
  const reserved = unfinished.reduce((sum, s) => sum + s.size, 0);
  await store.precheckWrite(owner, repoPath, req.size + reserved);
  return { req, repoPath };
}

/** What the HTTP API needs of resumable uploads, whichever backend keeps them. */
export type Uploads = Pick<ResumableUploads, 'create' | 'get' | 'append' | 'abort' | 'close'>;

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
  /** SHA-256 of the partial file's `offset` bytes, extended by each append; recomputed after a restart. */
  hash?: Hash;
  /** An append or the commit is running: a second append waits its turn by being refused. */
  busy: boolean;
}

export type AppendResult = { done: false; offset: number } | { done: true; info: FileRow };

export interface ResumableUploadsOptions {
  dataDir: string;
  db: MetadataStore;
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
    private readonly db: MetadataStore,
    private readonly store: FileStore,
    private readonly maxFileBytes: number,
    private readonly log: Logger,
    private readonly expiryMs: number,
  ) {
    this.sweeper = setInterval(() => void this.sweep(), Math.min(60_000, Math.max(100, expiryMs / 4)));
    this.sweeper.unref();
  }

  /**
   * Takes back the sessions a previous run left: each partial file is cut back to its recorded offset
   * (bytes past it were never acknowledged); sessions whose file is gone or short, expired ones, and files
   * without a session are dropped.
   */
  static async open(opts: ResumableUploadsOptions): Promise<ResumableUploads> {
    const expiryMs = opts.expiryMs ?? DEFAULT_UPLOAD_EXPIRY_MS;
    if (!Number.isSafeInteger(expiryMs) || expiryMs <= 0)
      throw new Error(`upload expiry ${expiryMs} ms is not a positive whole number`);
    const dir = path.join(opts.dataDir, 'partial-uploads');
    await fs.mkdir(dir, { recursive: true, mode: 0o700 });
    const uploads = new ResumableUploads(dir, opts.db, opts.store, opts.maxFileBytes, opts.log, expiryMs);
    const kept = new Set<string>();
    for (const row of await opts.db.listUploadSessions()) {
      const s: Session = { ...row, offset: row.received, partial: path.join(dir, row.id), busy: false };
      if (await uploads.reopen(s)) kept.add(row.id);
    }
    for (const name of await fs.readdir(dir))
      if (!kept.has(name)) await fs.rm(path.join(dir, name), { recursive: true, force: true });
    return uploads;
  }

  /** Restores one recorded session; false (and the record dropped) if it cannot continue. */
  private async reopen(s: Session): Promise<boolean> {
    let why: string | undefined;
    if (s.expiresAt <= Date.now()) why = 'expired';
    else {
      try {
        const handle = await fs.open(s.partial, fsc.O_WRONLY | fsc.O_NOFOLLOW);
        try {
          const { size } = await handle.stat();
          if (size < s.offset) why = `its partial file holds ${size} of ${s.offset} recorded bytes`;
          else if (size > s.offset) {
            await handle.truncate(s.offset);
            await handle.sync();
          }
        } finally {
          await handle.close();
        }
      } catch (err) {
        why = `its partial file cannot be opened: ${describeError(err)}`;
      }
    }
    if (why !== undefined) {
      await this.db.deleteUploadSession(s.id);
      this.log.warn({ owner: s.owner, path: s.path, id: s.id, why }, 'resumable upload dropped at start');
      return false;
    }
    this.sessions.set(s.id, s);
    return true;
  }

  /** Starts a session for `req.path` in `owner`'s space, refusing early what could never be stored. */
  async create(owner: string, body: unknown): Promise<UploadSessionInfo> {
    const { req, repoPath } = await admitUpload(
      this.store,
      owner,
      body,
      this.maxFileBytes,
      [...this.sessions.values()].filter((s) => s.owner === owner),
    );
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
    // The new name is durable before it is recorded, so a recorded session never lacks its file.
    await fsyncFile(this.dir);
    await this.db.insertUploadSession({ ...describe(s), owner, received: 0, expiresAt: s.expiresAt });
    this.sessions.set(id, s);
    this.log.info({ owner, path: repoPath, size: req.size, id }, 'resumable upload started');
    return describe(s);
  }

  async get(owner: string, id: string): Promise<UploadSessionInfo> {
    return describe(this.find(owner, id));
  }

  /**
   * Appends `body` at `offset`, which must be the session's current offset (else 409 with the right
   * one). Whatever arrives before a disconnect is kept, durably: the partial file is fsynced before the
   * new offset is recorded. A refused request (a wrong offset, more bytes than announced, whether by
   * `length` before reading or by counting) changes nothing. On the last byte the file is committed.
   */
  async append(
    owner: string,
    id: string,
    offset: number,
    body: Readable,
    length?: number,
  ): Promise<AppendResult> {
    const s = this.find(owner, id);
    if (s.busy) throw new UploadError(409, 'another request is appending to this upload', offsetHeader(s));
    if (offset !== s.offset)
      throw new UploadError(
        409,
        `Upload-Offset ${offset} does not match the ${s.offset} bytes received`,
        offsetHeader(s),
      );
    const tooMany = (): UploadError =>
      new UploadError(400, `more bytes than the ${s.size} announced for this upload`, offsetHeader(s));
    if (length !== undefined && s.offset + length > s.size) throw tooMany();
    s.busy = true;
    try {
      const hash = s.hash ?? (await hashPrefix(s.partial, s.offset));
      const before = hash.copy();
      const room = s.size - s.offset;
      const handle = await fs.open(s.partial, fsc.O_WRONLY | fsc.O_APPEND | fsc.O_NOFOLLOW);
      let written = 0;
      let failure: unknown;
      try {
        written = (
          await streamInto(body, handle, {
            hash,
            onChunk: (total) => {
              if (total > room) throw tooMany();
            },
          })
        ).size;
        s.hash = hash;
      } catch (err) {
        failure = err;
        // A refusal keeps nothing of the request; a disconnect keeps what arrived, so a resume continues.
        const refused = err instanceof UploadError;
        written = refused ? 0 : writtenBefore(err);
        s.hash = refused ? before : (hashBefore(err) ?? before);
      } finally {
        // A write that failed partway may have left part of a chunk that was never hashed: it goes too.
        if ((await handle.stat()).size !== s.offset + written) await handle.truncate(s.offset + written);
        await handle.sync();
        await handle.close();
      }
      if (written > 0) {
        s.offset += written;
        s.expiresAt = Date.now() + this.expiryMs;
        await this.db.updateUploadSession(s.id, s.offset, s.expiresAt);
      }
      if (failure !== undefined) throw failure;
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

  /** Stops the sweeper; sessions stay on disk for the next start. */
  close(): void {
    clearInterval(this.sweeper);
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
      const sha256 = (s.hash ?? (await hashPrefix(s.partial, s.offset))).digest('hex');
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
    await this.db.deleteUploadSession(s.id);
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

export function describe(s: Omit<Session, 'partial' | 'busy' | 'owner'>): UploadSessionInfo {
  return {
    id: s.id,
    path: s.path,
    size: s.size,
    ...(s.sha256 !== undefined && { sha256: s.sha256 }),
    offset: s.offset,
    expires: new Date(s.expiresAt).toISOString(),
  };
}

/** SHA-256 of the first `bytes` bytes of `file` (a session's running hash, after a restart). */
async function hashPrefix(file: string, bytes: number): Promise<Hash> {
  const hash = createHash('sha256');
  if (bytes === 0) return hash;
  const stream = createReadStream(file, { start: 0, end: bytes - 1, highWaterMark: 1 << 20 });
  for await (const chunk of stream) hash.update(chunk as Buffer);
  return hash;
}

export function offsetHeader(s: { offset: number; size: number }): Record<string, string> {
  return { 'Upload-Offset': String(s.offset), 'Upload-Length': String(s.size) };
}
