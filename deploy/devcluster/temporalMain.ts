import { mkdirSync, rmSync } from 'node:fs';
import path from 'node:path';

import { Command, InvalidArgumentError } from 'commander';

import { createLogger, describeError } from '../../logging/logger';
import { writeFileAtomicSync } from '../../storage/durableFile';
import { isShuttingDown, stopAllOnSignals, tailLog } from './processes';
import { startTemporalDevServer } from './temporal';
import { repoRoot } from './tools';

const log = createLogger('devcluster.temporalMain');

function parsePort(value: string): number {
  const port = Number(value);
  if (!/^\d+$/.test(value) || port < 1 || port > 65535) {
    throw new InvalidArgumentError(`expected a port from 1 to 65535, got '${value}'`);
  }
  return port;
}

/** Runs a persistent Temporal dev server with the web UI until Ctrl-C. */
async function main(): Promise<void> {
  const vspDir = path.join(repoRoot(), '.vsp');
  const opts = new Command('temporal-server')
    .description('Run the Temporal dev server for VSP (persistent, with the web UI) until Ctrl-C')
    .option('--ip <address>', 'address to bind', '127.0.0.1')
    .option('--port <port>', 'gRPC front-end port', parsePort, 7233)
    .option('--ui-port <port>', 'web UI port (default: port + 1000)', parsePort)
    .option('--db-file <file>', 'SQLite file that keeps workflow state', path.join(vspDir, 'temporal.db'))
    .parse()
    .opts<{ ip: string; port: number; uiPort?: number; dbFile: string }>();

  mkdirSync(path.dirname(opts.dbFile), { recursive: true });
  const logFile = path.join(vspDir, 'logs', 'temporal.log');
  const addressFile = path.join(vspDir, 'temporal.address');
  stopAllOnSignals(async () => rmSync(addressFile, { force: true }));
  const server = await startTemporalDevServer({
    ip: opts.ip,
    port: opts.port,
    uiPort: opts.uiPort ?? opts.port + 1000,
    dbFile: path.resolve(opts.dbFile),
    logFile,
  });
  void server.exited.then((code) => {
    if (isShuttingDown()) return;
    log.error({ code, logTail: tailLog(logFile, 20) }, 'the Temporal dev server exited on its own');
    rmSync(addressFile, { force: true });
    process.exit(1);
  });
  // Other tools (demo, CLI) read the address from here when TEMPORAL_ADDRESS is unset.
  writeFileAtomicSync(addressFile, `${server.address}\n`);
  process.stdout.write(
    `Temporal dev server: ${server.address} (namespace ${server.namespace})\n` +
      `Web UI: ${server.uiUrl}\nState: ${opts.dbFile}\nLog: ${logFile}\nPress Ctrl-C to stop.\n`,
  );
}

main().catch((err) => {
  log.error({ err: describeError(err) }, 'could not start the Temporal dev server');
  process.exit(1);
});
