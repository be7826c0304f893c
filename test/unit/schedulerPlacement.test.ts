import { nextBalanceMoves, planBalance, REBALANCE_ATTEMPTS } from '../../scheduler/balance';
import { drainActions, DRAIN_ATTEMPTS } from '../../scheduler/drain';
import {
  DEFAULT_SCHEDULER_CONFIG,
  MiB,
  type HostInventory,
  type PlacementRequest,
  type QueueEntry,
  type SchedulerState,
} from '../../scheduler/model';
import {
  allocations,
  choose,
  eligibleHosts,
  grantsFromQueue,
  insertionIndex,
  neverFits,
  reportedHosts,
  summarise,
} from '../../scheduler/placement';

/** The scheduler's pure decisions (scheduler/placement.ts): fit, scoring, queue order, refusals. */

function inventory(host: string, over: Partial<HostInventory> = {}): HostInventory {
  return {
    host,
    vcpus: 2,
    memoryMiB: 1536,
    storeTotalBytes: 100 * 1024 * MiB,
    storeFreeBytes: 90 * 1024 * MiB,
    drivers: ['qemu', 'process'],
    defaultDriver: 'qemu',
    accelerator: 'tcg',
    cachedImages: [],
    labels: {},
    workerStartedAt: '2026-01-01T00:00:00Z',
    reportedAt: '2026-01-01T00:00:00Z',
    ...over,
  };
}

function state(invs: HostInventory[], over: Partial<SchedulerState['config']> = {}): SchedulerState {
  return {
    config: { ...DEFAULT_SCHEDULER_CONFIG, hosts: invs.map((i) => i.host), ...over },
    views: Object.fromEntries(
      invs.map((i) => [i.host, { host: i.host, live: true, reason: 'live', inventory: i }]),
    ),
    surveyedAtMs: 1,
    drains: {},
    reservations: {},
    queue: [],
    seq: 0,
    decisions: 0,
  };
}

let n = 0;
function req(over: Partial<PlacementRequest> = {}): PlacementRequest {
  return {
    taskId: `t${n++}`,
    owner: 'alice',
    resources: { vcpus: 1, memoryMiB: 256, diskMiB: 320 },
    driver: 'process',
    labels: {},
    priority: 0,
    image: 'default',
    exclude: [],
    ...over,
  };
}

/** Places `r` like the workflow does: reserve on the chosen host. */
function place(s: SchedulerState, r: PlacementRequest): string | undefined {
  const c = choose(r, eligibleHosts(s), s.config);
  if ('none' in c) return undefined;
  s.reservations[r.taskId] = {
    taskId: r.taskId,
    owner: r.owner,
    host: c.host,
    resources: r.resources,
    since: '',
  };
  return c.host;
}

test('capacity: never more than the memory of a host (ratio 1.0), vCPUs overcommitted 4x', () => {
  const s = state([inventory('a'), inventory('b')]);
  const placed = Array.from({ length: 14 }, () => place(s, req()));
  expect(placed.filter((h) => h === 'a')).toHaveLength(6);
  expect(placed.filter((h) => h === 'b')).toHaveLength(6);
  expect(placed.slice(12)).toEqual([undefined, undefined]);
  const alloc = allocations(s.reservations);
  expect(alloc.get('a')).toEqual({ vcpus: 6, memoryMiB: 1536, diskMiB: 6 * 320 });
  // 4 vCPU tasks: 2 physical x 4.0 = 8 per host.
  const cpu = state([inventory('a', { memoryMiB: 64 * 1024 })]);
  const big = Array.from({ length: 3 }, () =>
    place(cpu, req({ resources: { vcpus: 4, memoryMiB: 256, diskMiB: 1 } })),
  );
  expect(big).toEqual(['a', 'a', undefined]);
});

test('spread alternates hosts; pack fills one before the next', () => {
  const spread = state([inventory('a'), inventory('b')]);
  expect([1, 2, 3, 4].map(() => place(spread, req()))).toEqual(['a', 'b', 'a', 'b']);
  const pack = state([inventory('a'), inventory('b')], { policy: 'pack' });
  expect([1, 2, 3, 4, 5, 6, 7].map(() => place(pack, req()))).toEqual(['a', 'a', 'a', 'a', 'a', 'a', 'b']);
});

test('locality: a host with the base image cached wins over an emptier one', () => {
  const s = state([
    inventory('a'),
    inventory('b', { cachedImages: [{ sha256: 'f'.repeat(64), names: ['base:debian'] }] }),
  ]);
  place(s, req());
  place(s, req({ host: 'b' }));
  place(s, req({ host: 'b' }));
  expect(place(s, req({ image: 'base:debian' }))).toBe('b');
  expect(place(s, req({ image: 'default' }))).toBe('a');
  s.config.locality = false;
  expect(place(s, req({ image: 'base:debian' }))).toBe('a');
});

test('constraints: host, labels, driver, excluded hosts, draining and down hosts', () => {
  const s = state([
    inventory('a', { labels: { zone: 'x' } }),
    inventory('b', { drivers: ['qemu'] }),
    inventory('c'),
  ]);
  expect(place(s, req({ labels: { zone: 'x' } }))).toBe('a');
  expect(place(s, req({ host: 'c' }))).toBe('c');
  const c = choose(req({ driver: 'process', exclude: ['a', 'c'] }), eligibleHosts(s), s.config);
  expect(c).toEqual({
    none: expect.stringMatching(/a: the task left it.*b: no process driver.*c: the task left it/),
  });
  s.drains.a = { since: '', maxParallel: 2 };
  s.views.c.live = false;
  expect(eligibleHosts(s).map((h) => h.host)).toEqual(['b']);
  expect(summarise(s).map((h) => [h.host, h.state])).toEqual([
    ['a', 'draining'],
    ['b', 'ready'],
    ['c', 'down'],
  ]);
});

test('a task no host could hold even empty is refused, saying what each host is missing', () => {
  const s = state([inventory('a'), inventory('b', { labels: { gpu: 'yes' } })]);
  expect(neverFits(req(), s.config, reportedHosts(s))).toBeUndefined();
  const why = neverFits(
    req({ resources: { vcpus: 1, memoryMiB: 4096, diskMiB: 1 } }),
    s.config,
    reportedHosts(s),
  );
  expect(why).toMatch(/a: too small even when empty: 2560 MiB memory short \(needs 4096, has 1536\)/);
  expect(
    neverFits(
      req({ labels: { gpu: 'yes' }, resources: { vcpus: 9, memoryMiB: 1, diskMiB: 1 } }),
      s.config,
      reportedHosts(s),
    ),
  ).toMatch(/a: labels gpu=yes not set; b: too small even when empty: 1 vCPUs short/);
  expect(neverFits(req({ host: 'zz' }), s.config, reportedHosts(s))).toMatch(
    /host 'zz' is not in the cluster/,
  );
  // Full now is not never: a full host still counts as able.
  for (let i = 0; i < 12; i++) place(s, req());
  expect(neverFits(req(), s.config, reportedHosts(s))).toBeUndefined();
});

test('queue: priority first, FIFO within one; grants in that order as capacity frees', () => {
  const s = state([inventory('a', { memoryMiB: 512 })]);
  const entries: QueueEntry[] = [];
  const add = (priority: number) => {
    const e: QueueEntry = { request: req({ priority }), seq: s.seq++, since: '', why: '' };
    s.queue.splice(insertionIndex(s.queue, e), 0, e);
    entries.push(e);
  };
  [0, 0, 5, 0, -1, 5].forEach(add);
  expect(s.queue.map((e) => [e.request.priority, e.seq])).toEqual([
    [5, 2],
    [5, 5],
    [0, 0],
    [0, 1],
    [0, 3],
    [-1, 4],
  ]);
  expect(grantsFromQueue(s).map((g) => g.taskId)).toEqual(
    [s.queue[0], s.queue[1]].map((e) => e.request.taskId),
  );
});

test('a large task at the head does not block smaller ones, unless strict', () => {
  const s = state([inventory('a', { memoryMiB: 512 })]);
  place(s, req());
  s.queue = [
    { request: req({ resources: { vcpus: 1, memoryMiB: 512, diskMiB: 1 } }), seq: 0, since: '', why: '' },
    { request: req(), seq: 1, since: '', why: '' },
  ];
  expect(grantsFromQueue(s).map((g) => g.taskId)).toEqual([s.queue[1].request.taskId]);
  expect(grantsFromQueue(s, true)).toEqual([]);
});

test('a migrating task holds its resources on both hosts', () => {
  const s = state([inventory('a'), inventory('b')]);
  const r = req();
  place(s, r);
  s.reservations[r.taskId].movingTo = 'b';
  const alloc = allocations(s.reservations);
  expect(alloc.get('a')?.memoryMiB).toBe(256);
  expect(alloc.get('b')?.memoryMiB).toBe(256);
  expect(summarise(s).find((h) => h.host === 'b')?.tasks).toEqual([r.taskId]);
});

test('drain: VM tasks move at most maxParallel at once, each a bounded number of times; past the deadline the rest are cancelled', () => {
  const s = state([inventory('a'), inventory('b')]);
  const vms = [req(), req(), req()].map((r) => (place(s, { ...r, host: 'a' }), r.taskId));
  const proc = req({ host: 'a' });
  place(s, proc);
  for (const id of vms) s.reservations[id].driver = 'qemu';
  s.reservations[proc.taskId].driver = 'process';
  s.drains.a = { since: '', maxParallel: 2, deadline: new Date(1000).toISOString() };
  expect(drainActions(s, new Map(), 0)).toEqual({ migrate: vms.slice(0, 2), localize: [], cancel: [] });
  // One under way: one more may start.
  expect(drainActions(s, new Map([[vms[0], 'a']]), 0)).toEqual({
    migrate: [vms[1]],
    localize: [],
    cancel: [],
  });
  s.drainAttempts = { [vms[1]]: DRAIN_ATTEMPTS };
  expect(drainActions(s, new Map(), 0).migrate).toEqual([vms[0], vms[2]]);
  // Past the deadline: the process task and the VM that could not move are cancelled.
  expect(drainActions(s, new Map([[vms[0], 'a']]), 2000)).toEqual({
    migrate: [vms[2]],
    localize: [],
    cancel: [vms[1], proc.taskId],
  });
});

test('drain with storage evacuation: VMs that run elsewhere on disks of the draining host move them; drained once nothing is left', () => {
  const s = state([inventory('a'), inventory('b')]);
  const [here, away, other] = [req(), req(), req()].map((r) => (place(s, { ...r, host: 'a' }), r.taskId));
  for (const id of [here, away, other]) s.reservations[id].driver = 'qemu';
  // `away` migrated to b, memory only: its disks stay on a; `other` runs on b with its disks on b.
  Object.assign(s.reservations[away], { host: 'b', storageHost: 'a' });
  Object.assign(s.reservations[other], { host: 'b' });
  s.drains.a = { since: '', maxParallel: 2 };
  expect(drainActions(s, new Map(), 0)).toEqual({ migrate: [here], localize: [away], cancel: [] });
  // The disk move counts against maxParallel like a migration.
  expect(drainActions(s, new Map([[here, 'a']]), 0).localize).toEqual([away]);
  s.drains.a.maxParallel = 1;
  expect(drainActions(s, new Map([[here, 'a']]), 0).localize).toEqual([]);
  Object.assign(s.reservations[here], { host: 'b', storageHost: 'a' });
  expect(summarise(s).find((h) => h.host === 'a')).toMatchObject({
    state: 'draining',
    tasks: [],
    storedTasks: [here, away],
  });
  for (const id of [here, away]) delete s.reservations[id].storageHost;
  expect(summarise(s).find((h) => h.host === 'a')).toMatchObject({ state: 'drained', tasks: [] });
  expect(drainActions(s, new Map(), 0)).toEqual({ migrate: [], localize: [], cancel: [] });
});

test('balance (spread): from a host with 3 VMs to an empty one, then stable; pack empties the least used host', () => {
  const s = state([inventory('a'), inventory('b')]);
  const vms = [req(), req(), req()];
  for (const r of vms) {
    place(s, { ...r, host: 'a' });
    s.reservations[r.taskId].driver = 'qemu';
  }
  const plan = planBalance(s, { threshold: 0.01, maxMoves: 10 });
  expect(plan).toEqual([{ taskId: vms[0].taskId, from: 'a', to: 'b', gain: expect.any(Number) }]);
  expect(plan[0].gain).toBeGreaterThan(0.01);
  // Applied, the plan is empty: stable from any midpoint.
  s.reservations[vms[0].taskId].host = 'b';
  expect(planBalance(s, { threshold: 0.01, maxMoves: 10 })).toEqual([]);
  // Process tasks never move.
  s.reservations[vms[0].taskId].host = 'a';
  for (const r of vms) s.reservations[r.taskId].driver = 'process';
  expect(planBalance(s, { threshold: 0.01, maxMoves: 10 })).toEqual([]);

  const p = state([inventory('a'), inventory('b')], { policy: 'pack' });
  const [x, y, z] = [req(), req(), req()];
  for (const [r, h] of [
    [x, 'a'],
    [y, 'b'],
    [z, 'b'],
  ] as const) {
    place(p, { ...r, host: h });
    p.reservations[r.taskId].driver = 'qemu';
  }
  expect(planBalance(p, { threshold: 0, maxMoves: 10 })).toEqual([
    { taskId: x.taskId, from: 'a', to: 'b', gain: 1 },
  ]);
  expect(planBalance(p, { threshold: 0, maxMoves: 0 })).toEqual([]);
});

test('rebalancing rounds: at most maxInFlight under way, planned as the moves under way leave the cluster; pinned and failing tasks stay', () => {
  const s = state([inventory('a'), inventory('b'), inventory('c')]);
  const vms = [req(), req(), req(), req(), req(), req()];
  for (const r of vms) {
    place(s, { ...r, host: 'a' });
    s.reservations[r.taskId].driver = 'qemu';
  }
  const cfg = { everySec: 60, threshold: 0.01, maxInFlight: 2 };
  const first = nextBalanceMoves(s, cfg);
  expect(first.map((m) => [m.from, m.to])).toEqual([
    ['a', 'b'],
    ['a', 'c'],
  ]);
  // Both under way: nothing more starts; one done, the next is planned as if the other had landed.
  s.balance = {
    rounds: 1,
    balanced: false,
    active: true,
    moved: 0,
    failed: 0,
    failures: {},
    inFlight: Object.fromEntries(first.map((m) => [m.taskId, m.to])),
  };
  expect(nextBalanceMoves(s, cfg)).toEqual([]);
  s.reservations[first[0].taskId].host = 'b';
  delete s.balance.inFlight[first[0].taskId];
  const next = nextBalanceMoves(s, cfg);
  expect(next).toHaveLength(1);
  expect(next[0].from).toBe('a');
  // A task asked for its host stays; one that failed too often is left alone.
  for (const r of vms) if (r.taskId !== first[0].taskId) s.reservations[r.taskId].pinned = true;
  s.balance.inFlight = {};
  s.reservations[first[1].taskId].host = 'c';
  expect(nextBalanceMoves(s, cfg)).toEqual([]);
  s.reservations[vms[2].taskId].pinned = false;
  expect(nextBalanceMoves(s, cfg).map((m) => m.taskId)).toEqual([vms[2].taskId]);
  s.balance.failures[vms[2].taskId] = REBALANCE_ATTEMPTS;
  expect(nextBalanceMoves(s, cfg)).toEqual([]);
});

test("anti-affinity: an owner's service tasks go to different hosts while one has room, and rebalancing keeps them apart", () => {
  const s = state([inventory('a'), inventory('b')], { antiAffinity: true, policy: 'pack' });
  const svc = (owner: string) => req({ owner, service: true, driver: 'qemu' });
  const reserve = (r: PlacementRequest) => {
    const host = place(s, r) as string;
    Object.assign(s.reservations[r.taskId], { service: r.service, driver: 'qemu' });
    return host;
  };
  // Pack would put all on a; the second service of alice goes to b, bob's first to a again.
  expect(reserve(svc('alice'))).toBe('a');
  expect(reserve(svc('alice'))).toBe('b');
  expect(reserve(svc('bob'))).toBe('a');
  // Non-service tasks are not held apart.
  expect(reserve(req({ owner: 'alice', driver: 'qemu' }))).toBe('a');
  // A third service of alice: both hosts hold one, so anti-affinity cannot help; it still gets a place.
  expect(reserve(svc('alice'))).toBeDefined();
  // Pack would empty b into a, but that would put two of alice's services together.
  const t = state([inventory('a'), inventory('b')], { antiAffinity: true, policy: 'pack' });
  for (const [r, h] of [
    [svc('alice'), 'a'],
    [svc('alice'), 'b'],
  ] as const) {
    t.reservations[r.taskId] = {
      taskId: r.taskId,
      owner: r.owner,
      host: h,
      resources: r.resources,
      driver: 'qemu',
      service: true,
      since: '',
    };
  }
  expect(planBalance(t, { threshold: 0, maxMoves: 10 })).toEqual([]);
  t.config.antiAffinity = false;
  expect(planBalance(t, { threshold: 0, maxMoves: 10 })).toHaveLength(1);
});
