import type { RebalanceConfig, Reservation, SchedulerState } from './model';
import { add, allocations, eligibleHosts, fitProblem, sharesService, type HostFit } from './placement';

export interface BalanceMove {
  taskId: string;
  from: string;
  to: string;
  /** How much the cluster score drops with this move (spread: unevenness; pack: hosts in use). */
  gain: number;
}

/**
 * Spread: how unevenly vCPUs and memory are used, the standard deviation of the hosts' used shares,
 * summed over both (0 when every host is equally full).
 */
export function spreadScore(hosts: HostFit[]): number {
  if (hosts.length < 2) return 0;
  let total = 0;
  for (const k of ['vcpus', 'memoryMiB'] as const) {
    const shares = hosts.map((h) => (h.capacity[k] > 0 ? h.allocated[k] / h.capacity[k] : 0));
    const mean = shares.reduce((a, b) => a + b, 0) / shares.length;
    total += Math.sqrt(shares.reduce((a, s) => a + (s - mean) ** 2, 0) / shares.length);
  }
  return total;
}

/** A VM task not moving already and free to go anywhere (a task that asked for its host stays there). */
const movable = (r: Reservation) =>
  !r.movingTo && !r.pinned && r.driver !== undefined && r.driver !== 'process';

/**
 * The live migrations that make the cluster's score better, one at a time, each computed on the cluster
 * as the moves before it leave it (so the plan is the same from any midpoint): under spread, the move
 * that lowers the unevenness most, while it lowers it by more than `threshold`; under pack, emptying the
 * least used host into the others when they can hold all its VMs. VM tasks only, between live hosts
 * that take tasks, each target with room.
 */
export function planBalance(
  state: SchedulerState,
  opts: { threshold: number; maxMoves: number },
): BalanceMove[] {
  const hosts = eligibleHosts(state, allocations(state.reservations));
  const byHost = new Map(hosts.map((h) => [h.host, h]));
  const tasks = Object.values(state.reservations).filter((r) => movable(r) && byHost.has(r.host));
  const moves: BalanceMove[] = [];
  const apply = (r: Reservation, to: HostFit) => {
    const from = byHost.get(r.host) as HostFit;
    from.allocated = add(from.allocated, r.resources, -1);
    to.allocated = add(to.allocated, r.resources);
    if (r.service) {
      from.serviceOwners = without(from.serviceOwners, r.owner);
      to.serviceOwners = [...to.serviceOwners, r.owner];
    }
    r.host = to.host;
  };
  const fits = (r: Reservation, to: HostFit) =>
    to.host !== r.host &&
    !sharesService(r, to, state.config) &&
    !fitProblem(
      {
        taskId: r.taskId,
        owner: r.owner,
        resources: r.resources,
        driver: r.driver,
        labels: r.labels ?? {},
        priority: 0,
        image: '',
        exclude: [],
      },
      to,
      state.config,
    );
  const work = tasks.map((r) => ({ ...r }));
  if (state.config.policy === 'pack') {
    const used = hosts.filter((h) => work.some((r) => r.host === h.host));
    const victim = [...used].sort(
      (a, b) => a.allocated.memoryMiB - b.allocated.memoryMiB || a.host.localeCompare(b.host),
    )[0];
    if (!victim || used.length < 2) return moves;
    const leaving = work.filter((r) => r.host === victim.host);
    // Everything on the host must be movable, or emptying it gains nothing.
    const others = Object.values(state.reservations).filter((r) => r.host === victim.host);
    if (others.length !== leaving.length) return moves;
    for (const r of leaving) {
      const to = used.filter((h) => h !== victim).find((h) => fits(r, h));
      if (!to) return [];
      moves.push({ taskId: r.taskId, from: victim.host, to: to.host, gain: 0 });
      apply(r, to);
    }
    // The host is free once its last VM has left: that move carries the gain (one host fewer in use).
    if (moves.length) moves[moves.length - 1].gain = 1;
    return moves.length <= opts.maxMoves ? moves : [];
  }
  while (moves.length < opts.maxMoves) {
    const before = spreadScore(hosts);
    let best: { r: Reservation; to: HostFit; gain: number } | undefined;
    for (const r of work)
      for (const to of hosts) {
        if (!fits(r, to)) continue;
        const from = byHost.get(r.host) as HostFit;
        apply(r, to);
        const gain = before - spreadScore(hosts);
        apply(r, from);
        if (gain > opts.threshold && (!best || gain > best.gain)) best = { r, to, gain };
      }
    if (!best) break;
    moves.push({
      taskId: best.r.taskId,
      from: best.r.host,
      to: best.to.host,
      gain: Number(best.gain.toFixed(4)),
    });
    apply(best.r, best.to);
  }
  return moves;
}

/** A task whose rebalancing move failed this many times stays where it is. */
export const REBALANCE_ATTEMPTS = 3;

/**
 * The moves a rebalancing round starts now: up to `maxInFlight` less those under way, each the first of
 * the plan (planBalance) on the cluster as the moves before it, and those under way, will leave it. A
 * task under way or that failed REBALANCE_ATTEMPTS times is not moved.
 */
export function nextBalanceMoves(state: SchedulerState, cfg: RebalanceConfig): BalanceMove[] {
  const inFlight = state.balance?.inFlight ?? {};
  const failures = state.balance?.failures ?? {};
  const room = cfg.maxInFlight - Object.keys(inFlight).length;
  const reservations: Record<string, Reservation> = {};
  for (const r of Object.values(state.reservations)) {
    const to = inFlight[r.taskId];
    reservations[r.taskId] = to
      ? { ...r, host: to, movingTo: undefined, pinned: true }
      : (failures[r.taskId] ?? 0) >= REBALANCE_ATTEMPTS
        ? { ...r, pinned: true }
        : r;
  }
  const moves: BalanceMove[] = [];
  while (moves.length < room) {
    const [next] = planBalance({ ...state, reservations }, { threshold: cfg.threshold, maxMoves: 100 });
    if (!next) break;
    moves.push(next);
    reservations[next.taskId] = { ...reservations[next.taskId], host: next.to, pinned: true };
  }
  return moves;
}

/** The list without one occurrence of `item`. */
function without(list: string[], item: string): string[] {
  const i = list.indexOf(item);
  return i < 0 ? list : [...list.slice(0, i), ...list.slice(i + 1)];
}
