import { promises as fs } from 'node:fs';
import path from 'node:path';
import type { Command } from 'commander';
import { deployCluster } from '../deploy/cluster/deploy';
import { HOST_WORKER_UNIT, planHost } from '../deploy/cluster/plan';
import { loadDeploySecrets, loadInventory, requireDeployable } from '../deploy/cluster/inventory';
import { formatPlan, formatReport, formatStep } from '../deploy/cluster/report';
import { repoRoot } from '../deploy/devcluster/tools';
import { commandGroup } from './adminCommands';

/**
 * `vsp cluster deploy --inventory cluster.json [--dry-run]`: installs this build on every hypervisor host
 * of the inventory over SSH (deploy/cluster/, deploy/production/README.md).
 */
export function registerClusterCommands(program: Command): void {
  commandGroup(program, 'cluster', 'the cluster of hypervisor hosts (operators)')
    .command('deploy')
    .description(
      'install this build on every host of the inventory over SSH: release, configuration, kernel-NFS storage, ' +
        'the host worker; then check each host (idempotent: a second run changes nothing)',
    )
    .requiredOption('--inventory <file>', 'the cluster inventory (JSON, deploy/production/README.md)')
    .option('--dry-run', 'validate the inventory and print the plan per host; connect to nothing')
    .action(async (opts: { inventory: string; dryRun?: boolean }) => {
      const json = Boolean(program.opts().json);
      const inv = requireDeployable(await loadInventory(opts.inventory), `inventory ${opts.inventory}`);
      const projectDir = repoRoot();
      if (opts.dryRun) {
        const { repositoryToken } = await loadDeploySecrets(inv);
        const unit = await fs.readFile(
          path.join(projectDir, 'deploy', 'production', 'systemd', HOST_WORKER_UNIT),
          'utf8',
        );
        const plans = inv.hosts.map((h) => planHost(inv, h, repositoryToken, unit));
        const secrets = { [repositoryToken]: `token from ${inv.cluster.repositoryTokenFile}` };
        process.stdout.write(
          json
            ? `${JSON.stringify(plans.map((p) => ({ host: p.host.name, steps: p.steps, files: p.files.map((f) => ({ path: f.path, mode: f.mode })) })))}\n`
            : formatPlan(plans, secrets),
        );
        return;
      }
      const report = await deployCluster(inv, {
        projectDir,
        onStep: json ? undefined : (host, step) => process.stdout.write(`${formatStep(host, step)}\n`),
      });
      process.stdout.write(json ? `${JSON.stringify(report)}\n` : formatReport(report));
      if (!report.ok) {
        const failed = report.hosts.filter((h) => h.failed).map((h) => h.host);
        throw new Error(`the deploy failed on ${failed.join(', ')}`);
      }
    });
}
