import { promises as fs } from 'node:fs';
import path from 'node:path';
import type { Readable } from 'node:stream';
import { runCommand } from '../../lib/runCommand';
import { describeError, type Logger } from '../../logging/logger';
import { BASE_IMAGE_NAME, BASE_IMAGE_PREFIX } from '../../spec/taskSpec';
import { writeDurably } from '../../lib/durableWrite';
import { ImageCache } from '../../storage/imageCache';
import { baseImageFile, StoreError, type FileStore } from './fileStore';
import type { RepositoryBackend } from './backend';
import type { BaseImageRow, ImageInfoRow } from './metadataDb';
import type { MetadataStore } from './metadataStore';
import { RefusedRequest } from '../refusedRequest';

/**
 * The VM image store: owners' images (files under IMAGES_FOLDER of their space, uploaded by any
 * protocol) and the provider's base images (`<dataDir>/base-images`, read-only for owners). Every
 * image is inspected by its content, never its name: `qemu-img info` for the facts, then the same
 * checks a host applies before booting it (storage/imageCache.ts), so "ok" here means a host will take it.
 * Results are kept per content hash, so renames and copies reuse them.
 */

/** Owners keep their images here; files elsewhere can still be named in a task spec, but are not listed. */
export const IMAGES_FOLDER = 'images';

const QEMU_IMG_INFO_TIMEOUT_MS = 60_000;

export interface ImageEntry {
  /** What a task spec's `image` names: the owner's path, or `base:<name>`. */
  name: string;
  /** Where it is in the owner's view of the repository. */
  path: string;
  origin: 'owner' | 'provider';
  /** 'inspecting' until the inspection that follows an upload has finished. */
  status: 'ok' | 'invalid' | 'inspecting';
  format?: string;
  virtualBytes?: number;
  /** The file's size. */
  bytes: number;
  /** Bytes allocated on disk (qemu-img's actual-size). */
  actualBytes?: number;
  hasBackingFile?: boolean;
  sha256: string;
  mtime: string;
  /** Why an invalid image cannot be used. */
  error?: string;
}

interface QemuImgFacts {
  format?: string;
  'virtual-size'?: number;
  'actual-size'?: number;
  'backing-filename'?: string;
}

/** A wrong input to the image store (a bad name, a name taken, an invalid base image): the caller's fault. */
export class ImageStoreError extends RefusedRequest {}

export function isOwnerImagePath(repoPath: string): boolean {
  return repoPath.startsWith(`${IMAGES_FOLDER}/`);
}

/**
 * Inspects the image at `file` (`name` is how messages call it): what qemu-img reads in it, and whether
 * a host would boot it. Never throws for a bad image: that is an 'invalid' result with the reason.
 */
export async function inspectImage(
  file: string,
  name: string,
  sha256: string,
  maxVirtualBytes = Number.MAX_SAFE_INTEGER,
): Promise<ImageInfoRow> {
  const inspected = new Date().toISOString();
  let facts: QemuImgFacts;
  try {
    const { stdout } = await runCommand('qemu-img', ['info', '--output=json', file], {
      timeoutMs: QEMU_IMG_INFO_TIMEOUT_MS,
    });
    facts = JSON.parse(stdout) as QemuImgFacts;
  } catch {
    // qemu-img's own message names the path it was given (a descriptor under /proc), not the image.
    return { sha256, status: 'invalid', error: `${name} is not a readable disk image`, inspected };
  }
  const row: ImageInfoRow = {
    sha256,
    status: 'ok',
    format: facts.format,
    virtualBytes: facts['virtual-size'],
    actualBytes: facts['actual-size'],
    hasBackingFile: facts['backing-filename'] !== undefined,
    inspected,
  };
  // A host only accepts backing files inside its own cache, which an uploaded image cannot name.
  if (row.hasBackingFile)
    return {
      ...row,
      status: 'invalid',
      error: `${name} has a backing file (${facts['backing-filename']}): images must be self-contained`,
    };
  try {
    // The cache folder is never used: validate() only reads it for backing files, excluded above.
    await new ImageCache({ dir: path.dirname(path.resolve(file)), maxVirtualBytes }).validate(file, name);
    return row;
  } catch (err) {
    return { ...row, status: 'invalid', error: (err as Error).message };
  }
}

function toEntry(
  file: { path: string; size: number; sha256: string; mtime: string },
  origin: ImageEntry['origin'],
  name: string,
  info: ImageInfoRow | undefined,
): ImageEntry {
  return {
    name,
    path: file.path,
    origin,
    status: info?.status ?? 'inspecting',
    format: info?.format,
    virtualBytes: info?.virtualBytes,
    bytes: file.size,
    actualBytes: info?.actualBytes,
    hasBackingFile: info?.hasBackingFile,
    sha256: file.sha256,
    mtime: file.mtime,
    error: info?.error,
  };
}

async function baseEntry(db: MetadataStore, b: BaseImageRow): Promise<ImageEntry> {
  return toEntry(
    baseImageFile(b),
    'provider',
    `${BASE_IMAGE_PREFIX}${b.name}`,
    await db.getImageInfo(b.sha256),
  );
}

export async function listBaseImages(db: MetadataStore): Promise<ImageEntry[]> {
  return Promise.all((await db.listBaseImages()).map((b) => baseEntry(db, b)));
}

function checkBaseName(name: string): void {
  if (!BASE_IMAGE_NAME.test(name))
    throw new ImageStoreError(
      'invalid',
      `base image name ${JSON.stringify(name)} must match ${BASE_IMAGE_NAME}`,
    );
}

/** The parts of a backend the base images need. */
export type BaseImageBackend = Pick<RepositoryBackend, 'metadata' | 'bytes'>;

/**
 * Adds a provider base image from `source` (streamed to a temp file, hashed, fsynced, inspected, then
 * moved into the backend's store): refused, leaving nothing, if the name is taken or the image is not one
 * a host would boot. Used by the admin CLI (on the repository host) and the admin HTTP API alike.
 */
export async function addBaseImage(
  backend: BaseImageBackend,
  name: string,
  source: Readable,
  maxBytes = Number.MAX_SAFE_INTEGER,
): Promise<ImageEntry> {
  const { metadata: db, bytes } = backend;
  try {
    checkBaseName(name);
    if (await db.getBaseImage(name))
      throw new ImageStoreError('conflict', `base image ${name} already exists`);
  } catch (err) {
    source.destroy();
    throw err;
  }
  const tmp = bytes.tempPath();
  await fs.mkdir(path.dirname(tmp), { recursive: true, mode: 0o755 });
  return writeDurably(
    source,
    tmp,
    {
      maxBytes,
      tooLarge: (max) => new StoreError('too-large', `base image is larger than the limit of ${max} bytes`),
      mode: 0o444,
    },
    async ({ size, sha256 }) => {
      const info = await inspectImage(tmp, `${BASE_IMAGE_PREFIX}${name}`, sha256);
      if (info.status !== 'ok')
        throw new ImageStoreError('invalid', info.error ?? `base image ${name} is invalid`);
      const row: BaseImageRow = { name, size, sha256, mtime: new Date().toISOString() };
      // The name is claimed by the row before the bytes move, so two adds of one name cannot both move.
      await db.transaction(async (tx) => {
        if (!(await tx.insertBaseImage(row)))
          throw new ImageStoreError('conflict', `base image ${name} already exists`);
        await tx.putImageInfo(info);
        await bytes.installBase(name, tmp); // a throw here rolls the rows back
      });
      return baseEntry(db, row);
    },
  );
}

/** Removes a base image; hosts keep their cached copy, so running tasks are unaffected. */
export async function removeBaseImage(backend: BaseImageBackend, name: string): Promise<void> {
  checkBaseName(name);
  if (!(await backend.metadata.deleteBaseImage(name)))
    throw new ImageStoreError('not-found', `no such base image: ${name}`);
  await backend.bytes.removeBase(name);
}

export interface ImageStoreOptions {
  db: MetadataStore;
  store: FileStore;
  log: Logger;
  /** Images with a larger virtual size are listed invalid (hosts have their own limit too). */
  maxVirtualBytes?: number;
}

/**
 * Inspects owners' images in the background, one at a time, as they are stored (any protocol: it
 * listens to FileStore's commits) and, after a restart, when a listing finds one not yet inspected.
 */
export class ImageStore {
  private readonly queue: { owner: string; path: string }[] = [];
  private readonly queued = new Set<string>();
  private running: Promise<void> | undefined;
  private closed = false;

  constructor(private readonly opts: ImageStoreOptions) {
    opts.store.onCommit((owner, repoPath) => {
      if (isOwnerImagePath(repoPath)) this.inspectLater(owner, repoPath);
    });
  }

  /** The owner's images, then the provider's base images. */
  async list(owner: string): Promise<ImageEntry[]> {
    const { db } = this.opts;
    const own = await Promise.all(
      (await db.listFiles(owner, `${IMAGES_FOLDER}/`)).map(async (f) => {
        const info = await db.getImageInfo(f.sha256);
        if (!info) this.inspectLater(owner, f.path);
        return toEntry(f, 'owner', f.path, info);
      }),
    );
    return [...own, ...(await listBaseImages(db))];
  }

  /** Adds a provider base image (admin API); see addBaseImage. */
  addBase(name: string, source: Readable, maxBytes?: number): Promise<ImageEntry> {
    return addBaseImage(this.backend(), name, source, maxBytes);
  }

  removeBase(name: string): Promise<void> {
    return removeBaseImage(this.backend(), name);
  }

  private backend(): BaseImageBackend {
    return { metadata: this.opts.db, bytes: this.opts.store.bytes };
  }

  inspectLater(owner: string, repoPath: string): void {
    const key = `${owner}\0${repoPath}`;
    if (this.closed || this.queued.has(key)) return;
    this.queued.add(key);
    this.queue.push({ owner, path: repoPath });
    this.running ??= this.drain().finally(() => (this.running = undefined));
  }

  /** Waits for the inspection in progress (qemu-img is bounded in time) and drops the rest. */
  async close(): Promise<void> {
    this.closed = true;
    this.queue.length = 0;
    await this.running;
  }

  private async drain(): Promise<void> {
    for (let job = this.queue.shift(); job && !this.closed; job = this.queue.shift()) {
      this.queued.delete(`${job.owner}\0${job.path}`);
      try {
        await this.inspect(job.owner, job.path);
      } catch (err) {
        // Not recorded: a file gone or replaced meanwhile is inspected again when next stored or listed.
        this.opts.log.warn({ ...job, err: describeError(err) }, 'image inspection failed');
      }
    }
  }

  /**
   * Inspects the file's content once per SHA-256: a content already inspected (here, or by another
   * server sharing the metadata) is not inspected again.
   */
  private async inspect(owner: string, repoPath: string): Promise<void> {
    const { db, store, log } = this.opts;
    await store.withContent(owner, repoPath, async (file, info) => {
      if (await db.getImageInfo(info.sha256)) return;
      const result = await inspectImage(file, repoPath, info.sha256, this.opts.maxVirtualBytes);
      await db.putImageInfo(result);
      log.info({ owner, path: repoPath, status: result.status, format: result.format }, 'image inspected');
    });
  }
}
