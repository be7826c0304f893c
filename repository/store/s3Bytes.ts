import { createReadStream, createWriteStream, promises as fs } from 'node:fs';
import { createHash, randomBytes } from 'node:crypto';
import path from 'node:path';
import { PassThrough, Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import {
  AbortMultipartUploadCommand,
  CompleteMultipartUploadCommand,
  CreateBucketCommand,
  CreateMultipartUploadCommand,
  DeleteObjectCommand,
  GetObjectCommand,
  HeadBucketCommand,
  HeadObjectCommand,
  PutObjectCommand,
  S3Client,
  UploadPartCommand,
} from '@aws-sdk/client-s3';
import type { FileBytes, OpenBytes, ReceiveOptions, Received, S3Settings, Staged } from './backend';
import type { StoredFile } from './metadataStore';
import { StoreError } from './storeError';

/**
 * The `cluster` backend's file bytes: one object per stored version of a file, under a random key
 * (`files/<hex>`) that the file's row names, so a rename is a metadata update and a replacement never
 * touches the bytes a reader has open. A write streams to the object store as a multipart upload while it
 * is hashed and counted; the object is complete (CompleteMultipartUpload) before the row that names it is
 * committed, and removed if that commit fails, so no file is visible before all its bytes are stored.
 * Objects of replaced or deleted files are removed after their rows; one left by a crash in between is
 * unreferenced garbage, never a visible file.
 */

/** Multipart part size: S3's minimum is 5 MiB (but for the last part); also the buffer per upload. */
const PART_BYTES = 8 << 20;

export function s3Client(s: S3Settings): S3Client {
  return new S3Client({
    endpoint: s.endpoint,
    region: s.region,
    forcePathStyle: true,
    credentials: { accessKeyId: s.accessKey, secretAccessKey: s.secretKey },
    // Only what S3 itself requires: SHA-256 is ours, and not every S3 server takes the SDK's CRCs.
    requestChecksumCalculation: 'WHEN_REQUIRED',
    responseChecksumValidation: 'WHEN_REQUIRED',
  });
}

/** Creates the bucket if it is missing (`vsp repository migrate`); true if it was made. */
export async function ensureBucket(s: S3Settings): Promise<boolean> {
  const client = s3Client(s);
  try {
    try {
      await client.send(new HeadBucketCommand({ Bucket: s.bucket }));
      return false;
    } catch (err) {
      if ((err as { name?: string }).name !== 'NotFound') throw err;
    }
    await client.send(new CreateBucketCommand({ Bucket: s.bucket }));
    return true;
  } finally {
    client.destroy();
  }
}

const isMissing = (err: unknown): boolean => {
  const name = (err as { name?: string }).name;
  return name === 'NotFound' || name === 'NoSuchKey';
};

export class S3Bytes implements FileBytes {
  private constructor(
    private readonly client: S3Client,
    private readonly bucket: string,
    private readonly tmpDir: string,
  ) {}

  /** Checks the bucket is there (made by `vsp repository migrate`) and clears this server's temp files. */
  static async open(dataDir: string, settings: S3Settings, serving = true): Promise<S3Bytes> {
    const client = s3Client(settings);
    try {
      await client.send(new HeadBucketCommand({ Bucket: settings.bucket }));
    } catch (err) {
      client.destroy();
      throw new Error(
        `S3 bucket ${settings.bucket} at ${settings.endpoint} is not reachable (run \`vsp repository migrate\` to create it)`,
        { cause: err },
      );
    }
    const tmpDir = path.join(dataDir, 'tmp');
    if (serving) await fs.rm(tmpDir, { recursive: true, force: true });
    await fs.mkdir(tmpDir, { recursive: true, mode: 0o700 });
    return new S3Bytes(client, settings.bucket, tmpDir);
  }

  /**
   * Streams `source` to a new object `key` (one PutObject when it fits a part, else a multipart upload),
   * hashing and counting each chunk; nothing is left under `key` if it fails.
   */
  private async upload(key: string, source: Readable, opts: ReceiveOptions): Promise<Staged> {
    const hash = createHash('sha256');
    let size = 0;
    let uploadId: string | undefined;
    const parts: { PartNumber: number; ETag?: string }[] = [];
    let held: Buffer[] = [];
    let heldBytes = 0;
    const sendPart = async (): Promise<void> => {
      uploadId ??= (
        await this.client.send(new CreateMultipartUploadCommand({ Bucket: this.bucket, Key: key }))
      ).UploadId;
      const PartNumber = parts.length + 1;
      const body = Buffer.concat(held, heldBytes);
      held = [];
      heldBytes = 0;
      const { ETag } = await this.client.send(
        new UploadPartCommand({ Bucket: this.bucket, Key: key, UploadId: uploadId, PartNumber, Body: body }),
      );
      parts.push({ PartNumber, ETag });
    };
    try {
      for await (const chunk of source as AsyncIterable<Buffer>) {
        size += chunk.length;
        if (size > opts.maxBytes) throw opts.tooLarge(opts.maxBytes);
        opts.onChunk?.(size);
        hash.update(chunk);
        held.push(chunk);
        heldBytes += chunk.length;
        if (heldBytes >= PART_BYTES) await sendPart();
      }
      if (uploadId === undefined) {
        await this.client.send(
          new PutObjectCommand({ Bucket: this.bucket, Key: key, Body: Buffer.concat(held, heldBytes) }),
        );
      } else {
        if (heldBytes > 0) await sendPart();
        await this.client.send(
          new CompleteMultipartUploadCommand({
            Bucket: this.bucket,
            Key: key,
            UploadId: uploadId,
            MultipartUpload: { Parts: parts },
          }),
        );
      }
      return { size, sha256: hash.digest('hex'), ref: key };
    } catch (err) {
      source.destroy();
      if (uploadId !== undefined)
        await this.client
          .send(new AbortMultipartUploadCommand({ Bucket: this.bucket, Key: key, UploadId: uploadId }))
          .catch(() => undefined); // the bucket's lifecycle rule for incomplete uploads is the backstop
      throw err;
    }
  }

  async receive<T>(
    source: Readable,
    opts: ReceiveOptions,
    commit: (staged: Staged) => Promise<T>,
  ): Promise<T> {
    const staged = await this.upload(`files/${randomBytes(16).toString('hex')}`, source, opts);
    try {
      return await commit(staged);
    } catch (err) {
      await this.discard(staged);
      throw err;
    }
  }

  async stageLocalFile(file: string, sum: Received): Promise<Staged> {
    const staged = await this.upload(`files/${randomBytes(16).toString('hex')}`, createReadStream(file), {
      maxBytes: sum.size,
      tooLarge: () => new StoreError('size-mismatch', `${file} grew past its ${sum.size} counted bytes`),
    });
    if (staged.sha256 !== sum.sha256 || staged.size !== sum.size) {
      await this.forget(staged.ref);
      throw new StoreError('checksum-mismatch', 'the upload changed on disk before it was stored');
    }
    await fs.rm(file, { force: true });
    return staged;
  }

  discard(staged: Staged): Promise<void> {
    return this.forget(staged.ref);
  }

  async install(_owner: string, _repoPath: string, staged: Staged): Promise<string> {
    return staged.ref;
  }

  async open(_owner: string, file: StoredFile): Promise<OpenBytes> {
    return this.openKey(this.keyOf(file), file.path, file.size);
  }

  /** Never throws: an object that could not be removed is unreferenced garbage, not a visible file. */
  async release(_owner: string, file: StoredFile): Promise<void> {
    if (file.blob !== undefined) await this.forget(file.blob);
  }

  async move(): Promise<void> {
    // Objects are named by key, not path: the rows' rename is the whole move.
  }

  async withLocalFile<T>(
    _owner: string,
    file: StoredFile,
    fn: (localPath: string) => Promise<T>,
  ): Promise<T> {
    const tmp = this.tempPath();
    try {
      const bytes = await this.openKey(this.keyOf(file), file.path, file.size);
      const hash = createHash('sha256');
      const source = bytes.createReadStream();
      source.on('data', (chunk: Buffer) => hash.update(chunk));
      await pipeline(source, createWriteStream(tmp, { mode: 0o600 }));
      if (hash.digest('hex') !== file.sha256)
        throw new StoreError('corrupt', `${file.path}: the stored object does not match its SHA-256`);
      return await fn(tmp);
    } finally {
      await fs.rm(tmp, { force: true });
    }
  }

  openBase(name: string, size: number): Promise<OpenBytes> {
    return this.openKey(`base-images/${name}`, `base image ${name}`, size);
  }

  async installBase(name: string, localFile: string): Promise<void> {
    try {
      await this.upload(`base-images/${name}`, createReadStream(localFile, { highWaterMark: 1 << 20 }), {
        maxBytes: Number.MAX_SAFE_INTEGER,
        tooLarge: () => new Error('unreachable'),
      });
    } finally {
      await fs.rm(localFile, { force: true });
    }
  }

  async removeBase(name: string): Promise<void> {
    await this.forget(`base-images/${name}`);
  }

  tempPath(): string {
    return path.join(this.tmpDir, `incoming-${randomBytes(12).toString('hex')}`);
  }

  async close(): Promise<void> {
    this.client.destroy();
  }

  private keyOf(file: StoredFile): string {
    if (file.blob === undefined)
      throw new StoreError('corrupt', `${file.path} is recorded without its object`);
    return file.blob;
  }

  private async forget(key: string): Promise<void> {
    await this.client.send(new DeleteObjectCommand({ Bucket: this.bucket, Key: key })).catch(() => undefined);
  }

  private async openKey(key: string, shown: string, size: number): Promise<OpenBytes> {
    let stored: number | undefined;
    try {
      stored = (await this.client.send(new HeadObjectCommand({ Bucket: this.bucket, Key: key })))
        .ContentLength;
    } catch (err) {
      if (isMissing(err))
        throw new StoreError('corrupt', `${shown} is recorded but missing in the object store`);
      throw err;
    }
    if (stored !== size)
      throw new StoreError(
        'corrupt',
        `${shown} is ${stored} bytes in the object store but ${size} in the metadata`,
      );
    const get = async (start: number, end: number): Promise<Readable> => {
      const { Body } = await this.client.send(
        new GetObjectCommand({ Bucket: this.bucket, Key: key, Range: `bytes=${start}-${end}` }),
      );
      return Body as Readable;
    };
    return {
      createReadStream: (range) => {
        const out = new PassThrough({ highWaterMark: 1 << 20 });
        const start = range?.start ?? 0;
        const end = range?.end ?? size - 1;
        if (end < start)
          out.end(); // an empty file (or range) has no bytes to ask for
        else
          get(start, end).then(
            (body) => pipeline(body, out).catch((err: Error) => out.destroy(err)),
            (err: Error) => out.destroy(err),
          );
        return out;
      },
      read: async (position, length) => {
        const end = Math.min(size, position + length) - 1;
        if (end < position) return Buffer.alloc(0);
        const chunks: Buffer[] = [];
        for await (const chunk of await get(position, end)) chunks.push(chunk as Buffer);
        return Buffer.concat(chunks);
      },
      close: async () => undefined,
    };
  }
}
