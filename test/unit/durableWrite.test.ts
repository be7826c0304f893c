import { createHash } from 'node:crypto';
import { promises as fs } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { hashBefore, streamInto, writtenBefore } from '../../lib/durableWrite';

/**
 * streamInto hashes each batch while its write runs and flushes in the background; what it reports
 * must still be exactly what reached the file, on success and when a write fails partway.
 */

const sha256 = (...parts: Buffer[]): string => {
  const h = createHash('sha256');
  for (const p of parts) h.update(p);
  return h.digest('hex');
};

/** A real file's handle whose n-th writev writes only part of its batch and then fails. */
function failingOnWrite(handle: FileHandle, failAt: number): FileHandle & { datasyncs: number } {
  let calls = 0;
  const wrapped = Object.create(handle) as FileHandle & { datasyncs: number };
  wrapped.datasyncs = 0;
  const writev: FileHandle['writev'] = async (buffers) => {
    if (++calls < failAt) return handle.writev(buffers);
    await handle.write(Buffer.from((buffers[0] as Buffer).subarray(0, 100)));
    throw Object.assign(new Error('ENOSPC: no space left on device'), { code: 'ENOSPC' });
  };
  wrapped.writev = writev;
  wrapped.datasync = () => {
    wrapped.datasyncs++;
    return handle.datasync();
  };
  return wrapped;
}

describe('streamInto', () => {
  let dir: string;
  beforeEach(async () => {
    dir = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-durable-'));
  });
  afterEach(async () => {
    await fs.rm(dir, { recursive: true, force: true });
  });

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
    const given = createHash('sha256');
    let failure: unknown;
    try {
      // 1 MiB chunks, as much as the sink buffers: a few batches, so the third write comes midway.
      await streamInto(Readable.from(chunks), handle, { hash: given }).catch(
        (err: unknown) => (failure = err),
      );
    } finally {
      await handle.close();
    }
    expect((failure as Error).message).toMatch(/ENOSPC/);
    const written = writtenBefore(failure);
    const onDisk = await fs.readFile(file);
    // The failed write left part of a batch that is counted nowhere.
    expect(onDisk.length).toBe(written + 100);
    expect(written).toBeGreaterThan(0);
    expect(hashBefore(failure)?.digest('hex')).toBe(sha256(onDisk.subarray(0, written)));
  });
});
