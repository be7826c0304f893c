import { rm } from 'node:fs/promises';
import path from 'node:path';
import type { Readable } from 'node:stream';
import { BASE_IMAGES_FOLDER } from '../../spec/taskSpec';
import { AccessDenied } from '../accounts/auth';
import type { FileBytes, Staged } from './backend';
import type { BaseImageRow, FileRow, OwnerRow, OwnerUsage } from './metadataDb';
import type { MetadataStore } from './metadataStore';
import { StoreError } from './storeError';

export { StoreError, type StoreErrorCode } from './storeError';

/**
 * The owners' files: their metadata rows (MetadataStore) kept in step with their bytes (FileBytes: the
 * data dir on `local`, the object store on `cluster`). Protocol-neutral: callers pass owner names and
 * paths already validated (OWNER_NAME, normaliseRepoPath) and a byte stream; this module makes writes
 * atomic and enforces quotas.
 *
 * A write's bytes are received and made durable first; then one metadata transaction locks the owner's
 * row, checks the quota afresh, installs the bytes and records the row, so two commits (on one server or
 * on many) cannot both fit the last of a quota, and a file is visible only once complete.
 *
 * Every owner also sees the provider's base images, read-only, in the folder BASE_IMAGES_FOLDER of its
 * space (recorded in the base_images table). The refusal of writes there lives here, below every
 * protocol, so HTTP, SFTP and FTPS cannot differ on it.
 */

/** The provider's base images on a `local` data dir; filled by imageStore.addBaseImage only. */
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
  snapshot: QuotaSnapshot;
  refreshing?: Promise<void>;
}

interface QuotaSnapshot {
  at: number;
  row?: OwnerRow;
  usage: OwnerUsage;
  /** The size of the file the upload replaces (0 if it adds one). */
  replaced: number;
}

/** The final check at commit always reads afresh; this only bounds the work per received chunk. */
const QUOTA_REFRESH_MS = 1000;

export class FileStore {
  /** This server's uploads in progress; other servers' are seen only when they commit. */
  private readonly pending = new Set<PendingUpload>();
  private readonly listeners: CommitListener[] = [];

  constructor(
    private readonly db: MetadataStore,
    readonly bytes: FileBytes,
  ) {}

  /** `listener` hears of every file committed or renamed into place, after the fact (errors are its own). */
  onCommit(listener: CommitListener): void {
    this.listeners.push(listener);
  }

  private notify(owner: string, repoPaths: string[]): void {
    for (const l of this.listeners) for (const p of repoPaths) l(owner, p);
  }

  list(owner: string, prefix?: string): Promise<FileRow[]> {
    return this.db.listFiles(owner, prefix);
  }

  /**
   * Receives `source` (hashing and counting as it goes) durably into a staging place, then commits it.
   * Any failure, including `source` erroring on a client disconnect, leaves neither the file nor the
   * staged bytes. `source` is destroyed on failure.
   */
  async write(owner: string, repoPath: string, source: Readable, limits: WriteLimits): Promise<FileRow> {
    let upload: PendingUpload;
    try {
      upload = await this.precheck(owner, repoPath, limits.expectedSize ?? 0);
    } catch (err) {
      source.destroy();
      throw err;
    }
    this.pending.add(upload);
    try {
      return await this.bytes.receive(
        source,
        {
          maxBytes: limits.maxBytes,
          tooLarge: (max) => new StoreError('too-large', `file is larger than the limit of ${max} bytes`),
          onChunk: (total) => {
            upload.bytes = total;
            this.checkQuotaSoon(upload, total);
          },
        },
        async (staged) => {
          if (limits.expectedSize !== undefined && staged.size !== limits.expectedSize) {
            throw new StoreError(
              'size-mismatch',
              `received ${staged.size} bytes but ${limits.expectedSize} were announced`,
            );
          }
          if (limits.expectedSha256 !== undefined && staged.sha256 !== limits.expectedSha256) {
            throw new StoreError(
              'checksum-mismatch',
              `content SHA-256 is ${staged.sha256} but ${limits.expectedSha256} was announced; nothing stored`,
            );
          }
          return this.commitChecked(upload, staged);
        },
      );
    } finally {
      this.pending.delete(upload);
    }
  }

  /**
   * Stores a complete local file (a resumable upload's partial file, fsynced) whose size and SHA-256
   * the caller counted as it was written: checked as `write` checks, then installed (on `local` renamed
   * into place, never copied). `file` is consumed: stored or removed.
   */
  async adopt(
    owner: string,
    repoPath: string,
    file: string,
    sum: { size: number; sha256: string },
  ): Promise<FileRow> {
    let staged: Staged | undefined;
    try {
      refuseBaseImages(repoPath);
      staged = await this.bytes.stageLocalFile(file, sum);
      const upload = { owner, path: repoPath, bytes: 0, adds: false, snapshot: emptySnapshot() };
      const info = await this.commitChecked(upload, staged);
      staged = undefined;
      return info;
    } finally {
      await rm(file, { force: true });
      if (staged) await this.bytes.discard(staged);
    }
  }

  /**
   * The quota check and commit in one transaction holding the owner's row: the check reads the stored
   * totals afresh, so no commit on any server can slip between it and the row. The replaced file's bytes
   * go once the new row is committed.
   */
  private async commitChecked(upload: PendingUpload, staged: Staged): Promise<FileRow> {
    this.pending.delete(upload);
    const info: FileRow = {
      path: upload.path,
      size: staged.size,
      sha256: staged.sha256,
      mtime: new Date().toISOString(),
    };
    const replaced = await this.db.transaction(async (tx) => {
      const row = await tx.lockOwner(upload.owner);
      const old = await tx.getStoredFile(upload.owner, upload.path);
      if (await this.folderAt(tx, upload.owner, upload.path))
        throw new StoreError('conflict', `${upload.path} is a folder`);
      await this.refuseFileParents(tx, upload.owner, upload.path);
      upload.adds = !old;
      upload.snapshot = {
        at: Date.now(),
        row,
        usage: await tx.usage(upload.owner),
        replaced: old?.size ?? 0,
      };
      this.checkQuota(upload, info.size);
      const blob = await this.bytes.install(upload.owner, upload.path, staged);
      await tx.upsertFile(upload.owner, info, blob);
      return old;
    });
    if (replaced) await this.bytes.release(upload.owner, replaced, true);
    this.notify(upload.owner, [upload.path]);
    return info;
  }

  /** Fails before any byte is sent if an upload of `expectedSize` bytes to `repoPath` cannot be stored. */
  async precheckWrite(owner: string, repoPath: string, expectedSize = 0): Promise<void> {
    await this.precheck(owner, repoPath, expectedSize);
  }

  private async precheck(owner: string, repoPath: string, expectedSize: number): Promise<PendingUpload> {
    refuseBaseImages(repoPath);
    if ((await this.entry(owner, repoPath))?.kind === 'folder')
      throw new StoreError('conflict', `${repoPath} is a folder`);
    await this.refuseFileParents(this.db, owner, repoPath);
    const old = await this.db.getFile(owner, repoPath);
    const upload: PendingUpload = {
      owner,
      path: repoPath,
      bytes: 0,
      adds: !old,
      snapshot: await this.snapshot(owner, old?.size ?? 0),
    };
    this.checkQuota(upload, expectedSize);
    return upload;
  }

  private async snapshot(owner: string, replaced: number): Promise<QuotaSnapshot> {
    const [row, usage] = await Promise.all([this.db.getOwner(owner), this.db.usage(owner)]);
    return { at: Date.now(), row, usage, replaced };
  }

  /** The check per received chunk: against the snapshot, refreshed in the background when it is old. */
  private checkQuotaSoon(upload: PendingUpload, bytes: number): void {
    if (!upload.refreshing && Date.now() - upload.snapshot.at > QUOTA_REFRESH_MS) {
      upload.refreshing = this.snapshot(upload.owner, upload.snapshot.replaced)
        .then((snap) => void (upload.snapshot = snap))
        .catch(() => undefined) // the commit's check reads afresh anyway
        .finally(() => (upload.refreshing = undefined));
    }
    this.checkQuota(upload, bytes);
  }

  /**
   * Would `upload`, at `bytes`, fit in its owner's quota beside the stored files and this server's other
   * uploads in progress? The file it replaces does not count. Throws StoreError('quota-exceeded').
   */
  private checkQuota(upload: PendingUpload, bytes: number): void {
    const { row, usage, replaced } = upload.snapshot;
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
    const used = usage.bytes - replaced + otherBytes;
    if (used + bytes > row.quotaBytes) {
      throw new StoreError(
        'quota-exceeded',
        `upload would exceed ${upload.owner}'s quota of ${row.quotaBytes} bytes (${used} in use); nothing stored`,
      );
    }
  }

  /** Opens a recorded file for reading (on `local`, a regular file reached without symlinks). */
  async open(owner: string, repoPath: string): Promise<OpenFile> {
    const base = baseImageName(repoPath);
    if (base) {
      const info = await this.baseImageRow(base);
      if (!info) throw new StoreError('not-found', `no such file: ${repoPath}`);
      return { info, ...(await this.bytes.openBase(base, info.size)) };
    }
    const stored = await this.db.getStoredFile(owner, repoPath);
    if (!stored) throw new StoreError('not-found', `no such file: ${repoPath}`);
    const { blob: _blob, ...info } = stored;
    return { info, ...(await this.bytes.open(owner, stored)) };
  }

  /**
   * Runs `fn` on a local path holding exactly the bytes the file's row describes (for tools such as
   * qemu-img), with that row; undefined if there is no such file or it was replaced meanwhile (its new
   * content is then seen by its own commit).
   */
  async withContent<T>(
    owner: string,
    repoPath: string,
    fn: (localPath: string, info: FileRow) => Promise<T>,
  ): Promise<T | undefined> {
    const stored = await this.db.getStoredFile(owner, repoPath);
    if (!stored) return undefined;
    const { blob: _blob, ...info } = stored;
    return this.bytes.withLocalFile(owner, stored, async (file) => {
      // On `local` the bytes at a path change by rename: after opening them, the row must still be theirs.
      const now = await this.db.getFile(owner, repoPath);
      if (!now || now.sha256 !== info.sha256 || now.mtime !== info.mtime) return undefined;
      return fn(file, info);
    });
  }

  /** Returns false if there was no such file. Empty folders left behind are removed. */
  async delete(owner: string, repoPath: string): Promise<boolean> {
    refuseBaseImages(repoPath);
    const gone = await this.db.transaction(async (tx) => {
      const stored = await tx.getStoredFile(owner, repoPath);
      if (stored) await tx.deleteFile(owner, repoPath);
      return stored;
    });
    if (!gone) return false;
    await this.bytes.release(owner, gone, false);
    return true;
  }

  /** What `repoPath` names ('' is the owner's root folder), or undefined. */
  async entry(owner: string, repoPath: string): Promise<Entry | undefined> {
    if (repoPath === '') return { kind: 'folder', path: '' };
    const base = baseImageName(repoPath);
    if (base === '') return { kind: 'folder', path: repoPath };
    if (base !== undefined) {
      const info = await this.baseImageRow(base);
      return info && { kind: 'file', info };
    }
    const info = await this.db.getFile(owner, repoPath);
    if (info) return { kind: 'file', info };
    if (await this.folderAt(this.db, owner, repoPath)) return { kind: 'folder', path: repoPath };
    return undefined;
  }

  /** A path's parents are folders: none of them may be a file (whatever the backend keeps on disk). */
  private async refuseFileParents(db: MetadataStore, owner: string, repoPath: string): Promise<void> {
    const parts = repoPath.split('/');
    for (let i = 1; i < parts.length; i++) {
      const parent = parts.slice(0, i).join('/');
      if (await db.getFile(owner, parent))
        throw new StoreError('conflict', `'${parent}' is a file, not a folder`);
    }
  }

  private async folderAt(db: MetadataStore, owner: string, repoPath: string): Promise<boolean> {
    return (await db.folderExists(owner, repoPath)) || (await db.listFiles(owner, `${repoPath}/`)).length > 0;
  }

  /** The files and folders directly in folder `dir` ('' for the root), by name. */
  async readdir(owner: string, dir: string): Promise<DirEntry[]> {
    const prefix = dir === '' ? '' : `${dir}/`;
    const base = baseImageName(dir);
    if (base !== undefined && base !== '') return [];
    if (base === '')
      return (await this.db.listBaseImages()).map((b) => ({
        name: b.name,
        kind: 'file',
        info: baseImageFile(b),
      }));
    const out = new Map<string, DirEntry>();
    if (dir === '')
      out.set(BASE_IMAGES_FOLDER, { name: BASE_IMAGES_FOLDER, kind: 'folder', path: BASE_IMAGES_FOLDER });
    for (const info of await this.db.listFiles(owner, prefix)) {
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
    for (const folder of await this.db.listFolders(owner, prefix)) {
      const rest = folder.slice(prefix.length);
      const name = rest.split('/')[0];
      if (!out.has(name)) out.set(name, { name, kind: 'folder', path: prefix + name });
    }
    return [...out.values()].sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  }

  /** Makes an empty folder; its parent must be a folder and the name free. */
  async makeFolder(owner: string, repoPath: string): Promise<void> {
    refuseBaseImages(repoPath);
    await this.requireFreeWithParent(owner, repoPath);
    await this.db.insertFolder(owner, repoPath);
  }

  /** Removes an empty folder. */
  async removeFolder(owner: string, repoPath: string): Promise<void> {
    refuseBaseImages(repoPath);
    const e = await this.entry(owner, repoPath);
    if (e?.kind !== 'folder' || repoPath === '')
      throw new StoreError('not-found', `no such folder: ${repoPath}`);
    if ((await this.readdir(owner, repoPath)).length > 0)
      throw new StoreError('conflict', `folder ${repoPath} is not empty`);
    await this.db.deleteFolder(owner, repoPath);
  }

  /**
   * Renames a file or folder within an owner's space. The target must not exist and its parent must
   * be a folder; a folder cannot move into itself. Bytes and metadata change together.
   */
  async rename(owner: string, from: string, to: string): Promise<void> {
    refuseBaseImages(from, to);
    const src = await this.entry(owner, from);
    if (!src || from === '') throw new StoreError('not-found', `no such file or folder: ${from}`);
    await this.requireFreeWithParent(owner, to);
    if (src.kind === 'folder' && to.startsWith(`${from}/`))
      throw new StoreError('conflict', `cannot move folder ${from} into itself`);
    await this.db.transaction(async (tx) => {
      if (src.kind === 'file') await tx.renameFile(owner, from, to);
      else await tx.renameTree(owner, from, to);
      await this.bytes.move(owner, from, to, src.kind); // a throw here rolls the metadata back
    });
    this.notify(
      owner,
      src.kind === 'file' ? [to] : (await this.db.listFiles(owner, `${to}/`)).map((f) => f.path),
    );
  }

  private async baseImageRow(name: string): Promise<FileRow | undefined> {
    const b = await this.db.getBaseImage(name);
    return b && baseImageFile(b);
  }

  private async requireFreeWithParent(owner: string, repoPath: string): Promise<void> {
    if (await this.entry(owner, repoPath)) throw new StoreError('conflict', `${repoPath} already exists`);
    const parent = repoPath.includes('/') ? repoPath.slice(0, repoPath.lastIndexOf('/')) : '';
    if ((await this.entry(owner, parent))?.kind !== 'folder')
      throw new StoreError('not-found', `no such folder: ${parent}`);
  }
}

function emptySnapshot(): QuotaSnapshot {
  return { at: 0, usage: { bytes: 0, files: 0 }, replaced: 0 };
}
