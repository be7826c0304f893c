import { createLogger, describeError } from '../logging/logger';
import {
  DEFAULT_MAX_FILE_BYTES,
  DEFAULT_PORT,
  startRepositoryServer,
  type RepositoryServerOptions,
} from './server';
import { tuneHeapForStreaming } from '../lib/streamingHeap';

/**
 * Repository process entrypoint (`node dist/repository/main.js`), configured by environment:
 * VSP_REPO_DIR (required), VSP_REPO_LISTEN (host:port, default 127.0.0.1:8420),
 * VSP_REPO_MAX_FILE_BYTES (default 64 GiB), VSP_REPO_SERVICE_TOKEN (optional),
 * VSP_REPO_SFTP_LISTEN (host:port; SFTP is off unless set), VSP_REPO_SFTP_HOST_KEY (default
 * <dir>/ssh_host_ed25519_key, made on first start), VSP_REPO_AUDIT_LOG (default <dir>/audit.log),
 * VSP_REPO_UPLOAD_EXPIRY_SECONDS (unfinished resumable uploads are dropped after this idle time; 86400),
 * VSP_REPO_IDLE_TIMEOUT_SECONDS (an HTTP, SSH or FTP connection that moves no bytes this long is dropped and
 * its unfinished upload discarded; 300),
 * VSP_REPO_FTPS_LISTEN (host:port; FTPS is off unless set), VSP_REPO_FTPS_PASV_PORTS (min-max, default
 * 50000-50100), VSP_REPO_FTPS_PASV_ADDRESS (announced to non-local clients; default the listen host),
 * VSP_REPO_FTPS_CERT / VSP_REPO_FTPS_KEY (PEM; default <dir>/ftps_cert.pem and ftps_key.pem, self-signed
 * on first start), VSP_REPO_FTPS_ALLOW_PLAIN=1 (accept logins without AUTH TLS: only on purpose),
 * VSP_REPO_TEMPORAL=1 (connect to Temporal, with the TEMPORAL_* settings of config/temporal.ts, so the
 * web page can list, submit and follow the owner's tasks; without it the task endpoints answer 503).
 * Task capabilities are signed with `<dir>/capability.key` (made on first start, mode 0600; rotation in
 * deploy/production/README.md).
 */

const log = createLogger('repository');

/** `host:port` or `[v6]:port`. */
export function parseListen(value: string, variable = 'VSP_REPO_LISTEN'): { host: string; port: number } {
  const m = /^(?:\[([0-9a-fA-F:.]+)\]|([^:[\]]+)):(\d{1,5})$/.exec(value.trim());
  const port = m ? Number(m[3]) : NaN;
  if (!m || port > 65535) {
    throw new Error(`${variable}=${JSON.stringify(value)} must be host:port (or [ipv6]:port), port 0-65535`);
  }
  return { host: m[1] ?? m[2], port };
}

/** `min-max`, an inclusive range of unprivileged ports. */
export function parsePortRange(value: string, variable: string): { min: number; max: number } {
  const m = /^(\d{4,5})-(\d{4,5})$/.exec(value.trim());
  const [min, max] = m ? [Number(m[1]), Number(m[2])] : [NaN, NaN];
  if (!m || min < 1024 || max > 65535 || min > max)
    throw new Error(`${variable}=${JSON.stringify(value)} must be min-max within 1024-65535`);
  return { min, max };
}

function parseFlag(value: string | undefined, variable: string): boolean {
  if (value === undefined || value === '' || value === '0') return false;
  if (value === '1') return true;
  throw new Error(`${variable}=${JSON.stringify(value)} must be 0 or 1`);
}

export function configFromEnv(env: NodeJS.ProcessEnv): RepositoryServerOptions {
  const dataDir = env.VSP_REPO_DIR;
  if (!dataDir) throw new Error('VSP_REPO_DIR is required: the folder holding the repository data');
  const { host, port } = parseListen(env.VSP_REPO_LISTEN ?? `127.0.0.1:${DEFAULT_PORT}`);
  let maxFileBytes = DEFAULT_MAX_FILE_BYTES;
  if (env.VSP_REPO_MAX_FILE_BYTES !== undefined) {
    if (
      !/^\d+$/.test(env.VSP_REPO_MAX_FILE_BYTES) ||
      !Number.isSafeInteger(Number(env.VSP_REPO_MAX_FILE_BYTES))
    ) {
      throw new Error(
        `VSP_REPO_MAX_FILE_BYTES=${JSON.stringify(env.VSP_REPO_MAX_FILE_BYTES)} must be a whole number of bytes`,
      );
    }
    maxFileBytes = Number(env.VSP_REPO_MAX_FILE_BYTES);
  }
  const serviceToken = env.VSP_REPO_SERVICE_TOKEN === '' ? undefined : env.VSP_REPO_SERVICE_TOKEN;
  const sftp = env.VSP_REPO_SFTP_LISTEN
    ? {
        ...parseListen(env.VSP_REPO_SFTP_LISTEN, 'VSP_REPO_SFTP_LISTEN'),
        hostKeyFile: env.VSP_REPO_SFTP_HOST_KEY || undefined,
      }
    : undefined;
  const auditLogFile = env.VSP_REPO_AUDIT_LOG || undefined;
  const uploadExpiryMs = secondsFromEnv(env, 'VSP_REPO_UPLOAD_EXPIRY_SECONDS');
  const idleTimeoutMs = secondsFromEnv(env, 'VSP_REPO_IDLE_TIMEOUT_SECONDS');
  const ftps = env.VSP_REPO_FTPS_LISTEN
    ? {
        ...parseListen(env.VSP_REPO_FTPS_LISTEN, 'VSP_REPO_FTPS_LISTEN'),
        pasvPorts: parsePortRange(env.VSP_REPO_FTPS_PASV_PORTS || '50000-50100', 'VSP_REPO_FTPS_PASV_PORTS'),
        pasvAddress: env.VSP_REPO_FTPS_PASV_ADDRESS || undefined,
        certFile: env.VSP_REPO_FTPS_CERT || undefined,
        keyFile: env.VSP_REPO_FTPS_KEY || undefined,
        allowPlain: parseFlag(env.VSP_REPO_FTPS_ALLOW_PLAIN, 'VSP_REPO_FTPS_ALLOW_PLAIN'),
      }
    : undefined;
  return {
    dataDir,
    host,
    port,
    maxFileBytes,
    serviceToken,
    sftp,
    ftps,
    auditLogFile,
    uploadExpiryMs,
    idleTimeoutMs,
  };
}

/** A positive whole number of seconds from `env[name]`, in milliseconds; undefined when unset. */
function secondsFromEnv(env: NodeJS.ProcessEnv, name: string): number | undefined {
  const raw = env[name];
  if (raw === undefined || raw === '') return undefined;
  if (!/^\d{1,9}$/.test(raw) || Number(raw) === 0)
    throw new Error(`${name}=${JSON.stringify(raw)} must be a positive whole number of seconds`);
  return Number(raw) * 1000;
}

/** Whether the repository should connect to Temporal for its task endpoints. */
export function temporalFromEnv(env: NodeJS.ProcessEnv): boolean {
  return parseFlag(env.VSP_REPO_TEMPORAL, 'VSP_REPO_TEMPORAL');
}

async function main(): Promise<void> {
  const config = configFromEnv(process.env);
  // Loaded only when asked for: the Temporal client weighs ~50 MiB of the server's resident memory.
  const tasks = temporalFromEnv(process.env)
    ? await (await import('../client/vspClient.js')).VspClient.connect()
    : undefined;
  const taskApi = tasks && (await import('./http/taskApi.js')).taskApiOver(tasks);
  const server = await startRepositoryServer({ ...config, tasks: taskApi }).catch(async (err: unknown) => {
    await tasks?.temporal.connection.close();
    throw err;
  });
  log.info(
    {
      url: server.url,
      sftp: server.sftp,
      dataDir: config.dataDir,
      maxFileBytes: config.maxFileBytes,
      tasks: tasks !== undefined,
    },
    'repository listening',
  );
  const stop = (signal: NodeJS.Signals): void => {
    log.info({ signal }, 'repository stopping');
    server
      .close()
      .then(() => tasks?.temporal.connection.close())
      .then(
        () => process.exit(0),
        (err: unknown) => {
          log.error({ err: describeError(err) }, 'repository did not close cleanly');
          process.exit(1);
        },
      );
  };
  process.once('SIGTERM', stop);
  process.once('SIGINT', stop);
}

if (require.main === module) {
  tuneHeapForStreaming();
  main().catch((err: unknown) => {
    log.fatal({ err: describeError(err) }, 'repository failed to start');
    process.exit(1);
  });
}
