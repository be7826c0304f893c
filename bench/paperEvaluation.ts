import { randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { inNetns, type TestNetwork } from '../deploy/devcluster/netns';
import { startNfsTestHosts, type NfsTestHosts } from '../deploy/devcluster/nfsTestHosts';
import type { QemuDriver } from '../drivers/qemu/qemuDriver';
import { runCommand } from '../lib/runCommand';
import type { MigrationResult, VmConfig, VmHandle } from '../drivers/types';
import { createLogger, describeError } from '../logging/logger';
import type { ClusterStorage } from '../storage/diskLocator';
import { DiskImageStaging, readDataDiskFile, VSP_DIR } from '../storage/diskImageStaging';
import { nfsUrl } from '../storage/nfsExport';
import type { VmStore } from '../storage/vmStore';
import { median, round } from './orchestration';
import type { BenchReport } from './report';

/**
 * The paper's evaluation (Tables 2 and 3, VM creation over NFS) on two namespace hosts: a is the storage
 * host (its store holds every VM's disks, exported over NFS), b runs VMs whose disks it opens over nfs://.
 * Driver level: QemuDriver under TCG, no Temporal.
 */

export interface PaperBenchOptions {
  /** Scratch folder (removed by the caller). */
  workDir: string;
  /** Fewer CPU rounds and a smaller file: a smoke run. */
  quick?: boolean;
}

type Host = 'a' | 'b';
const HOSTS: Host[] = ['a', 'b'];
const MB = 1e6;
const MiB = 1024 * 1024;
const MEMORY_MIB = 256;
/** The guest sleeps this long after "ready", so a VM moved to b before its work starts runs it all there. */
const SETTLE_SEC = 5;
/** Progress numbers of the CPU rounds start here (the guest reports 0..100). */
const ROUND_BASE = 10;
const CREATE_REPS = 3;
const CREATE_BASE_MiB = 512;
const POLL_MS = 100;
const log = createLogger('bench.paper');

interface Sizes {
  copyBytes: number;
  rounds: number;
  /** MiB of zeros hashed per round. */
  roundMiB: number;
}

/**
 * The task: "ready", a pause, then (if big.bin is there) copy it + sync, then the CPU rounds; every phase
 * timed by the guest's /proc/uptime and printed as VSP-PROGRESS lines (kept in .vsp/task.log).
 */
export function guestCommand(s: Sizes): string {
  return [
    't() { cut -d" " -f1 /proc/uptime; }',
    'echo "VSP-PROGRESS 1 ready"',
    `sleep ${SETTLE_SEC}`,
    'echo "VSP-PROGRESS 2 go"',
    'if [ -f big.bin ]; then s=$(t); cp big.bin copy.bin && sync; e=$(t); echo "VSP-PROGRESS 3 copy $s $e"; rm copy.bin; sync; fi',
    's=$(t); i=1',
    `while [ $i -le ${s.rounds} ]; do dd if=/dev/zero bs=1M count=${s.roundMiB} 2>/dev/null | sha256sum >/dev/null; echo "VSP-PROGRESS $((${ROUND_BASE} + i)) round $i"; i=$((i + 1)); done`,
    'e=$(t); echo "VSP-PROGRESS 99 cpu $s $e"',
  ].join('\n');
}

/** Seconds between the two uptime stamps of a guest line `VSP-PROGRESS n <what> <start> <end>`. */
export function guestSeconds(taskLog: string, what: string): number {
  const m = new RegExp(`^VSP-PROGRESS \\d+ ${what} ([\\d.]+) ([\\d.]+)$`, 'm').exec(taskLog);
  if (!m) throw new Error(`the guest reported no '${what}' timing; task log:\n${taskLog.slice(-2000)}`);
  return Number(m[2]) - Number(m[1]);
}

/** Waits until the guest prints a line matching `pattern`; throws with the console tail if it ends first. */
export async function untilLine(consoleLog: string, pattern: RegExp, timeoutMs = 180_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const text = await fs.readFile(consoleLog, 'utf8').catch(() => '');
    if (pattern.test(text)) return;
    if (/VSP-(EXIT|ERROR)/.test(text) || Date.now() > deadline)
      throw new Error(`the guest never printed ${pattern}; console:\n${text.slice(-2000)}`);
    await new Promise((r) => setTimeout(r, POLL_MS));
  }
}

interface GuestRun {
  copyS?: number;
  cpuS: number;
  migrations: MigrationResult[];
}

/** Two namespace hosts with their stores exported; everything they start is stopped by `close`. */
class PaperTestbed {
  private readonly staging = new DiskImageStaging();
  private vmCount = 0;

  private constructor(private readonly hosts: NfsTestHosts<Host>) {}

  get stores(): Record<Host, VmStore> {
    return this.hosts.stores;
  }

  get drivers(): Record<Host, QemuDriver> {
    return this.hosts.drivers;
  }

  get cluster(): ClusterStorage {
    return this.hosts.cluster;
  }

  get network(): TestNetwork {
    return this.hosts.network;
  }

  get baseImage(): string {
    return this.hosts.baseImage;
  }

  private get started(): { host: Host; handle: VmHandle }[] {
    return this.hosts.started;
  }

  static async open(work: string): Promise<PaperTestbed> {
    return new PaperTestbed(
      await startNfsTestHosts({
        hosts: HOSTS,
        prefix: 'vspppr-',
        subnet: '10.77.31',
        accel: 'tcg',
        parentDir: work,
      }),
    );
  }

  close(): Promise<void> {
    return this.hosts.stop();
  }

  /**
   * Runs the guest task in a VM stored on a. `startOn` b: moved there at "ready", before its work begins.
   * `midwayTo`: migrated there when half the CPU rounds are done.
   */
  async run(sizes: Sizes, bigFile: string | undefined, startOn: Host, midwayTo?: Host): Promise<GuestRun> {
    const vmId = `paper-${++this.vmCount}`;
    try {
      return await this.runVm(vmId, sizes, bigFile, startOn, midwayTo);
    } catch (err) {
      // Stopped now, so a leftover guest does not slow the next run down.
      await this.destroy(vmId).catch((e: unknown) =>
        log.warn({ vmId, err: describeError(e) }, 'destroy after a failed run failed'),
      );
      throw err;
    }
  }

  private async runVm(
    vmId: string,
    sizes: Sizes,
    bigFile: string | undefined,
    startOn: Host,
    midwayTo?: Host,
  ): Promise<GuestRun> {
    const paths = this.stores.a.paths(vmId);
    await fs.mkdir(paths.inputsDir, { recursive: true });
    if (bigFile) await fs.link(bigFile, path.join(paths.inputsDir, 'big.bin'));
    await this.staging.build(paths, bigFile ? sizes.copyBytes + 64 * MiB : 16 * MiB);
    const config: VmConfig = {
      vmId,
      owner: 'bench',
      command: guestCommand(sizes),
      vcpus: 1,
      memoryMiB: MEMORY_MIB,
      baseImage: this.baseImage,
      ports: [],
      timeLimitSec: 900,
    };
    let handle = await this.drivers.a.start(await this.drivers.a.create(config));
    this.started.push({ host: 'a', handle });
    const migrations: MigrationResult[] = [];
    await untilLine(String(handle.state.consoleLog), /^VSP-PROGRESS 1 ready/m);
    if (startOn === 'b') {
      handle = await this.migrate(handle, 'b', migrations);
      // Proof that the work ran on b: the guest said "go" after it arrived there.
      await untilLine(String(handle.state.consoleLog), /^VSP-PROGRESS 2 go/m);
    }
    if (midwayTo) {
      const half = ROUND_BASE + Math.floor(sizes.rounds / 2);
      await untilLine(String(handle.state.consoleLog), new RegExp(`^VSP-PROGRESS ${half} `, 'm'));
      handle = await this.migrate(handle, midwayTo, migrations);
    }
    const exit = await this.drivers[handle.host as Host].wait(handle, {
      onProgress: () => undefined,
      signal: new AbortController().signal,
    });
    if (exit.exitCode !== 0) throw new Error(`VM ${vmId}: the guest task exited ${exit.exitCode}`);
    const taskLog = (await readDataDiskFile(paths.dataDisk, `${VSP_DIR}/task.log`)) ?? '';
    await this.destroy(vmId);
    return {
      copyS: bigFile ? guestSeconds(taskLog, 'copy') : undefined,
      cpuS: guestSeconds(taskLog, 'cpu'),
      migrations,
    };
  }

  private async migrate(vm: VmHandle, to: Host, out: MigrationResult[]): Promise<VmHandle> {
    const from = this.drivers[vm.host as Host];
    const incoming = await this.drivers[to].prepareIncoming(await from.describeForMigration(vm));
    try {
      out.push(await from.migrate(vm, incoming, { downtimeLimitMs: 300 }));
    } catch (err) {
      await this.drivers[to].abortIncoming(incoming);
      throw err;
    }
    const handle = await this.drivers[to].finishIncoming(incoming);
    this.started.push({ host: to, handle });
    return handle;
  }

  private async destroy(vmId: string): Promise<void> {
    const mine = this.started.filter((s) => s.handle.vmId === vmId).reverse();
    for (const { host, handle } of mine) await this.drivers[host].destroy(handle);
    this.started.splice(0, this.started.length, ...this.started.filter((s) => s.handle.vmId !== vmId));
  }
}

/** A fully allocated file of random 1 MiB blocks (nothing for a file system or qemu-img to skip). */
async function writeRandomFile(file: string, bytes: number): Promise<void> {
  const fh = await fs.open(file, 'w');
  try {
    const block = randomBytes(MiB);
    for (let off = 0; off < bytes; off += MiB) {
      block.writeUInt32LE(off / MiB, 0);
      await fh.write(block, 0, Math.min(MiB, bytes - off), off);
    }
    await fh.sync();
  } finally {
    await fh.close();
  }
}

async function timedMs(cmd: { cmd: string; args: string[] }[]): Promise<number> {
  const t0 = process.hrtime.bigint();
  for (const c of cmd) await runCommand(c.cmd, c.args, { timeoutMs: 120_000 });
  return Number(process.hrtime.bigint() - t0) / 1e6;
}

/**
 * Host b creates a VM root disk in its own store against in a's store over NFS: a qcow2 overlay
 * (qemu-img create, nfs:// file names for the NFS case) and a full copy of the base (cp + sync locally;
 * nfs-cp, then a sync of the file on a, the server's disk, for NFS).
 */
async function benchCreation(bed: PaperTestbed): Promise<BenchReport['rows']> {
  const { stores, cluster } = bed;
  const netns = bed.network.hosts.b.netns;
  const inB = (cmd: string, args: string[]) => inNetns(netns, cmd, args);
  const base = path.join(stores.b.imagesDir, 'create-base.raw');
  await writeRandomFile(base, CREATE_BASE_MiB * MiB);
  await fs.copyFile(base, path.join(stores.a.imagesDir, 'create-base.raw'));
  const remoteBase = nfsUrl(cluster.a, 'images/create-base.raw');
  const times = { overlayLocal: [] as number[], overlayNfs: [] as number[], copyLocal: [], copyNfs: [] };
  for (let i = 0; i < CREATE_REPS; i++) {
    const localOverlay = path.join(stores.b.vmsDir, `create-${i}.qcow2`);
    times.overlayLocal.push(
      await timedMs([
        inB('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'raw', localOverlay]),
      ]),
    );
    times.overlayNfs.push(
      await timedMs([
        inB('qemu-img', [
          'create',
          '-q',
          '-f',
          'qcow2',
          '-b',
          remoteBase,
          '-F',
          'raw',
          nfsUrl(cluster.a, `vms/create-${i}.qcow2`),
        ]),
      ]),
    );
    const localCopy = path.join(stores.b.vmsDir, `create-${i}.raw`);
    (times.copyLocal as number[]).push(
      await timedMs([inB('cp', [base, localCopy]), inB('sync', ['-f', localCopy])]),
    );
    const remoteCopyOnA = path.join(stores.a.vmsDir, `create-${i}.raw`);
    (times.copyNfs as number[]).push(
      await timedMs([
        inB('nfs-cp', [base, nfsUrl(cluster.a, `vms/create-${i}.raw`)]),
        { cmd: 'sync', args: ['-f', remoteCopyOnA] },
      ]),
    );
    const made = [localOverlay, localCopy, remoteCopyOnA, path.join(stores.a.vmsDir, `create-${i}.qcow2`)];
    for (const f of made) {
      if ((await fs.stat(f)).size === 0) throw new Error(`VM creation produced an empty ${f}`);
      await fs.rm(f);
    }
  }
  const row = (kind: string, local: number[], nfs: number[]) => ({
    measure: `root disk: ${kind}`,
    local: `${round(median(local), 1)} ms`,
    remote: `${round(median(nfs), 1)} ms`,
    'remote/local': round(median(nfs) / median(local), 2),
  });
  return [
    row('qcow2 overlay', times.overlayLocal, times.overlayNfs),
    row(`full copy of ${CREATE_BASE_MiB} MiB`, times.copyLocal, times.copyNfs),
  ];
}

const COLUMNS = [
  'table',
  'measure',
  'local',
  'remote',
  'remote/local',
  'expected',
  'overhead %',
  'migration',
  'downtime',
  'RAM sent',
  'runs',
] as const;
type Row = Partial<Record<(typeof COLUMNS)[number], string | number>>;

/** Every row with every column (the report's table needs the same keys throughout). */
const fullRow = (r: Row) => Object.fromEntries(COLUMNS.map((c) => [c, r[c] ?? '']));
/** The shortest of the runs: interference from other work on the machine only ever adds time. */
const best = (xs: number[]) => Math.min(...xs);
const secs = (x: number) => `${round(x, 2)} s`;
const list = (xs: number[]) => xs.map((x) => round(x, 2)).join(', ');

/** Table 3's row for one direction: best run time, median migration figures (the one at half-time). */
function migratedRow(label: string, runs: GuestRun[], expected: number): Row {
  const cpu = best(runs.map((r) => r.cpuS));
  const midway = runs.map((r) => r.migrations[r.migrations.length - 1]);
  return {
    table: '3',
    measure: `CPU migrated at half, ${label}`,
    remote: secs(cpu),
    expected: secs(expected),
    'overhead %': round((100 * (cpu - expected)) / expected, 1),
    migration: `${median(midway.map((m) => m.totalTimeMs))} ms`,
    downtime: `${median(midway.map((m) => m.downtimeMs))} ms`,
    'RAM sent': `${round(median(midway.map((m) => m.ramTransferredBytes)) / MiB, 1)} MiB`,
    runs: `${list(runs.map((r) => r.cpuS))} s`,
  };
}

export async function benchPaper(opts: PaperBenchOptions): Promise<BenchReport> {
  const sizes: Sizes = opts.quick
    ? { copyBytes: 100 * MB, rounds: 8, roundMiB: 8 }
    : { copyBytes: 580 * MB, rounds: 30, roundMiB: 8 };
  const reps = opts.quick ? 1 : 2;
  const work = path.join(opts.workDir, 'paper');
  await fs.mkdir(work, { recursive: true });
  const bed = await PaperTestbed.open(work);
  try {
    const bigFile = path.join(work, 'big.bin');
    await writeRandomFile(bigFile, sizes.copyBytes);
    const runs = {
      local: [] as GuestRun[],
      remote: [] as GuestRun[],
      toB: [] as GuestRun[],
      toA: [] as GuestRun[],
    };
    // Interleaved, so a disturbance from the shared machine spreads over all four kinds.
    let retried = 0;
    // On a shared machine another suite's leak check may kill our QEMU: such a run is redone once.
    const attempt = async (...args: Parameters<PaperTestbed['run']>): Promise<GuestRun> => {
      try {
        return await bed.run(...args);
      } catch (err) {
        retried++;
        log.warn({ err: describeError(err) }, 'a VM run failed: running it again');
        return bed.run(...args);
      }
    };
    for (let rep = 1; rep <= reps; rep++) {
      log.info({ rep }, 'table 2: local and remote runs');
      runs.local.push(await attempt(sizes, bigFile, 'a'));
      runs.remote.push(await attempt(sizes, bigFile, 'b'));
      log.info({ rep }, 'table 3: runs migrated at half-time');
      runs.toB.push(await attempt(sizes, undefined, 'a', 'b'));
      runs.toA.push(await attempt(sizes, undefined, 'b', 'a'));
    }
    await fs.rm(bigFile);
    log.info('VM creation');
    const creation = await benchCreation(bed);

    const copyOf = (rs: GuestRun[]) => rs.map((r) => r.copyS ?? Number.NaN);
    const cpuOf = (rs: GuestRun[]) => rs.map((r) => r.cpuS);
    const copy = { local: best(copyOf(runs.local)), remote: best(copyOf(runs.remote)) };
    const cpu = { local: best(cpuOf(runs.local)), remote: best(cpuOf(runs.remote)) };
    const expected = (cpu.local + cpu.remote) / 2;
    const toB = migratedRow('a -> b (local to remote)', runs.toB, expected);
    const toA = migratedRow('b -> a (remote to local)', runs.toA, expected);
    const copyMB = Math.round(sizes.copyBytes / MB);
    const rows = [
      {
        table: '2',
        measure: `copy ${copyMB} MB + sync`,
        local: secs(copy.local),
        remote: secs(copy.remote),
        'remote/local': round(copy.remote / copy.local, 2),
        runs: `local ${list(copyOf(runs.local))} s; remote ${list(copyOf(runs.remote))} s`,
      },
      {
        table: '2',
        measure: `CPU: ${sizes.rounds} x sha256 of ${sizes.roundMiB} MiB`,
        local: secs(cpu.local),
        remote: secs(cpu.remote),
        'remote/local': round(cpu.remote / cpu.local, 2),
        runs: `local ${list(cpuOf(runs.local))} s; remote ${list(cpuOf(runs.remote))} s`,
      },
      toB,
      toA,
      ...creation.map((c) => ({ table: 'creation', ...c, runs: `median of ${CREATE_REPS}` })),
    ].map(fullRow);
    return {
      name: 'paper',
      title: "The paper's evaluation: local vs NFS disks, migration at half-time, VM creation over NFS",
      method:
        `Two test hosts on one machine (network namespaces on a bridge); host a is the storage host ` +
        `(nfs-ganesha exports its VM store), host b opens a's disks over nfs:// (QEMU libnfs). QEMU under ` +
        `TCG, -m ${MEMORY_MIB}, 1 vCPU, driver level (no Temporal). Table 2: one guest task copies a ` +
        `${copyMB} MB random file on its ext4 data disk (cp + sync), then runs ${sizes.rounds} rounds of ` +
        `sha256sum over ${sizes.roundMiB} MiB of zeros piped from dd (CPU-bound, no disk); each phase is ` +
        `timed inside the guest (/proc/uptime). Local: the VM runs on a; remote: it starts on a and is ` +
        `migrated to b during a ${SETTLE_SEC} s pause before its work (the guest's "go" line is checked ` +
        `to come from b). Table 3: the same CPU task migrated when half the rounds are done, a -> b and ` +
        `b -> a; expected = (local + remote CPU time) / 2, as in the paper; migration time, downtime and ` +
        `RAM bytes from QEMU's query-migrate. ${reps} run(s) of each VM kind, interleaved; times are the best run (other work on the shared machine only adds time; every run is listed), migration figures the median. ` +
        `VM creation: host b makes a root disk in its own store vs in a's store over NFS: qcow2 overlay ` +
        `with qemu-img create (nfs:// names), and a full copy of a ${CREATE_BASE_MiB} MiB random raw base ` +
        `(cp + sync -f locally; nfs-cp + sync -f of the file on a's disk); median of ${CREATE_REPS}. ` +
        `Loopback NFS hides network latency, and the host page cache holds the files, so the remote ` +
        `figures are a lower bound of what a real network gives.` +
        (retried > 0 ? ` ${retried} VM run(s) failed and were run again.` : ''),
      rows,
      summary: {
        'copy remote/local': round(copy.remote / copy.local, 2),
        'CPU remote/local': round(cpu.remote / cpu.local, 2),
        'migrated a->b overhead %': toB['overhead %'] ?? '',
        'migrated b->a overhead %': toA['overhead %'] ?? '',
        'midway migration a->b': `${toB.migration}, downtime ${toB.downtime}, ${toB['RAM sent']}`,
        'overlay creation NFS/local': creation[0]['remote/local'],
        'full-copy creation NFS/local': creation[1]['remote/local'],
      },
    };
  } finally {
    await bed.close();
    await fs.rm(work, { recursive: true, force: true });
  }
}
