import { Command, InvalidArgumentError } from 'commander';

import { createLogger, describeError } from '../../logging/logger';
import { clusterDown, clusterImage, clusterStatus, clusterUp, powerOff, powerOn } from './cluster';
import type { VmClusterOptions } from './config';

const log = createLogger('vmcluster.cli');

/**
 * The virtual Xen cluster by hand (root; `npm run vm-cluster -- <command>`):
 *   up [--hosts 2|3] [--cold]   builds the dom0 image once, boots the dom0s (warm snapshots after the
 *                               first run), writes the inventory and prints its path
 *   image                       builds the dom0 image once (cached), prints its folder
 *   status [--json]             per host: QEMU, memory, ssh; --json prints the inventory (exit 1 if down)
 *   down                        removes QEMUs, netns, taps, veth and overlays (also after a crash)
 *   power-off <host>            fault injection: the host's QEMU quits at once, as in a power cut
 *   power-on <host>             boots that host cold again from its own disk (what was deployed stays)
 * Logs are JSON lines on stderr; stdout carries only the command's answer.
 */
function intOption(value: string): number {
  const n = Number(value);
  if (!Number.isInteger(n)) throw new InvalidArgumentError(`not an integer: ${value}`);
  return n;
}

function common(cmd: Command): Command {
  return cmd
    .option('--prefix <name>', 'names the netns, bridge, taps and veth ($VSP_VMCLUSTER_PREFIX, or vspxen)')
    .option('--subnet <a.b.c>', 'the cluster /24, this machine at .254 ($VSP_VMCLUSTER_SUBNET, or 10.77.30)');
}

async function main(): Promise<void> {
  const program = new Command('vm-cluster').description('VSP virtual cluster: real Xen dom0s under QEMU');
  common(program.command('up'))
    .option('--hosts <n>', 'number of dom0s (1-3)', intOption, 2)
    .option('--cold', 'boot cold, and keep no warm snapshot')
    .action(async (o: { prefix?: string; subnet?: string; hosts: number; cold?: boolean }) => {
      const opts: VmClusterOptions = { prefix: o.prefix, subnet: o.subnet, hosts: o.hosts, warm: !o.cold };
      const up = await clusterUp(opts);
      process.stdout.write(`${up.inventoryFile}\n`);
    });
  program
    .command('image')
    .description(
      'builds the dom0 image if the cache has none (what a first up does first), prints its folder',
    )
    .action(async () => {
      process.stdout.write(`${await clusterImage()}\n`);
    });
  common(program.command('down')).action(async (o: { prefix?: string; subnet?: string }) => {
    await clusterDown({ prefix: o.prefix, subnet: o.subnet });
  });
  common(program.command('power-off <host>'))
    .description("cuts a host's power: its QEMU quits at once (Xen, dom0 and guests stop mid-step)")
    .action(async (host: string, o: { prefix?: string; subnet?: string }) => {
      await powerOff(host, { prefix: o.prefix, subnet: o.subnet });
    });
  common(program.command('power-on <host>'))
    .description('boots a powered-off host again from its own disk (what was deployed on it stays)')
    .action(async (host: string, o: { prefix?: string; subnet?: string }) => {
      const boot = await powerOn(host, { prefix: o.prefix, subnet: o.subnet });
      process.stdout.write(`${boot.name}: ssh ready in ${boot.sshReadySeconds} s\n`);
    });
  common(program.command('status'))
    .option('--json', 'print the inventory (exit code 1 when the cluster is not up)')
    .action(async (o: { prefix?: string; subnet?: string; json?: boolean }) => {
      const s = await clusterStatus({ prefix: o.prefix, subnet: o.subnet });
      if (o.json) {
        if (s.up && s.inventory) process.stdout.write(`${JSON.stringify(s.inventory, null, 2)}\n`);
        else process.exitCode = 1;
        return;
      }
      process.stdout.write(`cluster ${s.netns}: ${s.up ? 'up' : 'down'}; inventory ${s.inventoryFile}\n`);
      for (const h of s.hosts) {
        const parts = [h.running ? `running pid ${h.pid} (${h.mode})` : 'not running'];
        if (h.rssMiB !== undefined) parts.push(`rss ${h.rssMiB} MiB`);
        if (h.ssh !== undefined) parts.push(h.ssh ? 'ssh ok' : 'ssh not answering');
        process.stdout.write(`  ${h.name} ${h.address}: ${parts.join(', ')}\n`);
      }
      if (!s.up) process.exitCode = 1;
    });
  await program.parseAsync();
}

main().catch((err: unknown) => {
  log.error({ err: describeError(err) }, 'vm-cluster failed');
  process.exitCode = 1;
});
