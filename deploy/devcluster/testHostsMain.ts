import { promises as fs } from 'node:fs';
import path from 'node:path';

import { Command } from 'commander';

import { createLogger, describeError } from '../../logging/logger';
import { startNfsExport } from '../../storage/nfsExport';
import { cleanupTestHosts, createTestNetwork, DEFAULT_NETNS_PREFIX } from './netns';
import { stopAllOnSignals } from './processes';
import { repoRoot } from './tools';

const log = createLogger('devcluster.testHosts');

/**
 * Test hosts by hand (needs root):
 *   test-hosts up --hosts a,b,c [--nfs]   namespaces (+ each host's NFS export of .vsp/hosts/<h>/store)
 *                                         until Ctrl-C, then everything is removed
 *   test-hosts down                       removes leftovers of a crashed run
 */
async function main(): Promise<void> {
  const program = new Command('test-hosts').description('VSP test hosts: network namespaces on one machine');
  program
    .command('up')
    .requiredOption('--hosts <names>', 'comma-separated host names, e.g. a,b,c')
    .option('--prefix <prefix>', 'name prefix of namespaces and links', DEFAULT_NETNS_PREFIX)
    .option('--subnet <a.b.c>', 'first three octets of the /24', '10.77.0')
    .option('--nfs', "also export each host's store over NFS (nfs-ganesha)")
    .action(async (o: { hosts: string; prefix: string; subnet: string; nfs?: boolean }) => {
      const network = await createTestNetwork({
        hosts: o.hosts.split(','),
        prefix: o.prefix,
        subnet: o.subnet,
      });
      stopAllOnSignals(() => network.teardown());
      if (o.nfs) {
        for (const h of Object.values(network.hosts)) {
          const dir = path.join(repoRoot(), '.vsp', 'hosts', h.name);
          await fs.mkdir(path.join(dir, 'store'), { recursive: true });
          await startNfsExport({
            hostName: h.name,
            storeRoot: path.join(dir, 'store'),
            endpoint: { address: h.address, exportPath: '/vsp' },
            stateDir: path.join(dir, 'nfs'),
            netns: h.netns,
          });
        }
      }
      for (const h of Object.values(network.hosts))
        process.stdout.write(`${h.name} ${h.netns} ${h.address}${o.nfs ? ` nfs://${h.address}/vsp/` : ''}\n`);
      process.stdout.write('up; Ctrl-C removes everything\n');
    });
  program
    .command('down')
    .option('--prefix <prefix>', 'name prefix of namespaces and links', DEFAULT_NETNS_PREFIX)
    .action((o: { prefix: string }) => cleanupTestHosts(o.prefix));
  await program.parseAsync();
}

main().catch((err: unknown) => {
  log.error({ err: describeError(err) }, 'test-hosts failed');
  process.stderr.write(`test-hosts: ${describeError(err)}\n`);
  process.exit(1);
});
