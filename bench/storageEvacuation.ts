import { randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { inNetns } from '../deploy/devcluster/netns';
import { startNfsTestHosts, type NfsTestHosts } from '../deploy/devcluster/nfsTestHosts';
import { runCommand } from '../lib/runCommand';
import type { VmHandle } from '../drivers/types';
import { createLogger } from '../logging/logger';
import { DiskImageStaging } from '../storage/diskImageStaging';
import { untilLine } from './paperEvaluation';
import type { BenchReport } from './report';

const log = createLogger('bench.storage-evacuation');
const HOSTS = ['a', 'b'] as const;
type Host = (typeof HOSTS)[number];
const MiB = 1024 * 1024;

interface Round {
  round: number;
  from: Host;
  to: Host;
  /** Bytes the source disks hold (allocated), the same denominator for every copy. */
  bytes: number;
  mirrorMs: number;
  cpMs: number;
  nfsCpMs: number;
}

const rate = (bytes: number, ms: number) => Number((bytes / MiB / (ms / 1000)).toFixed(1));

async function allocated(files: string[]): Promise<number> {
  let n = 0;
  for (const f of files) n += (await fs.stat(f)).blocks * 512;
  return n;
}

async function timed(step: () => Promise<unknown>): Promise<number> {
  const t0 = Date.now();
  await step();
  return Date.now() - t0;
}

/**
 * Storage evacuation against plain copies of the same disks, in the same run: two namespace test hosts
 * with nfs-ganesha exports, one running VM whose home disk holds random data. Each round migrates the
 * VM (memory only) to the other host, then copies its disks, still on the host it left, three ways: `cp`
 * of the files (the upper bound: one file system, no network), `nfs-cp` from the storage host's export
 * run in the target's namespace (the mirror's own path, without a running guest), and the QEMU mirror
 * itself (driver localizeDisks: drive-mirror while the guest runs, then the switch). The next round goes
 * back the other way.
 */
export async function benchStorageEvacuation(o: { workDir: string; quick: boolean }): Promise<BenchReport> {
  const rounds = o.quick ? 1 : 3;
  const dataMiB = o.quick ? 64 : 256;
  let hosts: NfsTestHosts<Host> | undefined;
  const runs: Round[] = [];
  try {
    hosts = await startNfsTestHosts({
      hosts: HOSTS,
      prefix: 'vspbev-',
      subnet: '10.77.52',
      parentDir: o.workDir,
      migrationTls: false,
    });
    const t = hosts;
    const vmId = 'bench-evac';
    const paths = t.stores.a.paths(vmId);
    await fs.mkdir(paths.inputsDir, { recursive: true });
    await fs.writeFile(path.join(paths.inputsDir, 'data.bin'), randomBytes(dataMiB * MiB));
    await new DiskImageStaging().build(paths, 16 * MiB);
    let vm: VmHandle = await t.drivers.a.create({
      vmId,
      owner: 'bench',
      command: 'echo "VSP-PROGRESS 1 up"; while true; do date > out-clock; sleep 1; done',
      vcpus: 1,
      memoryMiB: 192,
      baseImage: t.baseImage,
      ports: [],
      timeLimitSec: 3600,
    });
    vm = await t.drivers.a.start(vm);
    t.started.push({ host: 'a', handle: vm });
    await untilLine(paths.consoleLog, /VSP-PROGRESS 1 up/, 300_000);

    for (let round = 0; round < rounds * 2; round++) {
      const from = vm.host as Host;
      const to: Host = from === 'a' ? 'b' : 'a';
      const incoming = await t.drivers[to].prepareIncoming(await t.drivers[from].describeForMigration(vm));
      await t.drivers[from].migrate(vm, incoming, {});
      vm = await t.drivers[to].finishIncoming(incoming);
      t.started.push({ host: to, handle: vm });

      const src = t.stores[from].paths(vmId);
      const disks = [src.rootDisk, src.dataDisk];
      const bytes = await allocated(disks);
      const scratch = path.join(t.stores[to].root, 'bench-copy');
      await fs.mkdir(scratch, { recursive: true });
      const cpMs = await timed(() => runCommand('cp', [...disks, scratch], { timeoutMs: 600_000 }));
      await fs.rm(scratch, { recursive: true, force: true });
      await fs.mkdir(scratch, { recursive: true });
      const exported = `nfs://${t.cluster[from].address}/vsp`;
      const nfsCpMs = await timed(async () => {
        for (const d of disks) {
          // As the disks' owner (QEMU's account): the export squashes root, and the disks are 0600.
          const { uid, gid } = await fs.stat(d);
          const url = `${exported}/${path.relative(t.stores[from].root, d)}?uid=${uid}&gid=${gid}`;
          const c = inNetns(t.network.hosts[to].netns, 'nfs-cp', [url, path.join(scratch, path.basename(d))]);
          await runCommand(c.cmd, c.args, { timeoutMs: 600_000 });
        }
      });
      await fs.rm(scratch, { recursive: true, force: true });
      const moved = await t.drivers[to].localizeDisks(vm, {});
      vm = moved.handle;
      await t.drivers[from].dropMovedDisks(vm);
      runs.push({
        round: Math.floor(round / 2) + 1,
        from,
        to,
        bytes,
        mirrorMs: moved.elapsedMs,
        cpMs,
        nfsCpMs,
      });
      log.info(runs.at(-1), 'round done');
    }
  } finally {
    await hosts?.stop();
  }
  const median = (xs: number[]) => [...xs].sort((x, y) => x - y)[Math.floor(xs.length / 2)];
  const med = (k: 'mirrorMs' | 'cpMs' | 'nfsCpMs') => median(runs.map((r) => rate(r.bytes, r[k])));
  return {
    name: 'storage-evacuation',
    title: "Storage evacuation: a running VM's disks mirrored to its host, against cp of the same disks",
    method:
      `Two namespace test hosts (nfs-ganesha exports), QEMU under TCG, one 192 MiB VM whose home disk holds ` +
      `${dataMiB} MiB of random data, its guest writing a file every second. Each move: live migration to the ` +
      'other host (memory only), then the same disks, still on the host it left, copied by `cp` (one file ' +
      "system, no network), by `nfs-cp` from the export in the target namespace (the mirror's path), and " +
      'by the QEMU mirror (drive-mirror sync=full while the guest runs, to the switch); the former host then ' +
      `drops its copy. ${rounds * 2} moves, alternating direction. Rates = the source disks' allocated bytes / time.`,
    rows: runs.map((r) => ({
      move: `${r.from} -> ${r.to}`,
      'disk MiB': Number((r.bytes / MiB).toFixed(1)),
      'mirror ms': r.mirrorMs,
      'mirror MiB/s': rate(r.bytes, r.mirrorMs),
      'cp ms': r.cpMs,
      'cp MiB/s': rate(r.bytes, r.cpMs),
      'nfs-cp ms': r.nfsCpMs,
      'nfs-cp MiB/s': rate(r.bytes, r.nfsCpMs),
    })),
    summary: {
      'mirror (running VM) MiB/s, median': med('mirrorMs'),
      'cp (local file system) MiB/s, median': med('cpMs'),
      'nfs-cp (same NFS path) MiB/s, median': med('nfsCpMs'),
      'mirror / cp': (med('mirrorMs') / med('cpMs')).toFixed(2),
    },
  };
}
