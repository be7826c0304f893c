import { createHash, randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { addOwner } from '../../repository/accounts/admin';
import { RepositoryClient, ResumableUploadError } from '../../repository/client';
import { clusterServers } from '../support/repositoryBackends';

// Two servers on one `cluster` backend: a resumable upload started on one resumes on the other.
const fleet = clusterServers(2, 'resume');
const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');
let token: string;

beforeAll(async () => {
  token = (await addOwner(fleet.dirs[0], 'alice')).token;
});

test('an upload cut off on one server resumes on another to the right checksum; stale offsets are refused', async () => {
  const [a, b] = fleet.servers.map((s) => new RepositoryClient({ url: s.url, token }));
  const data = randomBytes(3 << 20);
  const file = path.join(fleet.dirs[0], 'source.bin');
  await fs.writeFile(file, data);
  const abort = new AbortController();
  const err = await a
    .uploadResumable('alice', 'in/moved.bin', file, {
      chunkBytes: 512 << 10,
      signal: abort.signal,
      onProgress: (stored) => {
        if (stored >= data.length / 3) abort.abort();
      },
    })
    .catch((e: unknown) => e);
  expect(err).toBeInstanceOf(ResumableUploadError);
  const uploadId = (err as ResumableUploadError).uploadId;
  expect(await b.stat('alice', 'in/moved.bin')).toBeUndefined();

  // The other server knows the session and its offset, and refuses an append at a stale one.
  const head = await fetch(`${fleet.servers[1].url}/v1/owners/alice/uploads/${uploadId}`, {
    method: 'HEAD',
    headers: { Authorization: `Bearer ${token}` },
  });
  const offset = Number(head.headers.get('upload-offset'));
  expect(head.status).toBe(200);
  expect(offset).toBeGreaterThanOrEqual(data.length / 3);
  const stale = await fetch(`${fleet.servers[1].url}/v1/owners/alice/uploads/${uploadId}`, {
    method: 'PATCH',
    headers: {
      Authorization: `Bearer ${token}`,
      'Upload-Offset': '0',
      'Content-Type': 'application/offset+octet-stream',
    },
    body: data.subarray(0, 10),
  });
  expect(stale.status).toBe(409);
  expect(stale.headers.get('upload-offset')).toBe(String(offset));

  const info = await b.uploadResumable('alice', 'in/moved.bin', file, { uploadId, chunkBytes: 1 << 20 });
  expect(info).toMatchObject({ path: 'in/moved.bin', size: data.length, sha256: sha(data) });
  for (const c of [a, b]) expect(await c.stat('alice', 'in/moved.bin')).toMatchObject({ sha256: sha(data) });
  const back = path.join(fleet.dirs[1], 'back.bin');
  await a.download('alice', 'in/moved.bin', back);
  expect(sha(await fs.readFile(back))).toBe(sha(data));
  const gone = await fetch(`${fleet.servers[0].url}/v1/owners/alice/uploads/${uploadId}`, {
    method: 'HEAD',
    headers: { Authorization: `Bearer ${token}` },
  });
  expect(gone.status).toBe(404);
});
