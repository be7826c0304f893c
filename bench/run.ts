#!/usr/bin/env node
import { execFileSync } from 'node:child_process';
import { chmodSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { Command } from 'commander';
import { descendantsOf, listProcesses, type ProcInfo } from '../deploy/devcluster/procTable';
import { stopAll, stopAllOnSignals } from '../deploy/devcluster/processes';
import { startTemporalDevServer, type TemporalDevServer } from '../deploy/devcluster/temporal';
import { createLogger, describeError } from '../logging/logger';
import { writeFileAtomicSync } from '../storage/durableFile';
import { tuneHeapForStreaming } from '../lib/streamingHeap';
import { benchCpuShare } from './cpuShare';
import { benchDrain } from './drain';
import { benchLifecycle } from './lifecycle';
import { benchSnapshotStart } from './snapshotStart';
import { benchMigrationTls } from './migrationTls';
import { benchMigrationTraces } from './migrationTraces';
import { benchOrchestration, type ClusterBenchEnv } from './orchestration';
import { benchPaper } from './paperEvaluation';
import { benchRepository, benchRepositoryConcurrency } from './repository';
import { benchRepositoryProtocols } from './repositoryProtocols';
import { writeReport, type BenchReport } from './report';
import { benchScheduler } from './scheduler';
import { benchScaleout } from './scaleout';
import { benchStaging } from './staging';
import { benchStorageEvacuation } from './storageEvacuation';
import { benchSubmission } from './submission';
import { benchVmCreation } from './vmCreation';
import { benchXen } from './xen';

const log = createLogger('bench.run');

interface RunContext {
  quick: boolean;
  workDir: string;
  /** The reports' folder (benchmarks that draw figures put them there). */
  outDir: string;
  logsDir?: string;
  /** Starts the Temporal dev server on first use; the runner stops it at the end. */
  temporalAddress(): Promise<string>;
}

async function clusterEnv(ctx: RunContext): Promise<ClusterBenchEnv> {
  const { workDir, quick, logsDir } = ctx;
  return { temporalAddress: await ctx.temporalAddress(), workDir, quick, logsDir };
}

/** Every benchmark, in the order a full run takes them; names are the reports' file names. */
const BENCHMARKS: Record<string, (ctx: RunContext) => Promise<BenchReport>> = {
  orchestration: async (ctx) => benchOrchestration(await clusterEnv(ctx)),
  submission: async (ctx) =>
    benchSubmission({ temporalAddress: await ctx.temporalAddress(), quick: ctx.quick }),
  lifecycle: async (ctx) => benchLifecycle(await clusterEnv(ctx)),
  'snapshot-start': async (ctx) => benchSnapshotStart(await clusterEnv(ctx)),
  scheduler: async (ctx) =>
    benchScheduler({ temporalAddress: await ctx.temporalAddress(), quick: ctx.quick }),
  'vm-creation': () => benchVmCreation(),
  staging: (ctx) => benchStaging({ quick: ctx.quick }),
  repository: (ctx) => benchRepository(ctx.quick ? { sizeMiB: 64, runs: 1 } : {}),
  protocols: (ctx) => benchRepositoryProtocols(ctx.quick ? { sizeMiB: 64, runs: 1 } : {}),
  'repository-concurrency': (ctx) => benchRepositoryConcurrency(ctx.quick ? { clients: 20, sizeMiB: 2 } : {}),
  scaleout: (ctx) =>
    benchScaleout({ quick: ctx.quick, workDir: ctx.workDir, logsDir: ctx.logsDir ?? ctx.workDir }),
  paper: (ctx) => benchPaper({ workDir: ctx.workDir, quick: ctx.quick }),
  'migration-traces': (ctx) =>
    benchMigrationTraces({ workDir: ctx.workDir, outDir: ctx.outDir, quick: ctx.quick }),
  'migration-tls': (ctx) => benchMigrationTls({ workDir: ctx.workDir, quick: ctx.quick }),
  'cpu-share': (ctx) => benchCpuShare({ workDir: ctx.workDir, quick: ctx.quick }),
  'storage-evacuation': (ctx) => benchStorageEvacuation({ workDir: ctx.workDir, quick: ctx.quick }),
  drain: (ctx) => benchDrain({ workDir: ctx.workDir, quick: ctx.quick }),
  xen: (ctx) => benchXen({ workDir: ctx.workDir, quick: ctx.quick }),
};

/**
 * Watches the machine while a benchmark runs: the load average, and other test runs (jest processes
 * not started by this runner), which share the 2 cores and can disturb the figures.
 */
class InterferenceMonitor {
  private loads: number[] = [];
  private samples = 0;
  private foreignSamples = 0;
  private readonly timer: NodeJS.Timeout;

  constructor(private readonly cores = os.cpus().length) {
    this.sample();
    this.timer = setInterval(() => this.sample(), 2000);
  }

  private sample(): void {
    this.samples++;
    this.loads.push(Number(readFileSync('/proc/loadavg', 'utf8').split(' ')[0]));
    const procs = listProcesses();
    const mine = new Set(descendantsOf(process.pid, procs).map((p) => p.pid));
    const foreign = procs.some((p) => !mine.has(p.pid) && p.state !== 'Z' && /\/jest(\s|$)/.test(p.cmdline));
    if (foreign) this.foreignSamples++;
  }

  /** A sentence for the report's method. */
  stop(): string {
    clearInterval(this.timer);
    const mean = this.loads.reduce((a, b) => a + b, 0) / this.loads.length;
    const load =
      `Machine during this run: 1-min load average mean ${mean.toFixed(1)}, max ` +
      `${Math.max(...this.loads).toFixed(1)} on ${this.cores} cores`;
    return this.foreignSamples === 0
      ? `${load}; no other test run was seen.`
      : `${load}; other test runs (jest) were active in ${this.foreignSamples} of ${this.samples} samples, ` +
          'so these figures may be disturbed (slower than on a quiet machine).';
  }
}

/** Processes this run left: its descendants, and any (e.g. a daemonised QEMU) naming its scratch folder. */
function leftovers(workDir: string): ProcInfo[] {
  const procs = listProcesses().filter((p) => p.state !== 'Z' && p.pid !== process.pid);
  const found = new Map(descendantsOf(process.pid, procs).map((p) => [p.pid, p]));
  for (const p of procs) if (p.cmdline.includes(workDir)) found.set(p.pid, p);
  return [...found.values()];
}

function signal(pids: number[], sig: NodeJS.Signals): void {
  for (const pid of pids) {
    try {
      process.kill(pid, sig);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ESRCH') throw err;
    }
  }
}

/** SIGTERM to what is left, SIGKILL after 5 s, then the scratch folder goes. */
async function cleanUp(workDir: string): Promise<void> {
  let left = leftovers(workDir);
  if (left.length > 0) {
    log.warn({ left: left.map((p) => `${p.pid} ${p.cmdline.slice(0, 120)}`) }, 'stopping leftover processes');
    signal(
      left.map((p) => p.pid),
      'SIGTERM',
    );
    for (let i = 0; i < 50 && (left = leftovers(workDir)).length > 0; i++) await sleep(100);
    signal(
      left.map((p) => p.pid),
      'SIGKILL',
    );
  }
  rmSync(workDir, { recursive: true, force: true });
}

function gitCommit(): string {
  try {
    const rev = execFileSync('git', ['rev-parse', '--short', 'HEAD'], { encoding: 'utf8' }).trim();
    const dirty = execFileSync('git', ['status', '--porcelain'], { encoding: 'utf8' }).trim() !== '';
    return dirty ? `${rev} + uncommitted changes` : rev;
  } catch {
    return 'unknown (not a git checkout)';
  }
}

/**
 * SUMMARY.md: the headline figures of every report in `outDir` (this run's and earlier ones, each
 * with the time it was measured), and this run's failures.
 */
async function writeSummary(outDir: string, ran: string[], failures: Map<string, string>): Promise<string> {
  const lines = [
    '# VSP benchmark summary',
    '',
    `Written ${new Date().toISOString()} on ${os.cpus().length} cores (${os.cpus()[0]?.model ?? '?'}), ` +
      `${Math.round(os.totalmem() / 1024 ** 3)} GiB, Node ${process.version}, commit ${gitCommit()}.`,
    `This run: ${ran.join(', ')}. Full tables and methods: \`<name>.md\` / \`<name>.json\` in this folder.`,
    '',
  ];
  for (const name of Object.keys(BENCHMARKS)) {
    const file = path.join(outDir, `${name}.json`);
    let report: BenchReport;
    let measured: Date;
    try {
      report = JSON.parse(await fs.readFile(file, 'utf8')) as BenchReport;
      measured = (await fs.stat(file)).mtime;
    } catch {
      continue;
    }
    const when =
      ran.includes(name) && !failures.has(name) ? 'this run' : `earlier, ${measured.toISOString()}`;
    lines.push(`## ${report.title}`, '', `[${name}.md](${name}.md), measured ${when}.`, '');
    for (const [k, v] of Object.entries(report.summary)) lines.push(`- **${k}**: ${v}`);
    lines.push('');
  }
  if (failures.size > 0) {
    lines.push('## Failed in this run', '');
    for (const [name, why] of failures) lines.push(`- **${name}**: ${why.split('\n')[0]}`);
    lines.push('');
  }
  const file = path.join(outDir, 'SUMMARY.md');
  await fs.mkdir(outDir, { recursive: true });
  writeFileAtomicSync(file, lines.join('\n'));
  return file;
}

function parseArgs(): { names: string[]; quick: boolean; outDir: string; keepLogs: boolean } {
  const known = Object.keys(BENCHMARKS);
  const program = new Command('bench')
    .description(`Runs VSP's benchmarks and writes their reports (default: all of ${known.join(', ')})`)
    .argument('[benchmarks...]', `which to run: ${known.join(', ')}`)
    .option('--quick', 'fewer runs and smaller sizes where a benchmark allows it (a smoke run)', false)
    .option('--out <dir>', 'folder for the reports', 'bench-results')
    .option('--keep-logs', "copy the clusters' logs to <out>/logs/<benchmark>/", false)
    .showHelpAfterError()
    .parse();
  const names = program.processedArgs[0] as string[];
  const unknown = names.filter((n) => !known.includes(n));
  if (unknown.length > 0)
    program.error(`unknown benchmark(s): ${unknown.join(', ')} (known: ${known.join(', ')})`);
  const opts = program.opts<{ quick: boolean; out: string; keepLogs: boolean }>();
  return {
    names: names.length > 0 ? known.filter((n) => names.includes(n)) : known,
    ...opts,
    outDir: opts.out,
  };
}

async function main(): Promise<number> {
  // The benchmarks' clients run here: tuned as the host worker and the CLI are.
  tuneHeapForStreaming();
  const { names, quick, outDir, keepLogs } = parseArgs();
  const workDir = mkdtempSync(path.join(os.tmpdir(), 'vsp-bench-'));
  // QEMU runs as its own unprivileged account and must reach the VM stores made in here.
  chmodSync(workDir, 0o711);
  // Every benchmark's temp folders (and its children's) land in workDir, which cleanUp removes, Ctrl-C too.
  process.env.TMPDIR = workDir;
  stopAllOnSignals(() => cleanUp(workDir));

  let temporal: TemporalDevServer | undefined;
  const ctx: RunContext = {
    quick,
    workDir,
    outDir,
    logsDir: keepLogs ? path.resolve(outDir, 'logs') : undefined,
    async temporalAddress() {
      temporal ??= await startTemporalDevServer({
        headless: true,
        logFile: path.join(workDir, 'temporal.log'),
      });
      return temporal.address;
    },
  };
  const failures = new Map<string, string>();
  try {
    for (const name of names) {
      log.info({ benchmark: name, quick }, 'benchmark starting');
      const monitor = new InterferenceMonitor();
      try {
        const report = await BENCHMARKS[name](ctx);
        const note = monitor.stop();
        await writeReport({ ...report, method: `${report.method} ${note}` }, outDir);
      } catch (err) {
        monitor.stop();
        failures.set(name, describeError(err));
        log.error({ benchmark: name, err: describeError(err) }, 'benchmark failed');
      }
    }
    const summary = await writeSummary(outDir, names, failures);
    process.stdout.write(`Summary: ${path.resolve(summary)}\n`);
  } finally {
    await temporal?.stop();
    await stopAll();
    await cleanUp(workDir);
  }
  return failures.size > 0 ? 1 : 0;
}

main().then(
  (code) => {
    process.exitCode = code;
  },
  (err: unknown) => {
    log.fatal({ err: describeError(err) }, 'benchmark run failed');
    process.exitCode = 1;
  },
);
