import { randomBytes } from 'node:crypto';
import path from 'node:path';

import { runCommand } from '../../lib/runCommand';
import { createLogger } from '../../logging/logger';
import { freePort } from '../devcluster/ports';
import { spawnManaged } from '../devcluster/processes';
import { repoRoot } from '../devcluster/tools';

const log = createLogger('postgres.cluster');

const SCRIPT_TIMEOUT_MS = 120_000;
/** initdb and the first start on a busy 2-core machine take seconds; crash recovery after a kill more. */
const READY_TIMEOUT_MS = 120_000;

export interface PostgresClusterOptions {
  /** Data directory: created (initdb) when empty or absent, reused when it holds a cluster. */
  dir: string;
  /** Loopback TCP port; absent = a free one (for a new cluster) or the cluster's own. */
  port?: number;
  /** Server output (stdout and stderr) is appended here, kept after the cluster stops. */
  logFile: string;
  /** Without fsync: for throw-away test clusters (a machine crash may corrupt them). Default false. */
  noFsync?: boolean;
}

export interface PostgresCluster {
  dir: string;
  port: number;
  pid: number;
  /**
   * Creates database `name` owned by role `owner` (default: a role named as the database), each once;
   * returns the URL to reach it as that role (password inside).
   */
  createDatabase(name: string, owner?: string): Promise<string>;
  /** Drops the database, closing its connections first. */
  dropDatabase(name: string): Promise<void>;
  /** Fast shutdown (open sessions are ended), SIGKILL after 30 s. */
  stop(): Promise<void>;
}

function script(): string {
  return path.join(repoRoot(), 'deploy', 'postgres', 'pg-cluster.sh');
}

function runScript(args: string[]): Promise<string> {
  return runCommand('bash', [script(), ...args], { timeoutMs: SCRIPT_TIMEOUT_MS }).then((r) =>
    r.stdout.trim(),
  );
}

/** A database name that no other call picks: `prefix_<16 hex>`. */
export function uniqueDatabaseName(prefix: string): string {
  return `${prefix}_${randomBytes(8).toString('hex')}`;
}

/**
 * Runs a private PostgreSQL cluster (deploy/postgres/pg-cluster.sh) in the foreground as a managed process,
 * so stopping it, or the test run's leak check, reaches the server and its children.
 */
export async function startPostgresCluster(opts: PostgresClusterOptions): Promise<PostgresCluster> {
  const initArgs = ['init', opts.dir];
  if (opts.port !== undefined || !(await hasCluster(opts.dir))) {
    initArgs.push('--port', String(opts.port ?? (await freePort())));
  }
  if (opts.noFsync) initArgs.push('--no-fsync');
  await runScript(initArgs);
  const port = Number(await runScript(['port', opts.dir]));
  const proc = await spawnManaged('postgres', 'bash', [script(), 'run', opts.dir], {
    logFile: opts.logFile,
    readyWhen: {
      port: { host: '127.0.0.1', port },
      logLine: /database system is ready to accept connections/,
    },
    readyTimeoutMs: READY_TIMEOUT_MS,
  });
  log.info({ dir: opts.dir, port, serverPid: proc.pid, logFile: opts.logFile }, 'PostgreSQL ready');
  return {
    dir: opts.dir,
    port,
    pid: proc.pid,
    createDatabase: (name, owner) => runScript(['createdb', opts.dir, name, ...(owner ? [owner] : [])]),
    dropDatabase: async (name) => {
      await runScript(['dropdb', opts.dir, name]);
    },
    // SIGINT is PostgreSQL's fast shutdown; SIGTERM would wait for every client to leave.
    stop: () => proc.stop('SIGINT', 30_000),
  };
}

async function hasCluster(dir: string): Promise<boolean> {
  return runScript(['port', dir]).then(
    () => true,
    () => false,
  );
}
