import { promises as fs } from 'node:fs';

/** Up to `max` bytes of `file` from byte `offset`: fewer at its end, none when the file does not exist. */
export async function readRange(file: string, offset: number, max: number): Promise<Buffer> {
  let fh: fs.FileHandle;
  try {
    fh = await fs.open(file, 'r');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return Buffer.alloc(0);
    throw err;
  }
  try {
    const { size } = await fh.stat();
    const buf = Buffer.alloc(Math.max(0, Math.min(max, size - offset)));
    const { bytesRead } = await fh.read(buf, 0, buf.length, offset);
    return buf.subarray(0, bytesRead);
  } finally {
    await fh.close();
  }
}

/** The last `bytes` of a file as text ('' when it does not exist). */
export async function readTail(file: string, bytes = 64 * 1024): Promise<string> {
  const size = (await fs.stat(file).catch(() => undefined))?.size ?? 0;
  return (await readRange(file, Math.max(0, size - bytes), bytes)).toString('utf8');
}
