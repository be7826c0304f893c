import { withBackend } from '../../repository/store/backend';
import { execFile, execFileSync } from 'node:child_process';
import { createReadStream, promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { PassThrough, Readable } from 'node:stream';
import { promisify } from 'node:util';
import Database from 'better-sqlite3';
import { Client, FTPError } from 'basic-ftp';
import { addOwner, createServiceToken, setPassword } from '../../repository/accounts/admin';
import { RepositoryClient, RepositoryError, type ImageEntry } from '../../repository/client';
import { addBaseImage } from '../../repository/store/imageStore';
import { MetadataDb, repositoryDbPath } from '../../repository/store/metadataDb';
import type { RepositoryServer } from '../../repository/server';
import { parseTaskSpec, imageRepoPath } from '../../spec/taskSpec';
import { sha256File } from '../../storage/imageCache';
import { startAllProtocols } from '../support/repositoryServer';
import { refusal, SftpTestClient } from '../support/sftpTestClient';

const PASSWORD = 'correct horse battery staple';
const run = promisify(execFile);
const MiB = 1024 * 1024;

let dataDir: string;
let aliceToken: string;
let work: string;
let server: RepositoryServer;
let alice: RepositoryClient;
let bob: RepositoryClient;
let hosts: RepositoryClient;
let cert: Buffer;
/** A 32 MiB qcow2 made by qemu-img, and its hash. */
let qcow2: string;
let qcow2Sha: string;
let base: string;
let baseSha: string;

const qemuImg = (...args: string[]) => execFileSync('qemu-img', args, { stdio: 'pipe' });

/** Lists until no image is still being inspected (inspection runs after the upload has returned). */
async function settledImages(c: RepositoryClient, owner: string): Promise<ImageEntry[]> {
  const deadline = Date.now() + 120_000;
  for (;;) {
    const images = await c.listImages(owner);
    if (!images.some((i) => i.status === 'inspecting')) return images;
    if (Date.now() > deadline) throw new Error(`images still inspecting: ${JSON.stringify(images)}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

const sftpLogin = () =>
  SftpTestClient.connect({ port: server.sftp?.port ?? 0, username: 'alice', password: PASSWORD });

async function ftpsLogin(): Promise<Client> {
  const c = new Client(10_000);
  await c.access({
    host: '127.0.0.1',
    port: server.ftps?.port ?? 0,
    user: 'alice',
    password: PASSWORD,
    secure: true,
    secureOptions: { ca: cert, checkServerIdentity: () => undefined },
  });
  return c;
}

async function ftpRefusal(p: Promise<unknown>): Promise<number> {
  const err = await p.then(
    () => undefined,
    (e: unknown) => e,
  );
  if (!(err instanceof FTPError)) throw new Error(`expected an FTP refusal, got ${String(err)}`);
  return err.code;
}

async function httpStatus(p: Promise<unknown>): Promise<number> {
  const err = await p.then(
    () => undefined,
    (e: unknown) => e,
  );
  if (!(err instanceof RepositoryError)) throw new Error(`expected a refusal, got ${String(err)}`);
  return err.status;
}

beforeAll(async () => {
  dataDir = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-images-'));
  work = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-images-work-'));
  aliceToken = (await addOwner(dataDir, 'alice')).token;
  const bobToken = (await addOwner(dataDir, 'bob')).token;
  await setPassword(dataDir, 'alice', PASSWORD);
  const hostsToken = await createServiceToken(dataDir, 'hosts');
  qcow2 = path.join(work, 'mine.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', qcow2, '32M');
  qcow2Sha = await sha256File(qcow2);
  base = path.join(work, 'base.raw');
  execFileSync('mke2fs', ['-q', '-t', 'ext4', base, '8M'], { stdio: 'pipe' });
  baseSha = await sha256File(base);
  server = await startAllProtocols(dataDir);
  cert = await fs.readFile(path.join(dataDir, 'ftps_cert.pem'));
  alice = new RepositoryClient({ url: server.url, token: aliceToken });
  bob = new RepositoryClient({ url: server.url, token: bobToken });
  hosts = new RepositoryClient({ url: server.url, token: hostsToken });
  // The admin CLI's way in, next to the running server.
  await withBackend(dataDir, (backend) => addBaseImage(backend, 'debian-12', createReadStream(base)));
});

afterAll(async () => {
  await server?.close();
  await fs.rm(dataDir, { recursive: true, force: true });
  await fs.rm(work, { recursive: true, force: true });
});

describe("owners' images", () => {
  test('an image uploaded over HTTP is listed at once, then with its format, sizes and checksum', async () => {
    await alice.upload('alice', 'images/http.qcow2', qcow2);
    const first = (await alice.listImages('alice')).find((i) => i.path === 'images/http.qcow2');
    expect(first).toMatchObject({ origin: 'owner', sha256: qcow2Sha, bytes: (await fs.stat(qcow2)).size });
    expect(['inspecting', 'ok']).toContain(first?.status);
    const images = await settledImages(alice, 'alice');
    expect(images.find((i) => i.path === 'images/http.qcow2')).toMatchObject({
      name: 'images/http.qcow2',
      status: 'ok',
      format: 'qcow2',
      virtualBytes: 32 * MiB,
      hasBackingFile: false,
      sha256: qcow2Sha,
    });
    expect(images.find((i) => i.path === 'images/http.qcow2')?.actualBytes).toBeGreaterThan(0);
  });

  test('an image uploaded over SFTP, or renamed into images/, is inspected the same way', async () => {
    const c = await sftpLogin();
    try {
      await c.mkdir('/images').catch(() => undefined);
      await c.fastPut(qcow2, '/images/sftp.qcow2');
      await c.writeFile('/elsewhere.qcow2', await fs.readFile(qcow2));
      // Not under images/: not listed.
      expect((await alice.listImages('alice')).map((i) => i.path)).not.toContain('elsewhere.qcow2');
      await c.rename('/elsewhere.qcow2', '/images/moved.qcow2');
    } finally {
      c.end();
    }
    const images = await settledImages(alice, 'alice');
    for (const p of ['images/sftp.qcow2', 'images/moved.qcow2'])
      expect(images.find((i) => i.path === p)).toMatchObject({
        status: 'ok',
        format: 'qcow2',
        sha256: qcow2Sha,
      });
  });

  test('files that are not bootable images are listed invalid, with the reason', async () => {
    await alice.upload('alice', 'images/notes.txt', Readable.from([Buffer.from('not a disk\n')]));
    const backed = path.join(work, 'backed.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-b', qcow2, '-F', 'qcow2', backed);
    await alice.upload('alice', 'images/backed.qcow2', backed);
    const vdi = path.join(work, 'disk.vdi');
    qemuImg('create', '-q', '-f', 'vdi', vdi, '16M');
    await alice.upload('alice', 'images/disk.vdi', vdi);
    const images = await settledImages(alice, 'alice');
    const byPath = (p: string) => images.find((i) => i.path === p);
    expect(byPath('images/notes.txt')).toMatchObject({
      status: 'invalid',
      error: expect.stringMatching(/not a disk image/),
    });
    expect(byPath('images/backed.qcow2')).toMatchObject({
      status: 'invalid',
      format: 'qcow2',
      hasBackingFile: true,
      error: expect.stringMatching(/has a backing file .* must be self-contained/),
    });
    expect(byPath('images/disk.vdi')).toMatchObject({
      status: 'invalid',
      format: 'vdi',
      error: expect.stringMatching(/only qcow2 and raw/),
    });
  });

  test('`vsp image ls` lists them with their status and the name a task spec takes', async () => {
    const { stdout } = await run(process.execPath, ['dist/cli/vsp.js', 'image', 'ls'], {
      env: { ...process.env, VSP_REPOSITORY_URL: server.url, VSP_TOKEN: aliceToken, VSP_OWNER: 'alice' },
    });
    const lines = stdout.trim().split('\n');
    expect(lines).toContainEqual(
      expect.stringMatching(/^ok\s+qcow2\s+33554432\s+\d+\s+[0-9a-f]{12}\s+images\/http\.qcow2$/),
    );
    expect(lines).toContainEqual(
      expect.stringMatching(/^invalid\s.*images\/notes\.txt\s+\(.*not a disk image/),
    );
    expect(lines).toContainEqual(expect.stringMatching(/^ok\s+raw\s.*base:debian-12$/));
  });

  test("another owner's images are invisible", async () => {
    const own = await bob.listImages('bob');
    expect(own.filter((i) => i.origin === 'owner')).toEqual([]);
    expect(own.map((i) => i.name)).toEqual(['base:debian-12']);
    expect(await httpStatus(bob.listImages('alice'))).toBe(403);
  });
});

describe("the provider's base images", () => {
  test('are listed to every owner with their facts', async () => {
    const entry = (await settledImages(bob, 'bob')).find((i) => i.origin === 'provider');
    expect(entry).toEqual({
      name: 'base:debian-12',
      path: 'base-images/debian-12',
      origin: 'provider',
      status: 'ok',
      format: 'raw',
      virtualBytes: 8 * MiB,
      bytes: 8 * MiB,
      actualBytes: expect.any(Number),
      hasBackingFile: false,
      sha256: baseSha,
      mtime: expect.any(String),
    });
  });

  test('are readable but not writable, deletable or renamable over HTTP', async () => {
    const chunks: Buffer[] = [];
    for await (const c of await alice.downloadStream('alice', 'base-images/debian-12'))
      chunks.push(c as Buffer);
    expect(Buffer.concat(chunks).equals(await fs.readFile(base))).toBe(true);
    const junk = () => Readable.from([Buffer.from('overwrite')]);
    expect(await httpStatus(alice.upload('alice', 'base-images/debian-12', junk()))).toBe(403);
    expect(await httpStatus(alice.upload('alice', 'base-images/new', junk()))).toBe(403);
    expect(await httpStatus(alice.delete('alice', 'base-images/debian-12'))).toBe(403);
    expect(await httpStatus(alice.uploadResumable('alice', 'base-images/x', base, { retries: 0 }))).toBe(403);
    expect(await sha256File(path.join(dataDir, 'base-images', 'debian-12'))).toBe(baseSha);
  });

  test('are readable but not writable, deletable or renamable over SFTP', async () => {
    const c = await sftpLogin();
    try {
      expect((await c.readdir('/')).map((e) => e.filename)).toContain('base-images');
      expect((await c.readdir('/base-images')).map((e) => [e.filename, e.attrs.size])).toEqual([
        ['debian-12', 8 * MiB],
      ]);
      expect((await c.readFile('/base-images/debian-12')).equals(await fs.readFile(base))).toBe(true);
      const denied = /read-only/;
      expect(await refusal(c.writeFile('/base-images/debian-12', 'x'))).toMatch(denied);
      expect(await refusal(c.writeFile('/base-images/other', 'x'))).toMatch(denied);
      expect(await refusal(c.unlink('/base-images/debian-12'))).toMatch(denied);
      expect(await refusal(c.rename('/base-images/debian-12', '/mine'))).toMatch(denied);
      await c.writeFile('/mine.txt', 'mine');
      expect(await refusal(c.rename('/mine.txt', '/base-images/mine.txt'))).toMatch(denied);
      expect(await refusal(c.mkdir('/base-images/sub'))).toMatch(denied);
      expect(await refusal(c.rmdir('/base-images'))).toMatch(denied);
      expect(await refusal(c.rename('/base-images', '/stolen'))).toMatch(denied);
      expect((await c.readdir('/base-images')).map((e) => e.filename)).toEqual(['debian-12']);
    } finally {
      c.end();
    }
  });

  test('are readable but not writable, deletable or renamable over FTPS', async () => {
    const c = await ftpsLogin();
    try {
      expect((await c.list('base-images')).map((e) => [e.name, e.size])).toEqual([['debian-12', 8 * MiB]]);
      const sink = new PassThrough();
      const chunks: Buffer[] = [];
      sink.on('data', (b: Buffer) => chunks.push(b));
      await c.downloadTo(sink, 'base-images/debian-12');
      expect(Buffer.concat(chunks).equals(await fs.readFile(base))).toBe(true);
      expect(
        await ftpRefusal(c.uploadFrom(Readable.from([Buffer.from('x')]), 'base-images/debian-12')),
      ).toBeGreaterThanOrEqual(500);
      expect(await ftpRefusal(c.remove('base-images/debian-12'))).toBeGreaterThanOrEqual(500);
      expect(await ftpRefusal(c.rename('base-images/debian-12', 'mine'))).toBeGreaterThanOrEqual(500);
      expect(await ftpRefusal(c.send('MKD base-images/sub'))).toBeGreaterThanOrEqual(500);
      expect(await ftpRefusal(c.send('RMD base-images'))).toBeGreaterThanOrEqual(500);
    } finally {
      c.close();
    }
    expect(await sha256File(path.join(dataDir, 'base-images', 'debian-12'))).toBe(baseSha);
    const denials = (await fs.readFile(path.join(dataDir, 'audit.log'), 'utf8'))
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l) as Record<string, unknown>)
      // SFTP records the client's own path, with its leading '/'.
      .filter((e) => e.result === 'denied' && /^\/?base-images/.test(String(e.path)));
    expect(new Set(denials.map((e) => e.protocol))).toEqual(new Set(['http', 'sftp', 'ftps']));
    for (const e of denials) expect(e.detail).toMatch(/read-only/);
    const ftpsActions = new Set(denials.filter((e) => e.protocol === 'ftps').map((e) => e.action));
    for (const action of ['upload', 'delete', 'rename', 'mkdir']) expect(ftpsActions).toContain(action);
  });

  test("a task spec names one as 'base:<name>', and a host's service token fetches it by that name", async () => {
    const spec = parseTaskSpec({ owner: 'bob', command: 'true', image: 'base:debian-12' });
    expect(spec.image).toBe('base:debian-12');
    expect(imageRepoPath(spec.image)).toBe('base-images/debian-12');
    expect(await hosts.stat('bob', imageRepoPath(spec.image))).toMatchObject({
      sha256: baseSha,
      size: 8 * MiB,
    });
    const got = path.join(work, 'fetched');
    await hosts.download('bob', imageRepoPath(spec.image), got);
    expect(await sha256File(got)).toBe(baseSha);
    expect(() => parseTaskSpec({ owner: 'bob', command: 'true', image: 'base:Bad Name' })).toThrow(
      /image: base image name "Bad Name" is invalid/,
    );
    expect(() => parseTaskSpec({ owner: 'bob', command: 'true', image: 'base-images/debian-12' })).toThrow(
      /name a base image as 'base:<name>'/,
    );
    expect(() => parseTaskSpec({ owner: 'bob', command: 'true', image: '../x' })).toThrow(
      /image path .* contains '\.\.'/,
    );
    expect(parseTaskSpec({ owner: 'bob', command: 'true', image: 'images/a.qcow2' }).image).toBe(
      'images/a.qcow2',
    );
  });

  test('a base image that a host would not boot is refused when added, leaving nothing', async () => {
    const notes = path.join(work, 'notes.txt');
    await fs.writeFile(notes, 'hello\n');
    await expect(
      withBackend(dataDir, (backend) => addBaseImage(backend, 'broken', createReadStream(notes))),
    ).rejects.toThrow(/not a disk image/);
    await expect(
      withBackend(dataDir, (backend) => addBaseImage(backend, 'debian-12', createReadStream(base))),
    ).rejects.toThrow(/already exists/);
    expect(await fs.readdir(path.join(dataDir, 'base-images'))).toEqual(['debian-12']);
  });
});

test('a database of schema 2 is upgraded in place to the current schema, keeping its data', async () => {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-images-db-'));
  try {
    await addOwner(dir, 'carol');
    const raw = new Database(repositoryDbPath(dir));
    raw.exec(
      'DROP TABLE admin_tokens; DROP TABLE base_images; DROP TABLE image_info; DROP TABLE capabilities;',
    );
    raw.pragma('user_version = 2');
    raw.close();
    const db = MetadataDb.open(dir);
    try {
      expect(db.getOwner('carol')).toMatchObject({ name: 'carol' });
      expect(db.listBaseImages()).toEqual([]);
      expect(db.listAdminTokens()).toEqual([]);
      expect(db.getImageInfo('a'.repeat(64))).toBeUndefined();
      expect(db.liveCapabilities('carol', 0)).toEqual([]);
    } finally {
      db.close();
    }
    const again = new Database(repositoryDbPath(dir));
    expect(again.pragma('user_version', { simple: true })).toBe(4);
    again.close();
  } finally {
    await fs.rm(dir, { recursive: true, force: true });
  }
});
