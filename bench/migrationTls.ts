import { promises as fs } from 'node:fs';
import { startNfsTestHosts, type NfsTestHosts } from '../deploy/devcluster/nfsTestHosts';
import { QemuDriver } from '../drivers/qemu/qemuDriver';
import type { MigrationResult, VmHandle } from '../drivers/types';
import { createLogger } from '../logging/logger';
import { DiskImageStaging } from '../storage/diskImageStaging';
import type { BenchReport } from './report';

const log = createLogger('bench.migration-tls');
const HOSTS = ['a', 'b'] as const;
type Host = (typeof HOSTS)[number];
const MEMORY_MIB = 256;
/** Written by the guest before the runs, so its page cache holds this much besides the idle system. */
const FILL_MB = 96;
const MiB = 1024 * 1024;

function median(xs: number[]): number {
  const s = [...xs].sort((x, y) => x - y);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
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
  const figures: Record<'plain' | 'tls', MigrationResult[]> = { plain: [], tls: [] };
  try {
    hosts = await startNfsTestHosts({
      hosts: HOSTS,
      prefix: 'vspbtls-',
      subnet: '10.77.14',
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
    await untilConsole(paths.consoleLog, 'VSP-PROGRESS 1 filled');

    const move = async (kind: 'plain' | 'tls', to: Host) => {
      const from = drivers[kind][vm.host as Host];
      const incoming = await drivers[kind][to].prepareIncoming(await from.describeForMigration(vm));
      try {
        figures[kind].push(await from.migrate(vm, incoming, { downtimeLimitMs: 300 }));
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
        await move(kind, 'b');
        await move(kind, 'a');
      }
      log.info({ round }, 'round done');
    }
  } finally {
    await hosts?.stop();
  }
  const row = (kind: 'plain' | 'tls') => {
    const r = figures[kind];
    const total = median(r.map((m) => m.totalTimeMs));
    const ramMiB = median(r.map((m) => m.ramTransferredBytes)) / MiB;
    return {
      stream: kind === 'tls' ? 'TLS (x509, verify-peer, authz)' : 'plain TCP',
      migrations: r.length,
      'total time median ms': total,
      'total time min..max ms': `${Math.min(...r.map((m) => m.totalTimeMs))}..${Math.max(...r.map((m) => m.totalTimeMs))}`,
      'downtime median ms': median(r.map((m) => m.downtimeMs)),
      'downtime min..max ms': `${Math.min(...r.map((m) => m.downtimeMs))}..${Math.max(...r.map((m) => m.downtimeMs))}`,
      'RAM sent median MiB': Number(ramMiB.toFixed(1)),
      'throughput MiB/s': Number((ramMiB / (total / 1000)).toFixed(0)),
    };
  };
  const plain = row('plain');
  const tls = row('tls');
  return {
    name: 'migration-tls',
    title: 'Live migration: TLS against plain TCP (same VM, same run)',
    method:
      `Two namespace test hosts (nfs-ganesha exports, disks stay on a), QEMU under TCG, one ${MEMORY_MIB} MiB VM ` +
      `whose guest first wrote ${FILL_MB} MB of random data to its data disk (kept in its page cache), migrated ` +
      `a -> b -> a ${rounds} times in plain TCP and ${rounds} times over TLS (the hosts' own CA, certificates ` +
      'from deploy/migration-tls.sh), alternating which kind goes first each round. Figures from query-migrate; ' +
      'downtime limit 300 ms, bandwidth uncapped.',
    rows: [plain, tls],
    summary: {
      'TLS / plain total time (median)': `${(tls['total time median ms'] / plain['total time median ms']).toFixed(2)}x`,
      'downtime median plain -> TLS': `${plain['downtime median ms']} ms -> ${tls['downtime median ms']} ms`,
    },
  };
}

async function untilConsole(file: string, text: string, timeoutMs = 300_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const content = await fs.readFile(file, 'utf8').catch(() => '');
    if (content.includes(text)) return;
    if (/VSP-(EXIT|ERROR)/.test(content) || Date.now() > deadline)
      throw new Error(`the guest never printed ${text}; console:\n${content.slice(-2000)}`);
    await new Promise((r) => setTimeout(r, 500));
  }
}
