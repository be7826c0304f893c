import { createHash, randomBytes } from 'node:crypto';
import { appendFileSync, mkdirSync, promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { ApplicationFailure, Client, Connection } from '@temporalio/client';
import { heldFile, holdFile, type HoldPoint } from '../../deploy/devcluster/faultHoldFiles';
import { LocalCluster, type LocalClusterOptions } from '../../deploy/devcluster/localCluster';
import { listProcesses, readEnvVar } from '../../deploy/devcluster/procTable';
import { startTemporalDevServer, type TemporalDevServer } from '../../deploy/devcluster/temporal';
import { VspClient } from '../../client/vspClient';
import { RepositoryClient } from '../../repository/client';
import { CONTROL_TASK_QUEUE } from '../../config/names';
import { grantTask } from '../../repository/tasks/taskAdmission';
import type { TaskTuning } from '../../spec/taskInput';
import type { TaskSpecInput } from '../../spec/taskSpec';
import type { TaskPhase, TaskStatus } from '../../workflows/definitions';
import { testLogDir } from './testRun';
import { vmFolderOf } from './vmFolders';

/**
 * The fault suite's cluster (test/faults/): its own Temporal dev server on a SQLite file (so that it can be
 * stopped and started with its state), a repository, a control worker and host workers with the activity
 * holds preloaded (deploy/devcluster/faultHolds.ts), each of which a test can kill and start again.
 */
export const OWNER = 'alice';
/** What a task's command prints once it runs. */
const STARTED = 'VSP-FAULT-STARTED';

export const sha256 = (b: Buffer | string): string => createHash('sha256').update(b).digest('hex');

/** Phases in the order a task passes them; a phase the workflow may add between two shares the first's rank. */
const PHASE_RANK: Record<string, number> = {
  validating: 0,
  placing: 1,
  'staging-in': 2,
  creating: 3,
  starting: 4,
  running: 5,
  'staging-out': 6,
  'awaiting-repository': 6,
  destroying: 7,
  completed: 8,
  failed: 8,
  cancelled: 8,
};

/** True once a task in `phase` has gone past `than`. */
export function isPast(phase: string, than: TaskPhase): boolean {
  return (PHASE_RANK[phase] ?? -1) > PHASE_RANK[than];
}

export interface FaultClusterOptions {
  hosts: string[];
  /** VSP_DRIVERS of every host (default: process). */
  drivers?: string[];
  hostEnv?: NodeJS.ProcessEnv;
  controlEnv?: NodeJS.ProcessEnv;
}

/** A hold on one activity of one task, made before the activity runs (faultHoldFiles.ts). */
export interface Hold {
  /** Resolves once a worker holds the activity there, with that worker's pid and the attempt. */
  held(timeoutMs?: number): Promise<{ pid: number; attempt: number }>;
  release(): Promise<void>;
}

export class FaultCluster {
  readonly cluster: LocalCluster;
  temporalServer!: TemporalDevServer;
  private connection!: Connection;
  temporal!: Client;
  vsp!: VspClient;
  private temporalPort = 0;

  private constructor(
    readonly dir: string,
    private readonly opts: FaultClusterOptions,
  ) {
    const local: LocalClusterOptions = {
      temporalAddress: '',
      hosts: opts.hosts,
      baseDir: path.join(dir, 'cluster'),
      owners: [OWNER],
      drivers: opts.drivers,
      hostEnv: opts.hostEnv,
      controlEnv: opts.controlEnv,
      faultDir: this.faultDir,
    };
    this.cluster = new LocalCluster(local);
  }

  static async start(opts: FaultClusterOptions): Promise<FaultCluster> {
    const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-faults-'));
    const fc = new FaultCluster(dir, opts);
    try {
      await fs.mkdir(fc.cluster.opts.baseDir);
      // QEMU's unprivileged account reaches the host stores through these folders, nothing else in them.
      if (opts.drivers?.includes('qemu')) await fs.chmod(dir, 0o711);
      await fs.mkdir(fc.faultDir, { recursive: true });
      await fc.startTemporal();
      fc.connection = await Connection.connect({ address: fc.temporalServer.address });
      fc.temporal = new Client({ connection: fc.connection, namespace: 'default' });
      fc.vsp = new VspClient(fc.temporal);
      (fc.cluster.opts as { temporalAddress: string }).temporalAddress = fc.temporalServer.address;
      await fc.cluster.start();
      return fc;
    } catch (err) {
      await fc.stop().catch(() => undefined);
      throw err;
    }
  }

  get faultDir(): string {
    return path.join(this.dir, 'holds');
  }

  /** Starts the Temporal dev server, again on the same port and SQLite file after a stop. */
  async startTemporal(): Promise<void> {
    this.temporalServer = await startTemporalDevServer({
      headless: true,
      dbFile: path.join(this.dir, 'temporal.sqlite'),
      port: this.temporalPort || undefined,
      logFile: path.join(this.dir, 'temporal.log'),
    });
    this.temporalPort = Number(this.temporalServer.address.split(':').pop());
  }

  async stopTemporal(): Promise<void> {
    await this.temporalServer.stop();
  }

  repo(owner = OWNER): RepositoryClient {
    return new RepositoryClient({
      url: this.cluster.repositoryUrl,
      token: this.cluster.ownerTokens.get(owner) ?? 'none',
    });
  }

  /**
   * Submits a task of OWNER's through the repository's task API (the owners' front door), under a fresh
   * task id with that prefix; the process driver unless the spec names another.
   */
  async submit(prefix: string, spec: Omit<TaskSpecInput, 'owner'>): Promise<string> {
    const taskId = `${prefix}-${Date.now()}-${randomBytes(3).toString('hex')}`;
    await this.cluster.submitTask(OWNER, { driver: 'process', ...spec }, { taskId });
    return taskId;
  }

  /**
   * Submits a task as an operator would (`vsp task grant`, then the workflow started directly), which is
   * the one way to give the workflow other durations than its defaults (`tuning`).
   */
  async submitTuned(prefix: string, spec: Omit<TaskSpecInput, 'owner'>, tuning: TaskTuning): Promise<string> {
    const granted = await grantTask(this.cluster.repoDir, {
      owner: OWNER,
      spec: { driver: 'process', ...spec },
      taskId: `${prefix}-${Date.now()}-${randomBytes(3).toString('hex')}`,
    });
    await this.temporal.workflow.start('TaskLifecycle', {
      taskQueue: CONTROL_TASK_QUEUE,
      workflowId: granted.taskId,
      args: [{ ...granted.input, tuning }],
    });
    return granted.taskId;
  }

  /**
   * A task command that records each run, says it started (STARTED in its log), waits (unless `wait` is
   * false) for the test's release (a file `release` in its home: an isolated task sees nothing else of the
   * host) and then writes its name: every output present once proves it ran once.
   */
  taskCommand(name: string, wait = true): string {
    return [
      'mkdir -p out',
      'echo run >> out/runs.txt',
      `echo ${STARTED}`,
      ...(wait ? ['while [ ! -e release ]; do sleep 0.2; done'] : []),
      `echo '${name}' > out/id.txt`,
    ].join(' && ');
  }

  /** The task's VM folder, on whichever host holds it, or undefined when there is none (yet or any more). */
  async vmDir(taskId: string): Promise<string | undefined> {
    const stores = this.opts.hosts.map((h) => this.cluster.storeDir(h));
    const found = await vmFolderOf(stores, taskId);
    return found && path.join(found.storeDir, 'vms', found.vmId);
  }

  /** True once the task's command has started (its log says so). */
  async started(taskId: string): Promise<boolean> {
    const dir = await this.vmDir(taskId);
    const log = dir ? await fs.readFile(path.join(dir, 'task.log'), 'utf8').catch(() => '') : '';
    return log.includes(STARTED);
  }

  /** Waits for the task's command to start. */
  async untilStarted(taskId: string, timeoutMs = 120_000): Promise<void> {
    await poll(
      `${taskId} to start its command`,
      timeoutMs,
      async () => (await this.started(taskId)) || undefined,
    );
  }

  /** Lets a started task's command go on past its wait. */
  async release(taskId: string): Promise<void> {
    const dir = await this.vmDir(taskId);
    if (!dir) throw new Error(`task ${taskId} has no VM folder to release it in`);
    await fs.writeFile(path.join(dir, 'home', 'release'), '');
  }

  /** Holds `activity` of task `taskId` at `point` on whichever worker runs it, until released. */
  async hold(taskId: string, activity: string, point: HoldPoint): Promise<Hold> {
    const hold = holdFile(this.faultDir, taskId, activity, point);
    const held = heldFile(this.faultDir, taskId, activity, point);
    await fs.writeFile(hold, '');
    return {
      held: (timeoutMs = 60_000) =>
        poll(`${activity} of ${taskId} to be held ${point}`, timeoutMs, async () => {
          const text = await fs.readFile(held, 'utf8').catch(() => undefined);
          return text === undefined ? undefined : (JSON.parse(text) as { pid: number; attempt: number });
        }),
      release: () => fs.rm(hold, { force: true }),
    };
  }

  async status(taskId: string): Promise<TaskStatus> {
    return this.vsp.status(taskId);
  }

  /** Polls the task's status (every 100 ms) until `pred` holds; returns that status. */
  async untilStatus(
    taskId: string,
    what: string,
    pred: (s: TaskStatus) => boolean,
    timeoutMs = 120_000,
  ): Promise<TaskStatus> {
    return poll(`${taskId} ${what}`, timeoutMs, async () => {
      const s = await this.status(taskId).catch(() => undefined);
      return s && pred(s) ? s : undefined;
    });
  }

  /** Every file left in the hosts' stores (VM folders, temp files, downloads), as `host/relative path`. */
  async storeLeftovers(): Promise<string[]> {
    const left: string[] = [];
    for (const h of this.opts.hosts) {
      const root = this.cluster.storeDir(h);
      const entries = await fs.readdir(root, { recursive: true, withFileTypes: true }).catch(() => []);
      for (const e of entries) {
        const rel = path.relative(root, path.join(e.parentPath, e.name));
        // The store's own skeleton and the image cache (kept on purpose).
        if (e.isDirectory() && ['vms', 'images'].includes(rel)) continue;
        if (rel.startsWith(`images${path.sep}`)) continue;
        left.push(`${h}/${rel}`);
      }
    }
    return left.sort();
  }

  /** Processes still running a command that mentions `marker` (task processes left behind); quote names. */
  processesWith(marker: string): string[] {
    return listProcesses()
      .filter((p) => p.state !== 'Z' && p.cmdline.includes(marker) && p.pid !== process.pid)
      .map((p) => `${p.pid} ${p.cmdline}`);
  }

  /**
   * Task processes outlive their worker, as VMs do: a test that failed before their host reaped them
   * leaves them running. Kills every process group of a task of this cluster (its wrapper's VSP_VM_DIR).
   */
  private killTaskProcesses(): void {
    for (const p of listProcesses()) {
      if (!readEnvVar(p.pid, 'VSP_VM_DIR')?.startsWith(`${this.dir}/`)) continue;
      try {
        process.kill(-p.pgid, 'SIGKILL');
      } catch {
        // Already gone.
      }
    }
  }

  /** A file's bytes from the owner's repository space. */
  async download(repoPath: string, owner = OWNER): Promise<Buffer> {
    const dest = path.join(this.dir, `down-${randomBytes(6).toString('hex')}`);
    try {
      await this.repo(owner).download(owner, repoPath, dest);
      return await fs.readFile(dest);
    } finally {
      await fs.rm(dest, { force: true });
    }
  }

  async upload(repoPath: string, data: Buffer | string, owner = OWNER): Promise<void> {
    const src = path.join(this.dir, `up-${randomBytes(6).toString('hex')}`);
    await fs.writeFile(src, data);
    try {
      await this.repo(owner).upload(owner, repoPath, src);
    } finally {
      await fs.rm(src, { force: true });
    }
  }

  /** Every path under a results folder, relative to it, sorted. */
  async resultsListing(resultsPath: string): Promise<string[]> {
    const files = await this.repo().list(OWNER, `${resultsPath}/`);
    return files.map((f) => f.path.slice(resultsPath.length + 1)).sort();
  }

  async stop(): Promise<void> {
    await this.cluster.stop();
    this.killTaskProcesses();
    await this.connection?.close();
    await this.temporalServer?.stop();
    // The processes' logs outlive the cluster's folder: a hang seen once is read from them afterwards.
    const kept = path.join(testLogDir(), path.basename(this.dir));
    await fs.mkdir(kept, { recursive: true });
    await fs.cp(path.join(this.dir, 'cluster', 'logs'), kept, { recursive: true }).catch(() => undefined);
    await fs
      .copyFile(path.join(this.dir, 'temporal.log'), path.join(kept, 'temporal.log'))
      .catch(() => undefined);
    if (process.env.VSP_KEEP_TEST_DIRS !== '1')
      await fs.rm(this.dir, { recursive: true, force: true, maxRetries: 5 });
  }
}

/** The types of the ApplicationFailures in an error's chain of causes, outermost first. */
export function failureTypes(err: unknown): string[] {
  const types: string[] = [];
  for (let e: unknown = err; e instanceof Error; e = e.cause)
    if (e instanceof ApplicationFailure && e.type) types.push(e.type);
  return types;
}

/** Polls `fn` every 100 ms until it returns a value (a throw counts as "not yet"). */
export async function poll<T>(what: string, timeoutMs: number, fn: () => Promise<T | undefined>): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let lastError: unknown;
  for (;;) {
    try {
      const v = await fn();
      if (v !== undefined) return v;
    } catch (err) {
      lastError = err;
    }
    if (Date.now() > deadline)
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`, { cause: lastError });
    await sleep(100);
  }
}

/** Records a figure the issue asks for: on stderr, and as a JSON line in this run's fault-figures.jsonl. */
export function recordFigure(name: string, value: number | string, unit = ''): void {
  mkdirSync(testLogDir(), { recursive: true });
  const line = JSON.stringify({ name, value, unit, at: new Date().toISOString() });
  appendFileSync(path.join(testLogDir(), 'fault-figures.jsonl'), `${line}\n`);
  process.stderr.write(`fault figure: ${name} = ${value}${unit ? ` ${unit}` : ''}\n`);
}
