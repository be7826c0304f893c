import { promises as fs } from 'node:fs';
import path from 'node:path';
import { TaskClientError } from '../../client/taskClient';
import type { TaskSpecInput } from '../../spec/taskSpec';
import { drainUpdate, undrainUpdate } from '../../workflows/scheduling/definitions';
import { awaitAnswer, startPolling, summarizePolls } from '../support/httpPoller';
import { qemuHostsOf } from '../support/vmProcesses';
import { findVmId } from '../support/vmFolders';
import { SchedulerClient } from '../../client/schedulerClient';
import { until } from '../support/clusterFixture';
import { startNamespaceCluster, type NamespaceCluster } from '../support/namespaceCluster';
import { releaseTask, waitingCommand, waitingTaskDir } from '../support/releasedTasks';

/**
 * The scheduler on namespace test hosts (issue 12, Acceptance): two control workers, 40 submissions at
 * once on two hosts sized for 6 tasks each (1536 MiB, tasks of 256 MiB, memory not overcommitted): never
 * more than capacity in use (the hosts' VM stores, sampled every 200 ms), 12 running and 28 queued, each
 * queued task starting in queue order as one ends; a spec too big for any host refused at submission;
 * the scheduler's reservations intact across a control-worker kill (process-driver tasks). Then a host
 * drained under two QEMU VMs, one an HTTP service polled throughout: both move, then their disks (storage
 * evacuation), no request lost, the host left with no VM and no disk. Needs root.
 */
const HOSTS = ['a', 'b'];
const OWNER = 'alice';
const PER_HOST = 6;
const TASKS = 40;

let ns: NamespaceCluster;

beforeAll(async () => {
  ns = await startNamespaceCluster({
    hosts: HOSTS,
    prefix: 'vspsch-',
    subnet: '10.77.40',
    owners: [OWNER],
    hostEnv: { VSP_HOST_MEMORY_MIB: String(PER_HOST * 256), VSP_HOST_HEARTBEAT_SEC: '2' },
  });
  await ns.cluster.startControl();
}, 240_000);

afterAll(async () => {
  await ns?.stop();
}, 120_000);

/** VM folders per host now: a task's folder lives from stage-in to destroy, within its reservation. */
async function inUse(): Promise<Record<string, number>> {
  const out: Record<string, number> = {};
  for (const h of HOSTS)
    out[h] = (await fs.readdir(path.join(ns.cluster.storeDir(h), 'vms')).catch(() => [])).length;
  return out;
}

async function startedOn(marker: string): Promise<string | undefined> {
  for (const h of HOSTS) if (await waitingTaskDir(ns.cluster.storeDir(h), marker)) return h;
  return undefined;
}

test('40 tasks on 2 hosts for 6 each: 12 run, 28 queue, start in queue order, never over capacity', async () => {
  const { cluster, vsp } = ns;
  const scheduler = new SchedulerClient(ns.client);
  // The cluster is known to the scheduler before the burst (the hosts report within a heartbeat).
  await until('both hosts to report their inventory', async () => {
    const s = await scheduler.state({ fresh: true }).catch(() => undefined);
    return (
      s?.hosts.every((h) => h.state === 'ready' && h.capacity?.memoryMiB === PER_HOST * 256) || undefined
    );
  });

  // Too big for any host, even empty: refused before anything starts, saying what is missing.
  const refused = await cluster
    .submitTask(OWNER, { driver: 'process', command: 'true', memoryMiB: 4096 })
    .then(
      () => undefined,
      (e: unknown) => e,
    );
  expect(refused).toBeInstanceOf(TaskClientError);
  expect((refused as TaskClientError).status).toBe(400);
  expect((refused as Error).message).toMatch(
    /no host can ever run this task: a: .*memory short \(needs 4096, has 1536\)/,
  );

  let over: string | undefined;
  let sampling = true;
  const sampler = (async () => {
    while (sampling) {
      const now = await inUse();
      for (const h of HOSTS)
        if (now[h] > PER_HOST) over ??= `${h} held ${now[h]} VMs at ${new Date().toISOString()}`;
      await new Promise((r) => setTimeout(r, 200));
    }
  })();

  const markers = Array.from({ length: TASKS }, (_, i) => `vspsch-task-${i}`);
  const ids = (
    await Promise.all(
      markers.map((m) =>
        cluster.submitTask(OWNER, { driver: 'process', name: m, command: waitingCommand(m), memoryMiB: 256 }),
      ),
    )
  ).map((s) => s.taskId);
  const marker = new Map(ids.map((id, i) => [id, markers[i]]));

  const statuses = async () => Promise.all(ids.map((id) => vsp.status(id)));
  const all = await until('12 tasks to run and 28 to queue', async () => {
    const s = await statuses();
    const queued = s.filter((x) => x.phase === 'queued').length;
    const running = s.filter((x) => x.phase === 'running').length;
    return running === 2 * PER_HOST && queued === TASKS - 2 * PER_HOST ? s : undefined;
  });
  const queue = all
    .filter((s) => s.phase === 'queued')
    .sort((x, y) => (x.queue?.position ?? 0) - (y.queue?.position ?? 0));
  expect(queue.map((s) => s.queue?.position)).toEqual(Array.from({ length: 28 }, (_, i) => i + 1));
  expect(queue.every((s) => s.queue?.of === 28)).toBe(true);
  const running = all.filter((s) => s.phase === 'running');
  expect(HOSTS.map((h) => running.filter((s) => s.host === h).length)).toEqual([PER_HOST, PER_HOST]);

  // A control worker killed: the scheduler (a workflow) keeps every reservation and the queue.
  const before = await scheduler.state();
  await cluster.killControl();
  const after = await scheduler.state();
  expect(after.hosts.map((h) => [h.host, h.allocated, h.tasks.sort()])).toEqual(
    before.hosts.map((h) => [h.host, h.allocated, h.tasks.sort()]),
  );
  expect(after.queue.map((e) => e.request.taskId)).toEqual(queue.map((s) => s.taskId));

  // One ends, the head of the queue starts: in queue order, one by one.
  const startedOrder: string[] = [];
  let live = running.map((s) => s.taskId);
  for (const next of queue) {
    const done = live.shift() as string;
    await releaseTask(
      cluster.storeDir((await startedOn(marker.get(done) as string)) as string),
      marker.get(done) as string,
    );
    const host = await until(`queued task ${next.taskId} to start`, async () =>
      startedOn(marker.get(next.taskId) as string),
    );
    startedOrder.push(next.taskId);
    // Nobody behind it started before it.
    const behind = queue.slice(startedOrder.length).map((q) => marker.get(q.taskId) as string);
    expect(await Promise.all(behind.map(startedOn))).toEqual(behind.map(() => undefined));
    const s = await vsp.status(next.taskId);
    expect({ task: next.taskId, host: s.host }).toEqual({ task: next.taskId, host });
    live.push(next.taskId);
  }
  expect(startedOrder).toEqual(queue.map((s) => s.taskId));
  for (const id of live) {
    const m = marker.get(id) as string;
    await releaseTask(cluster.storeDir((await startedOn(m)) as string), m);
  }
  live = [];
  const results = await Promise.all(ids.map((id) => vsp.result(id)));
  expect(results.map((r) => r.exitCode)).toEqual(ids.map(() => 0));
  sampling = false;
  await sampler;
  expect(over).toBeUndefined();
  // Everything given back.
  const end = await scheduler.state();
  expect(end.hosts.map((h) => [h.host, h.allocated.memoryMiB, h.tasks])).toEqual(
    HOSTS.map((h) => [h, 0, []]),
  );
  expect(end.queue).toEqual([]);
}, 900_000);

test('drain: both VM tasks on a live-migrate to b, then their disks; no request lost; a holds no VM and no disk; undrain makes a eligible again', async () => {
  const { cluster, vsp } = ns;
  const scheduler = new SchedulerClient(ns.client);
  const vm = (over: Partial<TaskSpecInput>): TaskSpecInput => ({
    owner: OWNER,
    driver: 'qemu',
    host: 'a',
    memoryMiB: 128,
    command: 'echo idle-started; while [ ! -e release ]; do sleep 1; done',
    ...over,
  });
  const service = await cluster.submitTask(OWNER, {
    ...vm({
      ports: [8080],
      command: 'echo hello-service > index.html && exec busybox httpd -f -p 8080 -h .',
    }),
  });
  const idle = await cluster.submitTask(OWNER, vm({}));
  const ids = [service.taskId, idle.taskId];
  const running = await until(
    'both VM tasks running on a',
    async () => {
      const s = await Promise.all(ids.map((id) => vsp.status(id)));
      return s.every((x) => x.phase === 'running' && x.host === 'a') && s[0].address ? s : undefined;
    },
    300_000,
  );
  const url = `http://${running[0].address}:8080/index.html`;
  expect(await awaitAnswer(url, 180_000)).toBe('hello-service\n');
  const poller = startPolling(url);
  await poller.answers(40);

  const drainStart = Date.now();
  const order = await scheduler.update(drainUpdate, { host: 'a', maxParallel: 1 });
  expect(order.maxParallel).toBe(1);
  const drained = await until(
    'host a drained',
    async () => {
      const s = await scheduler.state({ fresh: true });
      return s.hosts.find((h) => h.host === 'a')?.state === 'drained' ? s : undefined;
    },
    300_000,
  );
  await poller.answers(40);
  const { requests, failed, perSecond } = summarizePolls(await poller.stop());
  process.stderr.write(
    `drain with a polled service (VMs and disks): ${Date.now() - drainStart} ms, requests=${requests} ` +
      `failed=${failed.length} rate=${perSecond.toFixed(1)}/s\n`,
  );
  expect(failed).toEqual([]);
  expect(perSecond).toBeGreaterThanOrEqual(10);
  expect(drained.hosts.find((h) => h.host === 'b')?.tasks.sort()).toEqual([...ids].sort());
  for (const id of ids) {
    const s = await vsp.status(id);
    // The drain also moved the disks (storage evacuation): a holds no VM and no disk.
    expect(s).toMatchObject({ phase: 'running', host: 'b', storageHost: 'b' });
    expect(s.migrations?.at(-1)).toMatchObject({ from: 'a', to: 'b', ok: true });
    expect(s.storageMoves?.at(-1)).toMatchObject({ from: 'a', to: 'b', ok: true });
    const vmId = await findVmId(
      HOSTS.map((h) => cluster.storeDir(h)),
      id,
    );
    // No VM runs on a any more.
    expect(await qemuHostsOf(vmId, Object.fromEntries(HOSTS.map((h) => [h, cluster.storeDir(h)])))).toEqual([
      'b',
    ]);
  }
  expect(drained.hosts.find((h) => h.host === 'a')?.storedTasks).toBeUndefined();
  expect(await fs.readdir(path.join(cluster.storeDir('a'), 'vms'))).toEqual([]);
  // Undrained, a takes tasks again.
  await scheduler.update(undrainUpdate, { host: 'a' });
  expect((await scheduler.state()).hosts.find((h) => h.host === 'a')?.state).toBe('ready');
  for (const id of ids) await vsp.cancel(id, 'test done');
  await Promise.all(ids.map((id) => vsp.result(id).catch(() => undefined)));
  const end = await scheduler.state();
  expect(end.hosts.map((h) => h.tasks)).toEqual([[], []]);
}, 900_000);
