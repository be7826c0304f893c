import net from 'node:net';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

import { Connection } from '@temporalio/client';
import { msToTs } from '@temporalio/common/lib/time';

import { SEARCH_ATTRIBUTE_TYPES } from '../../config/names';
import { missingSearchAttributeTypes } from '../../config/temporal';
import { runCommand } from '../../lib/runCommand';
import { createLogger } from '../../logging/logger';
import { spawnManaged } from '../devcluster/processes';
import { repoRoot } from '../devcluster/tools';

const log = createLogger('temporal.postgres');

/** Retention of closed workflows in the namespace this registers. */
const RETENTION = '30 days';
/** The first start creates the shards' rows and the system namespace; a start after a kill recovers shards. */
const READY_TIMEOUT_MS = 180_000;
const POLL_MS = 200;
/** config/vsp.yaml's port layout around the frontend port P (Temporal's own defaults around 7233). */
const PORT_OFFSETS = [0, 1, 2, 6, 10, -300, -299, -298, -294];
/** Temporal's SQL schema keeps the services' ports as smallint: the whole layout stays at or below 32767. */
export const MAX_PORT = 32_767 - 10;
export const MIN_PORT = 301;

function script(name: string): string {
  return path.join(repoRoot(), 'deploy', 'temporal', name);
}

/**
 * config/vsp.yaml's SQL settings from two PostgreSQL URLs (postgres://user:password@host:port/database):
 * persistence and visibility may be two databases, two roles, even two servers.
 */
export function temporalSqlEnv(persistenceUrl: string, visibilityUrl: string): NodeJS.ProcessEnv {
  const parse = (what: string, url: string) => {
    let u: URL;
    try {
      u = new URL(url);
    } catch (err) {
      throw new Error(`${what} URL is not a URL (postgres://user:password@host:port/database)`, {
        cause: err,
      });
    }
    const database = decodeURIComponent(u.pathname.replace(/^\//, ''));
    if (!/^postgres(ql)?:$/.test(u.protocol) || !u.hostname || !u.username || !u.password || !database)
      throw new Error(`${what} URL must be postgres://user:password@host:port/database`);
    return {
      address: `${u.hostname}:${u.port || '5432'}`,
      user: decodeURIComponent(u.username),
      password: decodeURIComponent(u.password),
      database,
    };
  };
  const p = parse('persistence', persistenceUrl);
  const v = parse('visibility', visibilityUrl);
  return {
    VSP_TEMPORAL_SQL_ADDRESS: p.address,
    VSP_TEMPORAL_SQL_USER: p.user,
    VSP_TEMPORAL_SQL_PASSWORD: p.password,
    VSP_TEMPORAL_SQL_DATABASE: p.database,
    VSP_TEMPORAL_VISIBILITY_SQL_ADDRESS: v.address,
    VSP_TEMPORAL_VISIBILITY_SQL_USER: v.user,
    VSP_TEMPORAL_VISIBILITY_SQL_PASSWORD: v.password,
    VSP_TEMPORAL_VISIBILITY_SQL_DATABASE: v.database,
  };
}

/** Creates or upgrades both schemas (deploy/temporal/schema.sh; idempotent). */
export async function setUpTemporalSchema(sqlEnv: NodeJS.ProcessEnv): Promise<void> {
  const { stdout } = await runCommand('bash', [script('schema.sh')], {
    env: { ...process.env, ...sqlEnv },
    timeoutMs: 300_000,
  });
  log.info({ output: stdout.trim() }, 'Temporal schemas current');
}

function portFree(host: string, port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const server = net.createServer();
    server.once('error', () => resolve(false));
    server.listen({ host, port }, () => server.close(() => resolve(true)));
  });
}

/** A frontend port P whose whole layout (PORT_OFFSETS) is free on `host` right now. */
export async function freeTemporalPort(host = '127.0.0.1'): Promise<number> {
  for (let attempt = 0; attempt < 50; attempt++) {
    // Above the well-known ports, below the ephemeral ones (32768 and up: clients' outgoing ports).
    const port = 10_300 + Math.floor(Math.random() * (MAX_PORT - 10_300));
    const free = await Promise.all(PORT_OFFSETS.map((o) => portFree(host, port + o)));
    if (free.every(Boolean)) return port;
  }
  throw new Error(`no free block of Temporal ports (${PORT_OFFSETS.join(', ')} around P) on ${host}`);
}

export interface TemporalPgServerOptions {
  /** config/vsp.yaml's SQL settings (temporalSqlEnv); the schemas must be current (setUpTemporalSchema). */
  sqlEnv: NodeJS.ProcessEnv;
  /** Address every service binds (default 127.0.0.1). */
  ip?: string;
  /** Frontend gRPC port; absent = a free layout (freeTemporalPort). A restart passes the same one. */
  port?: number;
  /** Registered with VSP's search attributes once the server serves (idempotent). */
  namespace: string;
  logFile: string;
}

export interface TemporalPgServer {
  /** host:port of the frontend. */
  address: string;
  namespace: string;
  port: number;
  pid: number;
  /** SIGTERM (a graceful stop: shards handed back), SIGKILL after 30 s. */
  stop(): Promise<void>;
  /** SIGKILL, now (a crash): resolves once the process is gone. */
  kill(): Promise<void>;
  exited: Promise<number | null>;
}

async function serving(address: string): Promise<boolean> {
  const connection = await Connection.connect({ address, connectTimeout: '2s' });
  try {
    const health = await connection.healthService.check({});
    return health.status === 1; // SERVING
  } finally {
    await connection.close();
  }
}

/**
 * Runs the Temporal server on PostgreSQL (deploy/temporal/server.sh) as a managed process and resolves once
 * it serves `namespace` with every VSP search attribute.
 */
export async function startTemporalPgServer(opts: TemporalPgServerOptions): Promise<TemporalPgServer> {
  const ip = opts.ip ?? '127.0.0.1';
  if (net.isIP(ip) !== 4) throw new Error(`ip must be an IPv4 address, got '${ip}'`);
  if (
    opts.port !== undefined &&
    !(Number.isInteger(opts.port) && opts.port >= MIN_PORT && opts.port <= MAX_PORT)
  )
    throw new Error(
      `port must be an integer from ${MIN_PORT} to ${MAX_PORT} (config/vsp.yaml's layout, stored as smallint), got ${opts.port}`,
    );
  const port = opts.port ?? (await freeTemporalPort(ip));
  const address = `${ip}:${port}`;
  const started = Date.now();
  const proc = await spawnManaged('temporal-server', 'bash', [script('server.sh')], {
    env: { ...process.env, ...opts.sqlEnv, VSP_TEMPORAL_IP: ip, VSP_TEMPORAL_PORT: String(port) },
    logFile: opts.logFile,
    readyWhen: { port: { host: ip, port }, probe: () => serving(address) },
    readyTimeoutMs: READY_TIMEOUT_MS,
  });
  try {
    await registerVspNamespace(address, opts.namespace, Date.now() + READY_TIMEOUT_MS);
  } catch (err) {
    await proc.stop('SIGKILL', 0);
    throw err;
  }
  log.info(
    { address, namespace: opts.namespace, serverPid: proc.pid, readyMs: Date.now() - started },
    'Temporal server on PostgreSQL ready',
  );
  return {
    address,
    namespace: opts.namespace,
    port,
    pid: proc.pid,
    exited: proc.exited,
    stop: () => proc.stop('SIGTERM', 30_000),
    kill: () => proc.stop('SIGKILL', 0),
  };
}

/** gRPC's ALREADY_EXISTS: the SDK's connection rejects with the raw service error. */
const GRPC_ALREADY_EXISTS = 6;

/**
 * Registers `namespace` (once) and adds whichever VSP search attribute it lacks, then waits until a
 * visibility query on them is accepted: from then on workflows may upsert them. Idempotent.
 */
export async function registerVspNamespace(
  address: string,
  namespace: string,
  deadline: number,
): Promise<void> {
  const connection = await Connection.connect({ address });
  try {
    await connection.workflowService
      .registerNamespace({
        namespace,
        workflowExecutionRetentionPeriod: msToTs(RETENTION),
        description: 'VSP tasks (deploy/temporal/)',
      })
      .catch((err: unknown) => {
        if ((err as { code?: unknown }).code !== GRPC_ALREADY_EXISTS) throw err;
      });
    const query = Object.entries(SEARCH_ATTRIBUTE_TYPES)
      .map(([name, type]) => (type === 'Int' ? `${name} = 0` : `${name} = ''`))
      .join(' AND ');
    let lastError: unknown;
    // A new namespace reaches the services' caches within seconds (system.namespaceCacheRefreshInterval).
    while (Date.now() < deadline) {
      try {
        const missing = await missingSearchAttributeTypes(connection.operatorService, namespace);
        if (Object.keys(missing).length > 0) {
          await connection.operatorService.addSearchAttributes({ namespace, searchAttributes: missing });
          continue;
        }
        await connection.workflowService.listWorkflowExecutions({ namespace, query, pageSize: 1 });
        return;
      } catch (err) {
        lastError = err;
        await sleep(POLL_MS);
      }
    }
    throw new Error(`namespace ${namespace} at ${address} not ready with VSP's search attributes`, {
      cause: lastError,
    });
  } finally {
    await connection.close();
  }
}
