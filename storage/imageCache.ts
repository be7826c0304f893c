import { createHash, randomBytes } from 'node:crypto';
import { createReadStream, constants as fsConstants, promises as fs } from 'node:fs';
import path from 'node:path';
import { fsyncFile, writeFileAtomic } from './durableFile';
import { runCommand } from '../lib/runCommand';
import { createLogger } from '../logging/logger';

export type ImageFormat = 'qcow2' | 'raw';

export interface ImageInfo {
  format: ImageFormat;
  virtualBytes: number;
  /** Absolute path of the backing file (always inside the cache), if any. */
  backingFile?: string;
}

export interface CachedImage extends ImageInfo {
  /** Absolute path in the cache: <dir>/<sha256>.<format>. */
  path: string;
  sha256: string;
}

const SHA256 = /^[0-9a-f]{64}$/;
const QEMU_IMG_TIMEOUT_MS = 5 * 60_000;
const EXT4_MAGIC_OFFSET = 1080;
const EXT4_MAGIC = 0xef53;

interface QemuImgInfo {
  format: string;
  'virtual-size': number;
  'backing-filename'?: string;
  'full-backing-filename'?: string;
  'format-specific'?: { data?: { 'data-file'?: string } };
}

/** The file is not an image a VM may boot from: retrying cannot help, the owner must fix the image. */
export class InvalidImageError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'InvalidImageError';
  }
}

/**
 * Base images, keyed by content hash, validated before first use: qcow2 or raw only, bounded virtual
 * size, no backing file outside the cache, no external data file, and a clean `qemu-img check`. Cached
 * files are read-only, since every VM's root overlay reads through them.
 */
export class ImageCache {
  private readonly log = createLogger('image-cache');

  constructor(private readonly opts: { dir: string; maxVirtualBytes: number }) {
    if (!path.isAbsolute(opts.dir)) throw new Error(`image cache folder must be absolute: ${opts.dir}`);
    if (!(opts.maxVirtualBytes > 0))
      throw new Error(`maxVirtualBytes must be positive, got ${opts.maxVirtualBytes}`);
  }

  async get(sha256: string): Promise<CachedImage | undefined> {
    checkSha(sha256);
    try {
      return JSON.parse(await fs.readFile(this.sidecarOf(sha256), 'utf8')) as CachedImage;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw err;
    }
  }

  /**
   * Adds `file` to the cache (copied, so later changes to `file` cannot reach running VMs) and returns
   * the cached image. With `sha256`, a cache hit skips all work and a content mismatch is an error.
   * `name` is how errors call the image (default: `file`), e.g. the owner's repository path.
   */
  async ensureFromFile(
    file: string,
    sha256?: string,
    name = file,
    signal?: AbortSignal,
  ): Promise<CachedImage> {
    if (sha256 !== undefined) {
      const hit = await this.get(sha256);
      if (hit) return hit;
    }
    await fs.mkdir(this.opts.dir, { recursive: true });
    const tmp = path.join(
      this.opts.dir,
      `.incoming.${process.pid}.${randomBytes(4).toString('hex')}.${path.basename(file)}`,
    );
    try {
      await fs.copyFile(file, tmp, fsConstants.COPYFILE_FICLONE);
      // Validate and hash the copy, not the source: what was checked is what VMs will read.
      const info = await this.validate(tmp, name, signal);
      const actual = await sha256File(tmp);
      if (sha256 !== undefined && actual !== sha256)
        throw new Error(`image ${name} has content hash ${actual}, expected ${sha256}`);
      const hit = await this.get(actual);
      if (hit) return hit;
      const cached: CachedImage = {
        ...info,
        sha256: actual,
        path: path.join(this.opts.dir, `${actual}.${info.format}`),
      };
      await fs.chmod(tmp, 0o444);
      await fsyncFile(tmp);
      await fs.rename(tmp, cached.path);
      // The sidecar is written last: get() trusts an entry only once it exists.
      await writeFileAtomic(this.sidecarOf(actual), JSON.stringify(cached));
      this.log.info(
        { image: cached.path, format: info.format, virtualBytes: info.virtualBytes },
        'image cached',
      );
      return cached;
    } finally {
      await fs.rm(tmp, { force: true });
    }
  }

  /** Checks that `file` is an image VMs may boot from; throws an InvalidImageError saying what is wrong. */
  async validate(file: string, name = file, signal?: AbortSignal): Promise<ImageInfo> {
    const st = await fs.stat(file).catch((err: unknown) => {
      throw new InvalidImageError(`image ${name} cannot be read`, { cause: err });
    });
    if (!st.isFile()) throw new InvalidImageError(`image ${name} is not a regular file`);
    if (st.size === 0) throw new InvalidImageError(`image ${name} is not a disk image: it is empty`);
    let raw: QemuImgInfo;
    try {
      const { stdout } = await runCommand('qemu-img', ['info', '--output=json', file], {
        timeoutMs: QEMU_IMG_TIMEOUT_MS,
        signal,
      });
      raw = JSON.parse(stdout) as QemuImgInfo;
    } catch (err) {
      signal?.throwIfAborted();
      throw new InvalidImageError(`image ${name} is not a readable disk image`, { cause: err });
    }
    if (raw.format !== 'qcow2' && raw.format !== 'raw')
      throw new InvalidImageError(
        `image ${name} has format ${raw.format}: only qcow2 and raw images are accepted`,
      );
    const format: ImageFormat = raw.format;
    const virtualBytes = raw['virtual-size'];
    if (virtualBytes > this.opts.maxVirtualBytes)
      throw new InvalidImageError(
        `image ${name} has a virtual size of ${mib(virtualBytes)} MiB, more than the maximum of ${mib(this.opts.maxVirtualBytes)} MiB`,
      );
    if (format === 'raw') {
      await checkRawHoldsExt4(file, name, st.size);
      return { format, virtualBytes };
    }
    if (raw['format-specific']?.data?.['data-file'])
      throw new InvalidImageError(`image ${name} keeps its data in an external file, which is not accepted`);
    const backingFile = raw['backing-filename'] ? await this.checkBacking(file, name, raw) : undefined;
    try {
      await runCommand('qemu-img', ['check', '-q', '-f', 'qcow2', file], {
        timeoutMs: QEMU_IMG_TIMEOUT_MS,
        signal,
      });
    } catch (err) {
      signal?.throwIfAborted();
      throw new InvalidImageError(`image ${name} is damaged or truncated (qemu-img check failed)`, {
        cause: err,
      });
    }
    return { format, virtualBytes, ...(backingFile ? { backingFile } : {}) };
  }

  private async checkBacking(file: string, name: string, raw: QemuImgInfo): Promise<string> {
    const named =
      raw['full-backing-filename'] ?? path.resolve(path.dirname(file), raw['backing-filename'] as string);
    const cacheDir = await fs.realpath(this.opts.dir).catch(() => path.resolve(this.opts.dir));
    const real = await fs.realpath(named).catch((err: unknown) => {
      throw new InvalidImageError(`image ${name} has a backing file ${named} that does not exist`, {
        cause: err,
      });
    });
    if (path.dirname(real) !== cacheDir || !SHA256.test(path.basename(real).split('.')[0]))
      throw new InvalidImageError(
        `image ${name} has a backing file ${named} outside the image cache ${this.opts.dir}`,
      );
    return real;
  }

  private sidecarOf(sha256: string): string {
    return path.join(this.opts.dir, `${sha256}.json`);
  }
}

/** The appliance mounts /dev/vda as ext4, so a raw image must be one (a file of any bytes probes as raw). */
async function checkRawHoldsExt4(file: string, name: string, size: number): Promise<void> {
  if (size % 512 !== 0)
    throw new InvalidImageError(`image ${name} is not a disk image: its size is not a multiple of 512 bytes`);
  const fh = await fs.open(file, 'r');
  try {
    const buf = Buffer.alloc(2);
    await fh.read(buf, 0, 2, EXT4_MAGIC_OFFSET);
    if (buf.readUInt16LE(0) !== EXT4_MAGIC)
      throw new InvalidImageError(
        `image ${name} is not a disk image: a raw image must hold an ext4 file system`,
      );
  } finally {
    await fh.close();
  }
}

function checkSha(sha256: string): void {
  if (!SHA256.test(sha256))
    throw new Error(`invalid image hash ${JSON.stringify(sha256)}: expected 64 hex digits`);
}

function mib(bytes: number): number {
  return Math.round(bytes / (1024 * 1024));
}

export function sha256File(file: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const hash = createHash('sha256');
    createReadStream(file)
      .on('error', reject)
      .on('data', (chunk) => hash.update(chunk))
      .on('end', () => resolve(hash.digest('hex')));
  });
}
