import { createLogger, describeError } from '../logging/logger';
import {
  DEFAULT_MAX_FILE_BYTES,
  DEFAULT_PORT,
  startRepositoryServer,
  type RepositoryServerOptions,
} from './server';

/**
 * Repository process entrypoint (`node dist/repository/main.js`), configured by environment:
 * VSP_REPO_DIR (required), VSP_REPO_LISTEN (host:port, default 127.0.0.1:8420),
 * VSP_REPO_MAX_FILE_BYTES (default 64 GiB), VSP_REPO_SERVICE_TOKEN (optional),
 * VSP_REPO_SFTP_LISTEN (host:port; SFTP is off unless set), VSP_REPO_SFTP_HOST_KEY (default
 * <dir>/ssh_host_ed25519_key, made on first start), VSP_REPO_AUDIT_LOG (default <dir>/audit.log).
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
  return { dataDir, host, port, maxFileBytes, serviceToken, sftp, auditLogFile };
}

async function main(): Promise<void> {
  const config = configFromEnv(process.env);
  const server = await startRepositoryServer(config);
  log.info(
    { url: server.url, sftp: server.sftp, dataDir: config.dataDir, maxFileBytes: config.maxFileBytes },
    'repository listening',
  );
  const stop = (signal: NodeJS.Signals): void => {
    log.info({ signal }, 'repository stopping');
    server.close().then(
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
  main().catch((err: unknown) => {
    log.fatal({ err: describeError(err) }, 'repository failed to start');
    process.exit(1);
  });
}
