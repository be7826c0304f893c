import { createHash, randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import http, { type IncomingHttpHeaders } from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { addOwner, setQuota } from '../../repository/accounts/admin';
import { RepositoryClient, ResumableUploadError } from '../../repository/client';
import { startRepositoryServer, type RepositoryServer } from '../../repository/server';

const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

let dataDir: string;
let scratch: string;
let server: RepositoryServer;
let aliceToken: string;
let bobToken: string;
let alice: RepositoryClient;

interface Reply {
  status: number;
  headers: IncomingHttpHeaders;
  body: string;
}

/** One raw request to the server, for what the client library never sends. */
function request(
  method: string,
  apiPath: string,
  token: string,
  headers: Record<string, string | number> = {},
  body?: Buffer | string,
): Promise<Reply> {
  return new Promise((resolve, reject) => {
    const req = http.request(new URL(apiPath, server.url), {
      method,
      headers: { Authorization: `Bearer ${token}`, ...headers },
    });
    req.on('response', (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () =>
        resolve({
          status: res.statusCode ?? 0,
          headers: res.headers,
          body: Buffer.concat(chunks).toString(),
        }),
      );
    });
    req.on('error', reject);
    req.end(body);
  });
}

async function startUpload(owner: string, token: string, spec: object): Promise<{ id: string } & Reply> {
  const reply = await request('POST', `/v1/owners/${owner}/uploads`, token, {}, JSON.stringify(spec));
  const id = reply.status === 201 ? (JSON.parse(reply.body) as { id: string }).id : '';
  return { id, ...reply };
}

const patch = (owner: string, id: string, token: string, offset: number | undefined, bytes: Buffer) =>
  request(
    'PATCH',
    `/v1/owners/${owner}/uploads/${id}`,
    token,
    offset === undefined ? {} : { 'Upload-Offset': offset },
    bytes,
  );

async function until(cond: () => Promise<boolean>, what: string, ms = 5000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!(await cond())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

async function localFile(name: string, bytes: number): Promise<{ file: string; data: Buffer }> {
  const data = randomBytes(bytes);
  const file = path.join(scratch, name);
  await fs.writeFile(file, data);
  return { file, data };
}

const partialFiles = () => fs.readdir(path.join(dataDir, 'partial-uploads'));

beforeAll(async () => {
  dataDir = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-resumable-'));
  scratch = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-resumable-scratch-'));
  aliceToken = (await addOwner(dataDir, 'alice')).token;
  bobToken = (await addOwner(dataDir, 'bob')).token;
  server = await startRepositoryServer({ dataDir, port: 0 });
  alice = new RepositoryClient({ url: server.url, token: aliceToken });
});

afterAll(async () => {
  await server?.close();
  await fs.rm(dataDir, { recursive: true, force: true });
  await fs.rm(scratch, { recursive: true, force: true });
});

describe('resumable uploads over HTTP', () => {
  test('an upload aborted halfway leaves no visible file and resumes to the right checksum', async () => {
    const { file, data } = await localFile('big.bin', 4 << 20);
    const abort = new AbortController();
    const progress: number[] = [];
    const err = await alice
      .uploadResumable('alice', 'in/big.bin', file, {
        chunkBytes: 256 << 10,
        signal: abort.signal,
        onProgress: (stored) => {
          progress.push(stored);
          if (stored >= data.length / 2) abort.abort();
        },
      })
      .catch((e: unknown) => e);
    expect(err).toBeInstanceOf(ResumableUploadError);
    const uploadId = (err as ResumableUploadError).uploadId;
    expect(uploadId).toMatch(/^[A-Za-z0-9_-]+$/);
    expect(await alice.stat('alice', 'in/big.bin')).toBeUndefined();
    expect(await alice.list('alice')).toEqual([]);
    const held = await request('HEAD', `/v1/owners/alice/uploads/${uploadId}`, aliceToken);
    expect(held.status).toBe(200);
    expect(Number(held.headers['upload-offset'])).toBeGreaterThanOrEqual(data.length / 2);
    expect(Number(held.headers['upload-offset'])).toBeLessThan(data.length);

    const resumed: number[] = [];
    const info = await alice.uploadResumable('alice', 'in/big.bin', file, {
      uploadId,
      chunkBytes: 1 << 20,
      onProgress: (stored) => resumed.push(stored),
    });
    expect(info).toMatchObject({ path: 'in/big.bin', size: data.length, sha256: sha(data) });
    // Resuming sent only the rest: its first acknowledged offset is past where the first call stopped.
    expect(resumed[0]).toBeGreaterThan(Number(held.headers['upload-offset']));
    const back = await alice.downloadStream('alice', 'in/big.bin');
    const chunks: Buffer[] = [];
    for await (const c of back) chunks.push(c as Buffer);
    expect(sha(Buffer.concat(chunks))).toBe(sha(data));
    expect(await partialFiles()).toEqual([]);
    expect((await request('HEAD', `/v1/owners/alice/uploads/${uploadId}`, aliceToken)).status).toBe(404);
  });

  test('the completed upload is renamed into place, not written a second time', async () => {
    const data = randomBytes(300_000);
    const { id } = await startUpload('alice', aliceToken, { path: 'renamed.bin', size: data.length });
    expect((await patch('alice', id, aliceToken, 0, data.subarray(0, 100_000))).status).toBe(204);
    const partial = await fs.stat(path.join(dataDir, 'partial-uploads', id));
    expect((await patch('alice', id, aliceToken, 100_000, data.subarray(100_000))).status).toBe(201);
    const stored = await fs.stat(path.join(dataDir, 'files', 'alice', 'renamed.bin'));
    // The same inode: the bytes were written once, as they arrived.
    expect(stored.ino).toBe(partial.ino);
    expect(stored.mode & 0o777).toBe(0o644);
    expect((await alice.stat('alice', 'renamed.bin'))?.sha256).toBe(sha(data));
  });

  test('a request cut off mid-body keeps the bytes that arrived, and nothing is visible', async () => {
    const data = randomBytes(1 << 20);
    const { id } = await startUpload('alice', aliceToken, {
      path: 'cut.bin',
      size: data.length,
      sha256: sha(data),
    });
    const half = data.subarray(0, data.length / 2);
    await new Promise<void>((resolve) => {
      const req = http.request(new URL(`/v1/owners/alice/uploads/${id}`, server.url), {
        method: 'PATCH',
        headers: { Authorization: `Bearer ${aliceToken}`, 'Upload-Offset': 0, 'Content-Length': data.length },
      });
      req.on('error', () => resolve());
      req.write(half, () => setTimeout(() => req.destroy(), 100));
    });
    const offsetNow = async () =>
      Number((await request('HEAD', `/v1/owners/alice/uploads/${id}`, aliceToken)).headers['upload-offset']);
    await until(async () => (await offsetNow()) === half.length, 'the received half to be recorded');
    expect(await alice.stat('alice', 'cut.bin')).toBeUndefined();

    const rest = await patch('alice', id, aliceToken, half.length, data.subarray(half.length));
    expect(rest.status).toBe(201);
    expect(JSON.parse(rest.body)).toMatchObject({ path: 'cut.bin', size: data.length, sha256: sha(data) });
  });

  test('offsets out of step, missing or overflowing are refused', async () => {
    const data = randomBytes(1000);
    const { id } = await startUpload('alice', aliceToken, { path: 'offsets.bin', size: data.length });
    expect((await patch('alice', id, aliceToken, 0, data.subarray(0, 400))).status).toBe(204);

    const behind = await patch('alice', id, aliceToken, 0, data.subarray(0, 400));
    expect(behind.status).toBe(409);
    expect(behind.headers['upload-offset']).toBe('400');
    expect(JSON.parse(behind.body).error).toMatch(/Upload-Offset 0 does not match the 400 bytes/);
    expect((await patch('alice', id, aliceToken, 700, data.subarray(700))).status).toBe(409);
    const missing = await patch('alice', id, aliceToken, undefined, data.subarray(400));
    expect(missing.status).toBe(400);
    expect(JSON.parse(missing.body).error).toMatch(/Upload-Offset header/);
    const tooMuch = await patch(
      'alice',
      id,
      aliceToken,
      400,
      Buffer.concat([data.subarray(400), Buffer.from('x')]),
    );
    expect(tooMuch.status).toBe(400);
    expect(JSON.parse(tooMuch.body).error).toMatch(/more bytes than the 1000 announced/);
    expect(await alice.stat('alice', 'offsets.bin')).toBeUndefined();
    expect(await partialFiles()).toContain(id);
    expect((await request('DELETE', `/v1/owners/alice/uploads/${id}`, aliceToken)).status).toBe(204);
    expect(await partialFiles()).not.toContain(id);

    const bad = await startUpload('alice', aliceToken, { path: '../escape', size: 1 });
    expect(bad.status).toBe(400);
    expect(JSON.parse(bad.body).error).toMatch(/'\.\.'/);
    expect((await startUpload('alice', aliceToken, { path: 'x', size: -1 })).status).toBe(400);
    expect((await startUpload('alice', aliceToken, { path: 'x', size: 1, sha256: 'abc' })).status).toBe(400);
  });

  test('a checksum that does not match stores nothing and ends the session', async () => {
    const data = randomBytes(5000);
    const { id } = await startUpload('alice', aliceToken, {
      path: 'wrong-sum.bin',
      size: data.length,
      sha256: sha(Buffer.from('other')),
    });
    const reply = await patch('alice', id, aliceToken, 0, data);
    expect(reply.status).toBe(400);
    expect(JSON.parse(reply.body).error).toMatch(/SHA-256/);
    expect(await alice.stat('alice', 'wrong-sum.bin')).toBeUndefined();
    expect((await request('HEAD', `/v1/owners/alice/uploads/${id}`, aliceToken)).status).toBe(404);
    expect(await partialFiles()).not.toContain(id);
  });

  test('the quota is enforced when the upload starts and again when it completes', async () => {
    const { file } = await localFile('quota.bin', 200_000);
    await setQuota(dataDir, 'bob', { bytes: 100_000 });
    const bob = new RepositoryClient({ url: server.url, token: bobToken });
    const refused = await bob.uploadResumable('bob', 'quota.bin', file).catch((e: unknown) => e);
    expect(refused).toBeInstanceOf(ResumableUploadError);
    expect((refused as ResumableUploadError).status).toBe(413);
    expect((refused as ResumableUploadError).message).toMatch(/quota of 100000 bytes/);

    // Room at the start, none left at the end: the commit refuses it and leaves nothing behind.
    await setQuota(dataDir, 'bob', { bytes: 300_000 });
    const data = randomBytes(200_000);
    const { id } = await startUpload('bob', bobToken, { path: 'late.bin', size: data.length });
    await setQuota(dataDir, 'bob', { bytes: 150_000 });
    const late = await patch('bob', id, bobToken, 0, data);
    expect(late.status).toBe(413);
    expect(JSON.parse(late.body).error).toMatch(/quota/);
    expect(await bob.list('bob')).toEqual([]);
    expect(await partialFiles()).not.toContain(id);
    await setQuota(dataDir, 'bob', {});
  });

  test('another owner cannot see, append to or drop a session', async () => {
    const data = randomBytes(2000);
    const { id } = await startUpload('alice', aliceToken, { path: 'private.bin', size: data.length });
    expect((await patch('alice', id, aliceToken, 0, data.subarray(0, 1000))).status).toBe(204);

    expect((await request('HEAD', `/v1/owners/alice/uploads/${id}`, bobToken)).status).toBe(403);
    expect((await patch('alice', id, bobToken, 1000, data.subarray(1000))).status).toBe(403);
    expect((await request('DELETE', `/v1/owners/alice/uploads/${id}`, bobToken)).status).toBe(403);
    // Under bob's own name the session does not exist at all.
    expect((await request('HEAD', `/v1/owners/bob/uploads/${id}`, bobToken)).status).toBe(404);
    expect((await patch('bob', id, bobToken, 1000, data.subarray(1000))).status).toBe(404);
    expect((await request('DELETE', `/v1/owners/bob/uploads/${id}`, bobToken)).status).toBe(404);
    expect((await startUpload('alice', bobToken, { path: 'x', size: 1 })).status).toBe(403);

    const mine = await request('GET', `/v1/owners/alice/uploads/${id}`, aliceToken);
    expect(JSON.parse(mine.body)).toMatchObject({ id, path: 'private.bin', offset: 1000, size: 2000 });
    expect((await request('DELETE', `/v1/owners/alice/uploads/${id}`, aliceToken)).status).toBe(204);
    expect((await request('HEAD', `/v1/owners/alice/uploads/${id}`, aliceToken)).status).toBe(404);

    const audit = (await fs.readFile(path.join(dataDir, 'audit.log'), 'utf8'))
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l) as Record<string, unknown>);
    expect(audit).toContainEqual(
      expect.objectContaining({ user: 'bob', owner: 'alice', action: 'upload-append', result: 'denied' }),
    );
    expect(audit).toContainEqual(
      expect.objectContaining({ user: 'alice', action: 'upload', path: 'in/big.bin', result: 'ok' }),
    );
  });

  test('unfinished sessions expire and their bytes are removed', async () => {
    const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-resumable-expiry-'));
    const token = (await addOwner(dir, 'carol')).token;
    const short = await startRepositoryServer({ dataDir: dir, port: 0, uploadExpiryMs: 400 });
    try {
      const reply = await new Promise<Reply>((resolve, reject) => {
        const req = http.request(new URL('/v1/owners/carol/uploads', short.url), {
          method: 'POST',
          headers: { Authorization: `Bearer ${token}` },
        });
        req.on('response', (res) => {
          let body = '';
          res.on('data', (c: Buffer) => (body += c.toString()));
          res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body }));
        });
        req.on('error', reject);
        req.end(JSON.stringify({ path: 'gone.bin', size: 10 }));
      });
      expect(reply.status).toBe(201);
      expect(await fs.readdir(path.join(dir, 'partial-uploads'))).toHaveLength(1);
      await until(
        async () => (await fs.readdir(path.join(dir, 'partial-uploads'))).length === 0,
        'the expired partial file to be removed',
      );
    } finally {
      await short.close();
      await fs.rm(dir, { recursive: true, force: true });
    }
  });
});
