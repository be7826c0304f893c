/**
 * The cluster tier's harness: tests in test/cluster/ run against real Xen dom0s (QEMU VMs on this
 * machine) that the tier's global setup (test/cluster/globalSetup.ts) brings up once per run and its
 * teardown removes; never start or stop dom0s from a test (fault tests may kill one: then say so, and
 * leave the rest to teardown).
 *
 * API (keep it small):
 *   clusterInventory()            the inventory (PLAN.md's contract, validated by deploy/cluster/inventory.ts
 *                                 as `vsp cluster deploy --inventory` reads it), with `cluster` filled in:
 *                                 Temporal at 10.77.30.254:7233 (started by the global setup, reachable
 *                                 from every dom0), the repository URL the tests serve at
 *                                 http://10.77.30.254:8420 and its service token file, driver 'xen'
 *   repositoryToken()             that service token (serve the tests' repository with it)
 *   inventoryFile()               the path of that inventory file
 *   onHost(host, command, opts?)  runs a shell command as root on dom0 `host` ('a', 'b', ...) over ssh2
 *                                 (deploy/cluster/sshSession.ts: key auth, host key pinned by the
 *                                 inventory; one connection per host and test file, closed after the file,
 *                                 reopened after a failure): { code, signal, stdout, stderr }; opts:
 *                                 timeoutMs (default 120 s), stdin
 *   onHostOk(host, command, opts?) the same; a non-zero exit throws (RemoteCommandError); its stdout
 *   hostTarget(host)              the SshTarget, for a test's own SshSession
 *   GATEWAY                       this machine's address on the cluster network
 *   deployCluster()               `vsp cluster deploy --inventory`; a failure carries the report
 *   ensureDeployed()              `vsp cluster deploy --inventory` once per run (host workers on the dom0s),
 *                                 then waits until the scheduler takes tasks on every host; markDeployed()
 *                                 records a deploy a test made itself
 *   ownerToken(owner)             a token of `owner` in the tier's repository (created on first use)
 *   submitTask(owner, spec)       submits a task as `owner` through the repository's task API; one the
 *                                 test leaves running is cancelled after it
 *   repo(owner)                   a RepositoryClient as `owner` (upload inputs, download results)
 *   vspClient()                   a VspClient on the tier's Temporal (status, migrate, result), closed
 *                                 after the file
 *   emulatorCrash(err, host, vmId) when `err` (a failed migration) says the guest died and the guest's
 *                                 console on `host` or the error shows nested virtualisation's fault
 *                                 (EMULATOR_CRASH), that reason; else undefined
 *   whileTaskRuns(task, what, check, timeoutMs)
 *                                 polls `check(the task's status)` until it yields; fails at once with the
 *                                 task's error if the task ends first (a test never waits out its timeout for a dead task)
 *
 * The global setup also runs the repository (on GATEWAY:8420, with the inventory's service token) and the
 * control worker on this machine; their logs and Temporal's are in the run folder (VSP_CLUSTER_RUN_DIR).
 *
 * Without the global setup (e.g. a developer's `npm run vm-cluster -- up` then
 * `npx jest --selectProjects cluster`), the inventory of the running `vspxen` cluster is used.
 */
import { spawn } from 'node:child_process';
import { existsSync, promises as fs } from 'node:fs';
import path from 'node:path';
import { Client, Connection } from '@temporalio/client';

import { TaskClient, type OwnerTaskSpec, type SubmittedTask } from '../../client/taskClient';
import { SchedulerClient } from '../../client/schedulerClient';
import { VspClient } from '../../client/vspClient';
import type { TaskStatus } from '../../workflows/definitions';

import { loadInventory, type Inventory } from '../../deploy/cluster/inventory';
import {
  RemoteCommandError,
  SshSession,
  type ExecOptions,
  type ExecResult,
  type SshTarget,
} from '../../deploy/cluster/sshSession';
import { ownerTokenIn } from '../../deploy/devcluster/localCluster';
import { repoRoot } from '../../deploy/devcluster/tools';
import { clusterConfig, inventoryFile as vmInventoryFile } from '../../deploy/vmcluster/config';
import { RepositoryClient } from '../../repository/client';
import { until } from '../support/clusterFixture';
import { describeError } from '../../logging/logger';
import { GUEST_DIED } from '../../drivers/xen/xenMigration';
import { sshTargets } from '../../deploy/vmcluster/ssh';
import { CLUSTER_INVENTORY_ENV, CLUSTER_RUN_DIR_ENV, CLUSTER_VSP_DIR_ENV, GATEWAY } from './suiteEnv';

export type { ExecResult, Inventory, SshTarget };
export { GATEWAY };

export function inventoryFile(): string {
  return process.env[CLUSTER_INVENTORY_ENV] ?? vmInventoryFile(clusterConfig());
}

let cached: { file: string; inventory: Inventory; targets: Record<string, SshTarget> } | undefined;

async function load(): Promise<NonNullable<typeof cached>> {
  const file = inventoryFile();
  if (cached?.file === file) return cached;
  const inventory = await loadInventory(file).catch((err: unknown) => {
    throw new Error(`no usable cluster inventory at ${file}: is the cluster up (npm run test:cluster)?`, {
      cause: err,
    });
  });
  cached = { file, inventory, targets: await sshTargets(inventory) };
  return cached;
}

export async function clusterInventory(): Promise<Inventory> {
  return (await load()).inventory;
}

export async function repositoryToken(): Promise<string> {
  const tokenFile = (await clusterInventory()).cluster?.repositoryTokenFile;
  if (!tokenFile) throw new Error(`the inventory ${inventoryFile()} has no cluster.repositoryTokenFile`);
  return (await fs.readFile(tokenFile, 'utf8')).split('\n')[0].trim();
}

export async function hostTarget(host: string): Promise<SshTarget> {
  const { inventory, targets } = await load();
  const t = targets[host];
  if (!t)
    throw new Error(
      `no host ${JSON.stringify(host)} in the cluster (hosts: ${inventory.hosts.map((h) => h.name).join(', ')})`,
    );
  return t;
}

/** One ssh session per host, opened on first use (a TCG dom0 takes seconds per key exchange). */
const sessions = new Map<string, Promise<SshSession>>();

function session(host: string): Promise<SshSession> {
  let s = sessions.get(host);
  if (!s) {
    s = hostTarget(host).then((t) => SshSession.connect(t));
    sessions.set(host, s);
    s.catch(() => sessions.delete(host));
  }
  return s;
}

export async function onHost(host: string, command: string, opts: ExecOptions = {}): Promise<ExecResult> {
  const s = await session(host);
  try {
    return await s.exec(command, opts);
  } catch (err) {
    // The command could not start or outlived its timeout: the connection may be dead (its host powered
    // off, say); the next call opens a new one.
    sessions.delete(host);
    s.close();
    throw err;
  }
}

export async function onHostOk(host: string, command: string, opts: ExecOptions = {}): Promise<string> {
  const s = await session(host);
  const r = await onHost(host, command, opts);
  if (r.code !== 0) throw new RemoteCommandError(s.target.name, command, r);
  return r.stdout;
}

function runEnv(name: string): string {
  const v = process.env[name];
  if (!v)
    throw new Error(
      `${name} is not set: run the cluster tier (npm run test:cluster), whose global setup sets it`,
    );
  return v;
}

/** `node dist/cli/vsp.js <args>`: exit code and output. */
export function vspCli(args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [path.join(repoRoot(), 'dist', 'cli', 'vsp.js'), ...args], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.once('error', reject);
    child.once('close', (code) => resolve({ code, stdout, stderr }));
  });
}

const deployedMarker = () => path.join(runEnv(CLUSTER_RUN_DIR_ENV), 'deployed');

/** Records that this run's inventory was deployed (by a test that ran `vsp cluster deploy` itself). */
export function markDeployed(): Promise<void> {
  return fs.writeFile(deployedMarker(), `${new Date().toISOString()}\n`);
}

/**
 * Deploys the run's inventory once per run (`vsp cluster deploy --inventory`, idempotent), so the dom0s run
 * host workers of this build, configured for this run's Temporal and repository, then waits until the
 * scheduler has every host's inventory and takes tasks there (a worker reports it with its first liveness
 * heartbeat, a moment after the deploy's check saw it poll). Returns the seconds the deploy took (0 when
 * this run deployed already).
 */
/** `vsp cluster deploy` of the tier's inventory; unless it exits 0, fails with its report and its log's end. */
export async function deployCluster(): Promise<{ stdout: string; stderr: string }> {
  const r = await vspCli(['cluster', 'deploy', '--inventory', inventoryFile()]);
  if (r.code !== 0)
    throw new Error(`vsp cluster deploy failed (exit ${r.code}):\n${r.stdout}\n${r.stderr.slice(-4000)}`);
  return r;
}

export async function ensureDeployed(): Promise<number> {
  let seconds = 0;
  if (!existsSync(deployedMarker())) {
    const t0 = Date.now();
    const r = await deployCluster();
    await markDeployed();
    seconds = (Date.now() - t0) / 1000;
    // The deploy's report (each host's steps and their times) belongs in the run's output.
    process.stderr.write(`vsp cluster deploy:\n${r.stdout}`);
  }
  const hosts = (await clusterInventory()).hosts.map((h) => h.name);
  const scheduler = new SchedulerClient((await temporalClient()).client);
  await until(
    `the scheduler to take tasks on ${hosts.join(', ')}`,
    async () => {
      const ready = (await scheduler.state({ fresh: true })).hosts.filter(
        (h) => h.state === 'ready' && h.inventory !== undefined,
      );
      return hosts.every((h) => ready.some((r) => r.host === h)) || undefined;
    },
    5 * 60_000,
  );
  return seconds;
}

export function ownerToken(owner: string): string {
  return ownerTokenIn(path.join(runEnv(CLUSTER_VSP_DIR_ENV), 'repository'), owner);
}

const tokens = new Map<string, string>();
const tokenOf = (owner: string) => {
  let t = tokens.get(owner);
  if (t === undefined) tokens.set(owner, (t = ownerToken(owner)));
  return t;
};

export async function submitTask(
  owner: string,
  spec: OwnerTaskSpec,
  opts: { taskId?: string } = {},
): Promise<SubmittedTask> {
  const url = (await clusterInventory()).cluster!.repositoryUrl;
  const submitted = await new TaskClient({ url, token: tokenOf(owner) }).submit(spec, opts);
  testTasks.push(submitted.taskId);
  return submitted;
}

/** The tasks the running test submitted: any it leaves running is cancelled after it (afterEach below). */
const testTasks: string[] = [];

export async function repo(owner: string): Promise<RepositoryClient> {
  return new RepositoryClient({
    url: (await clusterInventory()).cluster!.repositoryUrl,
    token: tokenOf(owner),
  });
}

let temporal: Promise<{ connection: Connection; client: Client }> | undefined;

function temporalClient(): Promise<{ connection: Connection; client: Client }> {
  temporal ??= clusterInventory().then(async (inv) => {
    const connection = await Connection.connect({ address: inv.cluster!.temporalAddress });
    return { connection, client: new Client({ connection, namespace: 'default' }) };
  });
  return temporal;
}

export async function vspClient(): Promise<VspClient> {
  return new VspClient((await temporalClient()).client);
}

/**
 * Xen in QEMU/TCG (Debian 12's QEMU 7.2 emulating nested SVM) with PVH guests: a guest often crashes as a
 * live migration starts tracking its dirty pages (its kernel faults on its own per-CPU data in interrupt
 * entry: "ENTRY_TRAMPOLINE stack guard page was hit"), and some boots triple-fault. The emulator's fault,
 * not the guest's or VSP's.
 */
const EMULATOR_CRASH = /ENTRY_TRAMPOLINE stack guard page was hit|triple-faulted/;

export async function emulatorCrash(err: unknown, host: string, vmId: string): Promise<string | undefined> {
  const why = describeError(err);
  if (!why.includes(GUEST_DIED)) return undefined;
  const console = (await onHost(host, `cat /var/lib/vsp/store/vms/${vmId}/console.log`)).stdout;
  return EMULATOR_CRASH.test(`${why}\n${console}`) ? why : undefined;
}

const ENDED = new Set(['completed', 'failed', 'cancelled']);

export async function whileTaskRuns<T>(
  taskId: string,
  what: string,
  check: (status: TaskStatus) => Promise<T | undefined>,
  timeoutMs: number,
): Promise<T> {
  const vsp = await vspClient();
  const r = await until(
    what,
    async (): Promise<{ value: T } | { ended: TaskStatus } | undefined> => {
      const st = await vsp.status(taskId);
      const value = await check(st).catch(() => undefined);
      if (value !== undefined && value !== false) return { value };
      return ENDED.has(st.phase) ? { ended: st } : undefined;
    },
    timeoutMs,
  );
  if ('ended' in r)
    throw new Error(
      `task ${taskId} ended (${r.ended.phase}) while waiting for ${what}: ${r.ended.error ?? 'no error recorded'}`,
    );
  return r.value;
}

// A test that failed (or was cut short) leaves its tasks running: cancelled here, so a retry does not share two
// dom0s on two cores with them. A passing test's tasks have ended: nothing to do.
afterEach(async () => {
  const ids = testTasks.splice(0);
  if (ids.length === 0) return;
  const vsp = await vspClient();
  for (const id of ids) {
    const st = await vsp.status(id).catch(() => undefined);
    if (!st || ENDED.has(st.phase)) continue;
    await vsp.cancel(id, 'its test ended').catch(() => undefined);
    await vsp.result(id).catch(() => undefined);
  }
}, 10 * 60_000);

// Each test file gets its own module instance: its sessions end with it.
afterAll(async () => {
  const t = temporal;
  temporal = undefined;
  if (t) await (await t).connection.close();
  const open = [...sessions.values()];
  sessions.clear();
  for (const s of await Promise.allSettled(open)) if (s.status === 'fulfilled') s.value.close();
});
