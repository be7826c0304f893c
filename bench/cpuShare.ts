import { promises as fs } from 'node:fs';
import { startNfsTestHosts } from '../deploy/devcluster/nfsTestHosts';
import { measureCpuRate } from '../drivers/cpuShare';
import type { CpuShare, VmConfig } from '../drivers/types';
import { DiskImageStaging } from '../storage/diskImageStaging';
import { untilLine } from './paperEvaluation';
import type { BenchReport } from './report';

/**
 * CPU-share change (issue 12, item 7): a QEMU VM (TCG, one namespace host) whose guest spins on its vCPU;
 * the QEMU process's CPU rate (user + system seconds per wall second, from /proc) measured uncapped, then
 * after each setCpuShare (the driver verb `vsp task resize` reaches: the VM's cgroup), then uncapped again.
 */
export interface CpuShareBenchOptions {
  workDir: string;
  quick?: boolean;
}

const MiB = 1024 * 1024;

export async function benchCpuShare(opts: CpuShareBenchOptions): Promise<BenchReport> {
  const windowMs = opts.quick ? 3000 : 8000;
  const hosts = await startNfsTestHosts({
    hosts: ['a'] as const,
    prefix: 'vspscb-',
    subnet: '10.77.52',
    accel: 'tcg',
    parentDir: opts.workDir,
    migrationTls: false,
  });
  try {
    const driver = hosts.drivers.a;
    const vmId = 'cpu-share-1';
    const paths = hosts.stores.a.paths(vmId);
    await fs.mkdir(paths.inputsDir, { recursive: true });
    await new DiskImageStaging().build(paths, 16 * MiB);
    const config: VmConfig = {
      vmId,
      owner: 'bench',
      command: 'echo "VSP-PROGRESS 1 spinning"; while :; do :; done',
      vcpus: 1,
      memoryMiB: 128,
      baseImage: hosts.baseImage,
      ports: [],
      timeLimitSec: 900,
    };
    const handle = await driver.start(await driver.create(config));
    hosts.started.push({ host: 'a', handle });
    await untilLine(String(handle.state.consoleLog), /^VSP-PROGRESS 1 spinning/m);
    const pid = Number(handle.state.pid);
    const rate = () => measureCpuRate(async () => [pid], windowMs);
    const steps: { label: string; share?: CpuShare }[] = [
      { label: 'uncapped' },
      { label: 'cap 50 %', share: { capPercent: 50 } },
      { label: 'cap 25 %', share: { capPercent: 25 } },
      { label: 'cap 10 %', share: { capPercent: 10 } },
      { label: 'cap lifted', share: {} },
    ];
    const rows: BenchReport['rows'] = [];
    for (const step of steps) {
      if (step.share) await driver.setCpuShare(handle, step.share);
      const r = await rate();
      rows.push({ share: step.label, 'QEMU CPU rate (cores)': Number(r.toFixed(3)) });
    }
    const of = (label: string) => Number(rows.find((r) => r.share === label)?.['QEMU CPU rate (cores)']);
    return {
      name: 'cpu-share',
      title: 'CPU-share change: a busy VM before and after resize',
      method:
        `One QEMU VM (TCG, 1 vCPU, 128 MiB) spinning in its guest; the QEMU process's CPU rate over ${windowMs / 1000} s ` +
        "windows (user + system seconds per wall second, /proc), uncapped, then after each setCpuShare (the VM's " +
        'cgroup: CFS quota per 100 ms period), then uncapped again. Other work on the machine competes with the ' +
        'uncapped VM, not with a capped one below its cap.',
      rows,
      summary: {
        'uncapped rate (cores)': of('uncapped'),
        'with --cpu-cap 25 (cores)': of('cap 25 %'),
        'with --cpu-cap 10 (cores)': of('cap 10 %'),
        'reduction at cap 10': `${(of('uncapped') / Math.max(of('cap 10 %'), 0.001)).toFixed(1)}x`,
      },
    };
  } finally {
    await hosts.stop();
  }
}
