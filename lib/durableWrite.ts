import { constants as fsc, promises as fs } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import { createHash, type Hash } from 'node:crypto';
import { Transform, type Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { fileSink, FlushError } from './fileSink';
import { OffThreadSha256 } from './offThreadSha256';

/**
 * The one writer behind every stored byte stream (the repository's uploads on every protocol, resumable
 * uploads, base images, and the repository client's downloads): source → size and SHA-256 → an fsynced
 * file → rename. The source is consumed through a single pipeline, so its errors (a client reset, a
 * half-close, a refusal) reject the returned promise, destroy the source and are never left unhandled;
 * a file that is not published is removed.
 */

/** What reached the file: its size and SHA-256. */
export interface Written {
  size: number;
  sha256: string;
}

export interface StreamIntoOptions {
  /**
   * Called with the running total (this stream's bytes so far, the chunk included) before each chunk is
   * written, to check limits or report progress; a throw refuses the stream with that error.
   */
  onChunk?: (total: number) => void;
  /**
   * Extended with the bytes that reach the file (default: a fresh SHA-256). After a failure it may be
   * ahead of the file: the error carries the hash of exactly what was written (`hashBefore`).
   */
  hash?: Hash;
}

/** Written back in the background every this many bytes (see fileSink's flushEveryBytes). */
const FLUSH_EVERY_BYTES = 32 << 20;

/**
 * `source` through a size meter into `handle`: the pipeline shared by streamInto and writeDurably,
 * `onWriting` and `onWritten` as for fileSink. Resolves with the bytes written; a failure is thrown once
 * no write is in flight, carrying `written` (see writtenBefore).
 */
async function pump(
  source: Readable,
  handle: FileHandle,
  opts: {
    onChunk?: (total: number) => void;
    flush: boolean;
    onWriting: (chunks: Buffer[]) => void | Promise<void>;
    onWritten?: (bytes: number) => void;
  },
): Promise<number> {
  let seen = 0;
  let size = 0;
  const meter = new Transform({
    highWaterMark: 1 << 20,
    transform(chunk: Buffer, _enc, done) {
      seen += chunk.length;
      try {
        opts.onChunk?.(seen);
      } catch (err) {
        done(err as Error);
        return;
      }
      done(null, chunk);
    },
  });
  const sink = fileSink(handle, {
    onWriting: opts.onWriting,
    onWritten: (chunks) => {
      let bytes = 0;
      for (const chunk of chunks) bytes += chunk.length;
      size += bytes;
      opts.onWritten?.(bytes);
    },
    flushEveryBytes: opts.flush ? FLUSH_EVERY_BYTES : undefined,
  });
  try {
    await pipeline(source, meter, sink);
  } catch (err) {
    // A write may still be in flight: the count is final only once the sink has closed.
    if (!sink.closed) await new Promise((resolve) => sink.once('close', resolve));
    // After a failed flush nothing written is known to be on disk.
    throw Object.assign(err as Error, { written: err instanceof FlushError ? 0 : size });
  }
  return size;
}

/**
 * Streams `source` to the open `handle` (at its position: opened with O_APPEND, its end), hashing each
 * batch while it is being written. The resolved count and hash cover exactly what was written; after a
 * failed write the file may hold a prefix of a batch that is counted nowhere, so the thrown error
 * carries the count to truncate the file back to (`writtenBefore`) and, when the caller passed its own
 * `hash` to extend, the hash of exactly those bytes (`hashBefore`). A failed background flush (a
 * FlushError) counts nothing as written: none of it is known to be on disk.
 */
export async function streamInto(
  source: Readable,
  handle: FileHandle,
  { onChunk, hash: given }: StreamIntoOptions = {},
): Promise<{ size: number; hash: Hash }> {
  const hash = given ?? createHash('sha256');
  const initial = given?.copy();
  // The hash of what is in the file while a batch is being written and hashed (kept for a caller's hash).
  let beforeBatch: Hash | undefined;
  let size = 0;
  try {
    await pump(source, handle, {
      onChunk,
      flush: true,
      onWriting: (chunks) => {
        if (given) beforeBatch = hash.copy();
        for (const chunk of chunks) hash.update(chunk);
      },
      onWritten: (bytes) => {
        beforeBatch = undefined;
        size += bytes;
      },
    });
  } catch (err) {
    if (given)
      Object.assign(err as Error, {
        hashBefore: writtenBefore(err) === size ? (beforeBatch ?? hash) : initial,
      });
    throw err;
  }
  return { size, hash };
}

/** The bytes a failed streamInto had written in full (what to truncate the file back to). */
export function writtenBefore(err: unknown): number {
  const n = (err as { written?: unknown } | undefined)?.written;
  return typeof n === 'number' ? n : 0;
}

/** The hash of those bytes, when the failed streamInto extended a hash of its caller's. */
export function hashBefore(err: unknown): Hash | undefined {
  return (err as { hashBefore?: Hash } | undefined)?.hashBefore;
}

export interface DurableWriteOptions {
  /** Refuse a stream once it passes this many bytes (the error comes from `tooLarge`). */
  maxBytes?: number;
  tooLarge?: (maxBytes: number) => Error;
  /** As for streamInto, after the size limit: e.g. a quota check, or progress. */
  onChunk?: (total: number) => void;
  /** The published file's mode (default 0644). */
  mode?: number;
  /**
   * Whether the file is fsynced before `publish` (default): false only for a caller that makes it
   * durable with others later (a data disk being staged is fsynced as a whole once complete).
   */
  sync?: boolean;
}

/**
 * Writes `source` to a new file `tmp` (created exclusively, never through a symlink), fsyncs it (unless
 * told not to), and
 * hands its size and SHA-256 to `publish`, which checks them and renames `tmp` into place (and records
 * it). If anything fails before `publish` returns, including `publish` itself, `tmp` is removed and the
 * error is thrown; `source` is destroyed whenever it was not read to its end.
 */
export async function writeDurably<T>(
  source: Readable,
  tmp: string,
  opts: DurableWriteOptions,
  publish: (written: Written) => T | Promise<T>,
): Promise<T> {
  const { maxBytes, tooLarge, onChunk, mode = 0o644, sync = true } = opts;
  const limit = (total: number): void => {
    if (maxBytes !== undefined && total > maxBytes)
      throw tooLarge?.(maxBytes) ?? new Error(`stream is larger than the limit of ${maxBytes} bytes`);
    onChunk?.(total);
  };
  let published = false;
  try {
    let handle: FileHandle;
    try {
      handle = await fs.open(tmp, fsc.O_WRONLY | fsc.O_CREAT | fsc.O_EXCL | fsc.O_NOFOLLOW, 0o600);
    } catch (err) {
      source.destroy();
      throw err;
    }
    let written: Written;
    const hash = new OffThreadSha256();
    try {
      const size = await pump(source, handle, {
        onChunk: limit,
        flush: sync,
        onWriting: (chunks) => hash.update(chunks),
      });
      if (sync) await handle.sync();
      await handle.chmod(mode);
      written = { size, sha256: await hash.digest() };
    } finally {
      hash.dispose();
      await handle.close();
    }
    const out = await publish(written);
    published = true;
    return out;
  } finally {
    if (!published) await fs.rm(tmp, { force: true });
  }
}
