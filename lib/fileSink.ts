import type { FileHandle } from 'node:fs/promises';
import { Writable } from 'node:stream';

export interface FileSinkOptions {
  highWaterMark?: number;
  /**
   * Called with each batch of chunks just after its write was issued: it runs while the write runs on
   * libuv's thread (e.g. hashing the batch meanwhile, here or on a thread of its own). The batch counts
   * as written once both its write and the promise returned, if any, are done. A throw or a rejection
   * fails the sink.
   */
  onWriting?: (chunks: Buffer[]) => void | Promise<void>;
  /**
   * Called with each batch once all of it is in the file, in file order (e.g. to count exactly what
   * was written: after a failed write the file may hold a prefix of a batch never passed here).
   */
  onWritten?: (chunks: Buffer[]) => void;
  /**
   * Starts an fdatasync in the background each time this many more bytes were written (one at a
   * time), so the page cache is written back while the stream still runs and the caller's final
   * fsync has little left to do; it also bounds the dirty pages per stream. If one fails, the sink
   * fails with a FlushError.
   */
  flushEveryBytes?: number;
}

/**
 * A background flush failed: the bytes written so far may not be on disk, whatever a later fsync of the
 * same file says.
 */
export class FlushError extends Error {
  constructor(cause: unknown) {
    super(`writing the file back to disk failed: ${(cause as Error)?.message ?? String(cause)}`, { cause });
    this.name = 'FlushError';
  }
}

/**
 * A Writable over an open FileHandle that leaves the handle open, so the caller can fsync and close
 * it afterwards. (FileHandle.createWriteStream with autoClose:false keeps a reference that makes a
 * later handle.close() wait forever.) Batches queued chunks into one writev. Once the sink has
 * finished or closed, no write or background flush of its own is still running on the handle.
 */
export function fileSink(
  handle: FileHandle,
  { highWaterMark = 1 << 20, onWriting, onWritten, flushEveryBytes }: FileSinkOptions = {},
): Writable {
  let unflushed = 0;
  let flushing: Promise<unknown> | undefined;
  // Kept and reported by the sink: Linux tells a write-back error to one fsync per open file only, so
  // the caller's own fsync after a failed background one could succeed.
  let flushFailure: Error | undefined;
  const flushInBackground = (bytes: number): void => {
    if (flushEveryBytes === undefined) return;
    unflushed += bytes;
    if (unflushed < flushEveryBytes || flushing) return;
    unflushed = 0;
    flushing = handle.datasync().then(
      () => (flushing = undefined),
      (err: unknown) => {
        flushFailure ??= new FlushError(err);
        flushing = undefined;
      },
    );
  };
  async function writeAll(chunks: Buffer[]): Promise<void> {
    if (flushFailure) throw flushFailure;
    let pending = chunks;
    let writing = handle.writev(pending);
    let beside: Promise<void>;
    try {
      beside = Promise.resolve(onWriting?.(chunks));
    } catch (err) {
      await writing.catch(() => undefined);
      throw err;
    }
    // Awaited after the write; handled now, so that a rejection meanwhile is never an unhandled one.
    beside.catch(() => undefined);
    for (;;) {
      const { bytesWritten } = await writing;
      pending = dropBytes(pending, bytesWritten);
      if (pending.length === 0) break;
      writing = handle.writev(pending);
    }
    await beside;
    onWritten?.(chunks);
    flushInBackground(chunks.reduce((n, c) => n + c.length, 0));
  }
  // A destroy (the source failed) waits for the write in flight, so that once the sink has closed the
  // file no longer changes and every byte written has been reported.
  let inFlight: Promise<void> = Promise.resolve();
  const start = (chunks: Buffer[], done: (err?: Error | null) => void): void => {
    inFlight = writeAll(chunks);
    inFlight.then(() => done(), done);
  };
  const settled = async (): Promise<void> => {
    await inFlight.catch(() => undefined);
    await flushing;
  };
  return new Writable({
    highWaterMark,
    write(chunk: Buffer, _enc, done) {
      start([chunk], done);
    },
    writev(entries, done) {
      start(
        entries.map((e) => e.chunk as Buffer),
        done,
      );
    },
    final(done) {
      settled().then(() => done(flushFailure), done);
    },
    destroy(err, done) {
      settled().then(
        () => done(err),
        () => done(err),
      );
    },
  });
}

/** What is left of `chunks` after a (possibly partial) write of `n` bytes. */
function dropBytes(chunks: Buffer[], n: number): Buffer[] {
  let i = 0;
  while (i < chunks.length && n >= chunks[i].length) n -= chunks[i++].length;
  if (i === chunks.length) return [];
  return [chunks[i].subarray(n), ...chunks.slice(i + 1)];
}
