import { Command } from 'commander';
import { createLogger, describeError } from '../../logging/logger';
import { parseRoute, startBalancer, type BalancerRoute } from './balancer';

const log = createLogger('balancer');

/**
 * The dev machine's balancer until Ctrl-C (`node dist/deploy/balancer/main.js --route ... --route ...`),
 * e.g. three repository servers' HTTP, SFTP, FTPS and their FTPS passive ranges:
 *   --route 127.0.0.1:8420=127.0.0.1:8421,127.0.0.1:8431,127.0.0.1:8441
 *   --route 127.0.0.1:50000-50099=127.0.0.1:50000-50099   (server 1 announces these, server 2 the next range)
 */
async function main(): Promise<void> {
  const opts = new Command('vsp-balancer')
    .description('Spread TCP connections over repository servers (tests and the dev machine only)')
    .requiredOption(
      '--route <LISTEN=BACKEND,...>',
      'a listen address and its backends; repeat per port (ranges map port to port)',
      (v: string, all: BalancerRoute[]) => [...all, ...parseRoute(v)],
      [],
    )
    .parse()
    .opts<{ route: BalancerRoute[] }>();
  const balancer = await startBalancer(opts.route, log);
  const stop = (): void => {
    balancer.close().then(
      () => process.exit(0),
      () => process.exit(1),
    );
  };
  process.once('SIGTERM', stop);
  process.once('SIGINT', stop);
}

main().catch((err: unknown) => {
  log.fatal({ err: describeError(err) }, 'balancer failed to start');
  process.exit(1);
});
