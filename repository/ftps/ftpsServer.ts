import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import { createRequire } from 'node:module';
import type { AddressInfo, Server as NetServer, Socket } from 'node:net';
import path from 'node:path';
import { finished, PassThrough, Readable, Writable } from 'node:stream';
import { createSecureContext, TLSSocket, type SecureContext } from 'node:tls';
import { promisify } from 'node:util';
import { FileSystem, FtpSrv, type FtpConnection } from 'ftp-srv';
import { describeError, type Logger } from '../../logging/logger';
import { AccessDenied, authenticatePassword, checkSession, type OwnerSession } from '../accounts/auth';
import { remoteOf, type AuditEvent } from '../accounts/auditLog';
import { StoreError, type Entry } from '../store/fileStore';
import type { FileProtocolDeps } from '../protocolDeps';
import {
  entryAsSpelled,
  PathRefused,
  renamePaths,
  resolveSftpPath,
  toFilePath,
  toRepoPath,
} from '../sftp/sftpSession';

/**
 * The repository's FTP service with explicit TLS (AUTH TLS), through ftp-srv: owners log in with their
 * password or an API token as password, and see only their own space through a FileSystem over the
 * shared FileStore, so uploads are atomic, checksummed, counted against the quota and audited as over
 * HTTP and SFTP. Logging in without TLS is refused unless plain FTP is allowed on purpose. Passive
 * mode only (active mode lets a client aim the server at any address).
 */

export interface FtpsServerOptions {
  host: string;
  /** 0 picks an ephemeral port. */
  port: number;
  /** Passive data connections use ports from this inclusive range. */
  pasvPorts: { min: number; max: number };
  /** The address announced for passive connections to non-local clients (default `host`). */
  pasvAddress?: string;
  /** PEM files; a self-signed pair is generated there on first start. */
  certFile: string;
  keyFile: string;
  /** Let clients log in without AUTH TLS (passwords then cross the network in clear). */
  allowPlain?: boolean;
  /** A control or data connection that moves no bytes for this long is dropped (default 5 min). */
  idleTimeoutMs?: number;
}

export interface FtpsServer {
  host: string;
  port: number;
  close(): Promise<void>;
}

export type FtpsDeps = FileProtocolDeps;

export const DEFAULT_IDLE_TIMEOUT_MS = 5 * 60_000;
const CERT_DAYS = 3650;
const run = promisify(execFile);

export function defaultFtpsCertPaths(dataDir: string): { certFile: string; keyFile: string } {
  return { certFile: path.join(dataDir, 'ftps_cert.pem'), keyFile: path.join(dataDir, 'ftps_key.pem') };
}

/** Reads the TLS pair, or makes a self-signed one (atomically, key mode 0600) so clients can pin it. */
export async function loadOrCreateTlsCert(
  certFile: string,
  keyFile: string,
  commonName = 'vsp-repository',
): Promise<{ cert: Buffer; key: Buffer }> {
  try {
    return { cert: await fs.readFile(certFile), key: await fs.readFile(keyFile) };
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT')
      throw new Error(`cannot read the FTPS certificate ${certFile} or key ${keyFile}`, { cause: err });
  }
  const suffix = `.tmp-${process.pid}-${randomBytes(4).toString('hex')}`;
  const [tmpCert, tmpKey] = [certFile + suffix, keyFile + suffix];
  try {
    await run('openssl', [
      'req',
      '-x509',
      '-newkey',
      'ec',
      '-pkeyopt',
      'ec_paramgen_curve:prime256v1',
      '-nodes',
      '-days',
      String(CERT_DAYS),
      '-subj',
      `/CN=${commonName}`,
      '-keyout',
      tmpKey,
      '-out',
      tmpCert,
    ]);
    await fs.chmod(tmpKey, 0o600);
    for (const f of [tmpKey, tmpCert]) {
      const h = await fs.open(f, 'r');
      await h.sync().finally(() => h.close());
    }
    await fs.rename(tmpKey, keyFile);
    await fs.rename(tmpCert, certFile);
  } catch (err) {
    throw new Error(`cannot generate a self-signed FTPS certificate at ${certFile}`, { cause: err });
  } finally {
    await Promise.all([fs.rm(tmpCert, { force: true }), fs.rm(tmpKey, { force: true })]);
  }
  return { cert: await fs.readFile(certFile), key: await fs.readFile(keyFile) };
}

/** What ftp-srv's listings and SIZE/MDTM read from a stat. */
interface FtpStat {
  name: string;
  size: number;
  mtime: Date;
  mode: number;
  isDirectory(): boolean;
}

function statOf(name: string, e: Entry): FtpStat {
  const folder = e.kind === 'folder';
  return {
    name,
    size: folder ? 0 : e.info.size,
    mtime: folder ? new Date(0) : new Date(e.info.mtime),
    mode: folder ? 0o40755 : 0o100644,
    isDirectory: () => folder,
  };
}

/** One logged-in owner's view of the store; every call re-checks that the login still holds. */
class OwnerFileSystem extends FileSystem {
  private dir = '/';

  constructor(
    connection: FtpConnection,
    private readonly session: OwnerSession,
    private readonly deps: FtpsDeps,
    private readonly remote: string | undefined,
    private readonly idleTimeoutMs: number,
  ) {
    super(connection, { root: '/', cwd: '/' });
  }

  /**
   * Watches a transfer's connections. ftp-srv hears only the data connection's 'end' and 'error': one
   * that just closes (destroyed, dropped) would leave the transfer, and an upload's temp file, pending for
   * good. So a data connection closed before its end, or idle past the limit, aborts `stream`; so does the
   * control connection ending (the client gave up, and could not hear a 226 anyway), before ftp-srv's
   * own ending of the data connection could read as the end of the file. The control connection is
   * silent during a transfer by design: its idle limit waits until the transfer is over.
   */
  private watchTransfer(stream: Readable | Writable): void {
    const conn = this.connection as unknown as ConnectionInternals;
    const data = conn.connector.socket;
    if (!data) return;
    const control = conn.commandSocket;
    const controlIdle = control.timeout ?? 0;
    control.setTimeout(0);
    data.setTimeout(this.idleTimeoutMs, () =>
      data.destroy(new Error(`the data connection was idle for ${this.idleTimeoutMs / 1000} s`)),
    );
    // ftp-srv listens for the stream's error only once it has the stream (some turns later) and only
    // once: an abort before or after that must still find a listener. (Not through finished(): ftp-srv
    // emits 'close' instead of ending an upload stream that has a 'close' listener.)
    stream.on('error', () => undefined);
    const abort = (err: Error): void => {
      if (!stream.destroyed) stream.destroy(err);
    };
    const controlGone = (): void => abort(new Error('the control connection closed during the transfer'));
    // It may have closed already, while ftp-srv was waiting for the data connection.
    if (control.destroyed || control.readableEnded) controlGone();
    control.once('end', controlGone).once('close', controlGone);
    finished(data, (err) => {
      control.off('end', controlGone).off('close', controlGone);
      if (!control.destroyed) control.setTimeout(controlIdle);
      if (err) abort(err);
    });
  }

  override currentDirectory(): string {
    return this.dir;
  }

  override get(fileName: string): Promise<FtpStat> {
    return this.act(undefined, fileName, async () => {
      const e = await entryAsSpelled(this.deps.store, this.session.owner, this.absolute(fileName));
      if (!e) throw new StoreError('not-found', `no such file or folder: ${fileName}`);
      return statOf(path.posix.basename(fileName) || '/', e);
    });
  }

  override list(dir = '.'): Promise<FtpStat[]> {
    return this.act('list', dir, async (p) => {
      if ((await this.deps.store.entry(this.session.owner, p))?.kind !== 'folder')
        throw new StoreError('not-found', `no such folder: ${dir}`);
      return (await this.deps.store.readdir(this.session.owner, p)).map((d) => statOf(d.name, d));
    });
  }

  /** '..' is lexical and stops at the owner's root, as in a chroot. */
  override chdir(dir = '.'): Promise<string> {
    return this.act(undefined, undefined, async () => {
      const shown = resolveSftpPath(dir.startsWith('/') ? dir : `${this.dir}/${dir}`);
      if ((await this.deps.store.entry(this.session.owner, toRepoPath(shown)))?.kind !== 'folder')
        throw new StoreError('not-found', `no such folder: ${dir}`);
      this.dir = shown;
      return shown;
    });
  }

  override write(
    fileName: string,
    { append = false, start }: { append?: boolean; start?: number } = {},
  ): Promise<{ stream: Writable; clientPath: string }> {
    return this.act('upload', fileName, async (p) => {
      if (append || (start ?? 0) > 0)
        throw new StoreError('conflict', 'uploads write a whole new file (no APPE or REST)');
      this.refuseFolder(fileName, p);
      const { store, maxFileBytes } = this.deps;
      await store.precheckWrite(this.session.owner, p);
      const body = new PassThrough({ highWaterMark: 1 << 20 });
      const result = store.write(this.session.owner, p, body, { maxBytes: maxFileBytes });
      // Failures reach the client through the sink below (the store destroys `body` when it fails) and
      // the audit log here, whether they come mid-transfer (quota, size) or at the commit.
      result.catch((err: unknown) =>
        this.record({ action: 'upload', path: p, result: 'failed', detail: (err as Error).message }),
      );
      body.on('error', () => undefined);
      const failure = (): Promise<Error> =>
        result.then(
          () => new Error('upload ended early'),
          (err: unknown) => err as Error,
        );
      let committed = false;
      // ftp-srv replies 226 on 'finish', which comes only once the store has committed the file.
      const stream = new Writable({
        highWaterMark: 1 << 20,
        write: (chunk: Buffer, _enc, done) => {
          if (body.destroyed) return void failure().then(done);
          if (body.write(chunk)) return done();
          const resume = (): void => {
            body.off('drain', resume).off('close', resume);
            if (body.destroyed) void failure().then(done);
            else done();
          };
          body.on('drain', resume).on('close', resume);
        },
        final: (done) => {
          body.end();
          result.then(
            (info) => {
              committed = true;
              this.record({ action: 'upload', path: p, result: 'ok', bytes: info.size });
              done();
            },
            (err: unknown) => done(err as Error),
          );
        },
        destroy: (err, done) => {
          if (!committed && !body.destroyed) body.destroy(err ?? new Error('transfer aborted'));
          done(err);
        },
      });
      this.watchTransfer(stream);
      return { stream, clientPath: `/${p}` };
    });
  }

  override read(
    fileName: string,
    { start = 0 }: { start?: number } = {},
  ): Promise<{ stream: Readable; clientPath: string }> {
    return this.act('download', fileName, async (p) => {
      this.refuseFolder(fileName, p);
      if ((await this.deps.store.entry(this.session.owner, p))?.kind !== 'file')
        throw new StoreError('not-found', `no such file: ${fileName}`);
      const file = await this.deps.store.open(this.session.owner, p);
      const size = file.info.size;
      if (start > size) {
        await file.close();
        throw new StoreError('conflict', `restart offset ${start} is past the file's ${size} bytes`);
      }
      if (start === size) {
        await file.close();
        return { stream: Readable.from([]), clientPath: `/${p}` };
      }
      const stream = file.createReadStream({ start, end: size - 1 });
      this.watchTransfer(stream);
      return { stream, clientPath: `/${p}` };
    });
  }

  override delete(target: string): Promise<void> {
    return this.act('delete', target, async (p) => {
      const e = await this.deps.store.entry(this.session.owner, p);
      if (p === '' || target === '.')
        throw new StoreError('conflict', `${JSON.stringify(target)} is the folder you are in or the root`);
      if (e?.kind === 'folder') return await this.deps.store.removeFolder(this.session.owner, p);
      this.refuseFolder(target, p);
      if (!(await this.deps.store.delete(this.session.owner, p)))
        throw new StoreError('not-found', `no such file: ${target}`);
    });
  }

  override mkdir(dir: string): Promise<string> {
    return this.act('mkdir', dir, async (p) => {
      if (await this.deps.store.entry(this.session.owner, p))
        throw new StoreError('conflict', `${JSON.stringify(dir)} exists already (as /${p})`);
      await this.deps.store.makeFolder(this.session.owner, p);
      return `/${p}`;
    });
  }

  override rename(from: string, to: string): Promise<void> {
    return this.act('rename', from, async () => {
      const [src, dst] = await renamePaths(
        this.deps.store,
        this.session.owner,
        this.absolute(from),
        this.absolute(to),
      );
      if (src === '' || dst === '') throw new StoreError('conflict', 'the root folder cannot be renamed');
      await this.deps.store.rename(this.session.owner, src, dst);
    });
  }

  override chmod(): Promise<void> {
    return Promise.reject(new StoreError('conflict', 'permissions are not kept in the repository'));
  }

  override getUniqueName(): string {
    return randomBytes(12).toString('hex');
  }

  /**
   * A client path made absolute. '.' alone (LIST's default argument) is the current folder; a '.' or
   * '..' segment elsewhere is left for toRepoPath to refuse, as HTTP and SFTP do.
   */
  private absolute(input: string): string {
    if (input === '.') return this.dir;
    return input.startsWith('/') ? input : `${this.dir.replace(/\/$/, '')}/${input}`;
  }

  /** Refuses a file operation on a folder's spelling ('a/', '.', the root). */
  private refuseFolder(input: string, repoPath: string): void {
    if (repoPath === '') throw new StoreError('conflict', `${JSON.stringify(input)} is a folder, not a file`);
    toFilePath(this.absolute(input));
  }

  /** A client path as a repository path; a path that tries to leave the owner's space is an AccessDenied. */
  private repoPathOf(input: string): string {
    try {
      return toRepoPath(this.absolute(input));
    } catch (err) {
      throw new AccessDenied(403, (err as Error).message);
    }
  }

  private record(e: Omit<AuditEvent, 'protocol' | 'remote' | 'user' | 'owner'>): void {
    const owner = this.session.owner;
    this.deps.audit.record({ protocol: 'ftps', remote: this.remote, user: owner, owner, ...e });
  }

  /**
   * Runs `fn` on `input` as a repository path (refusing '..', absolute escapes and the like by
   * normaliseRepoPath's rules) after re-checking the login; failures of a named action are audited.
   */
  private async act<T>(
    action: string | undefined,
    input: string | undefined,
    fn: (repoPath: string) => T | Promise<T>,
  ): Promise<T> {
    let repoPath: string | undefined;
    try {
      await checkSession(this.deps.db, this.session);
      repoPath = input === undefined ? '' : this.repoPathOf(input);
      const out = await fn(repoPath);
      // An upload is recorded when it commits.
      if (action !== undefined && action !== 'upload') this.record({ action, path: repoPath, result: 'ok' });
      return out;
    } catch (err) {
      const refused = err instanceof AccessDenied || err instanceof PathRefused;
      if (!(err instanceof StoreError || refused))
        this.deps.log.error({ owner: this.session.owner, err: describeError(err) }, 'FTPS request failed');
      if (action !== undefined) {
        this.record({
          action,
          path: repoPath ?? input,
          result: refused ? 'denied' : 'failed',
          detail: err instanceof Error ? err.message : String(err),
        });
      }
      throw err;
    }
  }
}

/** ftp-srv's passive connector (not in its typings): what the changes below need of it. */
interface PassiveConnector {
  connection: { secure: boolean; commandSocket: Socket };
  server: { options: { tls: object } };
  setupServer(): Promise<NetServer>;
}
let passivePatched = false;
const dataContexts = new WeakMap<object, SecureContext>();

/**
 * Two changes to ftp-srv's passive data server, made once the data server exists (before the PASV reply
 * can tell a client its port):
 * - Under TLS, ftp-srv counts a data connection as open only once its handshake is done, and waits for
 *   that before it answers STOR, RETR or LIST. Clients such as Python's ftplib send the command first
 *   and start the handshake only on the 150 reply: they got "425 No connection established". So the
 *   connection counts as open when the TCP connection is, wrapped in TLS at once (a client that
 *   handshakes first is served as before; the server's writes wait in the TLS socket for the handshake).
 * - ftp-srv checks a data connection's address against the control connection's with ip.isEqual,
 *   which throws on an undefined address (a socket already closed: reset by the client, or its control
 *   connection gone meanwhile); thrown in an event handler, that would end the process, so such a
 *   connection is dropped before ftp-srv sees it.
 */
function patchPassiveDataConnections(): void {
  if (passivePatched) return;
  passivePatched = true;
  const proto = (
    createRequire(__filename)('ftp-srv/src/connector/passive') as { prototype: PassiveConnector }
  ).prototype;
  const setupServer = proto.setupServer;
  proto.setupServer = function (this: PassiveConnector) {
    return setupServer.call(this).then((server) => {
      const secure = this.connection.secure;
      const event = secure ? 'secureConnection' : 'connection';
      const handlers = server.listeners(event) as ((socket: Socket) => void)[];
      server.removeAllListeners(event);
      // tls.Server's own listener, which would handshake before anything else.
      if (secure) server.removeAllListeners('connection');
      const tlsOptions = this.server.options.tls;
      server.on('connection', (raw: Socket) => {
        if (raw.remoteAddress === undefined || this.connection.commandSocket.remoteAddress === undefined)
          return void raw.destroy();
        let socket: Socket = raw;
        if (secure) {
          let secureContext = dataContexts.get(tlsOptions);
          // TLS 1.2 on data connections: under 1.3 the server sends session tickets after the handshake,
          // which an uploading client never reads; its close then resets the connection (RST) and the
          // kernel drops the upload's last bytes (seen with lftp).
          if (!secureContext)
            dataContexts.set(
              tlsOptions,
              (secureContext = createSecureContext({ ...tlsOptions, maxVersion: 'TLSv1.2' })),
            );
          socket = new TLSSocket(raw, { isServer: true, secureContext });
          // ftp-srv's 'connected' flag, which its secure path set only after the handshake.
          (socket as Socket & { connected?: boolean }).connected = true;
        }
        for (const h of handlers) h(socket);
      });
      return server;
    });
  };
}

/** The parts of ftp-srv's connection (not in its typings) that the TLS upgrade below replaces. */
interface ConnectionInternals {
  commandSocket: Socket;
  /** The passive connector; `socket` is the current data connection once the client has opened it. */
  connector: { socket?: Socket; end?(): void };
  /** Set once logged in. */
  fs?: FileSystem;
  secure: boolean;
  reply(code: number, message?: string): Promise<unknown>;
  commands: {
    parse(message: string): { directive: string; arg: string | null };
    handle(command: string | { directive: string; arg: string | null }): Promise<unknown>;
  };
}

/**
 * Answers AUTH TLS itself. ftp-srv replies 234 and wraps the command socket in TLS only some event-loop
 * turns later (its promises resolve through setImmediate), so a quick client's ClientHello could be read
 * first as an FTP command and answered in plain text: "wrong version number" at the client, often under
 * load. Here the socket is wrapped in the same turn as the 234 is written, before anything can be read.
 */
function upgradeToTlsAtOnce(connection: FtpConnection, secureContext: SecureContext): void {
  const conn = connection as unknown as ConnectionInternals;
  const handle = conn.commands.handle.bind(conn.commands);
  conn.commands.handle = (command) => {
    const c = typeof command === 'string' ? conn.commands.parse(command) : command;
    if (c.directive !== 'AUTH' || c.arg?.toUpperCase() !== 'TLS' || conn.secure) return handle(c);
    const plain = conn.commandSocket;
    plain.write('234 Honored\r\n');
    const secure = new TLSSocket(plain, { isServer: true, secureContext });
    // The idle timer moves along: the plain socket sees no reads once TLS has taken them over.
    secure.setTimeout(plain.timeout ?? 0);
    plain.setTimeout(0);
    // ftp-srv listens on the plain socket: it keeps hearing what now arrives through TLS.
    for (const event of ['data', 'timeout', 'end', 'close', 'drain', 'error'])
      secure.on(event, (...args: unknown[]) => plain.emit(event, ...args));
    conn.commandSocket = secure;
    conn.secure = true;
    return Promise.resolve();
  };
}

/** Longer command lines are refused unread: paths are at most MAX_PATH_BYTES, commands a few more. */
export const MAX_COMMAND_BYTES = 4096;
const LF = 0x0a;
const MAX_QUEUED_COMMANDS = 32;

/**
 * Reads the control connection's commands in place of ftp-srv, which took each TCP read as whole
 * commands (a command split across reads ran as two), decoded names leniently (invalid UTF-8 became
 * U+FFFD, so different names met in one file), had no length limit (a 20 KB command was echoed back)
 * and ran the commands of different reads concurrently (replies out of step). Here bytes are buffered
 * up to each LF (CRLF, or a bare LF as many servers accept), one command runs at a time in order, a
 * line over MAX_COMMAND_BYTES gets one 500 and is skipped to its end, and a line that is not UTF-8
 * gets a 501 without running; at most MAX_QUEUED_COMMANDS wait. LIST and NLST options (`LIST -la`) are ignored, as other servers do.
 */
function frameCommands(connection: FtpConnection, log: Logger): void {
  const conn = connection as unknown as ConnectionInternals;
  const socket = conn.commandSocket;
  socket.removeAllListeners('data');
  const utf8 = new TextDecoder('utf-8', { fatal: true });
  let pending = Buffer.alloc(0);
  let skipping = false;
  let queue: Promise<unknown> = Promise.resolve();
  // A client that sends commands faster than they run is read no further until the queue is short.
  let waiting = 0;
  const run = (step: () => Promise<unknown>): void => {
    if (++waiting > MAX_QUEUED_COMMANDS) conn.commandSocket.pause();
    queue = queue
      .then(step)
      .catch((err: unknown) => log.debug({ err: describeError(err) }, 'FTP command failed'))
      .finally(() => {
        if (--waiting === MAX_QUEUED_COMMANDS) conn.commandSocket.resume();
      });
  };
  const command = (line: Buffer): void => {
    if (line.length > MAX_COMMAND_BYTES) return tooLong();
    let text: string;
    try {
      text = utf8.decode(line[line.length - 1] === 0x0d ? line.subarray(0, -1) : line);
    } catch {
      return run(() => conn.reply(501, 'the command is not valid UTF-8: names must be UTF-8'));
    }
    if (text.trim() === '') return;
    run(async () => {
      const c = conn.commands.parse(text);
      if (c.directive === 'LIST' || c.directive === 'NLST') {
        if (c.arg !== null) c.arg = c.arg.replace(/^(\s*-[A-Za-z]+)+\s*/, '') || null;
        // ftp-srv answers a missing folder with 451 (a local error, worth retrying); clients such as
        // rclone take only 550 as "not there".
        const missing = await conn.fs?.get(c.arg ?? '.').then(
          () => undefined,
          (err: unknown) => (err instanceof StoreError && err.code === 'not-found' ? err : undefined),
        );
        if (missing) {
          conn.connector.end?.();
          return conn.reply(550, missing.message);
        }
      }
      return conn.commands.handle(c);
    });
  };
  const tooLong = (): void =>
    run(() => conn.reply(500, `the command line is longer than ${MAX_COMMAND_BYTES} bytes: refused`));
  socket.on('data', (chunk: Buffer) => {
    let buf = pending.length > 0 ? Buffer.concat([pending, chunk]) : chunk;
    for (let end = buf.indexOf(LF); end !== -1; end = buf.indexOf(LF)) {
      if (skipping) skipping = false;
      else command(buf.subarray(0, end));
      buf = buf.subarray(end + 1);
    }
    if (!skipping && buf.length > MAX_COMMAND_BYTES) {
      tooLong();
      skipping = true;
    }
    pending = skipping ? Buffer.alloc(0) : Buffer.from(buf);
  });
}

export async function startFtpsServer(deps: FtpsDeps, opts: FtpsServerOptions): Promise<FtpsServer> {
  const { db, log, audit } = deps;
  const { min, max } = opts.pasvPorts;
  if (!Number.isInteger(min) || !Number.isInteger(max) || min < 1024 || max > 65535 || min > max)
    throw new Error(`FTPS passive ports ${min}-${max} must be a range within 1024-65535`);
  const idleTimeoutMs = opts.idleTimeoutMs ?? DEFAULT_IDLE_TIMEOUT_MS;
  patchPassiveDataConnections();
  const tls = await loadOrCreateTlsCert(opts.certFile, opts.keyFile);
  const tlsOptions = { cert: tls.cert, key: tls.key, minVersion: 'TLSv1.2' } as const;
  const secureContext = createSecureContext(tlsOptions);
  // ftp-srv logs every refused command as an error; refusals are in the audit log, failures logged here.
  const ftpLog = log.child({ component: 'ftps' }, { level: 'fatal' });
  // ftp-srv exits the process on these signals; the repository's own handlers close it instead.
  const signals = ['SIGTERM', 'SIGINT', 'SIGQUIT'] as const;
  const before = new Map(signals.map((s) => [s, new Set(process.listeners(s))]));
  const ftp = new FtpSrv({
    url: `ftp://${opts.host.includes(':') ? `[${opts.host}]` : opts.host}:${opts.port}`,
    pasv_url: opts.pasvAddress ?? opts.host,
    pasv_min: min,
    pasv_max: max,
    tls: tlsOptions,
    blacklist: ['PORT', 'EPRT'],
    greeting: ['VSP repository'],
    log: ftpLog,
  });
  for (const s of signals)
    for (const l of process.listeners(s)) if (!before.get(s)?.has(l)) process.removeListener(s, l);

  ftp.on('login', ({ connection, username, password }, resolve, reject) => {
    const socket = (connection as unknown as { commandSocket?: Socket }).commandSocket;
    const remote = remoteOf(socket?.remoteAddress, socket?.remotePort);
    const denied = (err: unknown): void => {
      const detail = err instanceof Error ? err.message : String(err);
      audit.record({ protocol: 'ftps', remote, user: username, action: 'login', result: 'denied', detail });
      reject(err instanceof Error ? err : new Error(detail));
    };
    if (!opts.allowPlain && !connection.secure)
      return denied(new AccessDenied(401, 'log in only after AUTH TLS: plain FTP is not offered'));
    const who = { address: socket?.remoteAddress, account: username };
    deps.loginThrottle
      .guard(who, () => authenticatePassword(db, username, password))
      .then((session) => {
        audit.record({
          protocol: 'ftps',
          remote,
          user: session.owner,
          action: 'login',
          result: 'ok',
          detail: session.credential.kind,
        });
        resolve({ fs: new OwnerFileSystem(connection, session, deps, remote, idleTimeoutMs) });
      }, denied);
  });
  (ftp as NodeJS.EventEmitter).on('connect', ({ connection }: { connection: FtpConnection }) => {
    const socket = (connection as unknown as { commandSocket?: Socket }).commandSocket;
    // Set here rather than through ftp-srv's `timeout`, which also delays its close by as long.
    socket?.setTimeout(idleTimeoutMs);
    upgradeToTlsAtOnce(connection, secureContext);
    frameCommands(connection, log);
  });
  ftp.on('client-error', ({ error }: { error: unknown }) =>
    log.debug({ err: describeError(error) }, 'FTP client error'),
  );

  await ftp.listen();
  const addr = (ftp as unknown as { server: NetServer }).server.address() as AddressInfo;
  let closing: Promise<void> | undefined;
  return {
    host: addr.address,
    port: addr.port,
    close: () => (closing ??= Promise.resolve(ftp.close())),
  };
}
