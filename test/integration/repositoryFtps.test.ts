import { execFile } from 'node:child_process';
import { createHash, randomBytes, randomInt } from 'node:crypto';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import { connect as connectTcp } from 'node:net';
import path from 'node:path';
import { PassThrough, Readable } from 'node:stream';
import { connect as connectTls, type TLSSocket } from 'node:tls';
import { promisify } from 'node:util';
import { Client, FTPError } from 'basic-ftp';
import { addOwner, setOwnerDisabled, setPassword, setQuota } from '../../repository/accounts/admin';
import { RepositoryClient } from '../../repository/client';
import { startRepositoryServer, type RepositoryServer } from '../../repository/server';
import { BASE_IMAGES_FOLDER } from '../../spec/taskSpec';

const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');
const PASSWORD = 'correct horse battery staple';
const run = promisify(execFile);

let dataDir: string;
let server: RepositoryServer;
let ftpsPort: number;
let cert: Buffer;
let aliceToken: string;
let bobToken: string;
let aliceHttp: RepositoryClient;
let bobHttp: RepositoryClient;
let sigtermListeners: { before: number; after: number };

async function login(user: string, password: string, secure = true): Promise<Client> {
  const c = new Client(10_000);
  try {
    await c.access({
      host: '127.0.0.1',
      port: ftpsPort,
      user,
      password,
      secure,
      // The self-signed certificate is pinned; it names the service, not 127.0.0.1.
      secureOptions: { ca: cert, checkServerIdentity: () => undefined },
    });
    return c;
  } catch (err) {
    c.close();
    throw err;
  }
}

async function fetch(c: Client, remote: string): Promise<Buffer> {
  const sink = new PassThrough();
  const chunks: Buffer[] = [];
  sink.on('data', (b: Buffer) => chunks.push(b));
  await c.downloadTo(sink, remote);
  return Buffer.concat(chunks);
}

/** The FTP reply code a refused command got. */
async function refusal(p: Promise<unknown>): Promise<{ code: number; message: string }> {
  const err = await p.then(
    () => undefined,
    (e: unknown) => e,
  );
  if (!(err instanceof FTPError)) throw new Error(`expected an FTP refusal, got ${String(err)}`);
  return { code: err.code, message: err.message };
}

/**
 * A control connection driven byte by byte, for what FTP client libraries never send: commands split
 * across reads, over-long lines, bytes that are not UTF-8. `reply` returns the next final reply line.
 */
async function rawSession(user: string, password: string) {
  const tcp = connectTcp(ftpsPort, '127.0.0.1');
  let text = '';
  let wake: (() => void) | undefined;
  const listen = (s: NodeJS.ReadableStream): void => {
    s.on('data', (b: Buffer) => {
      text += b.toString('utf8');
      wake?.();
    });
  };
  listen(tcp);
  const reply = async (): Promise<string> => {
    for (;;) {
      const m = /^(\d{3}) [^\r\n]*\r\n/m.exec(text);
      if (m) {
        text = text.slice(m.index + m[0].length);
        return m[0].trim();
      }
      await new Promise<void>((r) => (wake = r));
    }
  };
  expect(await reply()).toMatch(/^220 /);
  tcp.write('AUTH TLS\r\n');
  expect(await reply()).toMatch(/^234 /);
  tcp.removeAllListeners('data');
  const tls: TLSSocket = connectTls({ socket: tcp, ca: cert, checkServerIdentity: () => undefined });
  await new Promise((r) => tls.once('secureConnect', r));
  listen(tls);
  const send = async (bytes: string | Buffer): Promise<void> => {
    await new Promise<void>((r, j) => tls.write(bytes, (err) => (err ? j(err) : r())));
  };
  await send(`USER ${user}\r\n`);
  expect(await reply()).toMatch(/^331 /);
  await send(`PASS ${password}\r\n`);
  expect(await reply()).toMatch(/^230 /);
  return { send, reply, close: () => tls.destroy(), pending: () => text };
}

async function auditLines(): Promise<Record<string, unknown>[]> {
  const text = await fs.readFile(path.join(dataDir, 'audit.log'), 'utf8');
  return text
    .trim()
    .split('\n')
    .map((l) => JSON.parse(l) as Record<string, unknown>);
}

beforeAll(async () => {
  dataDir = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-ftps-'));
  aliceToken = (await addOwner(dataDir, 'alice')).token;
  bobToken = (await addOwner(dataDir, 'bob')).token;
  await setPassword(dataDir, 'alice', PASSWORD);
  await setPassword(dataDir, 'bob', `${PASSWORD} bob`);
  const min = randomInt(30_000, 60_000);
  const before = process.listenerCount('SIGTERM');
  server = await startRepositoryServer({
    dataDir,
    port: 0,
    ftps: { port: 0, pasvPorts: { min, max: min + 40 } },
  });
  ftpsPort = server.ftps?.port ?? 0;
  sigtermListeners = { before, after: process.listenerCount('SIGTERM') };
  cert = await fs.readFile(path.join(dataDir, 'ftps_cert.pem'));
  aliceHttp = new RepositoryClient({ url: server.url, token: aliceToken });
  bobHttp = new RepositoryClient({ url: server.url, token: bobToken });
});

afterAll(async () => {
  await server?.close();
  await fs.rm(dataDir, { recursive: true, force: true });
});

describe('FTPS service', () => {
  test('the same file over HTTP and FTPS is stored once with the same checksum', async () => {
    const data = randomBytes(700_000);
    const c = await login('alice', PASSWORD);
    try {
      await c.uploadFrom(Readable.from([data]), 'both/from-ftps.bin');
      expect((await aliceHttp.stat('alice', 'both/from-ftps.bin'))?.sha256).toBe(sha(data));

      await aliceHttp.upload('alice', 'both/from-http.bin', Readable.from([data]), { size: data.length });
      expect(sha(await fetch(c, 'both/from-http.bin'))).toBe(sha(data));
      expect(sha(await fetch(c, '/both/from-ftps.bin'))).toBe(sha(data));
      // Replacing over FTPS keeps one record per path.
      await c.cd('both');
      await c.uploadFrom(Readable.from([data]), 'from-http.bin');
      expect((await c.list()).map((e) => [e.name, e.size]).sort()).toEqual([
        ['from-ftps.bin', data.length],
        ['from-http.bin', data.length],
      ]);
      const listed = await aliceHttp.list('alice', 'both/');
      expect(listed.map((f) => [f.path, f.sha256])).toEqual([
        ['both/from-ftps.bin', sha(data)],
        ['both/from-http.bin', sha(data)],
      ]);
      expect(await fs.readdir(path.join(dataDir, 'tmp'))).toEqual([]);
      // ftp-srv's own handler (which would exit the process) is gone.
      expect(sigtermListeners.after).toBe(sigtermListeners.before);
      // The self-signed pair made on first start is kept, the key private.
      expect((await fs.stat(path.join(dataDir, 'ftps_key.pem'))).mode & 0o777).toBe(0o600);
    } finally {
      c.close();
    }
  });

  test('mkdir, rename, delete and rmdir act on the store', async () => {
    const c = await login('alice', aliceToken); // a token works as the password
    try {
      await c.send('MKD ops');
      await c.uploadFrom(Readable.from([Buffer.from('abc')]), 'ops/a.txt');
      await c.rename('ops/a.txt', 'ops/b.txt');
      expect((await aliceHttp.stat('alice', 'ops/b.txt'))?.size).toBe(3);
      expect(await aliceHttp.stat('alice', 'ops/a.txt')).toBeUndefined();
      expect((await refusal(c.send('RMD ops'))).message).toMatch(/not empty/);
      await c.remove('ops/b.txt');
      await c.send('RMD ops');
      expect(await aliceHttp.list('alice', 'ops')).toEqual([]);
      expect(
        (await refusal(c.appendFrom(Readable.from([Buffer.from('x')]), 'both/from-ftps.bin'))).message,
      ).toMatch(/whole new file/);
    } finally {
      c.close();
    }
  });

  test('.. and absolute paths never leave the owner space', async () => {
    await bobHttp.upload('bob', 'secret.txt', Readable.from([Buffer.from('bob only')]), { size: 8 });
    const c = await login('alice', PASSWORD);
    try {
      for (const p of ['../bob/secret.txt', '/../bob/secret.txt', 'both/../../bob/secret.txt']) {
        expect((await refusal(fetch(c, p))).message).toMatch(/'\.\.'/);
        expect((await refusal(c.uploadFrom(Readable.from([Buffer.from('x')]), p))).message).toMatch(/'\.\.'/);
        expect((await refusal(c.remove(p))).message).toMatch(/'\.\.'/);
        expect((await refusal(c.rename('both/from-ftps.bin', p))).message).toMatch(/'\.\.'/);
      }
      // An absolute path starts at alice's own root: bob's file is not there.
      expect((await refusal(fetch(c, '/bob/secret.txt'))).message).toMatch(/no such file/);
      expect((await refusal(c.list('..'))).message).toMatch(/'\.\.'/);
      // cd .. stops at the root, as in a chroot.
      await c.cd('/');
      await c.cd('..');
      expect(await c.pwd()).toBe('/');
      // The provider's base images are in every owner's root; bob's files are not.
      expect((await c.list()).map((e) => e.name).sort()).toEqual([BASE_IMAGES_FOLDER, 'both'].sort());
      expect((await refusal(c.send('PORT 127,0,0,1,200,10'))).code).toBe(502);
    } finally {
      c.close();
    }
    expect((await bobHttp.stat('bob', 'secret.txt'))?.size).toBe(8);
    expect(await auditLines()).toContainEqual(
      expect.objectContaining({ protocol: 'ftps', user: 'alice', action: 'download', result: 'denied' }),
    );
  });

  test('bad passwords, other owners tokens, plain logins and disabled owners are refused', async () => {
    expect((await refusal(login('alice', 'wrong password here'))).code).toBe(530);
    expect((await refusal(login('alice', bobToken))).code).toBe(530);
    expect((await refusal(login('nobody', PASSWORD))).code).toBe(530);
    const plain = await refusal(login('alice', PASSWORD, false));
    expect(plain.code).toBe(530);
    expect(plain.message).toMatch(/AUTH TLS/);

    const c = await login('bob', bobToken);
    try {
      await setOwnerDisabled(dataDir, 'bob', true);
      expect((await refusal(fetch(c, 'secret.txt'))).message).toMatch(/disabled/);
      expect((await refusal(login('bob', `${PASSWORD} bob`))).code).toBe(530);
    } finally {
      c.close();
      await setOwnerDisabled(dataDir, 'bob', false);
    }
    const denied = (await auditLines()).filter((e) => e.action === 'login' && e.result === 'denied');
    expect(denied.map((e) => e.user)).toEqual(expect.arrayContaining(['alice', 'nobody', 'bob']));
  });

  test('an upload over quota fails with a clear message and leaves nothing', async () => {
    await setQuota(dataDir, 'bob', { bytes: 100_000 });
    const c = await login('bob', bobToken);
    try {
      const err = await refusal(c.uploadFrom(Readable.from([randomBytes(300_000)]), 'big.bin'));
      expect(err.code).toBe(550);
      expect(err.message).toMatch(/quota of 100000 bytes/);
    } finally {
      c.close();
      await setQuota(dataDir, 'bob', {});
    }
    expect(await bobHttp.stat('bob', 'big.bin')).toBeUndefined();
    expect(await fs.readdir(path.join(dataDir, 'tmp'))).toEqual([]);
    // Audited as over HTTP and SFTP.
    expect(await auditLines()).toContainEqual(
      expect.objectContaining({
        protocol: 'ftps',
        user: 'bob',
        action: 'upload',
        path: 'big.bin',
        result: 'failed',
        detail: expect.stringMatching(/quota/),
      }),
    );
  });

  test('an upload whose data connection is reset stores nothing and is not reported as stored', async () => {
    const s = await rawSession('alice', PASSWORD);
    try {
      await s.send('PBSZ 0\r\nPROT P\r\nTYPE I\r\nPASV\r\n');
      for (let i = 0; i < 3; i++) expect(await s.reply()).toMatch(/^200 /);
      const pasv = /\((\d+),(\d+),(\d+),(\d+),(\d+),(\d+)\)/.exec(await s.reply());
      const port = Number(pasv?.[5]) * 256 + Number(pasv?.[6]);
      const raw = connectTcp(port, '127.0.0.1');
      await new Promise((r) => raw.once('connect', r));
      await s.send('STOR reset.bin\r\n');
      expect(await s.reply()).toMatch(/^150 /);
      const data = connectTls({ socket: raw, ca: cert, checkServerIdentity: () => undefined });
      await new Promise((r) => data.once('secureConnect', r));
      await new Promise<void>((r) => data.write(randomBytes(200_000), () => r()));
      // Cut off by a reset, as when a client crashes or a middlebox drops the connection.
      raw.resetAndDestroy();
      expect(await s.reply()).not.toMatch(/^226 /);
    } finally {
      s.close();
    }
    expect(await aliceHttp.stat('alice', 'reset.bin')).toBeUndefined();
  });

  test('commands split across reads, over-long lines and bytes that are not UTF-8 keep replies in step', async () => {
    await aliceHttp.upload('alice', 'frame/a.txt', Readable.from([Buffer.from('abc')]), { size: 3 });
    const s = await rawSession('alice', PASSWORD);
    try {
      // One command over three writes (each awaited, so three TCP segments): it must run once, whole.
      await s.send('SIZE fra');
      await s.send('me/a.');
      await s.send('txt\r\n');
      expect(await s.reply()).toBe('213 3');
      // Two commands in one write, then a bare LF as many clients send.
      await s.send('PWD\r\nNOOP\r\nSIZE frame/a.txt\n');
      expect(await s.reply()).toMatch(/^257 /);
      expect(await s.reply()).toMatch(/^200 /);
      expect(await s.reply()).toBe('213 3');
      // 20 KB in one line: one 500 without the line echoed back, then the next command's own reply.
      const long = `SIZE ${'x'.repeat(20_000)}`;
      await s.send(`${long}\r\nSIZE frame/a.txt\r\n`);
      const refused = await s.reply();
      expect(refused).toMatch(/^500 .*longer than 4096 bytes/);
      expect(refused.length).toBeLessThan(200);
      expect(await s.reply()).toBe('213 3');
      // 100 KB spread over many writes: still one refusal, and the replies stay in step.
      for (let i = 0; i < 10; i++) await s.send(`${i === 0 ? 'STOR ' : ''}${'y'.repeat(10_000)}`);
      await s.send('\r\nSIZE frame/a.txt\r\n');
      expect(await s.reply()).toMatch(/^500 /);
      expect(await s.reply()).toBe('213 3');
      // A name that is not UTF-8 is refused, never stored under U+FFFD.
      await s.send(Buffer.concat([Buffer.from('MKD bad'), Buffer.from([0xff, 0xfe]), Buffer.from('\r\n')]));
      expect(await s.reply()).toMatch(/^501 .*not valid UTF-8/);
      // Many commands at once (more than are queued before reading stops) are all answered, in order.
      await s.send('NOOP\r\nPWD\r\n'.repeat(100));
      for (let i = 0; i < 100; i++) {
        expect(await s.reply()).toMatch(/^200 /);
        expect(await s.reply()).toMatch(/^257 /);
      }
      expect(s.pending()).toBe('');
    } finally {
      s.close();
    }
    expect((await aliceHttp.list('alice', 'bad')).length).toBe(0);
    expect((await aliceHttp.list('alice', '')).map((f) => f.path)).not.toContainEqual(
      expect.stringContaining('\ufffd'),
    );
  });

  test('LIST options, "." and "..", and a trailing "/" get the replies other servers give', async () => {
    const c = await login('alice', PASSWORD);
    try {
      await c.uploadFrom(Readable.from([Buffer.from('hello')]), 'dots/f.txt');
      await c.cd('dots');
      // LIST -la: the options are ignored; the listing is the current folder's.
      expect((await c.send('TYPE I')).code).toBe(200);
      expect((await c.list('-la')).map((e) => e.name)).toEqual(['f.txt']);
      expect((await c.list('-la /dots')).map((e) => e.name)).toEqual(['f.txt']);
      // MKD of a folder that exists says so by name.
      expect((await refusal(c.send('MKD .'))).message).toMatch(/^550 "\." exists already \(as \/dots\)/);
      expect((await refusal(c.send('MKD /dots'))).message).toMatch(/exists already/);
      expect((await refusal(c.send('RMD .'))).message).toMatch(/folder you are in/);
      // '.' or '..' inside a path is refused as over HTTP and SFTP; CWD .. climbs.
      expect((await refusal(fetch(c, 'f.txt/.'))).message).toMatch(/contains '\.'/);
      expect((await refusal(c.uploadFrom(Readable.from([Buffer.from('x')]), 'g/.'))).message).toMatch(
        /contains '\.'/,
      );
      expect((await refusal(c.remove('./f.txt'))).message).toMatch(/contains '\.'/);
      // A trailing '/' names a folder: no file is written, read or removed through it.
      expect((await refusal(c.uploadFrom(Readable.from([Buffer.from('x')]), 'new/'))).message).toMatch(
        /ends with '\/'/,
      );
      expect((await refusal(fetch(c, 'f.txt/'))).message).toMatch(/ends with '\/'/);
      expect((await refusal(c.remove('f.txt/'))).message).toMatch(/ends with '\/'/);
      expect((await refusal(c.size('f.txt/'))).message).toMatch(/no such file/);
      expect((await refusal(c.rename('f.txt', 'g.txt/'))).message).toMatch(/ends with '\/'/);
      await c.send('MKD sub/');
      await c.rename('sub/', 'sub2/');
      await c.cd('..');
      expect(await c.pwd()).toBe('/');
      expect((await c.list('dots/')).map((e) => e.name).sort()).toEqual(['f.txt', 'sub2']);
    } finally {
      c.close();
    }
    expect(await aliceHttp.stat('alice', 'dots/new')).toBeUndefined();
    expect(await aliceHttp.stat('alice', 'dots/g')).toBeUndefined();
    expect((await aliceHttp.stat('alice', 'dots/f.txt'))?.size).toBe(5);
  });

  test('parallel curl sessions all log in over TLS and move the right bytes', async () => {
    // A client that sends its ClientHello right after "234" once raced ftp-srv's delayed TLS wrap and got
    // a plain-text reply ("wrong version number"), for about one session in three with a few in parallel.
    const workDir = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-ftps-curl-'));
    const curl = (...args: string[]): Promise<unknown> =>
      run('curl', ['-sS', '--ssl-reqd', '--insecure', '--ftp-pasv', '--user', `alice:${PASSWORD}`, ...args]);
    try {
      const worker = async (w: number): Promise<void> => {
        const data = randomBytes(200_000 + w);
        const src = path.join(workDir, `src-${w}.bin`);
        const dst = path.join(workDir, `dst-${w}.bin`);
        await fs.writeFile(src, data);
        for (let i = 0; i < 4; i++) {
          await curl('-T', src, `ftp://127.0.0.1:${ftpsPort}/parallel/w${w}-${i}.bin`, '--ftp-create-dirs');
          await curl('-o', dst, `ftp://127.0.0.1:${ftpsPort}/parallel/w${w}-${i}.bin`);
          expect(sha(await fs.readFile(dst))).toBe(sha(data));
          expect((await aliceHttp.stat('alice', `parallel/w${w}-${i}.bin`))?.sha256).toBe(sha(data));
        }
      };
      await Promise.all(Array.from({ length: 6 }, (_, w) => worker(w)));
    } finally {
      await fs.rm(workDir, { recursive: true, force: true });
    }
    expect(await fs.readdir(path.join(dataDir, 'tmp'))).toEqual([]);
  }, 120_000);
});
