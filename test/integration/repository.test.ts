import { createHash, randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import {
  addOwner,
  createServiceToken,
  createToken,
  listOwners,
  listTokens,
  revokeToken,
  setOwnerDisabled,
} from '../../repository/accounts/admin';
import { RepositoryClient, RepositoryError } from '../../repository/client';
import { configFromEnv, parseListen } from '../../repository/main';
import { MetadataDb } from '../../repository/store/metadataDb';
import { localOnly, onClusterBackend, storedBytes } from '../support/repositoryBackends';
import { startRepositoryServer, type RepositoryServer } from '../../repository/server';

const MAX = 1024 * 1024;

let dataDir: string;
let scratch: string;
let server: RepositoryServer;
let aliceToken: string;
let bobToken: string;
let serviceToken: string;
let alice: RepositoryClient;
let bob: RepositoryClient;
let hosts: RepositoryClient;

/** Large buffers are compared by digest: jest's toEqual walks a Buffer byte by byte, taking seconds. */
const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

interface RawReply {
  status: number;
  headers: http.IncomingHttpHeaders;
  body: Buffer;
}

/** A request with the target sent exactly as given (fetch and URL would normalise `..` away). */
function raw(
  method: string,
  target: string,
  opts: { token?: string; headers?: http.OutgoingHttpHeaders; body?: Buffer } = {},
) {
  const { hostname, port } = new URL(server.url);
  return new Promise<RawReply>((resolve, reject) => {
    const headers: http.OutgoingHttpHeaders = { ...opts.headers };
    if (opts.token) headers.Authorization = `Bearer ${opts.token}`;
    const req = http.request({ host: hostname, port, method, path: target, headers }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () =>
        resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks) }),
      );
      res.on('error', reject);
    });
    req.on('error', reject);
    req.end(opts.body);
  });
}

const errorOf = (r: RawReply): string => (JSON.parse(r.body.toString()) as { error: string }).error;

async function tmpEntries(): Promise<string[]> {
  return fs.readdir(path.join(dataDir, 'tmp'));
}

async function until(cond: () => Promise<boolean>, what: string, ms = 5000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!(await cond())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

async function writeScratch(name: string, data: Buffer): Promise<string> {
  const file = path.join(scratch, name);
  await fs.writeFile(file, data);
  return file;
}

beforeAll(async () => {
  dataDir = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-repo-test-'));
  scratch = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-repo-scratch-'));
  aliceToken = (await addOwner(dataDir, 'alice')).token;
  bobToken = (await addOwner(dataDir, 'bob')).token;
  serviceToken = await createServiceToken(dataDir, 'test-hosts');
  server = await startRepositoryServer({ dataDir, port: 0, maxFileBytes: MAX });
  alice = new RepositoryClient({ url: server.url, token: aliceToken });
  bob = new RepositoryClient({ url: server.url, token: bobToken });
  hosts = new RepositoryClient({ url: server.url, token: serviceToken });
});

afterAll(async () => {
  try {
    await server?.close();
  } finally {
    for (const dir of [dataDir, scratch]) if (dir) await fs.rm(dir, { recursive: true, force: true });
  }
});

describe('repository HTTP service', () => {
  test('health answers without a token', async () => {
    const r = await raw('GET', '/v1/health');
    expect(r.status).toBe(200);
    expect(JSON.parse(r.body.toString())).toEqual({ ok: true });
    expect(await new RepositoryClient({ url: server.url, token: 'x' }).health()).toBe(true);
  });

  test('upload and download round trip with sha256', async () => {
    const data = randomBytes(300_000);
    const src = await writeScratch('in.bin', data);
    const up = await alice.upload('alice', 'inputs/data.bin', src, { sha256: sha(data) });
    expect(up).toMatchObject({ path: 'inputs/data.bin', size: data.length, sha256: sha(data) });
    expect(sha((await storedBytes(dataDir, 'alice', 'inputs/data.bin'))!)).toBe(sha(data));

    const dest = path.join(scratch, 'out.bin');
    const down = await alice.download('alice', 'inputs/data.bin', dest);
    expect(down).toEqual(up);
    expect(sha(await fs.readFile(dest))).toBe(sha(data));
    expect(await alice.stat('alice', 'inputs/data.bin')).toEqual(up);
    expect(await alice.stat('alice', 'inputs/absent.bin')).toBeUndefined();

    const head = await raw('HEAD', '/v1/owners/alice/files/inputs/data.bin', { token: aliceToken });
    expect(head.headers.etag).toBe(`"${sha(data)}"`);
    expect(head.headers['content-length']).toBe(String(data.length));
    expect(head.body.length).toBe(0);
  });

  test('a stream of unknown length uploads too', async () => {
    const data = randomBytes(200_000);
    const up = await alice.upload(
      'alice',
      'streamed.bin',
      Readable.from([data.subarray(0, 7), data.subarray(7)]),
    );
    expect(up.sha256).toBe(sha(data));
    expect(sha((await storedBytes(dataDir, 'alice', 'streamed.bin'))!)).toBe(sha(data));
  });

  test('range downloads', async () => {
    const data = randomBytes(10_000);
    await alice.upload('alice', 'ranged.bin', Readable.from([data]));
    const part = await alice.downloadStream('alice', 'ranged.bin', { start: 100, end: 199 });
    const chunks: Buffer[] = [];
    for await (const c of part) chunks.push(c as Buffer);
    expect(sha(Buffer.concat(chunks))).toBe(sha(data.subarray(100, 200)));

    const tail = await raw('GET', '/v1/owners/alice/files/ranged.bin', {
      token: aliceToken,
      headers: { Range: 'bytes=-5' },
    });
    expect(tail.status).toBe(206);
    expect(tail.headers['content-range']).toBe('bytes 9995-9999/10000');
    expect(sha(tail.body)).toBe(sha(data.subarray(9995)));

    const open = await raw('GET', '/v1/owners/alice/files/ranged.bin', {
      token: aliceToken,
      headers: { Range: 'bytes=9000-' },
    });
    expect(open.status).toBe(206);
    expect(sha(open.body)).toBe(sha(data.subarray(9000)));

    const beyond = await raw('GET', '/v1/owners/alice/files/ranged.bin', {
      token: aliceToken,
      headers: { Range: 'bytes=10000-10005' },
    });
    expect(beyond.status).toBe(416);
    expect(beyond.headers['content-range']).toBe('bytes */10000');
    await expect(alice.downloadStream('alice', 'ranged.bin', { start: 20_000 })).rejects.toMatchObject({
      status: 416,
    });
  });

  test('list by prefix, sorted, NFC-normalised', async () => {
    for (const p of ['list/b.txt', 'list/a.txt', 'list/sub/c.txt', 'other/d.txt', 'list/cafe\u0301.txt']) {
      await alice.upload('alice', p, Readable.from([Buffer.from(p)]));
    }
    const listed = await alice.list('alice', 'list/');
    expect(listed.map((f) => f.path)).toEqual([
      'list/a.txt',
      'list/b.txt',
      'list/café.txt',
      'list/sub/c.txt',
    ]);
    expect(listed[0]).toMatchObject({ size: 10, sha256: sha(Buffer.from('list/a.txt')) });
    expect(typeof listed[0].mtime).toBe('string');
    expect((await alice.list('alice', 'li')).length).toBe(4);
    expect((await alice.list('alice')).map((f) => f.path)).toContain('other/d.txt');
    const bad = await raw('GET', '/v1/owners/alice/files?prefix=a%00b', { token: aliceToken });
    expect(bad.status).toBe(400);
    expect(errorOf(bad)).toMatch(/NUL/);
  });

  test('delete removes file and empty folders; 404 when absent', async () => {
    await alice.upload('alice', 'gone/deep/x.txt', Readable.from([Buffer.from('x')]));
    expect(await alice.delete('alice', 'gone/deep/x.txt')).toBe(true);
    expect(await alice.delete('alice', 'gone/deep/x.txt')).toBe(false);
    expect(await storedBytes(dataDir, 'alice', 'gone/deep/x.txt')).toBeUndefined();
    if (!onClusterBackend())
      await expect(fs.stat(path.join(dataDir, 'files', 'alice', 'gone'))).rejects.toMatchObject({
        code: 'ENOENT',
      });
    const r = await raw('DELETE', '/v1/owners/alice/files/gone/deep/x.txt', { token: aliceToken });
    expect(r.status).toBe(404);
    expect(errorOf(r)).toMatch(/no such file/);
    await expect(alice.download('alice', 'gone/deep/x.txt', path.join(scratch, 'g'))).rejects.toMatchObject({
      status: 404,
    });
  });

  test('overwrite replaces the file and its metadata', async () => {
    const v1 = Buffer.from('version one');
    const v2 = Buffer.from('version two, longer');
    await alice.upload('alice', 'over.txt', Readable.from([v1]));
    const up = await alice.upload('alice', 'over.txt', Readable.from([v2]));
    expect(up).toMatchObject({ size: v2.length, sha256: sha(v2) });
    const dest = path.join(scratch, 'over.txt');
    await alice.download('alice', 'over.txt', dest);
    expect(await fs.readFile(dest)).toEqual(v2);
    expect((await alice.list('alice', 'over')).map((f) => f.sha256)).toEqual([sha(v2)]);
  });

  test('concurrent uploads to one path leave metadata naming the bytes on disk', async () => {
    const versions = Array.from({ length: 6 }, (_, i) => randomBytes(20_000 + i));
    await Promise.all(versions.map((v) => alice.upload('alice', 'raced.bin', Readable.from([v]))));
    const onDisk = (await storedBytes(dataDir, 'alice', 'raced.bin'))!;
    const recorded = await alice.stat('alice', 'raced.bin');
    expect(recorded).toMatchObject({ size: onDisk.length, sha256: sha(onDisk) });
    expect(versions.map(sha)).toContain(sha(onDisk));
    expect(await tmpEntries()).toEqual([]);
  });

  test('a path cannot be both a file and a folder', async () => {
    await alice.upload('alice', 'clash', Readable.from([Buffer.from('f')]));
    await expect(
      alice.upload('alice', 'clash/inner', Readable.from([Buffer.from('g')])),
    ).rejects.toMatchObject({
      status: 409,
      message: expect.stringMatching(/'clash' is a file/),
    });
    await alice.upload('alice', 'dir/inner', Readable.from([Buffer.from('g')]));
    await expect(alice.upload('alice', 'dir', Readable.from([Buffer.from('h')]))).rejects.toMatchObject({
      status: 409,
      message: expect.stringMatching(/is a folder/),
    });
    expect(await tmpEntries()).toEqual([]);
  });

  test('401 for a missing, malformed or wrong token', async () => {
    const none = await raw('GET', '/v1/owners/alice/files/inputs/data.bin');
    expect(none.status).toBe(401);
    expect(errorOf(none)).toMatch(/missing access token/);
    expect(none.headers['www-authenticate']).toBe('Bearer');
    const basic = await raw('GET', '/v1/owners/alice/files', { headers: { Authorization: 'Basic YTpi' } });
    expect(basic.status).toBe(401);
    expect(errorOf(basic)).toMatch(/Bearer/);
    const wrong = await raw('GET', '/v1/owners/alice/files/inputs/data.bin', { token: aliceToken + 'x' });
    expect(wrong.status).toBe(401);
    expect(errorOf(wrong)).toMatch(/invalid access token/);
    await expect(
      new RepositoryClient({ url: server.url, token: 'vsp_nope' }).list('alice'),
    ).rejects.toMatchObject({
      status: 401,
    });
  });

  test("an owner token never reaches another owner's files", async () => {
    const secret = Buffer.from('bob-secret-' + randomBytes(16).toString('hex'));
    await bob.upload('bob', 'private.txt', Readable.from([secret]));
    for (const method of ['GET', 'HEAD', 'DELETE', 'PUT']) {
      const r = await raw(method, '/v1/owners/bob/files/private.txt', {
        token: aliceToken,
        body: method === 'PUT' ? Buffer.from('overwritten') : undefined,
      });
      expect(r.status).toBe(403);
      expect(r.body.includes(secret)).toBe(false);
    }
    const listing = await raw('GET', '/v1/owners/bob/files', { token: aliceToken });
    expect(listing.status).toBe(403);
    expect(listing.body.toString()).not.toMatch(/private/);
    // Not even whether an owner exists leaks.
    expect((await raw('GET', '/v1/owners/nobody/files/x', { token: aliceToken })).status).toBe(403);
    await expect(alice.download('bob', 'private.txt', path.join(scratch, 'stolen'))).rejects.toMatchObject({
      status: 403,
    });
    await expect(fs.stat(path.join(scratch, 'stolen'))).rejects.toMatchObject({ code: 'ENOENT' });
    // Bob's file is untouched.
    expect(await storedBytes(dataDir, 'bob', 'private.txt')).toEqual(secret);
  });

  test("a service token reads only the provider's base images, never an owner's files", async () => {
    const data = Buffer.from('from a host worker');
    const refused = { status: 403, message: expect.stringMatching(/reads only base-images\//) };
    await expect(hosts.upload('bob', 'outputs/result.txt', Readable.from([data]))).rejects.toMatchObject(
      refused,
    );
    await expect(hosts.download('alice', 'inputs/data.bin', path.join(scratch, 'x'))).rejects.toMatchObject(
      refused,
    );
    await expect(hosts.stat('alice', 'inputs/data.bin')).rejects.toMatchObject({ status: 403 });
    await expect(hosts.list('alice', 'inputs/')).rejects.toMatchObject(refused);
    await expect(hosts.delete('alice', 'inputs/data.bin')).rejects.toMatchObject(refused);
    expect((await raw('GET', '/v1/owners/alice/images', { token: serviceToken })).status).toBe(403);
    expect((await raw('GET', '/v1/owners/alice/tasks', { token: serviceToken })).status).toBe(403);
    // Base images, in any existing owner's view, are what hosts may read by themselves.
    expect(await hosts.stat('alice', 'base-images/none')).toBeUndefined();
    const nobody = await raw('GET', '/v1/owners/nobody/files/base-images/none', { token: serviceToken });
    expect([nobody.status, errorOf(nobody)]).toEqual([404, expect.stringMatching(/no such owner/)]);
    expect(await storedBytes(dataDir, 'alice', 'inputs/data.bin')).toBeTruthy();
  });

  test('bad owner names and paths are refused with 400 naming the problem', async () => {
    const cases: [string, RegExp][] = [
      ['/v1/owners/alice/files/../x', /contains '\.\.'/],
      ['/v1/owners/alice/files/%2e%2e/x', /contains '\.\.'/],
      ['/v1/owners/alice/files/a/%2E%2E/%2E%2E/x', /contains '\.\.'/],
      ['/v1/owners/alice/files/./x', /contains '\.'/],
      ['/v1/owners/alice/files//etc/passwd', /absolute/],
      ['/v1/owners/alice/files/%2Fetc%2Fpasswd', /absolute/],
      ['/v1/owners/alice/files/a%00b', /NUL/],
      ['/v1/owners/alice/files/a%0Ab', /control character/],
      ['/v1/owners/alice/files/', /empty/],
      ['/v1/owners/alice/files/a//b', /empty segment/],
      ['/v1/owners/alice/files/a%5Cb', /backslash/],
      ['/v1/owners/alice/files/%E0%A4%A', /percent-encoding/],
      [`/v1/owners/alice/files/${'n'.repeat(256)}`, /segment longer than 255 bytes/],
      [`/v1/owners/alice/files/${Array(6).fill('s'.repeat(200)).join('/')}`, /longer than 1024 bytes/],
      ['/v1/owners/Alice/files/x', /owner name "Alice" is invalid/],
      ['/v1/owners/..%2F..%2Fetc/files/x', /owner name "..\/..\/etc" is invalid/],
    ];
    for (const [target, why] of cases) {
      for (const method of ['GET', 'PUT']) {
        const r = await raw(method, target, {
          token: serviceToken,
          body: method === 'PUT' ? Buffer.from('x') : undefined,
        });
        expect([target, method, r.status]).toEqual([target, method, 400]);
        expect([target, errorOf(r)]).toEqual([target, expect.stringMatching(why)]);
      }
    }
    expect(await tmpEntries()).toEqual([]);
    // The client refuses them before sending.
    await expect(alice.upload('alice', '../x', Readable.from([Buffer.from('x')]))).rejects.toBeInstanceOf(
      RepositoryError,
    );
  });

  test('over the size limit: 413 and nothing stored, whether announced or streamed', async () => {
    const big = randomBytes(MAX + 1);
    const announced = await raw('PUT', '/v1/owners/alice/files/big-announced.bin', {
      token: aliceToken,
      body: big,
    });
    expect(announced.status).toBe(413);
    expect(errorOf(announced)).toMatch(/larger than the limit of 1048576 bytes/);

    // No Content-Length: the limit trips while streaming.
    await expect(
      alice.upload(
        'alice',
        'big-streamed.bin',
        Readable.from([big.subarray(0, MAX / 2), big.subarray(MAX / 2)]),
      ),
    ).rejects.toMatchObject({ status: 413 });
    // The client announces a file's size up front.
    const src = await writeScratch('big.bin', big);
    await expect(alice.upload('alice', 'big-file.bin', src)).rejects.toMatchObject({ status: 413 });

    expect(await alice.list('alice', 'big')).toEqual([]);
    await until(async () => (await tmpEntries()).length === 0, 'temp files to go');
    expect(await storedBytes(dataDir, 'alice', 'big-streamed.bin')).toBeUndefined();
    // Exactly the limit is fine.
    expect((await alice.upload('alice', 'exact.bin', Readable.from([big.subarray(0, MAX)]))).size).toBe(MAX);
  });

  test('X-Content-SHA256 mismatch: 400 and nothing stored (an existing version survives)', async () => {
    const old = Buffer.from('the good version');
    await alice.upload('alice', 'checked.txt', Readable.from([old]));
    const data = Buffer.from('tampered in transit');
    await expect(
      alice.upload('alice', 'checked.txt', Readable.from([data]), { sha256: sha(Buffer.from('other')) }),
    ).rejects.toMatchObject({ status: 400, message: expect.stringMatching(/SHA-256 .* nothing stored/) });
    await expect(
      alice.upload('alice', 'never.txt', Readable.from([data]), { sha256: sha(Buffer.from('other')) }),
    ).rejects.toMatchObject({ status: 400 });
    const malformed = await raw('PUT', '/v1/owners/alice/files/never.txt', {
      token: aliceToken,
      headers: { 'X-Content-SHA256': 'abc' },
      body: data,
    });
    expect(malformed.status).toBe(400);
    expect(errorOf(malformed)).toMatch(/64 hex digits/);
    expect(await alice.stat('alice', 'never.txt')).toBeUndefined();
    expect(await storedBytes(dataDir, 'alice', 'checked.txt')).toEqual(old);
    expect((await alice.stat('alice', 'checked.txt'))?.sha256).toBe(sha(old));
    expect(await tmpEntries()).toEqual([]);
  });

  localOnly()('a client aborting mid-upload leaves no file and no temp file', async () => {
    const { hostname, port } = new URL(server.url);
    const req = http.request({
      host: hostname,
      port,
      method: 'PUT',
      path: '/v1/owners/alice/files/aborted.bin',
      headers: { Authorization: `Bearer ${aliceToken}`, 'Content-Length': 900_000 },
    });
    req.on('error', () => undefined);
    req.write(randomBytes(300_000));
    await until(async () => (await tmpEntries()).length === 1, 'the upload to start');
    req.destroy();
    await until(async () => (await tmpEntries()).length === 0, 'the temp file to be removed');
    expect(await alice.stat('alice', 'aborted.bin')).toBeUndefined();
    expect(await storedBytes(dataDir, 'alice', 'aborted.bin')).toBeUndefined();
  });

  localOnly()('client download is atomic and verifies the checksum', async () => {
    const data = randomBytes(50_000);
    await alice.upload('alice', 'verify.bin', Readable.from([data]));
    // Corrupt the stored bytes behind the server's back (same size, so only the checksum can tell).
    const onDisk = path.join(dataDir, 'files', 'alice', 'verify.bin');
    const corrupt = Buffer.from(data);
    corrupt[1234] ^= 0xff;
    await fs.writeFile(onDisk, corrupt);

    const destDir = await fs.mkdtemp(path.join(scratch, 'dl-'));
    const dest = path.join(destDir, 'verify.bin');
    await fs.writeFile(dest, 'previous content');
    await expect(alice.download('alice', 'verify.bin', dest)).rejects.toMatchObject({
      status: 0,
      message: expect.stringMatching(/corrupt/),
    });
    expect(await fs.readFile(dest, 'utf8')).toBe('previous content');
    expect(await fs.readdir(destDir)).toEqual(['verify.bin']);
  });

  localOnly()('symlinks inside the data dir are never followed', async () => {
    const outside = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-repo-outside-'));
    try {
      await fs.writeFile(path.join(outside, 'secret'), 'outside-secret');
      const ownerDir = path.join(dataDir, 'files', 'alice');
      await fs.symlink(outside, path.join(ownerDir, 'escape'));
      await fs.symlink(path.join(outside, 'secret'), path.join(ownerDir, 'linked'));
      // Pretend metadata exists for the symlinks, as if planted by someone with disk access.
      const db = MetadataDb.open(dataDir);
      const fake = { size: 14, sha256: sha(Buffer.from('outside-secret')), mtime: new Date().toISOString() };
      db.upsertFile('alice', { path: 'linked', ...fake });
      db.upsertFile('alice', { path: 'escape/secret', ...fake });
      db.close();

      for (const p of ['linked', 'escape/secret']) {
        const r = await raw('GET', `/v1/owners/alice/files/${p}`, { token: aliceToken });
        expect(r.status).toBe(500);
        expect(r.body.toString()).not.toMatch(/outside-secret/);
      }
      const put = await raw('PUT', '/v1/owners/alice/files/escape/planted', {
        token: aliceToken,
        body: Buffer.from('x'),
      });
      expect(put.status).toBe(500);
      expect(errorOf(put)).toMatch(/symlink/);
      expect(await fs.readdir(outside)).toEqual(['secret']);
      // Overwriting a symlinked file replaces the link, never the target.
      await alice.upload('alice', 'linked', Readable.from([Buffer.from('replaced')]));
      expect(await fs.readFile(path.join(outside, 'secret'), 'utf8')).toBe('outside-secret');
      expect((await fs.lstat(path.join(ownerDir, 'linked'))).isFile()).toBe(true);
      // Deleting through a symlinked folder forgets the record but unlinks nothing outside.
      expect(await alice.delete('alice', 'escape/secret')).toBe(true);
      expect(await fs.readFile(path.join(outside, 'secret'), 'utf8')).toBe('outside-secret');
      await fs.unlink(path.join(ownerDir, 'escape'));
    } finally {
      await fs.rm(outside, { recursive: true, force: true });
    }
  });
});

describe('repository accounts', () => {
  test('owners are unique and validated; listOwners counts active tokens', async () => {
    await expect(addOwner(dataDir, 'alice')).rejects.toThrow(/already exists/);
    await expect(addOwner(dataDir, 'Bad Name')).rejects.toThrow(/owner name "Bad Name" is invalid/);
    await expect(createToken(dataDir, 'nobody', 'ci')).rejects.toThrow(/no such owner: nobody/);
    await expect(createToken(dataDir, 'alice', '')).rejects.toThrow(/token name/);
    const owners = await listOwners(dataDir);
    expect(owners.map((o) => o.name)).toEqual(['alice', 'bob']);
    expect(owners[0]).toMatchObject({ disabled: false, activeTokens: 1 });
  });

  localOnly()('tokens are stored only hashed', async () => {
    const db = await fs.readFile(path.join(dataDir, 'repository.db'));
    const wal = await fs.readFile(path.join(dataDir, 'repository.db-wal')).catch(() => Buffer.alloc(0));
    for (const token of [aliceToken, bobToken, serviceToken]) {
      expect(token).toMatch(/^vsp_[A-Za-z0-9_-]{43}$/);
      expect(db.includes(token) || wal.includes(token)).toBe(false);
    }
  });

  test('a second token works; a revoked one is refused', async () => {
    const token = await createToken(dataDir, 'alice', 'laptop');
    const laptop = new RepositoryClient({ url: server.url, token });
    expect((await laptop.list('alice', 'inputs/')).length).toBe(1);
    const row = (await listTokens(dataDir, 'alice')).find((t) => t.name === 'laptop');
    expect(row).toMatchObject({ owner: 'alice', revoked: undefined });
    await revokeToken(dataDir, row!.id);
    await expect(laptop.list('alice')).rejects.toMatchObject({
      status: 401,
      message: expect.stringMatching(/revoked/),
    });
    await expect(revokeToken(dataDir, row!.id)).rejects.toThrow(/no unrevoked token/);
  });

  test('a disabled owner is refused to its own tokens and to service tokens', async () => {
    await setOwnerDisabled(dataDir, 'bob', true);
    try {
      await expect(bob.list('bob')).rejects.toMatchObject({
        status: 401,
        message: expect.stringMatching(/disabled/),
      });
      const r = await raw('GET', '/v1/owners/bob/files/base-images/none', { token: serviceToken });
      expect([r.status, errorOf(r)]).toEqual([403, expect.stringMatching(/disabled/)]);
    } finally {
      await setOwnerDisabled(dataDir, 'bob', false);
    }
    expect((await bob.list('bob')).length).toBeGreaterThan(0);
  });

  localOnly()('a supplied service token is ensured once and must not be weak', async () => {
    const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-repo-svc-'));
    try {
      await expect(startRepositoryServer({ dataDir: dir, port: 0, serviceToken: 'short' })).rejects.toThrow(
        /too short/,
      );
      const token = 'a-long-enough-service-token-for-hosts';
      for (let i = 0; i < 2; i++) {
        const s = await startRepositoryServer({ dataDir: dir, port: 0, serviceToken: token });
        try {
          // Known (not 401): the hosts' token reads base images, and there is no owner nobody.
          expect(
            await new RepositoryClient({ url: s.url, token })
              .download('nobody', 'base-images/x', path.join(dir, 'x'))
              .catch((e: RepositoryError) => e.status),
          ).toBe(404);
        } finally {
          await s.close();
        }
      }
      expect((await listTokens(dir)).map((t) => [t.name, t.owner])).toEqual([['hosts', undefined]]);
    } finally {
      await fs.rm(dir, { recursive: true, force: true });
    }
  });
});

describe('repository process configuration', () => {
  test('environment is validated with clear errors', () => {
    expect(() => configFromEnv({})).toThrow(/VSP_REPO_DIR is required/);
    expect(configFromEnv({ VSP_REPO_DIR: '/d' })).toMatchObject({
      dataDir: '/d',
      host: '127.0.0.1',
      port: 8420,
      maxFileBytes: 64 * 1024 ** 3,
      serviceToken: undefined,
    });
    expect(() => configFromEnv({ VSP_REPO_DIR: '/d', VSP_REPO_MAX_FILE_BYTES: '1e9' })).toThrow(
      /VSP_REPO_MAX_FILE_BYTES/,
    );
    expect(() => configFromEnv({ VSP_REPO_DIR: '/d', VSP_REPO_LISTEN: 'localhost' })).toThrow(
      /VSP_REPO_LISTEN/,
    );
    expect(parseListen('[::1]:0')).toEqual({ host: '::1', port: 0 });
    expect(() => parseListen('h:70000')).toThrow(/port 0-65535/);
  });
});
