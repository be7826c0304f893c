import {
  closeSync,
  constants as fsc,
  fstatSync,
  lstatSync,
  mkdirSync,
  openSync,
  renameSync,
  rmdirSync,
  unlinkSync,
} from 'node:fs';
import { promises as fs } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import { randomBytes } from 'node:crypto';
import path from 'node:path';
import type { Readable } from 'node:stream';
import { BASE_IMAGES_FOLDER } from '../../spec/taskSpec';
import { AccessDenied } from '../accounts/auth';
import { writeDurably } from '../../lib/durableWrite';
import { fsyncFile } from '../../storage/durableFile';
import type { BaseImageRow, FileRow, MetadataDb, OwnerRow, OwnerUsage } from './metadataDb';

/**
 * The owners' files on disk (`<dataDir>/files/<owner>/<path>`) kept in step with their metadata rows.
 * Protocol-neutral: callers pass owner names and paths already validated (OWNER_NAME,
 * normaliseRepoPath) and a byte stream; this module makes writes atomic and never follows a symlink.
 *
 * The commit of a write (mkdir, rename, metadata row) and a delete run synchronously, so within the
 * one process that owns a data dir they never interleave and the metadata always names the bytes on disk.
 *
 * Every owner also sees the provider's base images, read-only, in the folder BASE_IMAGES_FOLDER of its
 * space (`<dataDir>/base-images/<name>`, recorded in the base_images table). The refusal of writes there
 * lives here, below every protocol, so HTTP, SFTP and FTPS cannot differ on it.
 */

/** The provider's base images on disk; filled by imageStore.addBaseImage only. */
export function baseImagesDir(dataDir: string): string {
  return path.join(dataDir, 'base-images');
}

/** The base image a path names: '' for the folder itself, undefined if the path is outside it. */
function baseImageName(repoPath: string): string | undefined {
  if (repoPath === BASE_IMAGES_FOLDER) return '';
  return repoPath.startsWith(`${BASE_IMAGES_FOLDER}/`)
    ? repoPath.slice(BASE_IMAGES_FOLDER.length + 1)
    : undefined;
}

function refuseBaseImages(...repoPaths: string[]): void {
  for (const p of repoPaths) {
    if (baseImageName(p) !== undefined)
      throw new AccessDenied(
        403,
        `${BASE_IMAGES_FOLDER}/ holds the provider's base images: they are read-only (${p})`,
      );
  }
}

/** A base image as a file in an owner's view. */
export function baseImageFile(b: BaseImageRow): FileRow {
  return { path: `${BASE_IMAGES_FOLDER}/${b.name}`, size: b.size, sha256: b.sha256, mtime: b.mtime };
}

/** Called after a file appears at `repoPath` (written or renamed there). */
export type CommitListener = (owner: string, repoPath: string) => void;

export type StoreErrorCode =
  | 'not-found'
  | 'too-large'
  | 'quota-exceeded'
  | 'checksum-mismatch'
  | 'size-mismatch'
  | 'conflict'
  | 'corrupt';

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
  /** Up to `length` bytes from `position` (fewer at the end of the file), for protocols that read by offset. */
  read(position: number, length: number): Promise<Buffer>;
  /** For callers that end up not streaming (e.g. a 416). */
  close(): Promise<void>;
}

/** What a path names in an owner's space. Folders are implied by the files in them or made explicitly. */
export type Entry = { kind: 'file'; info: FileRow } | { kind: 'folder'; path: string };

/** One item of a folder listing. */
export type DirEntry = { name: string } & Entry;

/** An upload in progress, counted against its owner's quota before it is committed. */
interface PendingUpload {
  owner: string;
  path: string;
  bytes: number;
  /** Does it add a file (rather than replace one)? */
  adds: boolean;
  /** The owner's limits and stored totals, re-read during a transfer at most every QUOTA_REFRESH_MS. */
  snapshot?: { at: number; row?: OwnerRow; usage: OwnerUsage; replaced: number };
}

/** The final check at commit always reads afresh; this only bounds the work per received chunk. */
const QUOTA_REFRESH_MS = 1000;

/** Duck-typed: errors from Node's fs need not be `instanceof Error` of this realm (e.g. under jest). */
function isErrno(err: unknown, ...codes: string[]): boolean {
  const code = typeof err === 'object' && err !== null ? (err as NodeJS.ErrnoException).code : undefined;
  return typeof code === 'string' && codes.includes(code);
}

export class FileStore {
  private readonly filesDir: string;
  private readonly tmpDir: string;
  private readonly baseDir: string;
  private readonly pending = new Set<PendingUpload>();
  private readonly listeners: CommitListener[] = [];

  private constructor(
    dataDir: string,
    private readonly db: MetadataDb,
  ) {
    this.filesDir = path.join(dataDir, 'files');
    this.tmpDir = path.join(dataDir, 'tmp');
    this.baseDir = baseImagesDir(dataDir);
  }

  /** `listener` hears of every file committed or renamed into place, after the fact (errors are its own). */
  onCommit(listener: CommitListener): void {
    this.listeners.push(listener);
  }

  private notify(owner: string, repoPaths: string[]): void {
    for (const l of this.listeners) for (const p of repoPaths) l(owner, p);
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
    const upload: PendingUpload = {
      owner,
      path: repoPath,
      bytes: 0,
      adds: !this.db.getFile(owner, repoPath),
    };
    try {
      this.precheckWrite(owner, repoPath, limits.expectedSize);
    } catch (err) {
      source.destroy();
      throw err;
    }
    const tmp = path.join(this.tmpDir, `upload-${randomBytes(12).toString('hex')}`);
    this.pending.add(upload);
    try {
      return await writeDurably(
        source,
        tmp,
        {
          maxBytes: limits.maxBytes,
          tooLarge: (max) => new StoreError('too-large', `file is larger than the limit of ${max} bytes`),
          onChunk: (total) => {
            upload.bytes = total;
            this.checkQuota(upload, total, false);
          },
        },
        async ({ size, sha256 }) => {
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
          const dest = this.commitChecked(upload, tmp, info);
          await fsyncFile(path.dirname(dest)); // the rename is durable
          return info;
        },
      );
    } finally {
      this.pending.delete(upload);
    }
  }

  /**
   * Stores a file already complete and fsynced on the store's filesystem (a resumable upload's
   * partial file), whose size and SHA-256 the caller has counted as it was written: checked as
   * `write` checks, then renamed into place, never copied. `file` is consumed: renamed or removed.
   */
  async adopt(
    owner: string,
    repoPath: string,
    file: string,
    sum: { size: number; sha256: string },
  ): Promise<FileRow> {
    const upload: PendingUpload = {
      owner,
      path: repoPath,
      bytes: 0,
      adds: !this.db.getFile(owner, repoPath),
    };
    let committed = false;
    try {
      refuseBaseImages(repoPath);
      await fs.chmod(file, 0o644);
      const info: FileRow = { path: repoPath, ...sum, mtime: new Date().toISOString() };
      const dest = this.commitChecked(upload, file, info);
      committed = true;
      await fsyncFile(path.dirname(dest)); // the rename is durable
      return info;
    } finally {
      if (!committed) await fs.rm(file, { force: true });
    }
  }

  /** The quota check and commit, synchronous so the check cannot race another commit. */
  private commitChecked(upload: PendingUpload, tmp: string, info: FileRow): string {
    this.pending.delete(upload);
    upload.adds = !this.db.getFile(upload.owner, upload.path);
    this.checkQuota(upload, info.size);
    const dest = this.commit(upload.owner, upload.path, tmp, info);
    this.notify(upload.owner, [upload.path]);
    return dest;
  }

  /** Fails before any byte is sent if an upload of `expectedSize` bytes to `repoPath` cannot be stored. */
  precheckWrite(owner: string, repoPath: string, expectedSize = 0): void {
    refuseBaseImages(repoPath);
    if (this.entry(owner, repoPath)?.kind === 'folder')
      throw new StoreError('conflict', `${repoPath} is a folder`);
    this.checkQuota(
      { owner, path: repoPath, bytes: 0, adds: !this.db.getFile(owner, repoPath) },
      expectedSize,
    );
  }

  /**
   * Would `upload`, at `bytes`, fit in its owner's quota beside the stored files and the other uploads
   * in progress? The file it replaces does not count. Throws StoreError('quota-exceeded').
   */
  private checkQuota(upload: PendingUpload, bytes: number, fresh = true): void {
    let snap = upload.snapshot;
    if (fresh || !snap || Date.now() - snap.at > QUOTA_REFRESH_MS) {
      const replaced = upload.adds ? 0 : (this.db.getFile(upload.owner, upload.path)?.size ?? 0);
      snap = upload.snapshot = {
        at: Date.now(),
        row: this.db.getOwner(upload.owner),
        usage: this.db.usage(upload.owner),
        replaced,
      };
    }
    const { row, usage } = snap;
    if (!row || (row.quotaBytes === undefined && row.quotaFiles === undefined)) return;
    let otherBytes = 0;
    let otherAdds = 0;
    for (const p of this.pending) {
      if (p === upload || p.owner !== upload.owner) continue;
      otherBytes += p.bytes;
      if (p.adds) otherAdds++;
    }
    if (row.quotaFiles !== undefined && upload.adds && usage.files + otherAdds + 1 > row.quotaFiles) {
      throw new StoreError(
        'quota-exceeded',
        `${upload.owner} has reached the quota of ${row.quotaFiles} files (${usage.files} stored); nothing stored`,
      );
    }
    if (row.quotaBytes === undefined) return;
    const used = usage.bytes - snap.replaced + otherBytes;
    if (used + bytes > row.quotaBytes) {
      throw new StoreError(
        'quota-exceeded',
        `upload would exceed ${upload.owner}'s quota of ${row.quotaBytes} bytes (${used} in use); nothing stored`,
      );
    }
  }

  /** Opens a recorded file for reading, refusing anything but a regular file reached without symlinks. */
  async open(owner: string, repoPath: string): Promise<OpenFile> {
    const base = baseImageName(repoPath);
    const info = base ? this.baseImageRow(base) : this.db.getFile(owner, repoPath);
    if (!info) throw new StoreError('not-found', `no such file: ${repoPath}`);
    const dest = base ? path.join(this.baseDir, base) : this.checkedParents(owner, repoPath, false);
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
      read: async (position, length) => {
        const buf = Buffer.allocUnsafe(Math.max(0, Math.min(length, info.size - position)));
        let done = 0;
        while (done < buf.length) {
          const { bytesRead } = await handle.read(buf, done, buf.length - done, position + done);
          if (bytesRead === 0) break;
          done += bytesRead;
        }
        return buf.subarray(0, done);
      },
      close: () => handle.close(),
    };
  }

  /**
   * Opens an owner's stored file together with its metadata row in one synchronous step, so the bytes
   * are those the row describes (files are replaced by rename, never in place). For inspecting a file
   * with tools run on `/proc/<pid>/fd/<fd>`; the caller closes `fd`. Undefined if there is no such file.
   */
  openWithRow(owner: string, repoPath: string): { info: FileRow; fd: number } | undefined {
    const info = this.db.getFile(owner, repoPath);
    if (!info) return undefined;
    const fd = openSync(this.checkedParents(owner, repoPath, false), fsc.O_RDONLY | fsc.O_NOFOLLOW);
    try {
      const st = fstatSync(fd);
      if (!st.isFile() || st.size !== info.size)
        throw new StoreError('corrupt', `${repoPath} on disk does not match its metadata`);
    } catch (err) {
      closeSync(fd);
      throw err;
    }
    return { info, fd };
  }

  /** Returns false if there was no such file. Empty folders left behind are removed. */
  delete(owner: string, repoPath: string): boolean {
    refuseBaseImages(repoPath);
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
    this.removeEmptyParents(owner, dest);
    return true;
  }

  /** What `repoPath` names ('' is the owner's root folder), or undefined. */
  entry(owner: string, repoPath: string): Entry | undefined {
    if (repoPath === '') return { kind: 'folder', path: '' };
    const base = baseImageName(repoPath);
    if (base === '') return { kind: 'folder', path: repoPath };
    if (base !== undefined) {
      const info = this.baseImageRow(base);
      return info && { kind: 'file', info };
    }
    const info = this.db.getFile(owner, repoPath);
    if (info) return { kind: 'file', info };
    if (this.db.folderExists(owner, repoPath) || this.db.listFiles(owner, `${repoPath}/`).length > 0)
      return { kind: 'folder', path: repoPath };
    return undefined;
  }

  /** The files and folders directly in folder `dir` ('' for the root), by name. */
  readdir(owner: string, dir: string): DirEntry[] {
    const prefix = dir === '' ? '' : `${dir}/`;
    const base = baseImageName(dir);
    if (base !== undefined && base !== '') return [];
    if (base === '')
      return this.db.listBaseImages().map((b) => ({ name: b.name, kind: 'file', info: baseImageFile(b) }));
    const out = new Map<string, DirEntry>();
    if (dir === '')
      out.set(BASE_IMAGES_FOLDER, { name: BASE_IMAGES_FOLDER, kind: 'folder', path: BASE_IMAGES_FOLDER });
    for (const info of this.db.listFiles(owner, prefix)) {
      const rest = info.path.slice(prefix.length);
      const slash = rest.indexOf('/');
      if (slash < 0) out.set(rest, { name: rest, kind: 'file', info });
      else if (!out.has(rest.slice(0, slash)))
        out.set(rest.slice(0, slash), {
          name: rest.slice(0, slash),
          kind: 'folder',
          path: prefix + rest.slice(0, slash),
        });
    }
    for (const folder of this.db.listFolders(owner, prefix)) {
      const rest = folder.slice(prefix.length);
      const name = rest.split('/')[0];
      if (!out.has(name)) out.set(name, { name, kind: 'folder', path: prefix + name });
    }
    return [...out.values()].sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  }

  /** Makes an empty folder; its parent must be a folder and the name free. */
  makeFolder(owner: string, repoPath: string): void {
    refuseBaseImages(repoPath);
    this.requireFreeWithParent(owner, repoPath);
    this.db.insertFolder(owner, repoPath);
  }

  /** Removes an empty folder. */
  removeFolder(owner: string, repoPath: string): void {
    refuseBaseImages(repoPath);
    const e = this.entry(owner, repoPath);
    if (e?.kind !== 'folder' || repoPath === '')
      throw new StoreError('not-found', `no such folder: ${repoPath}`);
    if (this.readdir(owner, repoPath).length > 0)
      throw new StoreError('conflict', `folder ${repoPath} is not empty`);
    this.db.deleteFolder(owner, repoPath);
  }

  /**
   * Renames a file or folder within an owner's space. The target must not exist and its parent must
   * be a folder; a folder cannot move into itself. Disk and metadata change together.
   */
  rename(owner: string, from: string, to: string): void {
    refuseBaseImages(from, to);
    const src = this.entry(owner, from);
    if (!src || from === '') throw new StoreError('not-found', `no such file or folder: ${from}`);
    this.requireFreeWithParent(owner, to);
    if (src.kind === 'folder' && to.startsWith(`${from}/`))
      throw new StoreError('conflict', `cannot move folder ${from} into itself`);
    const onDisk =
      src.kind === 'file'
        ? this.checkedParents(owner, from, false)
        : this.checkedDirs(owner, from.split('/'), 'probe');
    const dest = this.checkedParents(owner, to, onDisk !== undefined);
    this.db.transaction(() => {
      if (src.kind === 'file') this.db.renameFile(owner, from, to);
      else this.db.renameTree(owner, from, to);
      if (onDisk !== undefined) renameSync(onDisk, dest); // a throw here rolls the metadata back
    });
    if (onDisk !== undefined) this.removeEmptyParents(owner, onDisk);
    this.notify(owner, src.kind === 'file' ? [to] : this.db.listFiles(owner, `${to}/`).map((f) => f.path));
  }

  private baseImageRow(name: string): FileRow | undefined {
    const b = this.db.getBaseImage(name);
    return b && baseImageFile(b);
  }

  private requireFreeWithParent(owner: string, repoPath: string): void {
    if (this.entry(owner, repoPath)) throw new StoreError('conflict', `${repoPath} already exists`);
    const parent = repoPath.includes('/') ? repoPath.slice(0, repoPath.lastIndexOf('/')) : '';
    if (this.entry(owner, parent)?.kind !== 'folder')
      throw new StoreError('not-found', `no such folder: ${parent}`);
  }

  private removeEmptyParents(owner: string, removed: string): void {
    const ownerDir = path.join(this.filesDir, owner);
    for (let dir = path.dirname(removed); dir !== ownerDir; dir = path.dirname(dir)) {
      try {
        rmdirSync(dir);
      } catch {
        break; // not empty (or already gone): its parents are not empty either
      }
    }
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
    const dir = this.checkedDirs(owner, segments.slice(0, -1), create ? 'create' : repoPath);
    return path.join(dir as string, segments[segments.length - 1]);
  }

  /**
   * Walks `<owner>/<dirs...>` on disk, refusing symlinks and files on the way. A missing folder is
   * made ('create'), ends the walk with undefined ('probe'), or is corruption of the recorded file
   * named by the string.
   */
  private checkedDirs(
    owner: string,
    dirs: string[],
    onMissing: 'create' | 'probe' | string,
  ): string | undefined {
    let dir = this.filesDir;
    for (const [i, seg] of [owner, ...dirs].entries()) {
      dir = path.join(dir, seg);
      const shown = i === 0 ? 'owner folder' : `'${dirs.slice(0, i).join('/')}'`;
      try {
        const st = lstatSync(dir);
        if (st.isSymbolicLink())
          throw new StoreError('corrupt', `${shown} is a symlink on disk; refusing it`);
        if (!st.isDirectory()) throw new StoreError('conflict', `${shown} is a file, not a folder`);
      } catch (err) {
        if (!isErrno(err, 'ENOENT')) throw err;
        if (onMissing === 'probe') return undefined;
        if (onMissing !== 'create')
          throw new StoreError('corrupt', `${onMissing} is recorded but ${shown} is missing on disk`);
        mkdirSync(dir, { mode: 0o755 });
      }
    }
    return dir;
  }
}
