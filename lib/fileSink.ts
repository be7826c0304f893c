import type { FileHandle } from 'node:fs/promises';
import { Writable } from 'node:stream';

export interface FileSinkOptions {
  highWaterMark?: number;
  /**
   * Called with each chunk once all of it is in the file, in file order (e.g. to hash exactly what
   * was written: after a failed write the file may hold a prefix of a chunk never passed here).
   */
  onWritten?: (chunk: Buffer) => void;
}

/**
 * A Writable over an open FileHandle that leaves the handle open, so the caller can fsync and close
 * it afterwards. (FileHandle.createWriteStream with autoClose:false keeps a reference that makes a
 * later handle.close() wait forever.) Batches queued chunks into one writev.
 */
export function fileSink(
  handle: FileHandle,
  { highWaterMark = 1 << 20, onWritten }: FileSinkOptions = {},
): Writable {
  async function writeAll(chunks: Buffer[]): Promise<void> {
    let pending = chunks;
    while (pending.length > 0) {
      const { bytesWritten } = await handle.writev(pending);
      pending = dropBytes(pending, bytesWritten);
    }
    if (onWritten) for (const chunk of chunks) onWritten(chunk);
  }
  // A destroy (the source failed) waits for the write in flight, so that once the sink has closed the
  // file no longer changes and every byte written has been reported.
  let inFlight: Promise<void> = Promise.resolve();
  const start = (chunks: Buffer[], done: (err?: Error | null) => void): void => {
    inFlight = writeAll(chunks);
    inFlight.then(() => done(), done);
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
    destroy(err, done) {
      inFlight.then(
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
