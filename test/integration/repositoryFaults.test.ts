import { createHash, randomBytes } from 'node:crypto';
import { promises as fs, readFileSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { PassThrough, Readable } from 'node:stream';
import { Client as FtpClient } from 'basic-ftp';
import { freePort } from '../../deploy/devcluster/ports';
import { spawnManaged, tailLog, type ManagedProcess } from '../../deploy/devcluster/processes';
import { repoRoot } from '../../deploy/devcluster/tools';
import { addOwner, withAdmin } from '../../repository/accounts/admin';
import { RepositoryClient } from '../../repository/client';
import { SftpTestClient } from '../support/sftpTestClient';
import { temporalAddress } from '../support/temporalEnv';
import { testLogDir } from '../support/testRun';

/**
 * Faults on the repository's upload paths, against the real repository process (dist/, so a crash shows
 * as the process exiting): clients that reset, half-close, stall or overflow mid-request on HTTP, SFTP
 * and FTPS. Throughout each case a healthy client keeps uploading and downloading over HTTP and SFTP,
 * and afterwards the process is alive, no temp file is left and nothing partial was committed.
 */

const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');
/** Short, so a stalled client is dropped while the test waits for it (an event, not a sleep). */
const IDLE_SECONDS = 2;

let dataDir: string;
let repo: ManagedProcess;
let env: NodeJS.ProcessEnv;
let httpPort: number;
let sftpPort: number;
let ftpsPort: number;
let token: string;
let bobToken: string;
let adminToken: string;
let client: RepositoryClient;
let cert: Buffer;

async function startRepository(): Promise<void> {
  repo = await spawnManaged(
    'repository',
    process.execPath,
    [path.join(repoRoot(), 'dist/repository/main.js')],
    {
      env,
      logFile: path.join(testLogDir(), 'repositoryFaults.log'),
      readyWhen: { port: { host: '127.0.0.1', port: httpPort }, logLine: /repository listening/ },
    },
  );
}

/** Fails the test if the repository process has died. */
async function expectAlive(): Promise<void> {
  const exited = await Promise.race([repo.exited.then(() => true), Promise.resolve(false)]);
  if (exited) throw new Error(`the repository process died:\n${tailLog(repo.logFile)}`);
}

async function until(cond: () => Promise<boolean> | boolean, what: string, ms = 15_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!(await cond())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

/** The store's temp files: uploads in progress (a resumable session's partial file is not one). */
const tempFiles = (): Promise<string[]> => fs.readdir(path.join(dataDir, 'tmp'));

async function ftpsLogin(user: string, password: string): Promise<FtpClient> {
  const c = new FtpClient(0);
  await c.access({
    host: '127.0.0.1',
    port: ftpsPort,
    user,
    password,
    secure: true,
    // The self-signed certificate is pinned; it names the service, not 127.0.0.1.
    secureOptions: { ca: cert, checkServerIdentity: () => undefined },
  });
  return c;
}

/**
 * A client that keeps uploading and downloading (HTTP, SFTP and FTPS, checked by SHA-256) until stopped.
 * `stop()` fails if any round failed, or if none completed while the fault ran.
 */
function healthyClient(tag: string): { stop(): Promise<number> } {
  let rounds = 0;
  /** Rounds to complete before the loop ends; set by stop() to two more than done then. */
  let target = Infinity;
  const loop = (async () => {
    const sftp = await SftpTestClient.connect({ port: sftpPort, username: 'bob', password: bobToken });
    const bob = new RepositoryClient({ url: `http://127.0.0.1:${httpPort}`, token: bobToken });
    const ftps = await ftpsLogin('bob', bobToken);
    try {
      while (rounds < target) {
        const data = randomBytes(64 << 10);
        const name = `healthy/${tag}-${rounds}.bin`;
        const info = await bob.upload('bob', name, Readable.from([data]), { size: data.length });
        expect(info.sha256).toBe(sha(data));
        const back = await bob.downloadStream('bob', name);
        const chunks: Buffer[] = [];
        for await (const c of back) chunks.push(c as Buffer);
        expect(sha(Buffer.concat(chunks))).toBe(sha(data));
        await sftp.writeFile(`/healthy/${tag}-${rounds}.sftp`, data);
        expect(sha(await sftp.readFile(`/healthy/${tag}-${rounds}.sftp`))).toBe(sha(data));
        await ftps.uploadFrom(Readable.from([data]), `healthy/${tag}-${rounds}.ftps`);
        const sink = new PassThrough();
        const got: Buffer[] = [];
        sink.on('data', (c: Buffer) => got.push(c));
        await ftps.downloadTo(sink, `healthy/${tag}-${rounds}.ftps`);
        expect(sha(Buffer.concat(got))).toBe(sha(data));
        rounds++;
      }
    } finally {
      sftp.end();
      ftps.close();
    }
  })();
  // A failure is reported by stop(); this only keeps it from counting as unhandled meanwhile.
  loop.catch(() => undefined);
  return {
    // Two more rounds: at least one starts after the fault is over, so it sees its aftermath.
    stop: async () => {
      target = rounds + 2;
      await loop;
      return rounds;
    },
  };
}
/** Runs `fault` while a healthy client works; afterwards checks the process, temp files and the store. */
async function underFault(
  tag: string,
  fault: () => Promise<void>,
  { mayCommit = false } = {},
): Promise<void> {
  const healthy = healthyClient(tag);
  try {
    await fault();
  } finally {
    expect(await healthy.stop()).toBeGreaterThanOrEqual(2);
  }
  await expectAlive();
  await until(async () => (await tempFiles()).length === 0, 'temp files to be removed');
  if (!mayCommit) expect(await client.stat('alice', `faults/${tag}`)).toBeUndefined();
}

/** A raw HTTP request whose bytes the test controls, for what no well-behaved client sends. */
function rawHttp(head: string): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const s = net.connect({ host: '127.0.0.1', port: httpPort }, () => {
      s.write(head);
      resolve(s);
    });
    s.once('error', reject);
  });
}

/** What the server sends before it closes the connection. */
function replyOf(s: net.Socket): Promise<string> {
  return new Promise((resolve) => {
    const chunks: Buffer[] = [];
    s.on('data', (c: Buffer) => chunks.push(c));
    s.on('error', () => undefined);
    s.on('close', () => resolve(Buffer.concat(chunks).toString('latin1')));
  });
}

/** Resolves with the first reply's status line as soon as it arrives (the connection may stay open). */
function statusLineOf(s: net.Socket): Promise<string> {
  return new Promise((resolve, reject) => {
    let text = '';
    s.on('data', (c: Buffer) => {
      text += c.toString('latin1');
      if (text.includes('\r\n')) resolve(text.slice(0, text.indexOf('\r\n')));
    });
    s.on('error', () => undefined);
    s.on('close', () => reject(new Error(`connection closed without a reply: ${JSON.stringify(text)}`)));
  });
}

const putHead = (p: string, length: number): string =>
  `PUT /v1/owners/alice/files/${p} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${token}\r\n` +
  `Content-Length: ${length}\r\n\r\n`;

async function newSession(p: string, size: number): Promise<string> {
  const res = await fetch(`http://127.0.0.1:${httpPort}/v1/owners/alice/uploads`, {
    method: 'POST',
    headers: { Authorization: `Bearer ${token}` },
    body: JSON.stringify({ path: p, size }),
  });
  expect(res.status).toBe(201);
  return ((await res.json()) as { id: string }).id;
}

async function offsetOf(id: string): Promise<number> {
  const res = await fetch(`http://127.0.0.1:${httpPort}/v1/owners/alice/uploads/${id}`, {
    method: 'HEAD',
    headers: { Authorization: `Bearer ${token}` },
  });
  expect(res.status).toBe(200);
  return Number(res.headers.get('upload-offset'));
}

function patch(id: string, offset: number, body: Buffer): Promise<Response> {
  return fetch(`http://127.0.0.1:${httpPort}/v1/owners/alice/uploads/${id}`, {
    method: 'PATCH',
    headers: { Authorization: `Bearer ${token}`, 'Upload-Offset': String(offset) },
    body,
  });
}

const partialSize = async (id: string): Promise<number> =>
  (await fs.stat(path.join(dataDir, 'partial-uploads', id))).size;

beforeAll(async () => {
  dataDir = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-repofaults-'));
  token = (await addOwner(dataDir, 'alice')).token;
  bobToken = (await addOwner(dataDir, 'bob')).token;
  adminToken = (await withAdmin(dataDir, (a) => a.createAdminToken('faults'))).token;
  [httpPort, sftpPort, ftpsPort] = [await freePort(), await freePort(), await freePort()];
  const pasv = 20000 + (process.pid % 20000);
  env = {
    ...process.env,
    VSP_REPO_DIR: dataDir,
    VSP_REPO_LISTEN: `127.0.0.1:${httpPort}`,
    VSP_REPO_SFTP_LISTEN: `127.0.0.1:${sftpPort}`,
    VSP_REPO_FTPS_LISTEN: `127.0.0.1:${ftpsPort}`,
    VSP_REPO_FTPS_PASV_PORTS: `${pasv}-${pasv + 40}`,
    VSP_REPO_IDLE_TIMEOUT_SECONDS: String(IDLE_SECONDS),
    // The task endpoints read their body only with Temporal configured.
    VSP_REPO_TEMPORAL: '1',
    TEMPORAL_ADDRESS: temporalAddress(),
  };
  await startRepository();
  client = new RepositoryClient({ url: `http://127.0.0.1:${httpPort}`, token });
  cert = readFileSync(path.join(dataDir, 'ftps_cert.pem'));
});

afterAll(async () => {
  await repo?.stop();
  await fs.rm(dataDir, { recursive: true, force: true });
});

describe('HTTP uploads under faults', () => {
  // Repeated, at once and once the upload has started: the window in which a fault once killed the
  // process (between reading the headers and the store taking the body) is short.
  test('a PUT that announces 1000 bytes, sends 10 and resets harms nothing', async () => {
    await underFault('put-reset', async () => {
      for (let i = 0; i < 10; i++) {
        const s = await rawHttp(putHead('faults/put-reset', 1000));
        const closed = replyOf(s);
        s.write(randomBytes(10));
        if (i % 2) await until(async () => (await tempFiles()).length > 0, 'the upload to start');
        s.resetAndDestroy();
        await closed;
      }
    });
  });

  test('a PUT that sends 10 of 1000 bytes and half-closes gets an answer and harms nothing', async () => {
    await underFault('put-halfclose', async () => {
      for (let i = 0; i < 10; i++) {
        const s = await rawHttp(putHead('faults/put-halfclose', 1000));
        const reply = replyOf(s);
        if (i % 2) {
          s.write(randomBytes(10));
          await until(async () => (await tempFiles()).length > 0, 'the upload to start');
          s.end();
        } else s.end(randomBytes(10));
        // Either a 400 before the close or just the close: never a stored file or a dead process.
        expect(await reply).not.toMatch(/^HTTP\/1\.1 2/);
      }
    });
  });

  test('a PUT that stalls mid-body is dropped after the idle timeout and harms nothing', async () => {
    await underFault('put-stall', async () => {
      const s = await rawHttp(putHead('faults/put-stall', 1000));
      const closed = replyOf(s);
      s.write(randomBytes(10));
      await closed;
    });
  });

  test('a resumable PATCH that resets mid-body keeps the session usable', async () => {
    const data = randomBytes(1000);
    const id = await newSession('faults/patch-reset', data.length);
    await underFault('patch-reset', async () => {
      for (let i = 0; i < 6; i++) {
        const at = await offsetOf(id);
        const s = await rawHttp(
          `PATCH /v1/owners/alice/uploads/${id} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${token}\r\n` +
            `Upload-Offset: ${at}\r\nContent-Length: ${data.length - at}\r\n\r\n`,
        );
        const closed = replyOf(s);
        s.write(data.subarray(at, at + 10));
        if (i % 2) await until(async () => (await partialSize(id)) > at, 'the bytes to arrive');
        s.resetAndDestroy();
        await closed;
        // The session is free again once the server has seen the reset: an empty PATCH is taken then.
        await until(
          async () => (await patch(id, await offsetOf(id), Buffer.alloc(0))).status === 204,
          'the session to be free',
        );
      }
    });
    // Whatever arrived before each reset was kept, and nothing else: the rest completes the file.
    const offset = await offsetOf(id);
    expect(offset).toBeGreaterThanOrEqual(30);
    expect(await partialSize(id)).toBe(offset);
    const res = await patch(id, offset, data.subarray(offset));
    expect(res.status).toBe(201);
    expect(((await res.json()) as { sha256: string }).sha256).toBe(sha(data));
  });

  const bigJson = JSON.stringify({ path: 'x', size: 1, pad: 'x'.repeat(70 * 1024) });
  for (const target of ['/v1/owners/alice/uploads', '/v1/owners/alice/tasks', '/v1/admin/owners']) {
    const bearer = (): string => (target.startsWith('/v1/admin/') ? adminToken : token);
    test(`a JSON body over the limit to POST ${target} is refused with 413 before it is read`, async () => {
      const s = await rawHttp(
        `POST ${target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${bearer()}\r\n` +
          `Content-Type: application/json\r\nContent-Length: ${bigJson.length}\r\n\r\n`,
      );
      // Not one byte of the body is sent: the answer can only come from the announced length.
      expect(await statusLineOf(s)).toMatch(/^HTTP\/1\.1 413 /);
      s.destroy();
      await expectAlive();
    });

    test(`a chunked JSON body over the limit to POST ${target} is refused with 413 once past it`, async () => {
      const s = await rawHttp(
        `POST ${target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${bearer()}\r\n` +
          `Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n`,
      );
      const reply = replyOf(s);
      // The body is never ended: the answer comes as soon as the limit is passed, then the close.
      s.write(`${bigJson.length.toString(16)}\r\n${bigJson}\r\n`);
      expect(await reply).toMatch(/^HTTP\/1\.1 413 /);
      await expectAlive();
    });
  }

  test('a client that never finishes its headers is dropped and harms nothing', async () => {
    await underFault('headers-stall', async () => {
      const s = await rawHttp(`PUT /v1/owners/alice/files/faults/headers-stall HTTP/1.1\r\nHost: x\r\n`);
      await replyOf(s);
    });
  });
});

describe('SFTP uploads under faults', () => {
  async function partialSftpUpload(tag: string, fault: (sock: net.Socket) => void): Promise<void> {
    await underFault(tag, async () => {
      const c = await SftpTestClient.connect({ port: sftpPort, username: 'alice', password: token });
      const sock = (c.conn as unknown as { _sock: net.Socket })._sock;
      const h = await c.open(`/faults/${tag}`, 'w');
      await c.write(h, randomBytes(32 << 10), 0);
      await until(async () => (await tempFiles()).length > 0, 'the upload to start');
      const closed = new Promise((r) => sock.once('close', r));
      c.conn.on('error', () => undefined);
      fault(sock);
      await closed;
    });
  }

  test('a client whose socket is destroyed mid-upload harms nothing', () =>
    partialSftpUpload('sftp-destroy', (s) => s.destroy()));
  test('a client whose connection is reset mid-upload harms nothing', () =>
    partialSftpUpload('sftp-reset', (s) => s.resetAndDestroy()));
  test('a client that half-closes mid-upload harms nothing', () =>
    partialSftpUpload('sftp-halfclose', (s) => s.end()));
  test('a client that stalls mid-upload is dropped after the idle timeout and harms nothing', () =>
    partialSftpUpload('sftp-stall', () => undefined));
});

describe('FTPS uploads under faults', () => {
  /** The underlying TCP socket of a TLS one, to reset it (a TLS socket's own destroy sends a FIN). */
  const tcpOf = (s: net.Socket | undefined): net.Socket | undefined =>
    (s as (net.Socket & { _parent?: net.Socket }) | undefined)?._parent ?? s;

  async function partialFtpsUpload(
    tag: string,
    fault: (c: FtpClient) => void,
    opts: { mayCommit?: boolean } = {},
  ): Promise<void> {
    await underFault(
      tag,
      async () => {
        const c = await ftpsLogin('alice', token);
        const source = new PassThrough();
        const upload = c.uploadFrom(source, `faults/${tag}`).catch((e: unknown) => e);
        source.write(randomBytes(32 << 10));
        // Mid-upload from the client's side: its data connection is open and has sent the bytes.
        await until(() => (tcpOf(c.ftp.dataSocket)?.bytesWritten ?? 0) >= 32 << 10, 'the bytes to be sent');
        fault(c);
        const outcome = await upload;
        // The client never sees its STOR succeed: it saw its own fault, or the server refused it.
        expect(outcome).toEqual(expect.objectContaining({ message: expect.any(String) }));
        c.close();
      },
      opts,
    );
  }

  // A reset of the data connection alone usually reaches the server as ECONNRESET (the upload is
  // discarded), but Linux may report a reset whose data was all read as an end of stream: see below.
  test('a data connection reset mid-upload harms no other client', () =>
    partialFtpsUpload('ftps-reset', (c) => tcpOf(c.ftp.dataSocket)?.resetAndDestroy(), { mayCommit: true }));
  // Both reset: the data connection's reset may likewise read as an end of stream, and that can reach the
  // server before the control connection's reset does (seen on a loaded host), so what arrived may be stored.
  test('a client whose control and data connections are both reset mid-upload harms nothing', () =>
    partialFtpsUpload(
      'ftps-both-reset',
      (c) => {
        tcpOf(c.ftp.dataSocket)?.resetAndDestroy();
        tcpOf(c.ftp.socket)?.resetAndDestroy();
        // Its TLS sockets may not hear of the reset below them: closing settles the client's upload.
        c.close();
      },
      { mayCommit: true },
    ));
  test('a client that half-closes its control connection mid-upload harms nothing', () =>
    partialFtpsUpload('ftps-control-halfclose', (c) => c.ftp.socket.end()));
  // FTP marks the end of an upload by closing the data connection (stream mode), and Node does not tell
  // whether TLS's close_notify came first: a data connection closed with a bare FIN, while the control
  // connection stays, reads as a finished upload, so what arrived may be stored. Other clients and the
  // process must still be unharmed.
  test('a data connection destroyed mid-upload (a bare FIN) harms no other client', () =>
    partialFtpsUpload('ftps-destroy', (c) => c.ftp.dataSocket?.destroy(), { mayCommit: true }));
  test('a data connection that stalls mid-upload is dropped after the idle timeout', () =>
    partialFtpsUpload('ftps-stall', () => undefined));
});

describe('resumable uploads across a restart', () => {
  test('a session survives a SIGKILL of the repository and completes with the right checksum', async () => {
    const data = randomBytes(3 << 20);
    const id = await newSession('faults/resumed.bin', data.length);
    expect((await patch(id, 0, data.subarray(0, 1 << 20))).status).toBe(204);
    repo.kill();
    await repo.exited;
    await startRepository();
    expect(await offsetOf(id)).toBe(1 << 20);
    expect((await patch(id, 1 << 20, data.subarray(1 << 20, 2 << 20))).status).toBe(204);
    const res = await patch(id, 2 << 20, data.subarray(2 << 20));
    expect(res.status).toBe(201);
    expect(((await res.json()) as { sha256: string }).sha256).toBe(sha(data));
    const back = await client.downloadStream('alice', 'faults/resumed.bin');
    const chunks: Buffer[] = [];
    for await (const c of back) chunks.push(c as Buffer);
    expect(sha(Buffer.concat(chunks))).toBe(sha(data));
  });

  test('a refused chunk (too many bytes, wrong offset) changes neither the offset nor the part file', async () => {
    const data = randomBytes(1000);
    const id = await newSession('faults/refused.bin', data.length);
    expect((await patch(id, 0, data.subarray(0, 400))).status).toBe(204);
    const tooMany = await patch(id, 400, randomBytes(601));
    expect(tooMany.status).toBe(400);
    expect(await offsetOf(id)).toBe(400);
    expect(await partialSize(id)).toBe(400);
    // Chunked, the excess shows only in the second chunk, after the first has been written.
    const s = await rawHttp(
      `PATCH /v1/owners/alice/uploads/${id} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${token}\r\n` +
        `Upload-Offset: 400\r\nTransfer-Encoding: chunked\r\n\r\n`,
    );
    const reply = statusLineOf(s);
    s.write(`12c\r\n${'a'.repeat(300)}\r\n`);
    s.write(`190\r\n${'b'.repeat(400)}\r\n0\r\n\r\n`);
    expect(await reply).toMatch(/^HTTP\/1\.1 400 /);
    s.destroy();
    expect(await offsetOf(id)).toBe(400);
    expect(await partialSize(id)).toBe(400);
    const wrongOffset = await patch(id, 300, data.subarray(300));
    expect(wrongOffset.status).toBe(409);
    expect(await offsetOf(id)).toBe(400);
    expect(await partialSize(id)).toBe(400);
    const res = await patch(id, 400, data.subarray(400));
    expect(res.status).toBe(201);
    expect(((await res.json()) as { sha256: string }).sha256).toBe(sha(data));
  });
});
