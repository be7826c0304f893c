import {
  MiB,
  type HostInventory,
  type HostState,
  type HostSummary,
  type PlacementRequest,
  type QueueEntry,
  type Reservation,
  type Resources,
  type SchedulerConfig,
  type SchedulerState,
} from './model';

/**
 * The scheduler's decisions as pure functions of its state: what a host can hold, whether a task fits,
 * which host it goes to, which queued tasks start when capacity frees. The workflow
 * (workflows/scheduler.ts) only applies them.
 */

const KINDS = ['vcpus', 'memoryMiB', 'diskMiB'] as const;
const UNITS: Record<(typeof KINDS)[number], string> = {
  vcpus: 'vCPUs',
  memoryMiB: 'MiB memory',
  diskMiB: 'MiB disk',
};

export const ZERO: Resources = { vcpus: 0, memoryMiB: 0, diskMiB: 0 };

export function add(a: Resources, b: Resources, sign = 1): Resources {
  return {
    vcpus: a.vcpus + sign * b.vcpus,
    memoryMiB: a.memoryMiB + sign * b.memoryMiB,
    diskMiB: a.diskMiB + sign * b.diskMiB,
  };
}

/** What a host may grant: its physical resources times the overcommit ratios. */
export function capacityOf(inv: HostInventory, config: SchedulerConfig): Resources {
  return {
    vcpus: Math.floor(inv.vcpus * config.cpuOvercommit),
    memoryMiB: Math.floor(inv.memoryMiB * config.memoryOvercommit),
    diskMiB: Math.floor((inv.storeTotalBytes / MiB) * config.diskOvercommit),
  };
}

/** What every host has granted: a migrating task counts on both of its hosts. */
export function allocations(reservations: Record<string, Reservation>): Map<string, Resources> {
  const out = new Map<string, Resources>();
  const charge = (host: string, r: Resources) => out.set(host, add(out.get(host) ?? ZERO, r));
  for (const r of Object.values(reservations)) {
    charge(r.host, r.resources);
    if (r.movingTo) charge(r.movingTo, r.resources);
  }
  return out;
}

/** The resources a missing amount is short of, as words ("2 vCPUs, 512 MiB memory"), or undefined. */
function shortfall(need: Resources, have: Resources): string | undefined {
  const missing = KINDS.filter((k) => need[k] > have[k]).map(
    (k) => `${need[k] - have[k]} ${UNITS[k]} short (needs ${need[k]}, has ${have[k]})`,
  );
  return missing.length ? missing.join(', ') : undefined;
}

/** Why the host can never run the task, whatever it holds (driver, constraints, size), or undefined. */
export function staticMismatch(
  req: PlacementRequest,
  inv: HostInventory,
  config: SchedulerConfig,
): string | undefined {
  if (req.host !== undefined && req.host !== inv.host) return `the task asks for host ${req.host}`;
  if (req.driver !== undefined ? !inv.drivers.includes(req.driver) : inv.defaultDriver === undefined)
    return req.driver !== undefined
      ? `no ${req.driver} driver (has ${inv.drivers.join(', ') || 'none'})`
      : 'no VM driver for a task that names none';
  const labels = Object.entries(req.labels).filter(([k, v]) => inv.labels[k] !== v);
  if (labels.length) return `labels ${labels.map(([k, v]) => `${k}=${v}`).join(', ')} not set`;
  const short = shortfall(req.resources, capacityOf(inv, config));
  return short && `too small even when empty: ${short}`;
}

export interface HostFit {
  host: string;
  capacity: Resources;
  allocated: Resources;
  inventory: HostInventory;
  /** The owners of the service tasks it holds, once per task (anti-affinity). */
  serviceOwners: string[];
}

/** Each host's service tasks' owners (a migrating one counts on both hosts). */
function serviceOwnersByHost(reservations: Record<string, Reservation>): Map<string, string[]> {
  const out = new Map<string, string[]>();
  for (const r of Object.values(reservations))
    if (r.service)
      for (const h of r.movingTo ? [r.host, r.movingTo] : [r.host])
        out.set(h, [...(out.get(h) ?? []), r.owner]);
  return out;
}

/** The hosts that may take new tasks now (live, reported, not draining), with what they hold. */
export function eligibleHosts(state: SchedulerState, allocated = allocations(state.reservations)): HostFit[] {
  const out: HostFit[] = [];
  const services = serviceOwnersByHost(state.reservations);
  for (const host of state.config.hosts) {
    const view = state.views[host];
    if (!view?.live || !view.inventory || state.drains[host]) continue;
    out.push({
      host,
      capacity: capacityOf(view.inventory, state.config),
      allocated: allocated.get(host) ?? ZERO,
      inventory: view.inventory,
      serviceOwners: services.get(host) ?? [],
    });
  }
  return out;
}

/** Why the task cannot go to this host now, or undefined when it can. */
export function fitProblem(req: PlacementRequest, h: HostFit, config: SchedulerConfig): string | undefined {
  if (req.exclude.includes(h.host)) return 'the task left it after it died';
  const mismatch = staticMismatch(req, h.inventory, config);
  if (mismatch) return mismatch;
  const short = shortfall(req.resources, add(h.capacity, h.allocated, -1));
  if (short) return `full: ${short}`;
  if (req.resources.diskMiB * MiB > h.inventory.storeFreeBytes)
    return `its store has ${Math.floor(h.inventory.storeFreeBytes / MiB)} MiB free, the task needs ${req.resources.diskMiB}`;
  return undefined;
}

/** Whether the host has the task's image cached (by the name the task gives it). */
export function hasImage(inv: HostInventory, image: string): boolean {
  return inv.cachedImages.some((i) => i.names.includes(image));
}

/** Whether anti-affinity keeps the task off the host: it holds another service task of the same owner. */
export function sharesService(
  req: Pick<PlacementRequest, 'owner' | 'service'>,
  h: HostFit,
  config: SchedulerConfig,
): boolean {
  return config.antiAffinity === true && req.service === true && h.serviceOwners.includes(req.owner);
}

/**
 * Higher is better. Spread: the most room left after the task (the mean free share of vCPUs and
 * memory); pack: the least. Locality adds one whole point, so a host with the image wins unless it is
 * the only difference in a tie of two equally full hosts. Anti-affinity takes two: a host holding
 * another service task of the owner is chosen only when no other has room.
 */
export function score(req: PlacementRequest, h: HostFit, config: SchedulerConfig): number {
  const after = add(h.allocated, req.resources);
  const share = (k: 'vcpus' | 'memoryMiB') => (h.capacity[k] > 0 ? 1 - after[k] / h.capacity[k] : 0);
  const free = (share('vcpus') + share('memoryMiB')) / 2;
  const base = config.policy === 'pack' ? 1 - free : free;
  return (
    base +
    (config.locality && hasImage(h.inventory, req.image) ? 1 : 0) -
    (sharesService(req, h, config) ? 2 : 0)
  );
}

export type Choice = { host: string } | { none: string };

/** The best host for the task among `hosts`, or why none fits (host by host). */
export function choose(req: PlacementRequest, hosts: HostFit[], config: SchedulerConfig): Choice {
  let best: { host: string; score: number } | undefined;
  const why: string[] = [];
  for (const h of hosts) {
    const problem = fitProblem(req, h, config);
    if (problem) {
      why.push(`${h.host}: ${problem}`);
      continue;
    }
    const s = score(req, h, config);
    if (!best || s > best.score || (s === best.score && h.host < best.host))
      best = { host: h.host, score: s };
  }
  if (best) return { host: best.host };
  return { none: why.length ? why.join('; ') : 'no live host that takes new tasks' };
}

/**
 * Why no host of the cluster could run the task even if it were empty (every reported host, live or
 * not: one that is down now may come back), or undefined when one could. The message says what is missing
 * on each host.
 */
export function neverFits(
  req: PlacementRequest,
  config: SchedulerConfig,
  reported: HostInventory[],
): string | undefined {
  if (req.host !== undefined && !config.hosts.includes(req.host))
    return `host '${req.host}' is not in the cluster (hosts: ${config.hosts.join(', ')})`;
  if (reported.length === 0) return undefined;
  const why: string[] = [];
  for (const inv of reported) {
    const mismatch = staticMismatch(req, inv, config);
    if (!mismatch) return undefined;
    why.push(`${inv.host}: ${mismatch}`);
  }
  return `no host can ever run this task: ${why.join('; ')}`;
}

/** The inventories the scheduler has of its hosts (live or not). */
export function reportedHosts(state: SchedulerState): HostInventory[] {
  return state.config.hosts.flatMap((h) => state.views[h]?.inventory ?? []);
}

/** Queue order: higher priority first, then arrival. */
export function byQueueOrder(a: QueueEntry, b: QueueEntry): number {
  return b.request.priority - a.request.priority || a.seq - b.seq;
}

/** Where a new entry goes in the ordered queue (binary search: the queue may hold thousands). */
export function insertionIndex(queue: QueueEntry[], entry: QueueEntry): number {
  let lo = 0;
  let hi = queue.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (byQueueOrder(queue[mid], entry) <= 0) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

export interface Grant {
  taskId: string;
  host: string;
}

/**
 * The queued tasks that start now, in queue order, each charged before the next is considered. A task
 * that fits nowhere keeps its place; a smaller one behind it may start meanwhile, unless `strict` (then
 * the queue stops at the first that does not fit, so a large task is never passed over).
 */
export function grantsFromQueue(state: SchedulerState, strict = false): Grant[] {
  const hosts = eligibleHosts(state);
  const grants: Grant[] = [];
  if (hosts.length === 0) return grants;
  // The most any one host has free, per resource: a task that needs more fits nowhere, found without
  // trying every host (a long queue behind a full cluster is passed over in one step per task).
  let roomiest = mostFree(hosts);
  for (const entry of state.queue) {
    const need = entry.request.resources;
    if (KINDS.some((k) => need[k] > roomiest[k])) {
      if (strict) break;
      continue;
    }
    const choice = choose(entry.request, hosts, state.config);
    if ('none' in choice) {
      if (strict) break;
      continue;
    }
    grants.push({ taskId: entry.request.taskId, host: choice.host });
    const h = hosts.find((x) => x.host === choice.host) as HostFit;
    h.allocated = add(h.allocated, entry.request.resources);
    roomiest = mostFree(hosts);
  }
  return grants;
}

function mostFree(hosts: HostFit[]): Resources {
  const out = { ...ZERO };
  for (const h of hosts) for (const k of KINDS) out[k] = Math.max(out[k], h.capacity[k] - h.allocated[k]);
  return out;
}

/** Every host's line: state, capacity, what is granted and free, its tasks. */
export function summarise(state: SchedulerState): HostSummary[] {
  const allocated = allocations(state.reservations);
  const tasks = new Map<string, string[]>();
  const stored = new Map<string, string[]>();
  for (const r of Object.values(state.reservations)) {
    for (const h of r.movingTo ? [r.host, r.movingTo] : [r.host])
      tasks.set(h, [...(tasks.get(h) ?? []), r.taskId]);
    if (r.storageHost && r.storageHost !== r.host)
      stored.set(r.storageHost, [...(stored.get(r.storageHost) ?? []), r.taskId]);
  }
  return state.config.hosts.map((host) => {
    const view = state.views[host];
    const inv = view?.inventory;
    const capacity = inv && capacityOf(inv, state.config);
    const alloc = allocated.get(host) ?? ZERO;
    const held = tasks.get(host) ?? [];
    const keeps = stored.get(host) ?? [];
    const drain = state.drains[host];
    const hostState: HostState = !view?.live
      ? 'down'
      : drain
        ? held.length || keeps.length
          ? 'draining'
          : 'drained'
        : 'ready';
    return {
      host,
      state: hostState,
      reason: view?.reason ?? 'not surveyed yet',
      ...(capacity ? { capacity, free: add(capacity, alloc, -1) } : {}),
      allocated: alloc,
      ...(inv ? { inventory: inv } : {}),
      ...(drain ? { drain } : {}),
      tasks: held,
      ...(keeps.length ? { storedTasks: keeps } : {}),
    };
  });
}
