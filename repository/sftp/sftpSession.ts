import { PassThrough } from 'node:stream';
import { utils, type Attributes, type FileEntry, type SFTPWrapper } from 'ssh2';
import { normaliseRepoPath, refuseFolderSpelling } from '../../spec/repoPath';
import { describeError } from '../../logging/logger';
import { AccessDenied, checkSession, type OwnerSession } from '../accounts/auth';
import type { AuditEvent } from '../accounts/auditLog';
import { StoreError, type DirEntry, type Entry, type FileStore, type OpenFile } from '../store/fileStore';
import type { FileProtocolDeps } from '../protocolDeps';
import type { FileRow } from '../store/metadataDb';

/**
 * One SFTP session of one owner. The owner's space is the session's whole world: every client path
 * is mapped into it (an absolute path starts at the owner's root; '..' never climbs above it in
 * REALPATH and is refused anywhere else) and validated by normaliseRepoPath, as over HTTP. Uploads go
 * through FileStore.write, so they are atomic, checksummed and counted against the quota.
 */

const { STATUS_CODE, OPEN_MODE } = utils.sftp;

/** Larger READ requests get a short read, which SFTP allows. */
const MAX_READ = 64 * 1024;
/** Names per READDIR reply, well inside the 256 KiB packet limit of OpenSSH clients. */
const READDIR_BATCH = 100;
/**
 * READ and WRITE re-check the login at most this often (a check costs several SQLite queries, which
 * at 32 KiB per request took a third of an upload's CPU); every other request, including the CLOSE
 * that commits an upload, checks it each time.
 */
const DATA_RECHECK_MS = 250;
/** WRITE data ahead of the next expected offset is held until the gap before it is filled: this much per session. */
const MAX_AHEAD_BYTES = 16 << 20;

export type SftpSessionDeps = FileProtocolDeps;

type Handle =
  | { kind: 'read'; path: string; file: OpenFile }
  | {
      kind: 'write';
      path: string;
      body: PassThrough;
      /** The offset the store expects next: everything before it has been passed on, in order. */
      next: number;
      /** Data the client wrote beyond `next`, by offset (SFTP clients may pipeline out of order). */
      ahead: Map<number, Buffer>;
      result: Promise<FileRow>;
    }
  | { kind: 'dir'; entries: DirEntry[]; sent: number };

/** Why the store ended an upload early (quota, size limit, disk). */
async function failureOf(h: { result: Promise<FileRow> }): Promise<Error> {
  try {
    await h.result;
    return new Error('the upload has already ended');
  } catch (err) {
    return err instanceof Error ? err : new Error(String(err));
  }
}

/** A refusal of a client path, reported as permission denied. */
export class PathRefused extends Error {}

/** REALPATH: lexical, with '..' stopping at the owner's root, as in a chroot. */
export function resolveSftpPath(input: string): string {
  const out: string[] = [];
  for (const seg of input.split('/')) {
    if (seg === '' || seg === '.') continue;
    if (seg === '..') out.pop();
    else out.push(seg);
  }
  return `/${out.join('/')}`;
}

/** A client path as a repository path ('' for the root), by normaliseRepoPath's rules. */
export function toRepoPath(input: string): string {
  const rel = input.replace(/^\/+/, '');
  if (rel === '' || rel === '.') return '';
  try {
    return normaliseRepoPath(rel);
  } catch (err) {
    throw new PathRefused((err as Error).message);
  }
}

/** A client path that must name a file, as a repository path: a trailing '/' is refused. */
export function toFilePath(input: string): string {
  try {
    refuseFolderSpelling(input);
  } catch (err) {
    throw new PathRefused((err as Error).message);
  }
  return toRepoPath(input);
}

/** `a/` names a folder: a file there is not found, as stat("file/") is ENOTDIR on POSIX. */
export async function entryAsSpelled(
  store: FileStore,
  owner: string,
  input: string,
): Promise<Entry | undefined> {
  const e = await store.entry(owner, toRepoPath(input));
  return e?.kind === 'file' && input.endsWith('/') ? undefined : e;
}

/** A rename's paths may end with '/' only when it moves a folder. */
export async function renamePaths(
  store: FileStore,
  owner: string,
  from: string,
  to: string,
): Promise<[string, string]> {
  const src = toRepoPath(from);
  if ((await store.entry(owner, src))?.kind !== 'folder') [from, to].forEach(toFilePath);
  return [src, toRepoPath(to)];
}

function attrsOf(e: Entry): Attributes {
  if (e.kind === 'folder') return { mode: 0o40755, uid: 0, gid: 0, size: 0, atime: 0, mtime: 0 };
  const t = Math.floor(Date.parse(e.info.mtime) / 1000);
  return { mode: 0o100644, uid: 0, gid: 0, size: e.info.size, atime: t, mtime: t };
}

function longname(name: string, e: Entry): string {
  const a = attrsOf(e);
  const type = e.kind === 'folder' ? 'drwxr-xr-x' : '-rw-r--r--';
  const date = new Date(a.mtime * 1000).toISOString().slice(0, 16).replace('T', ' ');
  return `${type}    1 owner    owner    ${String(a.size).padStart(12)} ${date} ${name}`;
}

export function serveSftp(
  sftp: SFTPWrapper,
  session: OwnerSession,
  remote: string | undefined,
  deps: SftpSessionDeps,
  endConnection: () => void,
): void {
  const { db, store, log, audit } = deps;
  const { owner } = session;
  const handles = new Map<number, Handle>();
  let nextHandle = 1;
  let loginCheckedAt = 0;
  let started: Promise<void> = Promise.resolve();
  /** Bytes held in all write handles' `ahead` maps. */
  let aheadBytes = 0;

  function dropAhead(h: { ahead: Map<number, Buffer> }): void {
    for (const chunk of h.ahead.values()) aheadBytes -= chunk.length;
    h.ahead.clear();
  }

  const record = (e: Omit<AuditEvent, 'protocol' | 'remote' | 'user' | 'owner'>): void =>
    audit.record({ protocol: 'sftp', remote, user: owner, owner, ...e });

  function newHandle(h: Handle): Buffer {
    const id = nextHandle++;
    handles.set(id, h);
    const buf = Buffer.alloc(4);
    buf.writeUInt32BE(id);
    return buf;
  }

  function handleOf(buf: Buffer): [number, Handle] | undefined {
    if (buf.length !== 4) return undefined;
    const id = buf.readUInt32BE(0);
    const h = handles.get(id);
    return h && [id, h];
  }

  /** Reports an error to the client and, for actions worth it, to the audit log. */
  function fail(reqId: number, err: unknown, action?: string, path?: string): void {
    let code: number = STATUS_CODE.FAILURE;
    if (err instanceof AccessDenied || err instanceof PathRefused) code = STATUS_CODE.PERMISSION_DENIED;
    else if (err instanceof StoreError && err.code === 'not-found') code = STATUS_CODE.NO_SUCH_FILE;
    else if (!(err instanceof StoreError))
      log.error({ owner, action, err: describeError(err) }, 'SFTP request failed');
    const message = err instanceof Error ? err.message : String(err);
    if (action)
      record({ action, path, result: err instanceof AccessDenied ? 'denied' : 'failed', detail: message });
    sftp.status(reqId, code, message);
  }

  /**
   * Runs one request: the session is re-checked first (a disabled owner, revoked token or removed
   * key ends it here; for READ and WRITE within DATA_RECHECK_MS), then `fn` runs and any error
   * becomes an SFTP status.
   */
  function serve(
    reqId: number,
    action: string | undefined,
    path: string | undefined,
    fn: () => unknown,
    dataRequest = false,
  ): void {
    // The checks run one at a time and each request starts after its own, so requests start in the order
    // they came (a CLOSE never overtakes the WRITEs before it) even when the metadata answers out of order.
    const arrived = Date.now();
    started = started.then(async () => {
      try {
        if (!dataRequest || arrived - loginCheckedAt >= DATA_RECHECK_MS) {
          await checkSession(db, session);
          loginCheckedAt = arrived;
        }
      } catch (err) {
        fail(reqId, err, action ?? 'request', path);
        endConnection();
        return;
      }
      Promise.resolve()
        .then(fn)
        .catch((err: unknown) => fail(reqId, err, action, path));
    });
  }

  async function openForWrite(reqId: number, repoPath: string, flags: number): Promise<void> {
    if (flags & (OPEN_MODE.READ | OPEN_MODE.APPEND))
      throw new StoreError('conflict', 'files are opened either to read or to write a whole new file');
    const existing = await store.entry(owner, repoPath);
    if (existing?.kind === 'folder') throw new StoreError('conflict', `${repoPath} is a folder`);
    if (existing && flags & OPEN_MODE.EXCL) throw new StoreError('conflict', `${repoPath} already exists`);
    await store.precheckWrite(owner, repoPath);
    const body = new PassThrough({ highWaterMark: 1 << 20 });
    const h: Handle & { kind: 'write' } = {
      kind: 'write',
      path: repoPath,
      body,
      next: 0,
      ahead: new Map(),
      result: store.write(owner, repoPath, body, { maxBytes: deps.maxFileBytes }),
    };
    // Failures reach the client through `result`; the store has destroyed the body by then.
    h.result.catch(() => undefined);
    body.on('error', () => undefined);
    sftp.handle(reqId, newHandle(h));
  }

  sftp.on('REALPATH', (reqId, p) =>
    serve(reqId, undefined, undefined, async () => {
      const shown = resolveSftpPath(p);
      const e = await store.entry(owner, toRepoPath(shown));
      const entry: Entry = e ?? { kind: 'folder', path: shown };
      sftp.name(reqId, [{ filename: shown, longname: longname(shown, entry), attrs: attrsOf(entry) }]);
    }),
  );

  const statHandler = (reqId: number, p: string): void =>
    serve(reqId, undefined, undefined, async () => {
      const e = await entryAsSpelled(store, owner, p);
      if (!e) throw new StoreError('not-found', `no such file or folder: ${p}`);
      sftp.attrs(reqId, attrsOf(e));
    });
  sftp.on('STAT', statHandler);
  sftp.on('LSTAT', statHandler);

  sftp.on('OPEN', (reqId, filename, flags) => {
    const action = flags & OPEN_MODE.WRITE ? 'upload' : 'download';
    serve(reqId, action, filename, async () => {
      const repoPath = toFilePath(filename);
      if (repoPath === '') throw new StoreError('conflict', 'the root is a folder');
      if (action === 'upload') return openForWrite(reqId, repoPath, flags);
      if ((await store.entry(owner, repoPath))?.kind === 'folder')
        throw new StoreError('conflict', `${repoPath} is a folder`);
      const file = await store.open(owner, repoPath);
      record({ action, path: repoPath, result: 'ok', bytes: file.info.size });
      sftp.handle(reqId, newHandle({ kind: 'read', path: repoPath, file }));
    });
  });

  sftp.on('READ', (reqId, hbuf, offset, length) =>
    serve(
      reqId,
      undefined,
      undefined,
      async () => {
        const h = handleOf(hbuf)?.[1];
        if (h?.kind !== 'read') throw new StoreError('not-found', 'invalid handle');
        const data = await h.file.read(offset, Math.min(length, MAX_READ));
        if (data.length === 0) sftp.status(reqId, STATUS_CODE.EOF);
        else sftp.data(reqId, data);
      },
      true,
    ),
  );

  sftp.on('WRITE', (reqId, hbuf, offset, data) =>
    serve(
      reqId,
      undefined,
      undefined,
      async () => {
        const h = handleOf(hbuf)?.[1];
        if (h?.kind !== 'write') throw new StoreError('not-found', 'invalid handle');
        if (h.body.destroyed) throw await failureOf(h);
        if (offset < h.next || h.ahead.has(offset)) {
          throw new StoreError(
            'conflict',
            `uploads write each byte once: offset ${offset} was already written (next is ${h.next})`,
          );
        }
        if (offset > h.next) {
          if (aheadBytes + data.length > MAX_AHEAD_BYTES) {
            throw new StoreError(
              'conflict',
              `more than ${MAX_AHEAD_BYTES} bytes written ahead of the missing offset ${h.next}`,
            );
          }
          h.ahead.set(offset, data);
          aheadBytes += data.length;
          return sftp.status(reqId, STATUS_CODE.OK);
        }
        let flowing = true;
        for (let chunk: Buffer | undefined = data; chunk; chunk = h.ahead.get(h.next)) {
          if (chunk !== data) {
            h.ahead.delete(h.next);
            aheadBytes -= chunk.length;
          }
          h.next += chunk.length;
          flowing = h.body.write(chunk);
        }
        if (!flowing && !h.body.destroyed) {
          // Backpressure: the reply waits until the store has taken the data (or has failed).
          await new Promise<void>((resolve) => {
            const done = (): void => {
              h.body.off('drain', done).off('close', done);
              resolve();
            };
            h.body.on('drain', done).on('close', done);
          });
        }
        if (h.body.destroyed) throw await failureOf(h);
        sftp.status(reqId, STATUS_CODE.OK);
      },
      true,
    ),
  );

  sftp.on('FSTAT', (reqId, hbuf) =>
    serve(reqId, undefined, undefined, async () => {
      const h = handleOf(hbuf)?.[1];
      if (!h || h.kind === 'dir') throw new StoreError('not-found', 'invalid handle');
      if (h.kind === 'read') return sftp.attrs(reqId, attrsOf({ kind: 'file', info: h.file.info }));
      sftp.attrs(reqId, { mode: 0o100644, uid: 0, gid: 0, size: h.next, atime: 0, mtime: 0 });
    }),
  );

  sftp.on('CLOSE', (reqId, hbuf) => {
    const found = handleOf(hbuf);
    if (!found) return sftp.status(reqId, STATUS_CODE.FAILURE, 'invalid handle');
    const [id, h] = found;
    // A write handle stays listed until its commit runs: if the session check refuses the CLOSE, the
    // session's cleanup still discards the upload.
    if (h.kind !== 'write') handles.delete(id);
    if (h.kind === 'dir') return sftp.status(reqId, STATUS_CODE.OK);
    if (h.kind === 'read') {
      h.file.close().then(
        () => sftp.status(reqId, STATUS_CODE.OK),
        (err: unknown) => fail(reqId, err),
      );
      return;
    }
    // The upload becomes visible only now, and only if the session is still allowed.
    serve(reqId, 'upload', h.path, async () => {
      handles.delete(id);
      if (h.ahead.size > 0) {
        dropAhead(h);
        const gap = new StoreError(
          'conflict',
          `the upload has a gap: nothing was written at offset ${h.next}`,
        );
        h.body.destroy(gap);
        throw gap;
      }
      h.body.end();
      const info = await h.result;
      record({ action: 'upload', path: h.path, result: 'ok', bytes: info.size });
      sftp.status(reqId, STATUS_CODE.OK);
    });
  });

  sftp.on('FSETSTAT', (reqId) =>
    serve(reqId, undefined, undefined, () => sftp.status(reqId, STATUS_CODE.OK)),
  );
  // Modes, owners and times are not kept: accepting them lets `put -p` and friends work.
  sftp.on('SETSTAT', (reqId, p) =>
    serve(reqId, undefined, undefined, async () => {
      if (!(await store.entry(owner, toRepoPath(p))))
        throw new StoreError('not-found', `no such file or folder: ${p}`);
      sftp.status(reqId, STATUS_CODE.OK);
    }),
  );

  sftp.on('OPENDIR', (reqId, p) =>
    serve(reqId, 'list', p, async () => {
      const repoPath = toRepoPath(p);
      const e = await store.entry(owner, repoPath);
      if (e?.kind !== 'folder') throw new StoreError('not-found', `no such folder: ${p}`);
      sftp.handle(reqId, newHandle({ kind: 'dir', entries: await store.readdir(owner, repoPath), sent: 0 }));
    }),
  );

  sftp.on('READDIR', (reqId, hbuf) =>
    serve(reqId, undefined, undefined, async () => {
      const h = handleOf(hbuf)?.[1];
      if (h?.kind !== 'dir') throw new StoreError('not-found', 'invalid handle');
      if (h.sent >= h.entries.length) return sftp.status(reqId, STATUS_CODE.EOF);
      const batch = h.entries.slice(h.sent, h.sent + READDIR_BATCH);
      h.sent += batch.length;
      sftp.name(
        reqId,
        batch.map((e): FileEntry => ({ filename: e.name, longname: longname(e.name, e), attrs: attrsOf(e) })),
      );
    }),
  );

  const mutation = (action: string, p: string, fn: (repoPath: string) => Promise<void>) => (reqId: number) =>
    serve(reqId, action, p, async () => {
      const repoPath = toRepoPath(p);
      if (repoPath === '') throw new PathRefused(`cannot ${action} the root folder`);
      await fn(repoPath);
      record({ action, path: repoPath, result: 'ok' });
      sftp.status(reqId, STATUS_CODE.OK);
    });

  sftp.on('MKDIR', (reqId, p) => mutation('mkdir', p, (rp) => store.makeFolder(owner, rp))(reqId));
  sftp.on('RMDIR', (reqId, p) => mutation('rmdir', p, (rp) => store.removeFolder(owner, rp))(reqId));
  sftp.on('REMOVE', (reqId, p) =>
    mutation('delete', p, async (rp) => {
      toFilePath(p);
      if ((await store.entry(owner, rp))?.kind === 'folder')
        throw new StoreError('conflict', `${rp} is a folder`);
      if (!(await store.delete(owner, rp))) throw new StoreError('not-found', `no such file: ${rp}`);
    })(reqId),
  );
  sftp.on('RENAME', (reqId, from, to) =>
    serve(reqId, 'rename', from, async () => {
      const [src, dst] = await renamePaths(store, owner, from, to);
      if (src === '' || dst === '') throw new PathRefused('cannot rename the root folder');
      await store.rename(owner, src, dst);
      record({ action: 'rename', path: src, to: dst, result: 'ok' });
      sftp.status(reqId, STATUS_CODE.OK);
    }),
  );

  /** A session that ends with uploads still open discards them: nothing partial becomes visible. */
  const cleanup = (): void => {
    for (const h of handles.values()) {
      if (h.kind === 'write') {
        dropAhead(h);
        h.body.destroy(new Error('the SFTP session ended before the file was closed'));
        record({ action: 'upload', path: h.path, result: 'failed', detail: 'session ended before close' });
      } else if (h.kind === 'read') void h.file.close().catch(() => undefined);
    }
    handles.clear();
  };
  sftp.on('close', cleanup);
  // The client's EOF ends the subsystem: closing our side too lets OpenSSH's client exit.
  sftp.on('end', () => {
    cleanup();
    sftp.end();
  });
}
