import { randomBytes } from 'node:crypto';
import { PassThrough, type Readable } from 'node:stream';
import { describeError, type Logger } from '../../logging/logger';
import type { FileBytes } from './backend';
import type { FileStore } from './fileStore';
import type { FileRow } from './metadataDb';
import type { PgMetadata } from './pgMetadata';
import {
  admitUpload,
  DEFAULT_UPLOAD_EXPIRY_MS,
  describe,
  offsetHeader,
  UploadError,
  type AppendResult,
  type Uploads,
  type UploadSessionInfo,
} from './resumableUploads';

/**
 * Resumable uploads on the `cluster` backend, where a resume may land on any server: a session is a
 * PostgreSQL row and each acknowledged append one object in the S3 store (upload_parts), so no server
 * holds state of its own. An append is received whole into its object, then recorded only if the session
 * is still at the offset it was sent for (one conditional UPDATE), so two servers appending at one
 * offset cannot both count; bytes of an append that fails midway are not kept (the client resends from
 * the offset it is told). The last append streams the parts, in order, through FileStore.write, which
 * checks the size, the SHA-256 and the quota and commits the file atomically, as every upload is.
 */
export class SharedUploads implements Uploads {
  private readonly sweeper: NodeJS.Timeout;

  constructor(
    private readonly db: PgMetadata,
    private readonly store: FileStore,
    private readonly bytes: FileBytes,
    private readonly maxFileBytes: number,
    private readonly log: Logger,
    private readonly expiryMs = DEFAULT_UPLOAD_EXPIRY_MS,
  ) {
    this.sweeper = setInterval(() => void this.sweep(), Math.min(60_000, Math.max(100, expiryMs / 4)));
    this.sweeper.unref();
  }

  async create(owner: string, body: unknown): Promise<UploadSessionInfo> {
    const now = Date.now();
    const unfinished = (await this.db.listUploadSessions()).filter(
      (s) => s.owner === owner && s.expiresAt > now,
    );
    const { req, repoPath } = await admitUpload(this.store, owner, body, this.maxFileBytes, unfinished);
    const row = {
      id: randomBytes(18).toString('base64url'),
      owner,
      path: repoPath,
      size: req.size,
      sha256: req.sha256,
      received: 0,
      expiresAt: now + this.expiryMs,
    };
    await this.db.insertUploadSession(row);
    this.log.info({ owner, path: repoPath, size: req.size, id: row.id }, 'resumable upload started');
    return describe({ ...row, offset: 0 });
  }

  async get(owner: string, id: string): Promise<UploadSessionInfo> {
    const s = await this.find(owner, id);
    return describe({ ...s, offset: s.received });
  }

  async append(
    owner: string,
    id: string,
    offset: number,
    body: Readable,
    length?: number,
  ): Promise<AppendResult> {
    const s = await this.find(owner, id);
    const at = { offset: s.received, size: s.size };
    const refuse = (status: number, message: string): UploadError => {
      body.destroy();
      return new UploadError(status, message, offsetHeader(at));
    };
    if (offset !== s.received)
      throw refuse(409, `Upload-Offset ${offset} does not match the ${s.received} bytes received`);
    const room = s.size - s.received;
    const tooMany = `more bytes than the ${s.size} announced for this upload`;
    if (length !== undefined && length > room) throw refuse(400, tooMany);
    if (room > 0) {
      await this.bytes.receive(
        body,
        { maxBytes: room, tooLarge: () => new UploadError(400, tooMany, offsetHeader(at)) },
        async (part) => {
          if (part.size === 0) return this.bytes.discard(part);
          const ok = await this.db.appendUploadPart(
            id,
            offset,
            part.size,
            part.ref,
            Date.now() + this.expiryMs,
          );
          if (!ok)
            throw new UploadError(409, 'another request appended to this upload first', offsetHeader(at));
        },
      );
      const now = await this.find(owner, id);
      if (now.received < now.size) return { done: false, offset: now.received };
    } else body.resume();
    return { done: true, info: await this.commit(s) };
  }

  async abort(owner: string, id: string): Promise<void> {
    await this.find(owner, id);
    await this.drop(id);
  }

  close(): void {
    clearInterval(this.sweeper);
  }

  private async find(owner: string, id: string) {
    const s = await this.db.getUploadSession(id);
    if (!s || s.owner !== owner || s.expiresAt <= Date.now())
      throw new UploadError(404, `no such upload: ${id}`);
    return s;
  }

  /** Streams the parts, in order, into the store: checked (size, SHA-256, quota) and committed there. */
  private async commit(s: {
    id: string;
    owner: string;
    path: string;
    size: number;
    sha256?: string;
  }): Promise<FileRow> {
    const parts = await this.db.uploadParts(s.id);
    const joined = new PassThrough({ highWaterMark: 1 << 20 });
    const feed = (async () => {
      for (const p of parts) {
        const part = await this.bytes.open(s.owner, {
          path: `upload ${s.id}`,
          size: p.size,
          sha256: '',
          mtime: '',
          blob: p.blob,
        });
        for await (const chunk of part.createReadStream())
          if (!joined.write(chunk)) await new Promise((r) => joined.once('drain', r));
      }
      joined.end();
    })().catch((err: unknown) => joined.destroy(err as Error));
    try {
      const info = await this.store.write(s.owner, s.path, joined, {
        maxBytes: this.maxFileBytes,
        expectedSize: s.size,
        expectedSha256: s.sha256,
      });
      this.log.info({ owner: s.owner, path: s.path, size: info.size, id: s.id }, 'resumable upload stored');
      return info;
    } finally {
      await feed;
      // Stored, or refused for good (checksum, quota, a folder in the way): the session is over either way.
      await this.drop(s.id);
    }
  }

  private async drop(id: string): Promise<void> {
    const blobs = await this.db.claimUploadSession(id);
    for (const blob of blobs ?? [])
      await this.bytes.release('', { path: `upload ${id}`, size: 0, sha256: '', mtime: '', blob }, false);
  }

  private async sweep(): Promise<void> {
    const now = Date.now();
    for (const s of await this.db.listUploadSessions().catch(() => [])) {
      if (s.expiresAt > now) continue;
      try {
        await this.drop(s.id);
        this.log.info({ owner: s.owner, path: s.path, id: s.id }, 'resumable upload expired');
      } catch (err) {
        this.log.warn({ id: s.id, err: describeError(err) }, 'could not remove an expired upload');
      }
    }
  }
}
