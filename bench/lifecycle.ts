import { spawn } from 'node:child_process';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { hostTscKhz } from '../drivers/qemu/accelerator';
import { ensureAppliance, type Appliance } from '../drivers/qemu/appliance';
import { buildQemuArgs, chooseMachine, type QemuMachine } from '../drivers/qemu/commandLine';
import { runCommand } from '../lib/runCommand';
import type { TaskSpecInput } from '../spec/taskSpec';
import type { TaskPhase } from '../workflows/definitions';
import {
  LIFECYCLE_PHASES,
  median,
  round,
  runLifecycle,
  withBenchCluster,
  type BenchCluster,
  type ClusterBenchEnv,
} from './orchestration';
import type { BenchReport } from './report';

export const HOST = 'q1';
export const FIRST_LINE = 'VSP-PROGRESS 1 first-line';
export const TASK: TaskSpecInput = {
  owner: 'bench',
  name: 'sleep1',
  driver: 'qemu',
  command: `echo ${FIRST_LINE} && sleep 1`,
  timeLimitSec: 300,
};
export const POLL_MS = 20;
const MEMORY_MIB = 256;

const hasFirstLine = (text: string) => text.split('\n').some((l) => l.replace(/\r$/, '') === FIRST_LINE);

/** Wall-clock times (ms since the epoch) the benchmark saw on the VM's console. */
interface ConsoleTimes {
  /** The console log appeared: QEMU has opened it, i.e. the VM process runs. */
  opened?: number;
  /** The task's first output line is on the console. */
  firstLine?: number;
}

/**
 * Watches the host's VM store while one task runs there alone: the single VM folder is the task's.
 * Resolves when `stop` is aborted.
 */
async function watchConsole(vmsDir: string, stop: AbortSignal): Promise<ConsoleTimes> {
  const seen: ConsoleTimes = {};
  while (!stop.aborted && seen.firstLine === undefined) {
    const vms = await fs.readdir(vmsDir).catch(() => [] as string[]);
    if (vms.length > 1) throw new Error(`more than one VM in ${vmsDir}: ${vms.join(', ')}`);
    if (vms.length === 1) {
      const text = await fs.readFile(path.join(vmsDir, vms[0], 'console.log'), 'utf8').catch(() => undefined);
      if (text !== undefined) seen.opened ??= Date.now();
      if (text !== undefined && hasFirstLine(text)) seen.firstLine = Date.now();
    }
    await sleep(POLL_MS);
  }
  return seen;
}

export interface Run {
  phaseMs: Partial<Record<TaskPhase, number>>;
  clientMs: number;
  /** startVm scheduled (workflow's 'starting' timestamp) to the first output line on the console. */
  bootToFirstLineMs: number;
  /** startVm scheduled to the console log appearing (activity dispatch + QEMU launch). */
  launchMs: number;
}

export async function oneTask(env: { bench: BenchCluster; vmsDir: string }): Promise<Run> {
  const stop = new AbortController();
  const watching = watchConsole(env.vmsDir, stop.signal);
  let lifecycle;
  try {
    lifecycle = await runLifecycle(env.bench, TASK);
  } finally {
    stop.abort();
  }
  const seen = await watching;
  const status = await env.bench.vsp.status(lifecycle.result.taskId);
  const startVm = Date.parse(status.timestamps.starting ?? '');
  if (!Number.isFinite(startVm))
    throw new Error(`task ${lifecycle.result.taskId} has no 'starting' timestamp`);
  if (seen.firstLine === undefined || seen.opened === undefined)
    throw new Error(`task ${lifecycle.result.taskId}: "${FIRST_LINE}" never seen on the console`);
  return {
    phaseMs: lifecycle.result.phaseMs,
    clientMs: lifecycle.clientMs,
    bootToFirstLineMs: seen.firstLine - startVm,
    launchMs: seen.opened - startVm,
  };
}

/** The files of a boot outside VSP: a root overlay and a data disk holding the task's command. */
interface RawFiles {
  dir: string;
  rootDisk: string;
  dataDisk: string;
  consoleLog: string;
  qmpSocket: string;
  controlSocket: string;
}

async function rawFiles(appliance: Appliance, dir: string): Promise<RawFiles> {
  const f: RawFiles = {
    dir,
    rootDisk: path.join(dir, 'root.qcow2'),
    dataDisk: path.join(dir, 'data.img'),
    consoleLog: path.join(dir, 'console.log'),
    qmpSocket: path.join(dir, 'qmp.sock'),
    controlSocket: path.join(dir, 'control.sock'),
  };
  const home = path.join(dir, 'home');
  await fs.mkdir(path.join(home, '.vsp'), { recursive: true });
  await fs.writeFile(path.join(home, '.vsp', 'command'), TASK.command);
  await runCommand('qemu-img', [
    'create',
    '-q',
    '-f',
    'qcow2',
    '-F',
    'qcow2',
    '-b',
    appliance.root.path,
    f.rootDisk,
  ]);
  await runCommand('mke2fs', ['-q', '-t', 'ext4', '-d', home, f.dataDisk, '64M']);
  return f;
}

/** QEMU booting the appliance's kernel as shipped, the way QEMU boots a kernel by default (pc, SeaBIOS). */
const rawArgs = (a: Appliance, f: RawFiles): string[] => [
  ...['-accel', 'tcg', '-machine', 'pc', '-cpu', 'max', '-m', String(MEMORY_MIB), '-smp', '1'],
  ...['-nodefaults', '-display', 'none', '-no-reboot', '-kernel', a.vmlinuz, '-initrd', a.initrd],
  ...['-append', `console=ttyS0 quiet panic=-1 vsp.owner=${TASK.owner}`],
  ...['-chardev', `file,id=console0,path=${f.consoleLog}`, '-serial', 'chardev:console0'],
  ...[
    '-drive',
    `file=${f.rootDisk},format=qcow2,if=virtio`,
    '-drive',
    `file=${f.dataDisk},format=raw,if=virtio`,
  ],
];

/** VSP's own command line for the machine the QEMU driver picks here, run by hand. */
const leanArgs = (a: Appliance, machine: QemuMachine, tscKhz: number | undefined, f: RawFiles): string[] =>
  buildQemuArgs({
    vmId: 'raw-lean',
    accel: 'tcg',
    machine,
    memoryMiB: MEMORY_MIB,
    vcpus: 1,
    vmlinuz: a.vmlinuz,
    vmlinux: a.vmlinux,
    initrd: a.initrd,
    tscKhz,
    rootDisk: f.rootDisk,
    dataDisk: f.dataDisk,
    qmpSocket: f.qmpSocket,
    controlSocket: f.controlSocket,
    consoleLog: f.consoleLog,
    owner: TASK.owner,
    portForwards: {},
  });

/**
 * A boot outside VSP: QEMU's launch to the task's first output line on the console, watched as the VSP runs
 * are (polling the console file). QEMU is killed once the line is there.
 */
async function rawBoot(appliance: Appliance, args: (f: RawFiles) => string[]): Promise<number> {
  const f = await rawFiles(appliance, await fs.mkdtemp(path.join(os.tmpdir(), 'raw-boot-')));
  try {
    const t0 = Date.now();
    const qemu = spawn('qemu-system-x86_64', args(f), { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    qemu.stderr.on('data', (d: Buffer) => (stderr = (stderr + d.toString()).slice(-2000)));
    const exited = new Promise<void>((resolve) => qemu.once('exit', () => resolve()));
    let running = true;
    void exited.then(() => (running = false));
    try {
      for (;;) {
        const text = await fs.readFile(f.consoleLog, 'utf8').catch(() => '');
        if (hasFirstLine(text)) return Date.now() - t0;
        if (!running) throw new Error(`QEMU exited before "${FIRST_LINE}": ${stderr || text.slice(-2000)}`);
        await sleep(POLL_MS);
      }
    } finally {
      qemu.kill('SIGKILL');
      await exited;
    }
  } finally {
    await fs.rm(f.dir, { recursive: true, force: true });
  }
}

/**
 * A QEMU VM's lifecycle under TCG on one host: boot to the task's first output line, and the whole
 * lifecycle of a one-second task, phase by phase.
 */
export async function benchLifecycle(env: ClusterBenchEnv): Promise<BenchReport> {
  const warmRuns = env.quick ? 1 : 5;
  return withBenchCluster(
    env,
    'lifecycle',
    { hosts: [HOST], drivers: ['qemu'], hostEnv: { VSP_ACCEL: 'tcg' }, owners: ['bench'] },
    async (bench) => {
      const ctx = { bench, vmsDir: path.join(bench.cluster.storeDir(HOST), 'vms') };
      // The first task on a fresh host also fills the host's image cache with the appliance's root image.
      const appliance = await ensureAppliance();
      const tscKhz = await hostTscKhz();
      const machine = chooseMachine('tcg', appliance, tscKhz);
      const cold = await oneTask(ctx);
      // Side by side: each warm VSP run, then the same kernel booted by QEMU alone, as shipped and lean.
      const warm: Run[] = [];
      const raw: number[] = [];
      const rawLean: number[] = [];
      for (let i = 0; i < warmRuns; i++) {
        warm.push(await oneTask(ctx));
        raw.push(await rawBoot(appliance, (f) => rawArgs(appliance, f)));
        rawLean.push(await rawBoot(appliance, (f) => leanArgs(appliance, machine, tscKhz, f)));
      }

      const total = (r: Run) => LIFECYCLE_PHASES.reduce((s, p) => s + (r.phaseMs[p] ?? 0), 0);
      const measures: [string, (r: Run) => number][] = [
        ...LIFECYCLE_PHASES.map((p): [string, (r: Run) => number] => [
          `phase: ${p}`,
          (r) => r.phaseMs[p] ?? 0,
        ]),
        ['workflow total (sum of phases)', total],
        ['client submit to result', (r) => r.clientMs],
        ['startVm to console opened (dispatch + QEMU launch)', (r) => r.launchMs],
        ['startVm to first output line (boot)', (r) => r.bootToFirstLineMs],
      ];
      const rows: Record<string, string | number>[] = measures.map(([measure, f]) => ({
        measure,
        'cold run ms': round(f(cold)),
        [`warm median ms (n=${warm.length})`]: round(median(warm.map(f))),
        'warm min ms': round(Math.min(...warm.map(f))),
        'warm max ms': round(Math.max(...warm.map(f))),
      }));
      const bootRow = (measure: string, xs: number[]) => ({
        measure,
        'cold run ms': '-',
        [`warm median ms (n=${warm.length})`]: round(median(xs)),
        'warm min ms': round(Math.min(...xs)),
        'warm max ms': round(Math.max(...xs)),
      });
      rows.push(
        bootRow('raw boot, no VSP: QEMU launch to first output line (pc, kernel as shipped)', raw),
        bootRow(
          `lean boot, no VSP: QEMU launch to first output line (VSP's ${machine} command line)`,
          rawLean,
        ),
      );
      const w = (f: (r: Run) => number) => round(median(warm.map(f)));
      const boot = median(warm.map((r) => r.bootToFirstLineMs));
      return {
        name: 'lifecycle',
        title: 'QEMU (TCG) task lifecycle: boot to first output, one-second task phase by phase',
        method:
          `A local cluster of real processes (Temporal dev server, repository, control worker, one host ` +
          `worker with the QEMU driver, VSP_ACCEL=tcg: KVM does not work on these machines). Task: ` +
          `\`echo ${FIRST_LINE} && sleep 1\` in the default appliance (1 vCPU, 256 MiB), no inputs; one ` +
          `task at a time. The cold run is the first task on the fresh host (it also fills the host's image ` +
          `cache); then ${warm.length} warm runs, medians. Phase times are the workflow's phaseMs. Boot to ` +
          `first output line: from the workflow's 'starting' timestamp (the workflow task that schedules ` +
          `startVm, so it includes the activity's dispatch and the QEMU launch) to the moment the benchmark, ` +
          `polling the VM's console log every ${POLL_MS} ms, sees the task's first line; the guest copies ` +
          `VSP-PROGRESS lines to the serial console as the task prints them. "Console opened" is when the ` +
          `console log first exists (QEMU opens it on launch). Both clocks are this machine's wall clock; ` +
          `the polling adds up to ${POLL_MS} ms. VSP's machine here: ${machine}` +
          `${tscKhz ? ` (guest told the host TSC, ${tscKhz} kHz)` : ''}. After each warm run, the same ` +
          `kernel, initramfs, root image and task command (fresh overlay, fresh data disk) are booted by QEMU ` +
          `alone, timed from its launch to the first line on the console (same polling): "raw" is the kernel ` +
          `as shipped (compressed bzImage) on QEMU's default pc machine with virtio-pci disks and the console ` +
          `quiet; "lean" is VSP's own command line for this host's machine. The goal compares VSP's boot ` +
          `(scheduling, launch and guest boot) with the raw one.`,
        rows,
        summary: {
          'boot to first output line, TCG (warm median ms)': w((r) => r.bootToFirstLineMs),
          'raw boot of the same kernel, no VSP (median ms)': round(median(raw)),
          'lean boot through VSP / raw boot (goal <= 0.5)': round(boot / median(raw), 2),
          'lean boot without VSP / raw boot': round(median(rawLean) / median(raw), 2),
          'one-second task, workflow total (warm median ms)': w(total),
          'one-second task, client submit to result (warm median ms)': w((r) => r.clientMs),
          'one-second task, running phase (warm median ms)': w((r) => r.phaseMs.running ?? 0),
          'cold first task, client submit to result (ms)': round(cold.clientMs),
        },
      };
    },
  );
}
