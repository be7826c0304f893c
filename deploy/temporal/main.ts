import { mkdirSync } from 'node:fs';
import path from 'node:path';

import { Command, InvalidArgumentError } from 'commander';

import { createLogger, describeError } from '../../logging/logger';
import { startPostgresCluster } from '../postgres/cluster';
import { repoRoot } from '../devcluster/tools';
import { MAX_PORT, MIN_PORT, setUpTemporalSchema, startTemporalPgServer, temporalSqlEnv } from './server';

const log = createLogger('temporal.main');

function parsePort(value: string): number {
  const port = Number(value);
  if (!/^\d+$/.test(value) || port < MIN_PORT || port > MAX_PORT) {
    throw new InvalidArgumentError(
      `expected a port from ${MIN_PORT} to ${MAX_PORT} (the other services use ports around it), got '${value}'`,
    );
  }
  return port;
}

function parseNamespace(value: string): string {
  if (!/^[A-Za-z0-9][A-Za-z0-9._-]{1,63}$/.test(value))
    throw new InvalidArgumentError(
      `expected a Temporal namespace name (letters, digits, . _ -), got '${value}'`,
    );
  return value;
}

/**
 * The dev machine's Temporal on PostgreSQL, until Ctrl-C: a private PostgreSQL cluster (deploy/postgres/),
 * Temporal's schemas in two of its databases, the real server (deploy/temporal/server.sh) and the
 * namespace with VSP's search attributes. State stays in the folder across runs.
 */
async function main(): Promise<void> {
  const opts = new Command('temporal-pg')
    .description('Run the Temporal server on a private PostgreSQL cluster for VSP until Ctrl-C')
    .option('--dir <dir>', 'PostgreSQL data and logs', path.join(repoRoot(), '.vsp', 'temporal-pg'))
    .option(
      '--port <port>',
      'Temporal frontend port (the other services use ports around it)',
      parsePort,
      7233,
    )
    .option('--namespace <name>', 'namespace to register with VSP search attributes', parseNamespace, 'vsp')
    .parse()
    .opts<{ dir: string; port: number; namespace: string }>();

  const dir = path.resolve(opts.dir);
  mkdirSync(dir, { recursive: true });
  const postgres = await startPostgresCluster({
    dir: path.join(dir, 'postgres'),
    logFile: path.join(dir, 'postgres.log'),
  });
  const sqlEnv = temporalSqlEnv(
    await postgres.createDatabase('temporal'),
    await postgres.createDatabase('temporal_visibility', 'temporal'),
  );
  await setUpTemporalSchema(sqlEnv);
  const logFile = path.join(dir, 'temporal.log');
  const server = await startTemporalPgServer({ sqlEnv, port: opts.port, namespace: opts.namespace, logFile });
  // Temporal first, so that PostgreSQL's fast shutdown finds no client.
  const stop = (code: number) =>
    server
      .stop()
      .then(() => postgres.stop())
      .catch((err) => log.error({ err: describeError(err) }, 'stop failed'))
      .finally(() => process.exit(code));
  process.once('SIGINT', () => void stop(130));
  process.once('SIGTERM', () => void stop(143));
  void server.exited.then((code) => {
    log.error({ code, logFile }, 'the Temporal server exited on its own');
    void stop(1);
  });
  process.stdout.write(
    `Temporal on PostgreSQL: TEMPORAL_ADDRESS=${server.address} TEMPORAL_NAMESPACE=${server.namespace}\n` +
      `PostgreSQL: ${postgres.dir} on 127.0.0.1:${postgres.port}\nLogs: ${logFile}\nPress Ctrl-C to stop.\n`,
  );
}

main().catch((err) => {
  log.error({ err: describeError(err) }, 'could not start Temporal on PostgreSQL');
  process.exit(1);
});
