import { execFile } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { promisify } from 'node:util';
import {
  addKey,
  addOwner,
  createToken,
  listKeys,
  listTokens,
  removeKey,
  revokeToken,
  setOwnerDisabled,
  setPassword,
  setQuota,
} from '../../repository/accounts/admin';
import { RepositoryClient } from '../../repository/client';
import { generateEd25519KeyPair } from '../../lib/sshKeyPair';
import { startRepositoryServer, type RepositoryServer } from '../../repository/server';
import { refusal, SftpTestClient } from '../support/sftpTestClient';

const run = promisify(execFile);
const sha = (b: Buffer | string): string => createHash('sha256').update(b).digest('hex');
const PASSWORD = 'correct horse battery staple';

let dataDir: string;
let scratch: string;
let server: RepositoryServer;
let sftpPort: number;
let aliceHttp: RepositoryClient;
let aliceKey: { private: string; public: string };
let aliceKeyFile: string;

let aliceToken: string;

async function startServer(): Promise<void> {
  server = await startRepositoryServer({ dataDir, port: 0, sftp: { port: 0 } });
  sftpPort = server.sftp?.port ?? 0;
  aliceHttp = new RepositoryClient({ url: server.url, token: aliceToken });
}

const login = (username: string, auth: { password?: string; privateKey?: string }) =>
  SftpTestClient.connect({ port: sftpPort, username, ...auth });
const alice = () => login('alice', { password: PASSWORD });

const putBytes = (c: RepositoryClient, owner: string, p: string, data: Buffer) =>
  c.upload(owner, p, Readable.from([data]), { size: data.length });

async function getBytes(c: RepositoryClient, owner: string, p: string): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const chunk of await c.downloadStream(owner, p)) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks);
}

async function auditLines(): Promise<Record<string, unknown>[]> {
  const text = await fs.readFile(path.join(dataDir, 'audit.log'), 'utf8');
  return text
    .split('\n')
    .filter((l) => l !== '')
    .map((l) => JSON.parse(l) as Record<string, unknown>);
}

async function until(cond: () => Promise<boolean>, what: string, ms = 5000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!(await cond())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

beforeAll(async () => {
  dataDir = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-sftp-'));
  scratch = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-sftp-scratch-'));
  aliceToken = (await addOwner(dataDir, 'alice')).token;
  await addOwner(dataDir, 'bob');
  await setPassword(dataDir, 'alice', PASSWORD);
  await setPassword(dataDir, 'bob', `${PASSWORD} bob`);
  aliceKey = generateEd25519KeyPair('alice@test');
  aliceKeyFile = path.join(scratch, 'alice_ed25519');
  await fs.writeFile(aliceKeyFile, aliceKey.private, { mode: 0o600 });
  await addKey(dataDir, 'alice', aliceKey.public);
  await startServer();
});

afterAll(async () => {
  await server?.close();
  await fs.rm(dataDir, { recursive: true, force: true });
  await fs.rm(scratch, { recursive: true, force: true });
});

describe('SFTP service', () => {
  test('the same file over HTTP and SFTP is stored once with the same checksum', async () => {
    const data = randomBytes(300_000);
    const c = await alice();
    try {
      await c.writeFile('/both/from-sftp.bin', data).catch(async () => {
        await c.mkdir('/both');
        await c.writeFile('/both/from-sftp.bin', data);
      });
      const viaHttp = await aliceHttp.stat('alice', 'both/from-sftp.bin');
      expect(viaHttp?.sha256).toBe(sha(data));
      expect(sha(await getBytes(aliceHttp, 'alice', 'both/from-sftp.bin'))).toBe(sha(data));

      await putBytes(aliceHttp, 'alice', 'both/from-http.bin', data);
      expect(sha(await c.readFile('/both/from-http.bin'))).toBe(sha(data));
      // Replacing over SFTP keeps one record per path.
      await c.writeFile('/both/from-http.bin', data);
      const listed = await aliceHttp.list('alice', 'both/');
      expect(listed.map((f) => [f.path, f.sha256])).toEqual([
        ['both/from-http.bin', sha(data)],
        ['both/from-sftp.bin', sha(data)],
      ]);
      expect(await fs.readdir(path.join(dataDir, 'tmp'))).toEqual([]);
    } finally {
      c.end();
    }
  });

  test('ls, stat, mkdir, rename, rm and rmdir behave like a file system', async () => {
    const c = await alice();
    try {
      await c.mkdir('/ops');
      await c.mkdir('/ops/empty');
      await c.writeFile('/ops/a.txt', 'a');
      expect((await c.readdir('/ops')).map((e) => [e.filename, e.attrs.isDirectory()]).sort()).toEqual([
        ['a.txt', false],
        ['empty', true],
      ]);
      expect((await c.stat('/ops/a.txt')).size).toBe(1);
      expect((await c.stat('/ops/empty')).isDirectory()).toBe(true);
      expect(await refusal(c.mkdir('/ops/a.txt'))).toMatch(/already exists/);
      expect(await refusal(c.rmdir('/ops'))).toMatch(/not empty/);

      await c.rename('/ops/a.txt', '/ops/empty/b.txt');
      expect((await c.readFile('/ops/empty/b.txt')).toString()).toBe('a');
      expect(await refusal(c.stat('/ops/a.txt'))).toMatch(/no such/i);
      await c.rename('/ops/empty', '/ops/full');
      expect((await c.readFile('/ops/full/b.txt')).toString()).toBe('a');
      expect((await aliceHttp.stat('alice', 'ops/full/b.txt'))?.sha256).toBe(sha('a'));
      expect(await refusal(c.rename('/ops', '/ops/full/inside'))).toMatch(/into itself/);

      await c.unlink('/ops/full/b.txt');
      await c.rmdir('/ops/full');
      await c.rmdir('/ops');
      expect(await refusal(c.stat('/ops'))).toMatch(/no such/i);
      expect(await c.realpath('.')).toBe('/');
    } finally {
      c.end();
    }
  });

  test('key login works; a removed key is refused and logged', async () => {
    const c = await login('alice', { privateKey: aliceKey.private });
    expect((await c.readdir('/')).length).toBeGreaterThan(0);
    const [key] = await listKeys(dataDir, 'alice');
    await removeKey(dataDir, 'alice', key.id);
    // The open session ends at its next request; a new login is refused.
    expect(await refusal(c.readdir('/'))).toMatch(/key has been removed/);
    c.end();
    expect(await refusal(login('alice', { privateKey: aliceKey.private }))).toMatch(
      /authentication methods failed/,
    );
    const denied = (await auditLines()).filter(
      (l) => l.protocol === 'sftp' && l.action === 'login' && l.result === 'denied',
    );
    expect(denied.at(-1)).toMatchObject({ user: 'alice', detail: expect.stringMatching(/not authorised/) });
    expect(denied.at(-1)?.remote).toMatch(/^127\.0\.0\.1:\d+$/);
    await addKey(dataDir, 'alice', aliceKey.public);
  });

  test('bad passwords, unknown owners and revoked tokens are refused and logged', async () => {
    expect(await refusal(login('alice', { password: 'wrong password!' }))).toMatch(/authentication/);
    expect(await refusal(login('nobody', { password: PASSWORD }))).toMatch(/authentication/);
    expect(await refusal(login('bob', { password: PASSWORD }))).toMatch(/authentication/);
    const token = await createToken(dataDir, 'alice', 'sftp-tool');
    const c = await login('alice', { password: token });
    await c.writeFile('/by-token.txt', 'x');
    const id = (await listTokens(dataDir, 'alice')).find((t) => t.name === 'sftp-tool')?.id ?? -1;
    await revokeToken(dataDir, id);
    expect(await refusal(c.readFile('/by-token.txt'))).toMatch(/revoked/);
    c.end();
    expect(await refusal(login('alice', { password: token }))).toMatch(/authentication/);
    const denied = (await auditLines()).filter((l) => l.action === 'login' && l.result === 'denied');
    expect(denied.map((l) => l.user)).toEqual(expect.arrayContaining(['alice', 'nobody', 'bob']));
    expect(denied.map((l) => l.detail)).toEqual(expect.arrayContaining([expect.stringMatching(/revoked/)]));
  });

  test('a disabled owner loses access at once, over SFTP and HTTP', async () => {
    const c = await alice();
    await c.writeFile('/before-disable.txt', 'x');
    await setOwnerDisabled(dataDir, 'alice', true);
    try {
      expect(await refusal(c.readdir('/'))).toMatch(/disabled/);
      expect(await refusal(alice())).toMatch(/authentication/);
      await expect(aliceHttp.list('alice')).rejects.toMatchObject({ status: 401 });
      const lines = await auditLines();
      expect(
        lines.some(
          (l) => l.protocol === 'http' && l.result === 'denied' && /disabled/.test(String(l.detail)),
        ),
      ).toBe(true);
      expect(
        lines.some(
          (l) => l.protocol === 'sftp' && l.result === 'denied' && /disabled/.test(String(l.detail)),
        ),
      ).toBe(true);
    } finally {
      c.end();
      await setOwnerDisabled(dataDir, 'alice', false);
    }
  });

  test('the host key is made once and kept across restarts', async () => {
    const first = await alice();
    first.end();
    await server.close();
    await startServer();
    const second = await alice();
    second.end();
    expect(second.hostKey.length).toBeGreaterThan(0);
    expect(second.hostKey.equals(first.hostKey)).toBe(true);
    expect((await fs.stat(path.join(dataDir, 'ssh_host_ed25519_key'))).mode & 0o777).toBe(0o600);
  });

  test('an upload cut off halfway leaves no visible file and no temp file', async () => {
    const c = await alice();
    const h = await c.open('/cut.bin', 'w');
    await c.write(h, randomBytes(64 * 1024), 0);
    await c.write(h, randomBytes(64 * 1024), 64 * 1024);
    expect(await fs.readdir(path.join(dataDir, 'tmp'))).toHaveLength(1);
    c.conn.destroy(); // the client dies: no CLOSE is ever sent
    await until(async () => (await fs.readdir(path.join(dataDir, 'tmp'))).length === 0, 'temp file removal');
    expect(await aliceHttp.stat('alice', 'cut.bin')).toBeUndefined();
    const d = await alice();
    try {
      expect(await refusal(d.stat('/cut.bin'))).toMatch(/no such/i);
    } finally {
      d.end();
    }
  });

  test('pipelined WRITEs out of order land at their offsets; gaps and rewrites are refused', async () => {
    const data = randomBytes(10 * 32 * 1024 + 1000);
    const chunks = Array.from({ length: 11 }, (_, i) => i * 32 * 1024);
    const c = await alice();
    try {
      const h = await c.open('/ooo.bin', 'w');
      // All in flight at once, sent last chunk first: the server holds those ahead of the gap.
      await Promise.all(
        [...chunks]
          .reverse()
          .map((at) => c.write(h, data.subarray(at, Math.min(at + 32 * 1024, data.length)), at)),
      );
      await c.close(h);
      expect(sha(await c.readFile('/ooo.bin'))).toBe(sha(data));
      expect((await aliceHttp.stat('alice', 'ooo.bin'))?.sha256).toBe(sha(data));

      const gap = await c.open('/gap.bin', 'w');
      await c.write(gap, data.subarray(0, 1000), 0);
      expect(await refusal(c.write(gap, data.subarray(0, 10), 500))).toMatch(
        /offset 500 was already written/,
      );
      await c.write(gap, data.subarray(2000, 3000), 2000);
      expect(await refusal(c.close(gap))).toMatch(/gap: nothing was written at offset 1000/);
      expect(await aliceHttp.stat('alice', 'gap.bin')).toBeUndefined();
    } finally {
      c.end();
    }
    await until(async () => (await fs.readdir(path.join(dataDir, 'tmp'))).length === 0, 'temp file removal');
  });

  test('an owner disabled mid-upload gets its CLOSE refused and leaves no temp file', async () => {
    const c = await alice();
    try {
      const h = await c.open('/disabled-mid.bin', 'w');
      await c.write(h, randomBytes(64 * 1024), 0);
      await setOwnerDisabled(dataDir, 'alice', true);
      expect(await refusal(c.close(h))).toMatch(/disabled/);
    } finally {
      await setOwnerDisabled(dataDir, 'alice', false);
      c.end();
    }
    await until(async () => (await fs.readdir(path.join(dataDir, 'tmp'))).length === 0, 'temp file removal');
    expect(await aliceHttp.stat('alice', 'disabled-mid.bin')).toBeUndefined();
  });

  test('over-quota uploads fail clearly on SFTP and HTTP and leave nothing', async () => {
    await setQuota(dataDir, 'bob', { bytes: 100_000, files: 2 });
    const bobHttp = new RepositoryClient({
      url: server.url,
      token: await createToken(dataDir, 'bob', 'quota'),
    });
    const c = await login('bob', { password: `${PASSWORD} bob` });
    try {
      expect(await refusal(c.writeFile('/big.bin', randomBytes(150_000)))).toMatch(/quota of 100000 bytes/);
      await expect(putBytes(bobHttp, 'bob', 'big.bin', randomBytes(150_000))).rejects.toMatchObject({
        status: 413,
        message: expect.stringMatching(/quota/),
      });
      await c.writeFile('/one.bin', randomBytes(40_000));
      await putBytes(bobHttp, 'bob', 'two.bin', randomBytes(40_000));
      // Replacing a file counts only the difference; a third file is over the file quota.
      await c.writeFile('/one.bin', randomBytes(50_000));
      expect(await refusal(c.writeFile('/three.bin', 'x'))).toMatch(/quota of 2 files/);
      expect((await bobHttp.list('bob')).map((f) => f.path)).toEqual(['one.bin', 'two.bin']);
      expect(await fs.readdir(path.join(dataDir, 'tmp'))).toEqual([]);
      expect(await fs.readdir(path.join(dataDir, 'files', 'bob'))).toEqual(['one.bin', 'two.bin']);
    } finally {
      c.end();
      await setQuota(dataDir, 'bob', {});
    }
  });

  test('every protocol writes to the audit log', async () => {
    const lines = await auditLines();
    const uploads = lines.filter((l) => l.action === 'upload' && l.result === 'ok');
    expect(new Set(uploads.map((l) => l.protocol))).toEqual(new Set(['http', 'sftp']));
    for (const l of uploads) {
      expect(l).toMatchObject({
        user: expect.any(String),
        owner: expect.any(String),
        path: expect.any(String),
      });
      expect(typeof l.time).toBe('string');
      expect(l.remote).toMatch(/^127\.0\.0\.1:\d+$/);
    }
  });

  test('OpenSSH sftp in batch mode puts, lists and gets with a key', async () => {
    const local = path.join(scratch, 'openssh.bin');
    const back = path.join(scratch, 'openssh-back.bin');
    const data = randomBytes(2_000_000);
    await fs.writeFile(local, data);
    const batch = path.join(scratch, 'batch');
    await fs.writeFile(batch, `put ${local} /openssh.bin\nls -l /\nget /openssh.bin ${back}\n`);
    const { stdout } = await run('sftp', [
      '-b',
      batch,
      '-i',
      aliceKeyFile,
      '-P',
      String(sftpPort),
      '-o',
      'StrictHostKeyChecking=no',
      '-o',
      'UserKnownHostsFile=/dev/null',
      '-o',
      'BatchMode=yes',
      'alice@127.0.0.1',
    ]);
    expect(stdout).toMatch(/openssh\.bin/);
    expect(sha(await fs.readFile(back))).toBe(sha(data));
    expect((await aliceHttp.stat('alice', 'openssh.bin'))?.sha256).toBe(sha(data));
  });
});

describe('SFTP owner isolation', () => {
  beforeAll(async () => {
    const bob = new RepositoryClient({ url: server.url, token: await createToken(dataDir, 'bob', 'iso') });
    await putBytes(bob, 'bob', 'secret.txt', Buffer.from('bob only'));
  });

  const bobSecretUntouched = async (): Promise<void> => {
    expect(await fs.readFile(path.join(dataDir, 'files', 'bob', 'secret.txt'), 'utf8')).toBe('bob only');
  };

  test("'..' never leaves the owner's space", async () => {
    const c = await alice();
    try {
      expect(await c.realpath('/../../bob')).toBe('/bob');
      expect(await c.realpath('..')).toBe('/');
      expect(await refusal(c.readFile('../bob/secret.txt'))).toMatch(/contains '\.\.'/);
      expect(await refusal(c.readFile('/../bob/secret.txt'))).toMatch(/contains '\.\.'/);
      expect(await refusal(c.writeFile('/../bob/secret.txt', 'overwritten'))).toMatch(/contains '\.\.'/);
      expect(await refusal(c.readdir('/..'))).toMatch(/contains '\.\.'/);
      expect(await refusal(c.rename('/../bob/secret.txt', '/stolen.txt'))).toMatch(/contains '\.\.'/);
      expect(await refusal(c.unlink('/x/../../bob/secret.txt'))).toMatch(/contains '\.\.'/);
      await bobSecretUntouched();
    } finally {
      c.end();
    }
  });

  test("absolute paths start at the owner's root", async () => {
    const c = await alice();
    try {
      expect(await refusal(c.readFile('/etc/passwd'))).toMatch(/no such/i);
      expect(await refusal(c.readFile(path.join(dataDir, 'files', 'bob', 'secret.txt')))).toMatch(/no such/i);
      expect(await refusal(c.readFile('//bob/secret.txt'))).toMatch(/no such/i);
      await c.writeFile('/bob-lookalike.txt', 'mine');
      expect(await getBytes(aliceHttp, 'alice', 'bob-lookalike.txt')).toEqual(Buffer.from('mine'));
      expect((await c.readdir('/')).map((e) => e.filename)).not.toContain('secret.txt');
      await bobSecretUntouched();
    } finally {
      c.end();
    }
  });

  test('no shell or command runs, only the SFTP subsystem', async () => {
    const c = await alice();
    try {
      const refused = await new Promise<string>((resolve) =>
        c.conn.exec('cat /etc/passwd', (err, stream) => {
          if (err) return resolve(err.message);
          stream.close();
          resolve('');
        }),
      );
      expect(refused).not.toBe('');
    } finally {
      c.end();
    }
  });

  test('symlinks are neither made nor followed', async () => {
    const c = await alice();
    try {
      expect(await refusal(c.symlink('/etc/passwd', '/link'))).toMatch(/unsupported/i);
      // A symlink planted on disk (by someone with shell access) in place of a folder is refused.
      await c.writeFile('/planted/file.txt', 'x').catch(async () => {
        await c.mkdir('/planted');
        await c.writeFile('/planted/file.txt', 'x');
      });
      const planted = path.join(dataDir, 'files', 'alice', 'planted');
      await fs.rm(planted, { recursive: true });
      await fs.symlink(path.join(dataDir, 'files', 'bob'), planted);
      expect(await refusal(c.readFile('/planted/file.txt'))).toMatch(/symlink/);
      expect(await refusal(c.writeFile('/planted/secret.txt', 'overwritten'))).toMatch(/symlink/);
      expect(await refusal(c.readFile('/planted/secret.txt'))).toMatch(/no such/i);
      await bobSecretUntouched();
      await fs.unlink(planted);
      await c.unlink('/planted/file.txt');
    } finally {
      c.end();
    }
  });

  test('URL-encoded names are literal names inside the space', async () => {
    const c = await alice();
    try {
      expect(await refusal(c.readFile('/%2e%2e/bob/secret.txt'))).toMatch(/no such/i);
      await c.mkdir('/%2e%2e');
      await c.writeFile('/%2e%2e/x.txt', 'literal');
      expect((await aliceHttp.list('alice', '%2e%2e/')).map((f) => f.path)).toEqual(['%2e%2e/x.txt']);
      expect(await fs.readFile(path.join(dataDir, 'files', 'alice', '%2e%2e', 'x.txt'), 'utf8')).toBe(
        'literal',
      );
      await bobSecretUntouched();
    } finally {
      c.end();
    }
  });

  test('Unicode lookalikes stay inside; NFC and NFD name the same file', async () => {
    const c = await alice();
    try {
      // Fullwidth full stops are not '..' (NFC keeps them), so this is a folder inside alice's space.
      expect(await refusal(c.readFile('/\uff0e\uff0e/bob/secret.txt'))).toMatch(/no such/i);
      await c.mkdir('/\uff0e\uff0e');
      await c.writeFile('/\uff0e\uff0e/y.txt', 'fullwidth');
      expect(await fs.readFile(path.join(dataDir, 'files', 'alice', '\uff0e\uff0e', 'y.txt'), 'utf8')).toBe(
        'fullwidth',
      );
      const nfd = 'cafe\u0301.txt';
      await c.writeFile(`/${nfd}`, 'nfd');
      expect((await c.readFile('/caf\u00e9.txt')).toString()).toBe('nfd');
      expect((await aliceHttp.list('alice', 'caf')).map((f) => f.path)).toEqual(['caf\u00e9.txt']);
      await bobSecretUntouched();
    } finally {
      c.end();
    }
  });
});
