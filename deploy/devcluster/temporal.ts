import { Connection } from '@temporalio/client';

import { SEARCH_ATTRIBUTE_TYPES, SEARCH_ATTRIBUTES } from '../../config/names';
import { createLogger } from '../../logging/logger';
import { missingSearchAttributes } from '../../config/temporal';
import { freePort } from './ports';
import { spawnManaged } from './processes';
import { resolveTemporalCli } from './tools';

const log = createLogger('devcluster.temporal');

/** The custom search attributes VSP's workflows set; the dev server registers them at start. */
export const VSP_SEARCH_ATTRIBUTES: readonly string[] = Object.values(SEARCH_ATTRIBUTES);

/** `temporal server start-dev` arguments that register them, each with its type. */
export function searchAttributeArgs(): string[] {
  return Object.entries(SEARCH_ATTRIBUTE_TYPES).flatMap(([name, type]) => [
    '--search-attribute',
    `${name}=${type}`,
  ]);
}

export interface TemporalDevServerOptions {
  /** SQLite file that keeps workflow state across restarts; absent = in memory. */
  dbFile?: string;
  /** Address the front end binds (default 127.0.0.1). */
  ip?: string;
  /** gRPC front-end port; 0 or absent = a free one. */
  port?: number;
  /** Web UI port; absent = a free one. Ignored when headless. */
  uiPort?: number;
  headless?: boolean;
  logFile: string;
  /** Default 60 s: the first start on a slow machine unpacks the UI and creates the SQLite schema. */
  readyTimeoutMs?: number;
}

export interface TemporalDevServer {
  /** host:port of the gRPC front end. */
  address: string;
  /** Web UI, unless headless. */
  uiUrl?: string;
  namespace: 'default';
  pid: number;
  stop(): Promise<void>;
  /** Resolves when the server process exits (code, or null when a signal ended it). */
  exited: Promise<number | null>;
}

function validPort(what: string, port: number | undefined): void {
  if (port !== undefined && !(Number.isInteger(port) && port >= 0 && port <= 65535)) {
    throw new Error(`${what} must be an integer from 0 to 65535, got ${port}`);
  }
}

/** Ready when a client can connect and sees every VSP search attribute in the default namespace. */
async function hasSearchAttributes(address: string): Promise<boolean> {
  const connection = await Connection.connect({ address, connectTimeout: '2s' });
  try {
    return (await missingSearchAttributes(connection.operatorService, 'default')).length === 0;
  } finally {
    await connection.close();
  }
}

/** Starts `temporal server start-dev` and resolves once it serves the VSP search attributes. */
export async function startTemporalDevServer(opts: TemporalDevServerOptions): Promise<TemporalDevServer> {
  validPort('port', opts.port);
  validPort('uiPort', opts.uiPort);
  const ip = opts.ip ?? '127.0.0.1';
  const port = opts.port || (await freePort(ip));
  const uiPort = opts.headless ? undefined : opts.uiPort || (await freePort(ip));
  const address = `${ip.includes(':') ? `[${ip}]` : ip}:${port}`;

  const args = ['server', 'start-dev', '--ip', ip, '--port', String(port), '--log-format', 'json'];
  args.push('--log-level', 'warn');
  args.push(...searchAttributeArgs());
  if (opts.dbFile) args.push('--db-filename', opts.dbFile);
  if (uiPort === undefined) args.push('--headless');
  else args.push('--ui-port', String(uiPort), '--ui-disable-news-fetch');

  const cli = resolveTemporalCli();
  const proc = await spawnManaged('temporal-dev-server', cli, args, {
    env: process.env,
    logFile: opts.logFile,
    readyWhen: { port: { host: ip, port }, probe: () => hasSearchAttributes(address) },
    readyTimeoutMs: opts.readyTimeoutMs ?? 60_000,
  });
  const uiUrl = uiPort === undefined ? undefined : `http://${ip.includes(':') ? `[${ip}]` : ip}:${uiPort}`;
  log.info(
    { address, uiUrl, serverPid: proc.pid, dbFile: opts.dbFile, logFile: opts.logFile },
    'Temporal dev server ready',
  );
  return {
    address,
    uiUrl,
    namespace: 'default',
    pid: proc.pid,
    exited: proc.exited,
    // SIGTERM lets the server close its SQLite file cleanly; SIGKILL after 10 s.
    stop: () => proc.stop('SIGTERM', 10_000),
  };
}
