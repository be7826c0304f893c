import { createHash, randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { type Client, WorkflowUpdateFailedError } from '@temporalio/client';
import type { LocalCluster } from '../../deploy/devcluster/localCluster';
import type { VspClient } from '../../client/vspClient';
import { qmpCommand } from '../../drivers/qemu/qmp';
import type { RepositoryClient } from '../../repository/client';
import type { TaskSpecInput } from '../../spec/taskSpec';
import { type MigrateRequest, type TaskResult } from '../../workflows/definitions';
import { until } from '../support/clusterFixture';
import { startNamespaceCluster, type NamespaceCluster } from '../support/namespaceCluster';
import { hashRoundsCommand, releaseTask, waitingCommand } from '../support/releasedTasks';
import { findVmId } from '../support/vmFolders';
import { qemuHostsOf } from '../support/vmProcesses';

/**
 * Live migration through the TaskLifecycle workflow: three namespace test hosts (a, b, c), each with its
 * host worker and an nfs-ganesha export of its store, real QEMU under TCG, a Temporal dev server and the
 * repository on the namespaces' gateway. Every task starts on a, whose store keeps its disks. Needs root.
 */
const HOSTS = ['a', 'b', 'c'];
const OWNER = 'alice';
const MEMORY_MIB = 256;
const DATA = randomBytes(2 * 1024 * 1024);
const DATA_SHA = createHash('sha256').update(DATA).digest('hex');

let ns: NamespaceCluster;
let cluster: LocalCluster;
let client: Client;
let vsp: VspClient;
let baseDir: string;

beforeAll(async () => {
  ns = await startNamespaceCluster({ hosts: HOSTS, prefix: 'vspml-', subnet: '10.77.12', owners: [OWNER] });
  ({ cluster, client, vsp, baseDir } = ns);
  const f = path.join(baseDir, 'data.bin');
  await fs.writeFile(f, DATA);
  await repo().upload(OWNER, 'in/data.bin', f);
}, 240_000);

afterAll(async () => {
  await ns?.stop();
}, 120_000);

function repo(): RepositoryClient {
  return ns.repo(OWNER);
}

/**
 * A CPU-bound task on host a: hashes its input round after round, one line per round, until the test
 * releases it (the ACPI power button: the guest's stop script sends TERM, which the task takes as "finish
 * the round and exit 0"). No round count is a guess at how long a migration takes.
 */
function submitCpuTask(): Promise<{ taskId: string }> {
  const spec: TaskSpecInput = {
    owner: OWNER,
    driver: 'qemu',
    host: 'a',
    memoryMiB: MEMORY_MIB,
    timeLimitSec: 600,
    inputs: ['in/data.bin'],
    command: hashRoundsCommand('in/data.bin', { hashes: 3 }),
  };
  return cluster.submitTask(OWNER, spec);
}

const vmIdOf = (taskId: string) =>
  findVmId(
    HOSTS.map((h) => cluster.storeDir(h)),
    taskId,
  );

const vmDir = (host: string, vmId: string) => ns.vmDir(host, vmId);

/** Waits until the guest on `host` printed round `n` or later (each host's console starts at arrival). */
async function awaitRound(host: string, vmId: string, n: number): Promise<void> {
  await until(
    `round ${n} of ${vmId} on ${host}`,
    async () => {
      const text = await fs.readFile(path.join(vmDir(host, vmId), 'console.log'), 'utf8');
      const seen = [...text.matchAll(/^VSP-PROGRESS \d+ round (\d+)/gm)].map((m) => Number(m[1]));
      return seen.some((r) => r >= n) || undefined;
    },
    180_000,
  );
}

/** Releases a waiting CPU task where its VM runs now (see submitCpuTask), and returns its result. */
async function release(taskId: string): Promise<TaskResult> {
  const { host } = await vsp.status(taskId);
  const vmId = await vmIdOf(taskId);
  await qmpCommand(path.join(vmDir(host!, vmId), 'run', 'qmp.sock'), 'system_powerdown');
  return vsp.result(taskId);
}

function migrate(taskId: string, req: MigrateRequest) {
  return vsp.migrate(taskId, req);
}

/** The update's failure message, cause included. */
async function rejection(p: Promise<unknown>): Promise<string> {
  const err = await p.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(Error);
  const parts: string[] = [];
  for (let e: unknown = err; e instanceof Error; e = e.cause) parts.push(e.message);
  return parts.join(': ');
}

/** What QEMU on `host` opened as the VM's root disk. */
async function rootDiskOn(host: string, vmId: string): Promise<string> {
  const blocks = await qmpCommand<{ inserted?: { file: string } }[]>(
    path.join(vmDir(host, vmId), 'run', 'qmp.sock'),
    'query-block',
  );
  return blocks.find((b) => b.inserted)?.inserted?.file ?? '';
}

async function searchAttribute(taskId: string, name: string): Promise<unknown> {
  const d = await client.workflow.getHandle(taskId).describe();
  return d.typedSearchAttributes.getAll().find((p) => p.key.name === name)?.value;
}

/**
 * Completed with every round's hash right, wherever each round ran; nothing left on any host. Returns
 * how many rounds the task ran.
 */
async function expectCorrectResult(result: TaskResult, cleanHosts = HOSTS): Promise<number> {
  expect(result.exitCode).toBe(0);
  const f = path.join(baseDir, `rounds-${randomBytes(4).toString('hex')}`);
  await repo().download(OWNER, `${result.resultsPath}/outputs/rounds.txt`, f);
  const lines = (await fs.readFile(f, 'utf8')).trim().split('\n');
  expect(lines.length).toBeGreaterThan(0);
  expect(lines).toEqual(Array.from({ length: lines.length }, () => `${DATA_SHA}  in/data.bin`));
  for (const h of cleanHosts)
    expect(await fs.readdir(path.join(cluster.storeDir(h), 'vms')).catch(() => [])).toEqual([]);
  return lines.length;
}

/**
 * The task's console in the repository: one segment per host the VM ran on, in order, under its header
 * line, each also kept as its own file; the guest's progress rounds appear in every segment, each once
 * and in order across them (a host's segment repeated or missing would break the order or the count).
 */
async function expectWholeConsole(result: TaskResult, hosts: string[], rounds: number): Promise<void> {
  const text = async (file: string) => {
    const f = path.join(baseDir, `console-${randomBytes(4).toString('hex')}`);
    await repo().download(OWNER, `${result.resultsPath}/logs/${file}`, f);
    return fs.readFile(f, 'utf8');
  };
  const whole = await text('console.log');
  expect(result.logs.map((l) => l.path)).toContain(`${result.resultsPath}/logs/console.log`);
  const headers = [...whole.matchAll(/^=== host ([a-z]), (\S+) \.\. (\S+) ===$/gm)];
  // An unmigrated VM's console is its one host's, as it was.
  expect(headers.map((h) => h[1])).toEqual(hosts.length > 1 ? hosts : []);
  if (hosts.length > 1) expect(whole.startsWith(headers[0][0])).toBe(true);
  const roundsIn = (t: string) =>
    [...t.matchAll(/^VSP-PROGRESS \d+ round (\d+)\r?$/gm)].map((m) => Number(m[1]));
  const segments =
    hosts.length > 1 ? headers.map((h, i) => whole.slice(h.index + h[0].length, headers[i + 1]?.index)) : [];
  for (const [i, seg] of segments.entries()) {
    expect(roundsIn(seg).length).toBeGreaterThan(0);
    // Each host's own file holds its segment as it appears in the whole.
    expect((await text(`console-${i + 1}-${hosts[i]}.log`)).trim()).toBe(seg.trim());
  }
  expect(roundsIn(whole)).toEqual(Array.from({ length: rounds }, (_, i) => i + 1));
  expect(roundsIn(segments.at(-1) ?? whole).at(-1)).toBe(rounds);
}

function expectMemoryOnly(m: NonNullable<TaskResult['migrations']>[number]): void {
  expect(m.ok).toBe(true);
  expect(m.diskTransferredBytes).toBe(0);
  expect(m.ramTransferredBytes).toBeGreaterThan(0);
  // The disks (base image, overlay, 2 MiB input) are never sent: less than the guest's RAM goes over.
  expect(m.ramTransferredBytes).toBeLessThan(MEMORY_MIB * 1024 * 1024);
}

test('a CPU-bound task migrated a -> b halfway completes correctly; only RAM moved, b reads a over NFS', async () => {
  const { taskId } = await submitCpuTask();
  const vmId = await vmIdOf(taskId);
  await awaitRound('a', vmId, 3);
  const status = await migrate(taskId, { host: 'b' });
  expect(status).toMatchObject({ host: 'b', storageHost: 'a', phase: 'running' });
  expect(await searchAttribute(taskId, 'VspHost')).toBe('b');
  expect(await searchAttribute(taskId, 'VspStorageHost')).toBe('a');
  // On b the disks are a's, opened over NFS.
  expect(await rootDiskOn('b', vmId)).toMatch(
    new RegExp(`"driver": "nfs".*"path": "/vsp/vms/${vmId}/root.qcow2"`),
  );
  await awaitRound('b', vmId, 1);

  const result = await release(taskId);
  await expectWholeConsole(result, ['a', 'b'], await expectCorrectResult(result));
  expect(result).toMatchObject({ host: 'b', storageHost: 'a' });
  expect(result.migrations).toHaveLength(1);
  expect(result.migrations?.[0]).toMatchObject({ from: 'a', to: 'b', storageHost: 'a' });
  expectMemoryOnly(result.migrations![0]);
  process.stderr.write(
    `migration a->b: ${JSON.stringify(result.migrations)}; phases ${JSON.stringify(result.phaseMs)}\n`,
  );
}, 240_000);

test('a -> b -> c, and a -> (placement) -> a back home, both complete', async () => {
  const [roam, home] = await Promise.all([submitCpuTask(), submitCpuTask()]);
  const [roamVm, homeVm] = await Promise.all([vmIdOf(roam.taskId), vmIdOf(home.taskId)]);

  // The two tours run side by side; each task runs until released after its tour.
  const roamTour = async () => {
    await awaitRound('a', roamVm, 2);
    await migrate(roam.taskId, { host: 'b' });
    await awaitRound('b', roamVm, 1);
    expect(await migrate(roam.taskId, { host: 'c' })).toMatchObject({ host: 'c', storageHost: 'a' });
  };
  const homeTour = async () => {
    await awaitRound('a', homeVm, 2);
    // No host named: placement picks the least-loaded other live host.
    const moved = await migrate(home.taskId, {});
    expect(['b', 'c']).toContain(moved.host);
    await awaitRound(moved.host!, homeVm, 1);
    expect(await migrate(home.taskId, { host: 'a' })).toMatchObject({ host: 'a', storageHost: 'a' });
    // Back home the disks are local files again.
    expect(await rootDiskOn('a', homeVm)).toBe(path.join(vmDir('a', homeVm), 'root.qcow2'));
    return moved.host!;
  };
  const [, away] = await Promise.all([roamTour(), homeTour()]);

  // Each VM runs a round where it arrived before it is released.
  await Promise.all([awaitRound('c', roamVm, 1), awaitRound('a', homeVm, 1)]);
  const [r1, r2] = await Promise.all([release(roam.taskId), release(home.taskId)]);
  const [n1, n2] = [await expectCorrectResult(r1), await expectCorrectResult(r2)];
  expect(r1.migrations?.map((m) => `${m.from}->${m.to}`)).toEqual(['a->b', 'b->c']);
  expect(r2.migrations?.map((m) => `${m.from}->${m.to}`)).toEqual([`a->${away}`, `${away}->a`]);
  for (const m of [...r1.migrations!, ...r2.migrations!]) expectMemoryOnly(m);
  expect(r1).toMatchObject({ host: 'c', storageHost: 'a' });
  expect(r2).toMatchObject({ host: 'a', storageHost: 'a' });
  await expectWholeConsole(r1, ['a', 'b', 'c'], n1);
  await expectWholeConsole(r2, ['a', away, 'a'], n2);
  process.stderr.write(`migrations a->b->c ${JSON.stringify(r1.migrations)}\n`);
  process.stderr.write(`migrations a->x->a ${JSON.stringify(r2.migrations)}\n`);
}, 300_000);

test('bad migrate requests get clear errors and the task keeps running', async () => {
  const { taskId } = await cluster.submitTask(OWNER, {
    owner: OWNER,
    driver: 'process',
    host: 'a',
    command: waitingCommand('bad-migrate'),
  });
  // Still being placed or staged: not running yet.
  expect(await rejection(migrate(taskId, { host: 'b' }))).toMatch(/is not running \(it is [a-z-]+\)/);
  await until('the task running', async () => (await vsp.status(taskId)).phase === 'running' || undefined);

  expect(await rejection(migrate(taskId, { host: 'a' }))).toMatch(/already runs on host a/);
  expect(await rejection(migrate(taskId, { host: 'Not A Host' }))).toMatch(/"Not A Host" is not a host name/);
  expect(await rejection(migrate(taskId, { host: 'b', maxBandwidthMiBps: -1 }))).toMatch(
    /maxBandwidthMiBps must be a positive number/,
  );
  const unknown = migrate(taskId, { host: 'zz' });
  await expect(unknown).rejects.toBeInstanceOf(WorkflowUpdateFailedError);
  expect(await rejection(unknown)).toMatch(/host 'zz' is not in the cluster \(hosts: a, b, c\)/);
  expect(await rejection(migrate(taskId, { host: 'b' }))).toMatch(/driver 'process' cannot live-migrate/);

  const status = await vsp.status(taskId);
  expect(status).toMatchObject({ phase: 'running', host: 'a' });
  expect(status.migrations?.map((m) => m.ok)).toEqual([false, false]);
  await until('the task released', () =>
    releaseTask(cluster.storeDir('a'), 'bad-migrate').then(
      () => true,
      () => undefined,
    ),
  );
  const result = await vsp.result(taskId);
  expect(result).toMatchObject({ exitCode: 0, host: 'a' });
}, 120_000);

test('the target host dies mid-migration: the task carries on at the source, the failure is recorded', async () => {
  const { taskId } = await submitCpuTask();
  const vmId = await vmIdOf(taskId);
  await awaitRound('a', vmId, 1);
  // Throttled, so the transfer lasts long enough to be cut.
  const migrating = migrate(taskId, { host: 'c', maxBandwidthMiBps: 2 });
  const pid = await until('the incoming QEMU on c', async () => {
    const text = await fs.readFile(path.join(vmDir('c', vmId), 'qemu.pid'), 'utf8');
    return Number(text.trim()) > 1 ? Number(text.trim()) : undefined;
  });
  await until('the transfer under way', async () =>
    (await vsp.status(taskId)).migrating?.step === 'transferring' ? true : undefined,
  );
  expect(await rejection(migrate(taskId, { host: 'b' }))).toMatch(/already migrating to c/);
  // Host c dies: its worker and its QEMU.
  await cluster.killHost('c');
  process.kill(pid, 'SIGKILL');

  const why = await rejection(migrating);
  expect(why).toMatch(/could not migrate task .* from a to c: .*migration .*failed.*; it runs on a/);
  const status = await vsp.status(taskId);
  // The task waits for its release: it still runs at the source.
  expect(status).toMatchObject({ host: 'a', storageHost: 'a', phase: 'running' });
  expect(status.migrations).toEqual([expect.objectContaining({ from: 'a', to: 'c', ok: false })]);

  const result = await release(taskId);
  // c is dead: what it had prepared stays there until its operator clears it.
  await expectCorrectResult(result, ['a', 'b']);
  expect(result).toMatchObject({ exitCode: 0, host: 'a', storageHost: 'a' });
  const history = JSON.stringify((await client.workflow.getHandle(taskId).fetchHistory()).events);
  expect(history).toMatch(/MigrationFailed/);
}, 300_000);

/** Per poll: the hosts with a QEMU of the VM (process table) and those whose QEMU reports the guest running. */
interface CopySample {
  at: number;
  hosts: string[];
  running: string[];
  settled: boolean;
}

/** How long a settled migration may keep a second (not running) copy: 200 samples, a minute or more. */
const MAX_SETTLED_SAMPLES = 200;

/**
 * Samples where copies of the VM exist and which of them run, every 300 ms until stopped. A QEMU whose
 * QMP socket is held by its worker (one client at a time) counts as present with its state unknown.
 */
function watchCopies(vmId: string): { settle(samples: number): Promise<CopySample[]> } {
  const storeDirs = Object.fromEntries(HOSTS.map((h) => [h, cluster.storeDir(h)]));
  const samples: CopySample[] = [];
  let settled = false;
  let wanted = Infinity;
  // Settled samples from the first that shows one copy on: the source's paused copy may take a moment to go.
  const converged = () => {
    const after = samples.filter((s) => s.settled);
    const first = after.findIndex((s) => s.hosts.length === 1);
    return first < 0 ? 0 : after.length - first;
  };
  const loop = (async () => {
    while (converged() < wanted && samples.filter((s) => s.settled).length < MAX_SETTLED_SAMPLES) {
      const at = Date.now();
      const hosts = await qemuHostsOf(vmId, storeDirs);
      const states = await Promise.all(
        hosts.map((h) =>
          qmpCommand<{ status: string }>(
            path.join(vmDir(h, vmId), 'run', 'qmp.sock'),
            'query-status',
            undefined,
            1000,
          )
            .then((s) => s.status)
            .catch(() => 'unknown'),
        ),
      );
      samples.push({ at, hosts, running: hosts.filter((_, i) => states[i] === 'running'), settled });
      await new Promise((r) => setTimeout(r, 300));
    }
  })();
  return {
    // Once the migration settled, one copy must remain, and a number of samples (not a span of time) must
    // then show it alone.
    settle: async (n) => {
      settled = true;
      wanted = n;
      await loop;
      return samples;
    },
  };
}

test('the source worker restarts during migration: it completes or rolls back, never two running copies', async () => {
  const { taskId } = await submitCpuTask();
  const vmId = await vmIdOf(taskId);
  await awaitRound('a', vmId, 1);
  const copies = watchCopies(vmId);
  // Throttled to a few seconds, so that the worker dies while it sends (or is about to send) the memory. A
  // longer transfer would widen the window further but made the TCG guest crash after more migrations.
  const migrating = migrate(taskId, { host: 'b', maxBandwidthMiBps: 16 }).then(
    (s) => ({ ok: true as const, status: s }),
    (e: unknown) => ({ ok: false as const, error: e }),
  );
  await until('the transfer under way', async () =>
    (await vsp.status(taskId)).migrating?.step === 'transferring' ? true : undefined,
  );
  await cluster.killHost('a');
  await cluster.startHost('a');

  const outcome = await migrating;
  const samples = await copies.settle(10);
  const status = await vsp.status(taskId);
  const record = status.migrations?.at(-1);
  process.stderr.write(
    `source worker restart mid-migration: ${outcome.ok ? 'completed' : 'rolled back'}; ${JSON.stringify(record)}; ` +
      `copies seen: ${[...new Set(samples.map((s) => `${s.hosts.join('+')}(running: ${s.running.join('+') || '-'})`))].join(', ')}\n`,
  );
  // Never two running copies; at most the source and the incoming one; once the migration settled, the
  // copy that does not run goes, and one stays alone.
  for (const s of samples) {
    expect(s.running.length).toBeLessThanOrEqual(1);
    expect(s.hosts.filter((h) => h !== 'a' && h !== 'b')).toEqual([]);
    expect(s.hosts.filter((h) => h === 'a').length).toBeLessThanOrEqual(1);
  }
  const settled = samples.filter((s) => s.settled);
  const alone = settled.findIndex((s) => s.hosts.length === 1);
  expect(alone).toBeGreaterThanOrEqual(0);
  for (const s of settled.slice(alone)) expect(s.hosts).toHaveLength(1);
  // The worker died under migrateOut: its retry on the restarted worker is what settled the migration.
  const events = (await client.workflow.getHandle(taskId).fetchHistory()).events ?? [];
  const migrateOuts = new Set(
    events
      .filter((e) => e.activityTaskScheduledEventAttributes?.activityType?.name === 'migrateOut')
      .map((e) => String(e.eventId)),
  );
  const attempts = events
    .map((e) => e.activityTaskStartedEventAttributes)
    .filter((a) => a && migrateOuts.has(String(a.scheduledEventId)))
    .map((a) => a?.attempt ?? 0);
  expect(Math.max(0, ...attempts)).toBeGreaterThanOrEqual(2);
  const where = outcome.ok ? 'b' : 'a';
  expect(status).toMatchObject({ host: where, storageHost: 'a' });
  // The copy left alone is the one the status names; before that, any copy that runs is that one too.
  expect(settled.slice(alone).every((s) => s.hosts[0] === where)).toBe(true);
  expect(settled.slice(0, alone).every((s) => s.running.every((h) => h === where))).toBe(true);
  if (outcome.ok) {
    expect(record).toMatchObject({ from: 'a', to: 'b', ok: true, diskTransferredBytes: 0 });
  } else {
    expect(await rejection(Promise.reject(outcome.error))).toMatch(/could not migrate task .* from a to b/);
    expect(record).toMatchObject({ from: 'a', to: 'b', ok: false });
    // The incoming side is cleaned.
    expect(await fs.readdir(path.join(cluster.storeDir('b'), 'vms'))).toEqual([]);
  }

  const result = await release(taskId);
  expect(result).toMatchObject({ exitCode: 0, host: where, storageHost: 'a' });
  // c died in the test before; what it kept of that test's VM stays there.
  const rounds = await expectCorrectResult(result, ['a', 'b']);
  // The retried migrateOut still handed a's console on: nothing the guest printed there is lost.
  await expectWholeConsole(result, outcome.ok ? ['a', 'b'] : ['a'], rounds);
  expect(await qemuHostsOf(vmId, Object.fromEntries(HOSTS.map((h) => [h, cluster.storeDir(h)])))).toEqual([]);
}, 600_000);
