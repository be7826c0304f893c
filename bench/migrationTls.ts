import { promises as fs } from 'node:fs';
import { startNfsTestHosts, type NfsTestHosts } from '../deploy/devcluster/nfsTestHosts';
import { QemuDriver } from '../drivers/qemu/qemuDriver';
import type { MigrationResult, VmHandle } from '../drivers/types';
import { createLogger } from '../logging/logger';
import { DiskImageStaging } from '../storage/diskImageStaging';
import { median } from './orchestration';
import { untilLine } from './paperEvaluation';
import type { BenchReport } from './report';

const log = createLogger('bench.migration-tls');
const HOSTS = ['a', 'b'] as const;
type Host = (typeof HOSTS)[number];
const MEMORY_MIB = 256;
/** Written by the guest before the runs, so its page cache holds this much besides the idle system. */
const FILL_MB = 96;
const MiB = 1024 * 1024;
type Kind = 'plain' | 'tls';
interface Run {
  round: number;
  kind: Kind;
  result: MigrationResult;
  /** Around the driver's migrate(): credentials, parameters, the stream and the source's exit. */
  wallMs: number;
}

/**
 * Live migration with TLS against plain TCP, same VM, same hosts, same run: two namespace test hosts with
 * their CA's certificates, one VM whose guest filled its page cache, migrated back and forth; each round
 * does a -> b -> a in plain TCP and over TLS, alternating which goes first. Figures from QEMU's
 * query-migrate (total time, downtime, RAM sent).
 */
export async function benchMigrationTls(o: { workDir: string; quick: boolean }): Promise<BenchReport> {
  const rounds = o.quick ? 2 : 5;
  let hosts: NfsTestHosts<Host> | undefined;
  const runs: Run[] = [];
  try {
    hosts = await startNfsTestHosts({
      hosts: HOSTS,
      prefix: 'vspbtls-',
      subnet: '10.77.51',
      parentDir: o.workDir,
    });
    const t = hosts;
    const drivers = {
      tls: t.drivers,
      plain: {
        a: new QemuDriver({ ...t.driverOptions.a, migrationTlsDir: undefined }),
        b: new QemuDriver({ ...t.driverOptions.b, migrationTlsDir: undefined }),
      },
    };
    const vmId = 'bench-tls';
    const paths = t.stores.a.paths(vmId);
    await fs.mkdir(paths.inputsDir, { recursive: true });
    await new DiskImageStaging().build(paths, (FILL_MB + 32) * MiB);
    let vm: VmHandle = await t.drivers.a.create({
      vmId,
      owner: 'bench',
      command: `head -c ${FILL_MB * 1000 * 1000} /dev/urandom > fill.bin; echo "VSP-PROGRESS 1 filled"; while true; do sleep 1; done`,
      vcpus: 1,
      memoryMiB: MEMORY_MIB,
      baseImage: t.baseImage,
      ports: [],
      timeLimitSec: 3600,
    });
    vm = await t.drivers.a.start(vm);
    t.started.push({ host: 'a', handle: vm });
    await untilLine(paths.consoleLog, /VSP-PROGRESS 1 filled/, 300_000);

    const move = async (round: number, kind: Kind, to: Host) => {
      const from = drivers[kind][vm.host as Host];
      const incoming = await drivers[kind][to].prepareIncoming(await from.describeForMigration(vm));
      try {
        const t0 = Date.now();
        const result = await from.migrate(vm, incoming, { downtimeLimitMs: 300 });
        runs.push({ round, kind, result, wallMs: Date.now() - t0 });
      } catch (err) {
        await drivers[kind][to].abortIncoming(incoming);
        throw err;
      }
      vm = await drivers[kind][to].finishIncoming(incoming);
      t.started.push({ host: to, handle: vm });
    };
    for (let round = 0; round < rounds; round++) {
      const order = round % 2 === 0 ? (['plain', 'tls'] as const) : (['tls', 'plain'] as const);
      for (const kind of order) {
        await move(round, kind, 'b');
        await move(round, kind, 'a');
      }
      log.info({ round }, 'round done');
    }
  } finally {
    await hosts?.stop();
  }
  const of = (kind: Kind) => runs.filter((r) => r.kind === kind);
  const totals = (kind: Kind) => median(of(kind).map((r) => r.result.totalTimeMs));
  const downtimes = (kind: Kind) => median(of(kind).map((r) => r.result.downtimeMs));
  const throughput = (kind: Kind) =>
    median(of(kind).map((r) => r.result.ramTransferredBytes / MiB / (r.result.totalTimeMs / 1000)));
  return {
    name: 'migration-tls',
    title: 'Live migration: TLS against plain TCP (same VM, same run)',
    method:
      `Two namespace test hosts (nfs-ganesha exports, disks stay on a), QEMU under TCG, one ${MEMORY_MIB} MiB VM ` +
      `whose guest first wrote ${FILL_MB} MB of random data to its data disk (kept in its page cache), migrated ` +
      `a -> b -> a ${rounds} times in plain TCP and ${rounds} times over TLS (the hosts' own CA, certificates ` +
      'from deploy/migration-tls.sh), alternating which kind goes first each round. Figures from query-migrate; ' +
      'downtime limit 300 ms, bandwidth uncapped.',
    rows: runs.map((r) => ({
      round: r.round + 1,
      stream: r.kind === 'tls' ? 'TLS' : 'plain TCP',
      direction: `${r.result.from} -> ${r.result.to}`,
      'total time ms': r.result.totalTimeMs,
      'downtime ms': r.result.downtimeMs,
      'RAM sent MiB': Number((r.result.ramTransferredBytes / MiB).toFixed(1)),
      'migrate() wall ms': r.wallMs,
    })),
    summary: {
      'total time median, plain -> TLS': `${totals('plain')} ms -> ${totals('tls')} ms (${(totals('tls') / totals('plain')).toFixed(2)}x)`,
      'downtime median, plain -> TLS': `${downtimes('plain')} ms -> ${downtimes('tls')} ms`,
      'RAM throughput median, plain -> TLS': `${throughput('plain').toFixed(0)} MiB/s -> ${throughput('tls').toFixed(0)} MiB/s`,
    },
  };
}
