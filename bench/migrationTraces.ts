import { randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { httpGet, startPolling, type Reply } from '../deploy/devcluster/httpPolling';
import { HOST_BRIDGE } from '../deploy/devcluster/netns';
import { startNfsTestHosts, type NfsTestHosts } from '../deploy/devcluster/nfsTestHosts';
import { ConsoleFollower, type ConsoleState } from '../drivers/qemu/consoleLog';
import { nicFromState, type VmNetworkOptions } from '../drivers/qemu/vmNetwork';
import type { MigrationResult, VmConfig, VmHandle } from '../drivers/types';
import { createLogger } from '../logging/logger';
import { DiskImageStaging } from '../storage/diskImageStaging';
import { round } from './orchestration';
import { HostTraceSampler, type HostTraceSample } from './hostTraces';
import { plotLineChart, writeCsv, type ChartPanel, type CsvRow, type MarkedInterval } from './plot';
import type { BenchReport } from './report';

/**
 * The paper's Figures 4 and 5 on two namespace hosts (a stores the VM's disks and exports them over
 * NFS; b opens them over nfs:// once the VM arrives). Figure 4: per-second traces of the hosts' CPU and
 * network while a CPU-bound task is migrated a -> b halfway through. Figure 5: the reply rate of an HTTP
 * service in a VM, polled by several clients, through a live migration a -> b. Driver level (no
 * Temporal), QEMU under TCG. Each figure is a CSV (one row per second) and a gnuplot PNG in `outDir`.
 */

export interface MigrationTracesOptions {
  /** Scratch folder (removed by the caller). */
  workDir: string;
  /** Where the CSVs, PNGs and gnuplot scripts go (the runner's report folder). */
  outDir: string;
  /** A shorter task and service window: a smoke run. */
  quick?: boolean;
}

type Host = 'a' | 'b';
const HOSTS: Host[] = ['a', 'b'];
const SUBNET = '10.77.41';
const VM_NETWORK: VmNetworkOptions = { bridge: HOST_BRIDGE, subnet: SUBNET };
const MEMORY_MIB = 256;
const MiB = 1024 * 1024;
const KiB = 1024;
const CONSOLE_POLL_MS = 200;
const BOOT_TIMEOUT_MS = 180_000;
const DOWNTIME_LIMIT_MS = 300;
/** Traces go on this long after the task ends, so the figure shows the hosts at rest again. */
const TAIL_MS = 3000;
const HTTP_PORT = 8080;
const REQUEST_TIMEOUT_MS = 3000;
/** Figure 5 reports the lowest reply rate in this many seconds after the migration too. */
const AFTER_S = 3;
const log = createLogger('bench.migration-traces');

/** Figure 4's task, mencoder-like: each round reads 1 MiB of new input, burns CPU, writes output + sync. */
interface TaskSizes {
  rounds: number;
  /** MiB of zeros hashed per round: the CPU part. */
  cpuMiB: number;
  /** Output written (and synced) per round. */
  outputKiB: number;
}

interface ServiceSizes {
  clients: number;
  /** Each client sends its next request this long after the previous one began (one at a time). */
  intervalMs: number;
  beforeMs: number;
  afterMs: number;
}

function taskCommand(s: TaskSizes): string {
  return [
    'echo "VSP-PROGRESS 0 start"',
    'i=0',
    `while [ $i -lt ${s.rounds} ]; do`,
    '  dd if=input.bin bs=1M skip=$i count=1 2>/dev/null | sha256sum >> digests.txt',
    `  dd if=/dev/zero bs=1M count=${s.cpuMiB} 2>/dev/null | sha256sum > /dev/null`,
    `  dd if=/dev/zero of=output.bin bs=${s.outputKiB}k count=1 seek=$i conv=notrunc 2>/dev/null`,
    '  sync',
    '  i=$((i + 1))',
    `  echo "VSP-PROGRESS $((i * 100 / ${s.rounds})) round $i"`,
    'done',
    `[ "$(wc -l < digests.txt)" -eq ${s.rounds} ] || exit 3`,
  ].join('\n');
}

// ---------------------------------------------------------------------------------------------------
// Host traces as figure columns.

type HostSample = HostTraceSample<Host>;

const HOST_COLUMNS = (s: HostSample): CsvRow =>
  Object.fromEntries(
    HOSTS.flatMap((h) => [
      [`cpu_qemu_${h}`, round(s.hosts[h].qemuCpu, 1)],
      [`cpu_services_${h}`, round(s.hosts[h].servicesCpu, 1)],
      [`sent_kib_s_${h}`, round(s.hosts[h].sentKiBs, 1)],
      [`recv_kib_s_${h}`, round(s.hosts[h].recvKiBs, 1)],
    ]),
  );

/** Every figure value is a rate over the second that ends at its t. */
const CPU_PANEL: ChartPanel = {
  ylabel: 'CPU (% of one core)',
  style: 'steps',
  series: HOSTS.flatMap((h) => [
    { column: `cpu_qemu_${h}`, title: `VM's QEMU on ${h}` },
    { column: `cpu_services_${h}`, title: `other processes on ${h} (NFS server)` },
  ]),
};

// ---------------------------------------------------------------------------------------------------
// The testbed: VMs and their migration.

interface Migration {
  result: MigrationResult;
  /** Wall-clock bounds of the whole move: prepare the target, migrate, see the guest run there. */
  startedAt: number;
  endedAt: number;
  handle: VmHandle;
}

async function migrate(hosts: NfsTestHosts<Host>, vm: VmHandle, to: Host): Promise<Migration> {
  const from = hosts.drivers[vm.host as Host];
  const startedAt = Date.now();
  const incoming = await hosts.drivers[to].prepareIncoming(await from.describeForMigration(vm));
  let result: MigrationResult;
  try {
    result = await from.migrate(vm, incoming, { downtimeLimitMs: DOWNTIME_LIMIT_MS });
  } catch (err) {
    await hosts.drivers[to].abortIncoming(incoming);
    throw err;
  }
  const handle = await hosts.drivers[to].finishIncoming(incoming);
  hosts.started.push({ host: to, handle });
  return { result, startedAt, endedAt: Date.now(), handle };
}

async function startVm(hosts: NfsTestHosts<Host>, config: VmConfig): Promise<VmHandle> {
  const handle = await hosts.drivers.a.start(await hosts.drivers.a.create(config));
  hosts.started.push({ host: 'a', handle });
  return handle;
}

/** Follows a VM's console until `done` holds; returns when it was seen. Throws on a guest exit or error. */
async function untilConsole(
  handle: VmHandle,
  what: string,
  done: (s: ConsoleState) => boolean,
  timeoutMs: number,
): Promise<number> {
  const follower = new ConsoleFollower(String(handle.state.consoleLog));
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const state = await follower.poll();
    if (done(state)) return Date.now();
    if (state.exitCode !== undefined || state.guestError !== undefined || Date.now() > deadline)
      throw new Error(
        `VM ${handle.vmId} on ${handle.host}: no ${what} (exit ${state.exitCode ?? '-'}, ` +
          `error ${state.guestError ?? '-'}, last progress ${state.progressMessage ?? '-'})`,
      );
    await new Promise((r) => setTimeout(r, CONSOLE_POLL_MS));
  }
}

const roundOf = (s: ConsoleState) => Number(/^round (\d+)$/.exec(s.progressMessage ?? '')?.[1] ?? 0);

async function destroyVm(hosts: NfsTestHosts<Host>, vmId: string): Promise<void> {
  const mine = hosts.started.filter((s) => s.handle.vmId === vmId).reverse();
  for (const { host, handle } of mine) await hosts.drivers[host].destroy(handle);
  hosts.started.splice(0, hosts.started.length, ...hosts.started.filter((s) => s.handle.vmId !== vmId));
}

async function writeRandomInput(file: string, mib: number): Promise<void> {
  const fh = await fs.open(file, 'w');
  try {
    for (let i = 0; i < mib; i++) await fh.write(randomBytes(MiB), 0, MiB, i * MiB);
  } finally {
    await fh.close();
  }
}

const mean = (xs: number[]) => (xs.length === 0 ? 0 : xs.reduce((a, b) => a + b, 0) / xs.length);

// ---------------------------------------------------------------------------------------------------
// Figure 4.

interface Figure4 {
  rows: CsvRow[];
  migration: Migration;
  window: MarkedInterval;
  /** Seconds since the trace began. */
  task: { startS: number; endS: number };
  /** What host a sent during the migration window, by its traffic counters. */
  sentInWindowBytes: number;
  before: { qemuCpuA: number; sentKiBsA: number };
  after: { qemuCpuB: number; sentKiBsA: number };
}

async function runFigure4(hosts: NfsTestHosts<Host>, sizes: TaskSizes): Promise<Figure4> {
  const vmId = 'trace-task';
  const paths = hosts.stores.a.paths(vmId);
  await fs.mkdir(paths.inputsDir, { recursive: true });
  await writeRandomInput(path.join(paths.inputsDir, 'input.bin'), sizes.rounds);
  await new DiskImageStaging().build(paths, sizes.rounds * sizes.outputKiB * KiB + 16 * MiB);
  const config: VmConfig = {
    vmId,
    owner: 'bench',
    command: taskCommand(sizes),
    vcpus: 1,
    memoryMiB: MEMORY_MIB,
    baseImage: hosts.baseImage,
    ports: [],
    timeLimitSec: 1800,
  };
  const sampler = await HostTraceSampler.start(netnsOf(hosts));
  let samples: HostSample[] | undefined;
  try {
    const handle = await startVm(hosts, config);
    const startedAt = await untilConsole(
      handle,
      'task start',
      (s) => s.progress !== undefined,
      BOOT_TIMEOUT_MS,
    );
    const half = Math.floor(sizes.rounds / 2);
    await untilConsole(handle, `round ${half}`, (s) => roundOf(s) >= half, 30 * 60_000);
    log.info({ vmId, round: half }, 'figure 4: migrating the task a -> b');
    const migration = await migrate(hosts, handle, 'b');
    const endedAt = await untilConsole(
      migration.handle,
      'last round',
      (s) => roundOf(s) === sizes.rounds,
      30 * 60_000,
    );
    const exit = await hosts.drivers.b.wait(migration.handle, {
      onProgress: () => undefined,
      signal: new AbortController().signal,
    });
    if (exit.exitCode !== 0) throw new Error(`VM ${vmId}: the guest task exited ${exit.exitCode}`);
    await destroyVm(hosts, vmId);
    await new Promise((r) => setTimeout(r, TAIL_MS));
    samples = await sampler.stop();
    const window: MarkedInterval = {
      from: sampler.since(migration.startedAt),
      to: sampler.since(migration.endedAt),
      label: 'migration a -> b',
    };
    const rows = samples.map((s) => ({
      t: s.t,
      ...HOST_COLUMNS(s),
      migrating: overlaps(s.t, window) ? 1 : 0,
      task_running: s.t > sampler.since(startedAt) && s.t - 1 < sampler.since(endedAt) ? 1 : 0,
    }));
    const task = { startS: sampler.since(startedAt), endS: sampler.since(endedAt) };
    const local = samples.filter((s) => s.t - 1 >= task.startS && s.t <= window.from);
    const remote = samples.filter((s) => s.t - 1 >= window.to && s.t <= task.endS);
    const inWindow = samples.filter((s) => overlaps(s.t, window));
    return {
      rows,
      migration,
      window,
      task,
      sentInWindowBytes: inWindow.reduce((sum, s) => sum + s.hosts.a.sentKiBs * KiB, 0),
      before: {
        qemuCpuA: mean(local.map((s) => s.hosts.a.qemuCpu)),
        sentKiBsA: mean(local.map((s) => s.hosts.a.sentKiBs)),
      },
      after: {
        qemuCpuB: mean(remote.map((s) => s.hosts.b.qemuCpu)),
        sentKiBsA: mean(remote.map((s) => s.hosts.a.sentKiBs)),
      },
    };
  } finally {
    if (!samples) await sampler.stop();
  }
}

/** Whether the one-second interval ending at `t` overlaps the window. */
const overlaps = (t: number, w: MarkedInterval) => t > w.from && t - 1 < w.to;

const netnsOf = (hosts: NfsTestHosts<Host>) =>
  Object.fromEntries(HOSTS.map((h) => [h, hosts.network.hosts[h].netns])) as Record<Host, string>;

// ---------------------------------------------------------------------------------------------------
// Figure 5.

interface Figure5 {
  rows: CsvRow[];
  migration: Migration;
  window: MarkedInterval;
  requests: number;
  failures: Reply[];
  /** Replies per second: over the seconds before the migration, and the lowest in a second overlapping it. */
  rateBefore: number;
  minRateInWindow: number;
  /** The lowest in the seconds right after it (the target's QEMU translates the guest's code afresh). */
  minRateAfter: number;
  /** Longest time without any reply (across all clients), and the slowest single request. */
  maxGapMs: number;
  slowestMs: number;
}

async function runFigure5(hosts: NfsTestHosts<Host>, sizes: ServiceSizes): Promise<Figure5> {
  const vmId = 'trace-web';
  const body = `hello from ${vmId}\n`;
  const paths = hosts.stores.a.paths(vmId);
  await fs.mkdir(paths.inputsDir, { recursive: true });
  await fs.writeFile(path.join(paths.inputsDir, 'index.html'), body);
  await new DiskImageStaging().build(paths, 4 * MiB);
  const handle = await startVm(hosts, {
    vmId,
    owner: 'bench',
    command: `exec busybox httpd -f -p ${HTTP_PORT} -h .`,
    vcpus: 1,
    memoryMiB: MEMORY_MIB,
    baseImage: hosts.baseImage,
    ports: [HTTP_PORT],
    timeLimitSec: 1800,
  });
  const nic = nicFromState(handle.state);
  if (!nic) throw new Error(`VM ${vmId} got no NIC on the VM network`);
  const url = `http://${nic.address.split('/')[0]}:${HTTP_PORT}/index.html`;
  const bootDeadline = Date.now() + BOOT_TIMEOUT_MS;
  while ((await httpGet(url, REQUEST_TIMEOUT_MS).catch(() => undefined)) !== body) {
    if (Date.now() > bootDeadline) throw new Error(`the VM's service never answered at ${url}`);
    await new Promise((r) => setTimeout(r, 500));
  }

  const sampler = await HostTraceSampler.start(netnsOf(hosts));
  const clients = startPolling(url, {
    clients: sizes.clients,
    intervalMs: sizes.intervalMs,
    timeoutMs: REQUEST_TIMEOUT_MS,
    expectBody: body,
  });
  let replies: Reply[] | undefined;
  let samples: HostSample[] | undefined;
  try {
    await new Promise((r) => setTimeout(r, sizes.beforeMs));
    log.info({ vmId }, 'figure 5: migrating the service a -> b');
    const migration = await migrate(hosts, handle, 'b');
    await new Promise((r) => setTimeout(r, sizes.afterMs));
    replies = await clients.stop();
    samples = await sampler.stop();
    await destroyVm(hosts, vmId);

    const window: MarkedInterval = {
      from: sampler.since(migration.startedAt),
      to: sampler.since(migration.endedAt),
      label: 'migration a -> b',
    };
    const done = replies;
    const inSecond = (t: number) =>
      done.filter((r) => r.doneAt > sampler.t0 + (t - 1) * 1000 && r.doneAt <= sampler.t0 + t * 1000);
    const rows = samples.map((s) => {
      const here = inSecond(s.t);
      const ok = here.filter((r) => r.ok);
      return {
        t: s.t,
        replies: ok.length,
        failures: here.length - ok.length,
        mean_latency_ms: round(mean(ok.map((r) => r.doneAt - r.sentAt)), 1),
        max_latency_ms: Math.max(0, ...ok.map((r) => r.doneAt - r.sentAt)),
        ...HOST_COLUMNS(s),
        migrating: overlaps(s.t, window) ? 1 : 0,
      };
    });
    const ok = done.filter((r) => r.ok);
    let maxGapMs = 0;
    for (let i = 1; i < ok.length; i++) maxGapMs = Math.max(maxGapMs, ok[i].doneAt - ok[i - 1].doneAt);
    const repliesIn = (keep: (t: number) => boolean) => rows.filter((r) => keep(r.t)).map((r) => r.replies);
    return {
      rows,
      migration,
      window,
      requests: done.length,
      failures: done.filter((r) => !r.ok),
      rateBefore: mean(repliesIn((t) => t <= window.from)),
      // The window always overlaps at least one second, and the trace goes on for afterMs.
      minRateInWindow: Math.min(...repliesIn((t) => overlaps(t, window))),
      minRateAfter: Math.min(...repliesIn((t) => t - 1 >= window.to && t - 1 < window.to + AFTER_S)),
      maxGapMs,
      slowestMs: Math.max(...ok.map((r) => r.doneAt - r.sentAt)),
    };
  } finally {
    if (!replies) await clients.stop();
    if (!samples) await sampler.stop();
  }
}

// ---------------------------------------------------------------------------------------------------
// The benchmark.

const mb = (bytes: number) => `${round(bytes / 1e6, 1)} MB`;

export async function benchMigrationTraces(opts: MigrationTracesOptions): Promise<BenchReport> {
  const task: TaskSizes = opts.quick
    ? { rounds: 20, cpuMiB: 4, outputKiB: 256 }
    : { rounds: 60, cpuMiB: 4, outputKiB: 256 };
  const service: ServiceSizes = opts.quick
    ? { clients: 4, intervalMs: 100, beforeMs: 8000, afterMs: 8000 }
    : { clients: 4, intervalMs: 100, beforeMs: 20_000, afterMs: 20_000 };
  const work = path.join(opts.workDir, 'migration-traces');
  await fs.mkdir(work, { recursive: true });
  await fs.mkdir(opts.outDir, { recursive: true });
  const files = {
    fig4: {
      csv: path.join(opts.outDir, 'migration-traces-fig4.csv'),
      png: path.join(opts.outDir, 'migration-traces-fig4.png'),
    },
    fig5: {
      csv: path.join(opts.outDir, 'migration-traces-fig5.csv'),
      png: path.join(opts.outDir, 'migration-traces-fig5.png'),
    },
  };
  const hosts = await startNfsTestHosts({
    hosts: HOSTS,
    prefix: 'vsptr-',
    subnet: SUBNET,
    vmNetwork: VM_NETWORK,
    accel: 'tcg',
    parentDir: work,
  });
  let f4: Figure4;
  let f5: Figure5;
  try {
    log.info({ task }, 'figure 4: CPU-bound task migrated halfway');
    f4 = await runFigure4(hosts, task);
    log.info({ service }, 'figure 5: HTTP service through a migration');
    f5 = await runFigure5(hosts, service);
  } finally {
    await hosts.stop();
    await fs.rm(work, { recursive: true, force: true });
  }

  // The migration's burst dwarfs the NFS traffic of the remote run: clip the axis so both show, as the paper did.
  const peakKiBs = Math.max(...f4.rows.flatMap((r) => HOSTS.map((h) => Number(r[`sent_kib_s_${h}`]))));
  const quiet = f4.rows
    .filter((r) => r.migrating === 0)
    .flatMap((r) => HOSTS.map((h) => Number(r[`recv_kib_s_${h}`])));
  const netMax = Math.max(64, 4 * Math.max(...quiet));
  await writeCsv(files.fig4.csv, f4.rows);
  await plotLineChart(
    {
      title: `Figure 4: CPU-bound task (${task.rounds} rounds) migrated a -> b halfway; VM disks stay on a (NFS)`,
      csvFile: files.fig4.csv,
      xColumn: 't',
      xLabel: 'time since the VM was launched (s)',
      intervals: [f4.window],
      panels: [
        CPU_PANEL,
        {
          ylabel: 'network (KiB/s)',
          series: HOSTS.flatMap((h) => [
            { column: `sent_kib_s_${h}`, title: `sent by ${h}` },
            { column: `recv_kib_s_${h}`, title: `received by ${h}`, dashed: true },
          ]),
          style: 'steps',
          yMax: peakKiBs > netMax ? round(netMax, 0) : undefined,
          note:
            peakKiBs > netMax
              ? `axis clipped: the migration peaks at ${round(peakKiBs / KiB, 1)} MiB/s`
              : undefined,
        },
      ],
    },
    files.fig4.png,
  );
  await writeCsv(files.fig5.csv, f5.rows);
  await plotLineChart(
    {
      title: `Figure 5: HTTP service in a VM, ${service.clients} clients, live migration a -> b`,
      csvFile: files.fig5.csv,
      xColumn: 't',
      xLabel: 'time since polling began (s)',
      intervals: [f5.window],
      panels: [
        {
          ylabel: 'per second',
          style: 'steps',
          series: [
            { column: 'replies', title: 'replies' },
            { column: 'failures', title: 'failed requests' },
          ],
        },
        {
          ylabel: 'latency (ms)',
          style: 'steps',
          series: [
            { column: 'max_latency_ms', title: 'slowest reply' },
            { column: 'mean_latency_ms', title: 'mean reply' },
          ],
        },
        CPU_PANEL,
      ],
    },
    files.fig5.png,
  );

  const m4 = f4.migration.result;
  const m5 = f5.migration.result;
  const rel = (f: string) => path.basename(f);
  const row = (figure: string, m: Migration, extra: Record<string, string | number>) => ({
    figure,
    'migration (wall)': `${m.endedAt - m.startedAt} ms`,
    'QEMU total': `${m.result.totalTimeMs} ms`,
    downtime: `${m.result.downtimeMs} ms`,
    'RAM sent': mb(m.result.ramTransferredBytes),
    'disk sent': `${m.result.diskTransferredBytes} B`,
    ...extra,
  });
  const rows = [
    row('4: CPU-bound task', f4.migration, {
      'a sent in window': mb(f4.sentInWindowBytes),
      requests: '-',
      'lost requests': '-',
      'min replies/s in window': '-',
      [`min replies/s ${AFTER_S} s after`]: '-',
      files: `${rel(files.fig4.csv)}, ${rel(files.fig4.png)}`,
    }),
    row('5: HTTP service', f5.migration, {
      'a sent in window': '-',
      requests: f5.requests,
      'lost requests': f5.failures.length,
      'min replies/s in window': f5.minRateInWindow,
      [`min replies/s ${AFTER_S} s after`]: f5.minRateAfter,
      files: `${rel(files.fig5.csv)}, ${rel(files.fig5.png)}`,
    }),
  ];
  return {
    name: 'migration-traces',
    title:
      "The paper's Figures 4 and 5: host traces of a migrated task, and a service's reply rate through a migration",
    method:
      `Two test hosts on one machine (network namespaces on a bridge, prefix vsptr-, ${SUBNET}.0/24); host a ` +
      `stores the VM's disks and exports its store with nfs-ganesha, host b opens them over nfs:// after ` +
      `the move (memory-only live migration, QMP migrate, downtime limit ${DOWNTIME_LIMIT_MS} ms). QEMU ` +
      `under TCG, -m ${MEMORY_MIB}, 1 vCPU, driver level (no Temporal). Once a second: CPU of each host's ` +
      `processes from /proc/<pid>/stat (utime + stime, all threads; the namespace's processes by ` +
      `ip netns pids: the VM's QEMU, and the rest, i.e. nfs-ganesha and rpcbind, the paper's Domain-0), ` +
      `and each host's traffic from the byte counters of its veth (NFS and migration traffic alike). ` +
      `Figure 4: a mencoder-like guest task of ${task.rounds} rounds (read 1 MiB of new input from the ` +
      `data disk, sha256 of ${task.cpuMiB} MiB of zeros, write ${task.outputKiB} KiB of output + sync), ` +
      `migrated a -> b when round ${Math.floor(task.rounds / 2)} is done; task ran ` +
      `${round(f4.task.endS - f4.task.startS, 1)} s. Figure 5: busybox httpd in a VM on the cluster's VM ` +
      `network (tap on each host's bridge, same MAC and address after the move), polled from the root ` +
      `namespace by ${service.clients} clients, each one request at a time every ${service.intervalMs} ms ` +
      `on a fresh connection with a ${REQUEST_TIMEOUT_MS} ms timeout; ${service.beforeMs / 1000} s before ` +
      `and ${service.afterMs / 1000} s after the migration. The migration window (shaded) runs from ` +
      `preparing the target to the guest running there. Files in this folder: ` +
      `${[files.fig4.csv, files.fig4.png, files.fig5.csv, files.fig5.png].map(rel).join(', ')} (and the ` +
      `gnuplot scripts, .gp).`,
    rows,
    summary: {
      'fig 4 migration': `${m4.totalTimeMs} ms (QEMU), downtime ${m4.downtimeMs} ms, RAM ${mb(m4.ramTransferredBytes)}, disk ${m4.diskTransferredBytes} B`,
      'fig 4 traffic of a': `before ${round(f4.before.sentKiBsA, 1)} KiB/s, during the migration ${mb(f4.sentInWindowBytes)}, after ${round(f4.after.sentKiBsA, 1)} KiB/s (NFS to b)`,
      'fig 4 QEMU CPU': `a before ${round(f4.before.qemuCpuA, 0)} %, b after ${round(f4.after.qemuCpuB, 0)} %`,
      'fig 5 migration': `${m5.totalTimeMs} ms (QEMU), downtime ${m5.downtimeMs} ms, RAM ${mb(m5.ramTransferredBytes)}, disk ${m5.diskTransferredBytes} B`,
      'fig 5 requests':
        `${f5.requests}, lost ${f5.failures.length}` +
        (f5.failures.length > 0
          ? ` (${[...new Set(f5.failures.map((r) => r.error))].slice(0, 3).join('; ')})`
          : ''),
      'fig 5 reply rate': `${round(f5.rateBefore, 1)}/s before the migration, min ${f5.minRateInWindow}/s during it, min ${f5.minRateAfter}/s in the ${AFTER_S} s after`,
      'fig 5 client view': `longest time without a reply ${f5.maxGapMs} ms, slowest reply ${f5.slowestMs} ms`,
      plots: `${rel(files.fig4.png)}, ${rel(files.fig5.png)}`,
    },
  };
}
