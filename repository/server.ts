import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import path from 'node:path';
import { createLogger } from '../logging/logger';
import { ensureServiceToken } from './accounts/auth';
import { loadCapabilityKeys } from './accounts/capabilities';
import { AuditLog, defaultAuditLogPath } from './accounts/auditLog';
import { AuditShipper, serverIdOf } from './accounts/auditShipper';
import { FileStore } from './store/fileStore';
import {
  DEFAULT_IDLE_TIMEOUT_MS,
  defaultFtpsCertPaths,
  startFtpsServer,
  type FtpsServer,
} from './ftps/ftpsServer';
import { createRequestHandler } from './http/httpApi';
import {
  backendSettingsFromEnv,
  openBackend,
  type BackendSettings,
  type RepositoryBackend,
} from './store/backend';
import { ResumableUploads, type Uploads } from './store/resumableUploads';
import { SharedUploads } from './store/sharedUploads';
import type { PgMetadata } from './store/pgMetadata';
import {
  LoginThrottle,
  PgThrottleStore,
  type LoginThrottleOptions,
  type ThrottleStore,
} from './accounts/loginThrottle';
import { ImageStore } from './store/imageStore';
import { defaultHostKeyPath, startSftpServer, type SftpServer } from './sftp/sftpServer';
import type { TaskApi, TaskAdmissionDeps } from './http/taskApi';
import { LiveLogs } from './tasks/liveLogs';
import { PgLiveLogs } from './tasks/pgLiveLogs';
import { loadWebAssets } from './http/webAssets';
import type { Logger } from '../logging/logger';

export interface RepositoryServerOptions {
  /** On `cluster`, only this server's own files (host keys, certificates, temp files). */
  dataDir: string;
  /** Where metadata and file bytes live; default from the VSP_REPOSITORY_* settings (`local`). */
  backend?: BackendSettings;
  host?: string;
  /** 0 picks an ephemeral port. */
  port?: number;
  maxFileBytes?: number;
  /** If given, ensured to exist as a service token named 'hosts'. */
  serviceToken?: string;
  /** JSON-lines audit log; default `<dataDir>/audit.log`. */
  auditLogFile?: string;
  /** Also serve SFTP (same store, accounts and rules) when given. */
  sftp?: { host?: string; port: number; hostKeyFile?: string };
  /** Also serve FTP with explicit TLS (same store, accounts and rules) when given. */
  ftps?: {
    host?: string;
    port: number;
    pasvPorts: { min: number; max: number };
    pasvAddress?: string;
    /** PEM files, default `<dataDir>/ftps_cert.pem` and `ftps_key.pem` (self-signed on first start). */
    certFile?: string;
    keyFile?: string;
    /** Allow logins without AUTH TLS. */
    allowPlain?: boolean;
  };
  /**
   * A connection (HTTP, SSH, FTPS control or data) that moves no bytes for this long is dropped and its
   * unfinished upload discarded (default 5 min).
   */
  idleTimeoutMs?: number;
  /** How long an unfinished resumable upload lives after its last append (default 24 h). */
  uploadExpiryMs?: number;
  /** Login rate limiting shared by all protocols (defaults in loginThrottle.ts). */
  loginThrottle?: Partial<LoginThrottleOptions>;
  /**
   * Where failures and lockouts live; default the backend's: PostgreSQL on `cluster` (shared by every
   * server), this process's memory on `local` (one server is the whole repository).
   */
  throttleStore?: ThrottleStore;
  /**
   * Temporal, for the task endpoints the web page uses (list, submit, status). Without it they answer
   * 503. The caller keeps the connection and closes it after the server. A factory (taskApi.ts's
   * taskApiOver), so that a server without Temporal never loads its client.
   */
  tasks?: (log: Logger, admission: TaskAdmissionDeps) => TaskApi;
}

export interface RepositoryServer {
  url: string;
  /** Where SFTP listens, when it was configured. */
  sftp?: { host: string; port: number };
  /** Where FTPS listens, when it was configured. */
  ftps?: { host: string; port: number };
  close(): Promise<void>;
}

export const DEFAULT_PORT = 8420;
export const DEFAULT_MAX_FILE_BYTES = 64 * 1024 ** 3;
/** A client gets this long to send its request headers (slow-header clients hold no connection longer). */
const HEADERS_TIMEOUT_MS = 30_000;
/** On close, requests still running after this long are cut off. */
const CLOSE_GRACE_MS = 10_000;

function validate(
  opts: RepositoryServerOptions,
): Required<Pick<RepositoryServerOptions, 'dataDir' | 'host' | 'port' | 'maxFileBytes'>> {
  if (typeof opts.dataDir !== 'string' || opts.dataDir === '')
    throw new Error('repository dataDir is required');
  const port = opts.port ?? DEFAULT_PORT;
  for (const [what, p] of [
    ['repository port', port],
    ['SFTP port', opts.sftp?.port ?? 0],
    ['FTPS port', opts.ftps?.port ?? 0],
  ] as const) {
    if (!Number.isInteger(p) || p < 0 || p > 65535) throw new Error(`${what} ${p} is not 0-65535`);
  }
  const maxFileBytes = opts.maxFileBytes ?? DEFAULT_MAX_FILE_BYTES;
  if (!Number.isSafeInteger(maxFileBytes) || maxFileBytes < 0) {
    throw new Error(`repository maxFileBytes ${maxFileBytes} is not a non-negative integer`);
  }
  return { dataDir: path.resolve(opts.dataDir), host: opts.host ?? '127.0.0.1', port, maxFileBytes };
}

/** Starts the repository's HTTP service over the store in `dataDir`. */
export async function startRepositoryServer(opts: RepositoryServerOptions): Promise<RepositoryServer> {
  const { dataDir, host, port, maxFileBytes } = validate(opts);
  const idleTimeoutMs = opts.idleTimeoutMs ?? DEFAULT_IDLE_TIMEOUT_MS;
  const log = createLogger('repository');
  const backend: RepositoryBackend = await openBackend(
    dataDir,
    opts.backend ?? backendSettingsFromEnv(process.env),
  );
  const db = backend.metadata;
  let audit: AuditLog | undefined;
  let shipper: AuditShipper | undefined;
  let sftp: SftpServer | undefined;
  let uploads: Uploads | undefined;
  let ftps: FtpsServer | undefined;
  let images: ImageStore | undefined;
  try {
    if (opts.serviceToken !== undefined) await ensureServiceToken(db, opts.serviceToken, 'hosts');
    const keys = loadCapabilityKeys(dataDir);
    const store = new FileStore(db, backend.bytes);
    // Before any protocol starts: it hears of every image stored, whichever protocol stores it.
    images = new ImageStore({ db, store, log: log.child({ part: 'images' }) });
    const auditFile = opts.auditLogFile ?? defaultAuditLogPath(dataDir);
    audit = AuditLog.open(auditFile);
    if (db.kind === 'cluster') {
      shipper = new AuditShipper(
        (db as PgMetadata).sharedPool,
        auditFile,
        await serverIdOf(dataDir),
        log.child({ part: 'audit' }),
      );
      shipper.start();
    }
    uploads =
      backend.settings.kind === 'cluster'
        ? new SharedUploads(db as PgMetadata, store, backend.bytes, maxFileBytes, log, opts.uploadExpiryMs)
        : await ResumableUploads.open({
            dataDir,
            db,
            store,
            maxFileBytes,
            log,
            expiryMs: opts.uploadExpiryMs,
          });
    const loginThrottle = new LoginThrottle(
      opts.loginThrottle,
      opts.throttleStore ??
        (db.kind === 'cluster' ? new PgThrottleStore((db as PgMetadata).sharedPool) : undefined),
    );
    const deps = { db, store, maxFileBytes, log, audit, uploads, loginThrottle };
    const web = await loadWebAssets();
    const tasks = opts.tasks?.(log.child({ part: 'tasks' }), { db, keys });
    if (opts.sftp) {
      sftp = await startSftpServer(deps, {
        host: opts.sftp.host ?? host,
        port: opts.sftp.port,
        hostKeyFile: opts.sftp.hostKeyFile ?? defaultHostKeyPath(dataDir),
        idleTimeoutMs,
      });
      log.info({ host: sftp.host, port: sftp.port }, 'SFTP listening');
    }
    if (opts.ftps) {
      const defaults = defaultFtpsCertPaths(dataDir);
      ftps = await startFtpsServer(deps, {
        ...opts.ftps,
        host: opts.ftps.host ?? host,
        certFile: opts.ftps.certFile ?? defaults.certFile,
        keyFile: opts.ftps.keyFile ?? defaults.keyFile,
        idleTimeoutMs,
      });
      log.info({ host: ftps.host, port: ftps.port }, 'FTPS listening');
    }
    const liveLogs =
      db.kind === 'cluster' ? new PgLiveLogs((db as PgMetadata).sharedPool) : await LiveLogs.open(dataDir);
    const handler = createRequestHandler({ ...deps, web, tasks, images, keys, liveLogs });
    const inFlight = new Set<Promise<void>>();
    const server = createServer(
      // Checked this often, the headers timeout holds to within a few seconds.
      { connectionsCheckingInterval: 5_000 },
      (req: IncomingMessage, res: ServerResponse) => {
        const p = handler(req, res).finally(() => inFlight.delete(p));
        inFlight.add(p);
      },
    );
    // Large uploads legitimately take long: no limit on a whole request, but on its headers and on
    // idleness (small JSON bodies have their own deadline in httpApi.ts).
    server.requestTimeout = 0;
    server.headersTimeout = Math.min(HEADERS_TIMEOUT_MS, idleTimeoutMs);
    server.setTimeout(idleTimeoutMs);
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(port, host, () => {
        server.off('error', reject);
        resolve();
      });
    });
    const addr = server.address() as AddressInfo;
    const shownHost = addr.family === 'IPv6' ? `[${addr.address}]` : addr.address;
    const url = `http://${shownHost}:${addr.port}`;
    let closing: Promise<void> | undefined;
    const close = async (): Promise<void> => {
      const closed = new Promise<void>((resolve) => server.close(() => resolve()));
      server.closeIdleConnections();
      const cutOff = setTimeout(() => server.closeAllConnections(), CLOSE_GRACE_MS);
      try {
        await Promise.all([
          sftp?.close(),
          ftps?.close(),
          closed.then(() => Promise.allSettled([...inFlight])),
        ]);
      } finally {
        await uploads?.close();
        await images?.close();
        clearTimeout(cutOff);
        audit?.close();
        await shipper?.close();
        await backend.close();
      }
      log.info({ url }, 'repository closed');
    };
    return {
      url,
      sftp: sftp && { host: sftp.host, port: sftp.port },
      ftps: ftps && { host: ftps.host, port: ftps.port },
      close: () => (closing ??= close()),
    };
  } catch (err) {
    await sftp?.close();
    await ftps?.close();
    await uploads?.close();
    await images?.close();
    audit?.close();
    await shipper?.close();
    await backend.close();
    throw err;
  }
}
