import { createHash, type Hash } from 'node:crypto';
import { promises as fs } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { hashBefore, streamInto, writeDurably, writtenBefore } from '../../lib/durableWrite';

/**
 * streamInto hashes each batch while its write runs and flushes in the background; what it reports
 * must still be exactly what reached the file, on success and when a write fails partway.
 */

const sha256 = (...parts: Buffer[]): string => {
  const h = createHash('sha256');
  for (const p of parts) h.update(p);
  return h.digest('hex');
};

/**
 * A real file's handle whose n-th writev writes only part of its batch and then fails, and whose
 * fdatasync fails if asked to.
 */
function failingOnWrite(
  handle: FileHandle,
  failAt: number,
  failDatasync = false,
): FileHandle & { datasyncs: number } {
  let calls = 0;
  const wrapped = Object.create(handle) as FileHandle & { datasyncs: number };
  wrapped.datasyncs = 0;
  const writev: FileHandle['writev'] = async (buffers) => {
    if (++calls < failAt) return handle.writev(buffers);
    await handle.write(Buffer.from((buffers[0] as Buffer).subarray(0, 100)));
    throw Object.assign(new Error('ENOSPC: no space left on device'), { code: 'ENOSPC' });
  };
  wrapped.writev = writev;
  wrapped.datasync = async () => {
    wrapped.datasyncs++;
    if (failDatasync) throw Object.assign(new Error('EIO: i/o error, fdatasync'), { code: 'EIO' });
    return handle.datasync();
  };
  return wrapped;
}

/** streamInto of `chunks` to `handle` with a caller's hash, which must fail: its error; the handle is closed. */
async function failure(handle: FileHandle, chunks: Buffer[], given: Hash): Promise<Error> {
  try {
    await streamInto(Readable.from(chunks), handle, { hash: given });
  } catch (err) {
    return err as Error;
  } finally {
    await handle.close();
  }
  throw new Error('streamInto succeeded');
}

let dir: string;
beforeEach(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-durable-'));
});
afterEach(async () => {
  await fs.rm(dir, { recursive: true, force: true });
});

describe('streamInto', () => {
  test('a stream of 40 MiB: its size and SHA-256, the bytes in the file, a background flush on the way', async () => {
    const chunks = Array.from({ length: 40 }, (_, i) => Buffer.alloc(1 << 20, i));
    const file = path.join(dir, 'ok');
    const handle = failingOnWrite(await fs.open(file, 'w'), Infinity);
    try {
      const { size, hash } = await streamInto(Readable.from(chunks), handle);
      expect(size).toBe(40 << 20);
      expect(hash.digest('hex')).toBe(sha256(...chunks));
    } finally {
      await handle.close();
    }
    expect(handle.datasyncs).toBeGreaterThanOrEqual(1);
    expect(sha256(await fs.readFile(file))).toBe(sha256(...chunks));
  });

  test("a write failing partway: the error gives the bytes written in full and, for a caller's hash, their SHA-256", async () => {
    const chunks = Array.from({ length: 8 }, (_, i) => Buffer.alloc(1 << 20, i + 1));
    const file = path.join(dir, 'partial');
    const handle = failingOnWrite(await fs.open(file, 'w'), 3);
    // 1 MiB chunks, as much as the sink buffers: a few batches, so the third write comes midway.
    const err = await failure(handle, chunks, createHash('sha256'));
    expect(err.message).toMatch(/ENOSPC/);
    const written = writtenBefore(err);
    const onDisk = await fs.readFile(file);
    // The failed write left part of a batch that is counted nowhere.
    expect(onDisk.length).toBe(written + 100);
    expect(written).toBeGreaterThan(0);
    expect(hashBefore(err)?.digest('hex')).toBe(sha256(onDisk.subarray(0, written)));
  });

  test('a failed background flush fails the stream and counts nothing as written', async () => {
    const chunks = Array.from({ length: 40 }, (_, i) => Buffer.alloc(1 << 20, i));
    const handle = failingOnWrite(await fs.open(path.join(dir, 'eio'), 'w'), Infinity, true);
    const err = await failure(handle, chunks, createHash('sha256').update('earlier bytes'));
    expect(handle.datasyncs).toBe(1);
    expect(err.message).toMatch(/writing the file back to disk failed: EIO/);
    expect(writtenBefore(err)).toBe(0);
    expect(hashBefore(err)?.digest('hex')).toBe(createHash('sha256').update('earlier bytes').digest('hex'));
  });
});

describe('writeDurably', () => {
  /** Odd-sized chunks, different in each stream, so that a batch hashed twice, late or in another stream shows. */
  const chunksOf = (seed: number, n: number): Buffer[] =>
    Array.from({ length: n }, (_, i) => Buffer.alloc(65_536 + ((i * 7919 + seed) % 4096), (seed + i) % 251));

  test('streams written at once each get the SHA-256 of their own bytes, hashed on the hashing thread', async () => {
    const streams = [0, 1, 2, 3].map((seed) => chunksOf(seed, 200 + seed * 37));
    const results = await Promise.all(
      streams.map((chunks, i) =>
        writeDurably(Readable.from(chunks), path.join(dir, `t${i}`), {}, async (written) => {
          await fs.rename(path.join(dir, `t${i}`), path.join(dir, `f${i}`));
          return written;
        }),
      ),
    );
    for (const [i, chunks] of streams.entries()) {
      expect(results[i]).toEqual({ size: Buffer.concat(chunks).length, sha256: sha256(...chunks) });
      expect(sha256(await fs.readFile(path.join(dir, `f${i}`)))).toBe(sha256(...chunks));
    }
  });

  test('a source that fails midway publishes nothing and leaves no temp file; the next stream still hashes', async () => {
    const chunks = chunksOf(5, 50);
    const source = new Readable({
      read() {
        const next = chunks.shift();
        if (next) this.push(next);
        else this.destroy(new Error('client went away'));
      },
    });
    const publish = jest.fn();
    await expect(writeDurably(source, path.join(dir, 'broken'), {}, publish)).rejects.toThrow(
      'client went away',
    );
    expect(publish).not.toHaveBeenCalled();
    expect(await fs.readdir(dir)).toEqual([]);
    const again = chunksOf(6, 3);
    const written = await writeDurably(Readable.from(again), path.join(dir, 'ok'), { sync: false }, (w) => w);
    expect(written.sha256).toBe(sha256(...again));
  });

  test('streams about the size hashed in line, and just past it, get their own SHA-256', async () => {
    for (const size of [(256 << 10) - 1, 256 << 10, (256 << 10) + 1, 3 << 20]) {
      const bytes = Buffer.alloc(size, size % 251);
      const chunks = [bytes.subarray(0, 1000), bytes.subarray(1000, 200_000), bytes.subarray(200_000)];
      const written = await writeDurably(Readable.from(chunks), path.join(dir, `s${size}`), {}, (w) => w);
      expect(written).toEqual({ size, sha256: sha256(bytes) });
    }
  });

  test('an empty stream is the SHA-256 of no bytes', async () => {
    const written = await writeDurably(Readable.from([]), path.join(dir, 'empty'), {}, (w) => w);
    expect(written).toEqual({ size: 0, sha256: sha256() });
  });
});
