import { createHash, randomBytes } from 'node:crypto';
import { OffThreadSha256 } from '../../lib/offThreadHash';

test('the worker thread hashes exactly the bytes given, in order, whatever their batching', async () => {
  // Small chunks come from Buffer's shared pool: the copy sent must not detach it.
  const chunks = [
    randomBytes(10),
    Buffer.from('x'),
    randomBytes(3 << 20),
    Buffer.alloc(0),
    randomBytes(70_000),
  ];
  const expected = createHash('sha256');
  for (const c of chunks) expected.update(c);
  const pooled = Buffer.from('pooled');
  const h = new OffThreadSha256();
  await h.update(chunks.slice(0, 2));
  await h.update(chunks.slice(2));
  expect(await h.digest()).toBe(expected.digest('hex'));
  expect(pooled.toString()).toBe('pooled');
  expect(chunks[1].toString()).toBe('x');
  expect(chunks[2].length).toBe(3 << 20);
});

test('streams hashed at once keep their own hashes; a finished hash refuses more bytes', async () => {
  const a = randomBytes(20 << 20);
  const b = randomBytes(5 << 20);
  const ha = new OffThreadSha256();
  const hb = new OffThreadSha256();
  const dropped = new OffThreadSha256();
  await dropped.update([randomBytes(1000)]);
  dropped.dispose();
  // 20 MiB in 1 MiB batches passes the in-flight bound, so the sender waits for the worker on the way.
  for (let off = 0; off < a.length; off += 1 << 20) {
    await ha.update([a.subarray(off, off + (1 << 20))]);
    if (off < b.length) await hb.update([b.subarray(off, off + (1 << 20))]);
  }
  const [da, db] = await Promise.all([ha.digest(), hb.digest()]);
  expect(da).toBe(createHash('sha256').update(a).digest('hex'));
  expect(db).toBe(createHash('sha256').update(b).digest('hex'));
  await expect(ha.update([Buffer.from('more')])).rejects.toThrow(/already finished/);
  expect(await new OffThreadSha256().digest()).toBe(createHash('sha256').digest('hex'));
});
