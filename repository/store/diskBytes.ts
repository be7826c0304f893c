import {
  closeSync,
  constants as fsc,
  fstatSync,
  lstatSync,
  openSync,
  mkdirSync,
  promises as fs,
  renameSync,
  rmdirSync,
  unlinkSync,
} from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import { randomBytes } from 'node:crypto';
import path from 'node:path';
import type { Readable } from 'node:stream';
import { writeDurably } from '../../lib/durableWrite';
import { fsyncFile } from '../../storage/durableFile';
import type { FileBytes, OpenBytes, ReceiveOptions, Received, Staged } from './backend';
import type { StoredFile } from './metadataStore';
import { StoreError } from './storeError';
import { baseImagesDir } from './fileStore';

/**
 * The `local` backend's file bytes: `<dataDir>/files/<owner>/<path>`, written to a temp file, fsynced and
 * renamed into place, never through a symlink: every folder on the way is checked (and made one by one),
 * so a symlink planted on disk can never redirect a write or a read out of the owner's space.
 */

/** Duck-typed: errors from Node's fs need not be `instanceof Error` of this realm (e.g. under jest). */
export function isErrno(err: unknown, ...codes: string[]): boolean {
  const code = typeof err === 'object' && err !== null ? (err as NodeJS.ErrnoException).code : undefined;
  return typeof code === 'string' && codes.includes(code);
}

/** Opens `file` read-only without following a symlink and checks it is a regular file of `size` bytes. */
export async function openRegular(file: string, shown: string, size: number): Promise<OpenBytes> {
  let handle: FileHandle;
  try {
    handle = await fs.open(file, fsc.O_RDONLY | fsc.O_NOFOLLOW);
  } catch (err) {
    if (isErrno(err, 'ENOENT')) throw new StoreError('corrupt', `${shown} is recorded but missing on disk`);
    if (isErrno(err, 'ELOOP')) throw new StoreError('corrupt', `${shown} is a symlink on disk; refusing it`);
    throw err;
  }
  try {
    const st = await handle.stat();
    if (!st.isFile()) throw new StoreError('corrupt', `${shown} is not a regular file on disk`);
    if (st.size !== size)
      throw new StoreError('corrupt', `${shown} is ${st.size} bytes on disk but ${size} in the metadata`);
  } catch (err) {
    await handle.close();
    throw err;
  }
  return {
    createReadStream: (range) => handle.createReadStream({ ...range, highWaterMark: 1 << 20 }),
    read: async (position, length) => {
      const buf = Buffer.allocUnsafe(Math.max(0, Math.min(length, size - position)));
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

export class DiskBytes implements FileBytes {
  private constructor(
    private readonly filesDir: string,
    private readonly tmpDir: string,
    private readonly baseDir: string,
  ) {}

  /** Creates the folders; a server (one process owns a data dir) clears the temp files a crash left. */
  static async open(dataDir: string, serving = true): Promise<DiskBytes> {
    const bytes = new DiskBytes(
      path.join(dataDir, 'files'),
      path.join(dataDir, 'tmp'),
      baseImagesDir(dataDir),
    );
    await fs.mkdir(bytes.filesDir, { recursive: true, mode: 0o700 });
    if (serving) await fs.rm(bytes.tmpDir, { recursive: true, force: true });
    await fs.mkdir(bytes.tmpDir, { recursive: true, mode: 0o700 });
    return bytes;
  }

  receive<T>(source: Readable, opts: ReceiveOptions, commit: (staged: Staged) => Promise<T>): Promise<T> {
    const tmp = path.join(this.tmpDir, `upload-${randomBytes(12).toString('hex')}`);
    return writeDurably(source, tmp, opts, (written) => commit({ ...written, ref: tmp }));
  }

  async stageLocalFile(file: string, sum: Received): Promise<Staged> {
    return { ...sum, ref: file };
  }

  async discard(staged: Staged): Promise<void> {
    await fs.rm(staged.ref, { force: true });
  }

  async install(owner: string, repoPath: string, staged: Staged): Promise<undefined> {
    const dest = this.checkedParents(owner, repoPath, true);
    try {
      if (lstatSync(dest).isDirectory()) throw new StoreError('conflict', `${repoPath} is a folder`);
    } catch (err) {
      if (!isErrno(err, 'ENOENT')) throw err;
    }
    await fs.chmod(staged.ref, 0o644);
    renameSync(staged.ref, dest); // replaces a file (or a stray symlink) atomically, never follows it
    await fsyncFile(path.dirname(dest)); // the rename is durable
    return undefined;
  }

  open(owner: string, file: StoredFile): Promise<OpenBytes> {
    return openRegular(this.checkedParents(owner, file.path, false), file.path, file.size);
  }

  async release(owner: string, file: StoredFile, replaced: boolean): Promise<void> {
    if (replaced) return; // the new file's rename took its place
    let dest: string;
    try {
      dest = this.checkedParents(owner, file.path, false);
    } catch (err) {
      // Nothing safe to unlink (a folder is missing or is a symlink): forgetting the record was enough.
      if (err instanceof StoreError) return;
      throw err;
    }
    try {
      unlinkSync(dest); // unlink never follows a symlink
    } catch (err) {
      if (!isErrno(err, 'ENOENT')) throw err;
    }
    this.removeEmptyParents(owner, dest);
  }

  async move(owner: string, from: string, to: string, kind: 'file' | 'folder'): Promise<void> {
    const onDisk =
      kind === 'file'
        ? this.checkedParents(owner, from, false)
        : this.checkedDirs(owner, from.split('/'), 'probe');
    if (onDisk === undefined) return; // an empty folder made explicitly has nothing on disk
    renameSync(onDisk, this.checkedParents(owner, to, true));
    this.removeEmptyParents(owner, onDisk);
  }

  async withLocalFile<T>(owner: string, file: StoredFile, fn: (localPath: string) => Promise<T>): Promise<T> {
    const fd = openSync(this.checkedParents(owner, file.path, false), fsc.O_RDONLY | fsc.O_NOFOLLOW);
    try {
      const st = fstatSync(fd);
      if (!st.isFile() || st.size !== file.size)
        throw new StoreError('corrupt', `${file.path} on disk does not match its metadata`);
      // Through our own descriptor: a rename over the path meanwhile cannot change what is read.
      return await fn(`/proc/${process.pid}/fd/${fd}`);
    } finally {
      closeSync(fd);
    }
  }

  openBase(name: string, size: number): Promise<OpenBytes> {
    return openRegular(path.join(this.baseDir, name), `base image ${name}`, size);
  }

  async installBase(name: string, localFile: string): Promise<void> {
    await fs.mkdir(this.baseDir, { recursive: true, mode: 0o755 });
    renameSync(localFile, path.join(this.baseDir, name));
    await fsyncFile(this.baseDir);
  }

  async removeBase(name: string): Promise<void> {
    await fs.rm(path.join(this.baseDir, name), { force: true });
  }

  /** In the base images' folder (the one filesystem their rename needs); a dot name is never an image's. */
  tempPath(): string {
    return path.join(this.baseDir, `.incoming-${randomBytes(12).toString('hex')}`);
  }

  async close(): Promise<void> {}

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
