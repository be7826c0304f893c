import { constants as fsc, lstatSync, mkdirSync, renameSync, rmdirSync, unlinkSync } from 'node:fs';
import { promises as fs } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import { createHash, randomBytes } from 'node:crypto';
import path from 'node:path';
import { Transform, type Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { fileSink } from './fileSink';
import type { FileRow, MetadataDb } from './metadataDb';

/**
 * The owners' files on disk (`<dataDir>/files/<owner>/<path>`) kept in step with their metadata rows.
 * Protocol-neutral: callers pass owner names and paths already validated (OWNER_NAME,
 * normaliseRepoPath) and a byte stream; this module makes writes atomic and never follows a symlink.
 *
 * The commit of a write (mkdir, rename, metadata row) and a delete run synchronously, so within the
 * one process that owns a data dir they never interleave and the metadata always names the bytes on disk.
 */

export type StoreErrorCode =
  'not-found' | 'too-large' | 'checksum-mismatch' | 'size-mismatch' | 'conflict' | 'corrupt';

export class StoreError extends Error {
  constructor(
    readonly code: StoreErrorCode,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
    this.name = 'StoreError';
  }
}

export interface WriteLimits {
  maxBytes: number;
  /** Lower-case hex; a mismatch stores nothing. */
  expectedSha256?: string;
  expectedSize?: number;
}

export interface OpenFile {
  info: FileRow;
  /** Inclusive byte range, like HTTP's; the stream closes the file when it ends or is destroyed. */
  createReadStream(range?: { start: number; end: number }): Readable;
  /** For callers that end up not streaming (e.g. a 416). */
  close(): Promise<void>;
}

/** Duck-typed: errors from Node's fs need not be `instanceof Error` of this realm (e.g. under jest). */
function isErrno(err: unknown, ...codes: string[]): boolean {
  const code = typeof err === 'object' && err !== null ? (err as NodeJS.ErrnoException).code : undefined;
  return typeof code === 'string' && codes.includes(code);
}

export class FileStore {
  private readonly filesDir: string;
  private readonly tmpDir: string;

  private constructor(
    dataDir: string,
    private readonly db: MetadataDb,
  ) {
    this.filesDir = path.join(dataDir, 'files');
    this.tmpDir = path.join(dataDir, 'tmp');
  }

  /** Creates the folders and clears temp files left by a crash (one process owns a data dir). */
  static async open(dataDir: string, db: MetadataDb): Promise<FileStore> {
    const store = new FileStore(dataDir, db);
    await fs.mkdir(store.filesDir, { recursive: true, mode: 0o700 });
    await fs.rm(store.tmpDir, { recursive: true, force: true });
    await fs.mkdir(store.tmpDir, { recursive: true, mode: 0o700 });
    return store;
  }

  list(owner: string, prefix?: string): FileRow[] {
    return this.db.listFiles(owner, prefix);
  }

  /**
   * Streams `source` into a temp file (hashing and counting as it goes), fsyncs it, then renames it
   * into place and records it. Any failure, including `source` erroring on a client disconnect,
   * leaves neither the file nor the temp file. `source` is destroyed on failure.
   */
  async write(owner: string, repoPath: string, source: Readable, limits: WriteLimits): Promise<FileRow> {
    const tmp = path.join(this.tmpDir, `upload-${randomBytes(12).toString('hex')}`);
    const handle = await fs.open(tmp, fsc.O_WRONLY | fsc.O_CREAT | fsc.O_EXCL | fsc.O_NOFOLLOW, 0o600);
    const hash = createHash('sha256');
    let size = 0;
    const meter = new Transform({
      highWaterMark: 1 << 20,
      transform(chunk: Buffer, _enc, done) {
        size += chunk.length;
        if (size > limits.maxBytes) {
          done(new StoreError('too-large', `file is larger than the limit of ${limits.maxBytes} bytes`));
          return;
        }
        hash.update(chunk);
        done(null, chunk);
      },
    });
    let committed = false;
    try {
      try {
        await pipeline(source, meter, fileSink(handle));
        await handle.sync();
        await handle.chmod(0o644);
      } finally {
        await handle.close();
      }
      const sha256 = hash.digest('hex');
      if (limits.expectedSize !== undefined && size !== limits.expectedSize) {
        throw new StoreError(
          'size-mismatch',
          `received ${size} bytes but ${limits.expectedSize} were announced`,
        );
      }
      if (limits.expectedSha256 !== undefined && sha256 !== limits.expectedSha256) {
        throw new StoreError(
          'checksum-mismatch',
          `content SHA-256 is ${sha256} but ${limits.expectedSha256} was announced; nothing stored`,
        );
      }
      const info: FileRow = { path: repoPath, size, sha256, mtime: new Date().toISOString() };
      const dest = this.commit(owner, repoPath, tmp, info);
      committed = true;
      await syncDir(path.dirname(dest));
      return info;
    } finally {
      if (!committed) await fs.rm(tmp, { force: true });
    }
  }

  /** Opens a recorded file for reading, refusing anything but a regular file reached without symlinks. */
  async open(owner: string, repoPath: string): Promise<OpenFile> {
    const info = this.db.getFile(owner, repoPath);
    if (!info) throw new StoreError('not-found', `no such file: ${repoPath}`);
    const dest = this.checkedParents(owner, repoPath, false);
    let handle: FileHandle;
    try {
      handle = await fs.open(dest, fsc.O_RDONLY | fsc.O_NOFOLLOW);
    } catch (err) {
      if (isErrno(err, 'ENOENT'))
        throw new StoreError('corrupt', `${repoPath} is recorded but missing on disk`);
      if (isErrno(err, 'ELOOP'))
        throw new StoreError('corrupt', `${repoPath} is a symlink on disk; refusing it`);
      throw err;
    }
    try {
      const st = await handle.stat();
      if (!st.isFile()) throw new StoreError('corrupt', `${repoPath} is not a regular file on disk`);
      if (st.size !== info.size) {
        throw new StoreError(
          'corrupt',
          `${repoPath} is ${st.size} bytes on disk but ${info.size} in the metadata`,
        );
      }
    } catch (err) {
      await handle.close();
      throw err;
    }
    return {
      info,
      createReadStream: (range) => handle.createReadStream({ ...range, highWaterMark: 1 << 20 }),
      close: () => handle.close(),
    };
  }

  /** Returns false if there was no such file. Empty folders left behind are removed. */
  delete(owner: string, repoPath: string): boolean {
    if (!this.db.getFile(owner, repoPath)) return false;
    let dest: string;
    try {
      dest = this.checkedParents(owner, repoPath, false);
    } catch (err) {
      // Nothing safe to unlink (a folder is missing or is a symlink): forgetting the record is enough.
      if (!(err instanceof StoreError)) throw err;
      return this.db.deleteFile(owner, repoPath);
    }
    try {
      unlinkSync(dest); // unlink never follows a symlink
    } catch (err) {
      if (!isErrno(err, 'ENOENT')) throw err;
    }
    this.db.deleteFile(owner, repoPath);
    const ownerDir = path.join(this.filesDir, owner);
    for (let dir = path.dirname(dest); dir !== ownerDir; dir = path.dirname(dir)) {
      try {
        rmdirSync(dir);
      } catch {
        break; // not empty (or already gone): its parents are not empty either
      }
    }
    return true;
  }

  private commit(owner: string, repoPath: string, tmp: string, info: FileRow): string {
    const dest = this.checkedParents(owner, repoPath, true);
    try {
      if (lstatSync(dest).isDirectory()) throw new StoreError('conflict', `${repoPath} is a folder`);
    } catch (err) {
      if (!isErrno(err, 'ENOENT')) throw err;
    }
    renameSync(tmp, dest); // replaces a file (or a stray symlink) atomically, never follows it
    this.db.upsertFile(owner, info);
    return dest;
  }

  /**
   * The on-disk path of `repoPath`, after checking that every folder on the way is a real folder
   * (not a symlink, not a file). With `create`, missing folders are made one by one, so a symlink
   * can never redirect a mkdir out of the owner's space.
   */
  private checkedParents(owner: string, repoPath: string, create: boolean): string {
    const segments = repoPath.split('/');
    let dir = this.filesDir;
    for (const [i, seg] of [owner, ...segments.slice(0, -1)].entries()) {
      dir = path.join(dir, seg);
      const shown = i === 0 ? 'owner folder' : `'${segments.slice(0, i).join('/')}'`;
      try {
        const st = lstatSync(dir);
        if (st.isSymbolicLink())
          throw new StoreError('corrupt', `${shown} is a symlink on disk; refusing it`);
        if (!st.isDirectory()) throw new StoreError('conflict', `${shown} is a file, not a folder`);
      } catch (err) {
        if (!isErrno(err, 'ENOENT')) throw err;
        if (!create)
          throw new StoreError('corrupt', `${repoPath} is recorded but ${shown} is missing on disk`);
        mkdirSync(dir, { mode: 0o755 });
      }
    }
    return path.join(dir, segments[segments.length - 1]);
  }
}

/** Makes a rename durable. */
async function syncDir(dir: string): Promise<void> {
  const handle = await fs.open(dir, fsc.O_RDONLY | fsc.O_DIRECTORY);
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}
