import {
  allHandlersFinished,
  condition,
  continueAsNew,
  getExternalWorkflowHandle,
  log,
  patched,
  proxyActivities,
  setHandler,
  workflowInfo,
} from '@temporalio/workflow';
import type { ControlActivities } from '../activities/control/createControlActivities';
import { CONTROL_TASK_QUEUE, SCHEDULER_WORKFLOW_ID } from '../config/names';
import { nextBalanceMoves } from '../scheduler/balance';
import { drainActions, storageHostOf } from '../scheduler/drain';
import {
  emptySchedulerState,
  type PlacementRequest,
  type QueueEntry,
  type Reservation,
  type SchedulerState,
} from '../scheduler/model';
import {
  allocations,
  choose,
  eligibleHosts,
  fitProblem,
  grantsFromQueue,
  insertionIndex,
  neverFits,
  reportedHosts,
  summarise,
} from '../scheduler/placement';
import {
  configureUpdate,
  drainUpdate,
  placementGrantedSignal,
  placeUpdate,
  queuePositionQuery,
  rebalanceSignal,
  refreshUpdate,
  releaseUpdate,
  reserveMoveUpdate,
  schedulerStateQuery,
  settleMoveUpdate,
  settleStorageUpdate,
  undrainUpdate,
  type SchedulerInput,
} from './scheduling/definitions';

const { surveyHosts } = proxyActivities<Pick<ControlActivities, 'surveyHosts'>>({
  taskQueue: CONTROL_TASK_QUEUE,
  startToCloseTimeout: '30s',
  retry: { initialInterval: '1s', maximumInterval: '10s' },
});

/** A drain's moves: one attempt each (the drain decides about another), bounded like a migration. */
const { migrateTask, localizeTask, cancelTask } = proxyActivities<
  Pick<ControlActivities, 'migrateTask' | 'localizeTask' | 'cancelTask'>
>({
  taskQueue: CONTROL_TASK_QUEUE,
  startToCloseTimeout: '25m',
  heartbeatTimeout: '30s',
  retry: { maximumAttempts: 1 },
});

const HISTORY_EVENT_LIMIT = 10_000;

/** Reservations and queue entries of task workflows that ended without releasing them are swept. */
export const SWEEP_PATCH = 'vsp-scheduler-sweep';
const SWEEP_EVERY_SEC = 600;

const { goneTasks } = proxyActivities<Pick<ControlActivities, 'goneTasks'>>({
  taskQueue: CONTROL_TASK_QUEUE,
  startToCloseTimeout: '2m',
  heartbeatTimeout: '30s',
  retry: { initialInterval: '1s', maximumInterval: '10s', maximumAttempts: 3 },
});

/** Placements decide on a survey younger than SURVEY_REUSE_MS instead of always surveying first. */
export const SURVEY_REUSE_PATCH = 'vsp-scheduler-survey-reuse';
const SURVEY_REUSE_MS = 2000;

/** A drain also moves the disks the host stores for VMs that run elsewhere (storage evacuation). */
export const EVACUATION_PATCH = 'vsp-drain-evacuates-storage';

/**
 * The cluster's one scheduler (id `vsp-scheduler`): the only place that grants capacity, so any number
 * of control workers never double-book a host. Each task reserves its vCPUs, memory and disk on a host
 * through the `place` update, or waits in the queue until capacity frees; `release` gives it back when
 * the VM is destroyed; `reserveMove`/`settleMove` carry it along a migration. Hosts' liveness and
 * inventory come from their heartbeats (surveyHosts). The decisions are pure functions
 * (scheduler/placement.ts); this workflow applies them, one update at a time, and continues as new
 * with its state when its history grows long.
 */
export async function Scheduler(input: SchedulerInput): Promise<void> {
  const s: SchedulerState = input.state ?? emptySchedulerState(input.config);
  let surveying: Promise<void> | undefined;
  // A rebalancing round the previous run left under way goes on at once.
  let kicked = s.balance?.active === true;

  /** The hosts' views, fresh (joins a survey under way rather than starting another). */
  const refresh = (): Promise<void> =>
    (surveying ??= surveyHosts(s.config.hosts)
      .then((views) => {
        for (const v of views) s.views[v.host] = v;
        s.surveyedAtMs = Date.now();
      })
      .finally(() => (surveying = undefined)));

  const now = () => new Date().toISOString();

  function reserve(req: PlacementRequest, host: string): void {
    const driver = req.driver ?? s.views[host]?.inventory?.defaultDriver;
    s.reservations[req.taskId] = {
      taskId: req.taskId,
      owner: req.owner,
      host,
      resources: req.resources,
      ...(driver ? { driver } : {}),
      since: now(),
      ...(req.host !== undefined ? { pinned: true } : {}),
      ...(Object.keys(req.labels).length ? { labels: req.labels } : {}),
      ...(req.service ? { service: true } : {}),
    };
  }

  /**
   * Starts the next rebalancing moves, one decision at a time on the cluster as the moves under way will
   * leave it, until `maxInFlight` are under way or no move gains enough (scheduler/balance.ts); each
   * move's end asks for the next. Moves are the tasks' own migrate updates (migrateTask), so each is in
   * the task's migration history, and a scheduler restarted midway plans again from its reservations.
   */
  function balanceStep(): void {
    const cfg = s.config.rebalance;
    const b = s.balance;
    if (!cfg || cfg.everySec <= 0 || !b) return;
    const moves = nextBalanceMoves(s, cfg);
    b.balanced = moves.length === 0 && Object.keys(b.inFlight).length === 0;
    for (const m of moves) {
      b.inFlight[m.taskId] = m.to;
      log.info('rebalancing: moving a task', { ...m });
      migrateTask({ taskId: m.taskId, to: m.to })
        .then(
          (outcome) => {
            if (outcome === 'moved') b.moved++;
          },
          (err: unknown) => {
            b.failed++;
            b.failures[m.taskId] = (b.failures[m.taskId] ?? 0) + 1;
            log.warn('rebalancing: a move failed', { ...m, error: String(err) });
          },
        )
        .finally(() => {
          delete b.inFlight[m.taskId];
          b.active = kicked = true;
        });
    }
  }

  /** Drain moves under way (migrations, disk moves): task -> the draining host it leaves. */
  const moving = new Map<string, string>();
  const cancelling = new Set<string>();

  /** One drain move; its end wakes the loop for the next. */
  function drainMove(taskId: string, from: string, what: 'VM' | 'disks', move: Promise<string>): void {
    moving.set(taskId, from);
    move
      .then(
        (outcome) => {
          log.info(`drain: task's ${what} asked to move`, { taskId, from, outcome });
          // A task not running yet is asked again at the loop's next round, not at once.
          if (outcome === 'moved') kicked = true;
        },
        (err: unknown) => {
          s.drainAttempts = { ...s.drainAttempts, [taskId]: (s.drainAttempts?.[taskId] ?? 0) + 1 };
          log.warn(`drain: task's ${what} could not move`, { taskId, from, error: String(err) });
          kicked = true;
        },
      )
      .finally(() => moving.delete(taskId));
  }

  /** Starts what the drains need now (drainActions). */
  function drainStep(): void {
    const actions = drainActions(s, moving, Date.now());
    for (const taskId of actions.migrate)
      drainMove(taskId, s.reservations[taskId].host, 'VM', migrateTask({ taskId }));
    // Histories from before storage evacuation issued no disk moves.
    if (actions.localize.length > 0 && patched(EVACUATION_PATCH))
      for (const taskId of actions.localize)
        drainMove(taskId, storageHostOf(s.reservations[taskId]), 'disks', localizeTask({ taskId }));
    for (const taskId of actions.cancel) {
      if (cancelling.has(taskId)) continue;
      cancelling.add(taskId);
      const host = s.reservations[taskId].host;
      cancelTask({ taskId, reason: `host ${host} was drained and its deadline passed` }).catch(
        (err: unknown) =>
          log.warn('drain: could not cancel a task past the deadline', { taskId, error: String(err) }),
      );
    }
  }

  function position(taskId: string) {
    const i = s.queue.findIndex((e) => e.request.taskId === taskId);
    if (i < 0) return undefined;
    const e = s.queue[i];
    return { position: i + 1, of: s.queue.length, since: e.since, why: e.why };
  }

  /** Starts the queued tasks that fit now; `self` is answered by its own update instead of a signal. */
  function grantQueued(self?: string): void {
    if (s.queue.length === 0) return;
    const grants = grantsFromQueue(s);
    if (grants.length === 0) return;
    const granted = new Map(grants.map((g) => [g.taskId, g.host]));
    const left: QueueEntry[] = [];
    for (const e of s.queue) {
      const host = granted.get(e.request.taskId);
      if (host === undefined) left.push(e);
      else {
        reserve(e.request, host);
        s.decisions++;
        if (e.request.taskId !== self) notify(e.request.taskId, host);
      }
    }
    s.queue = left;
    const others = grants.filter((g) => g.taskId !== self).length;
    if (others > 0) log.info('queued tasks granted', { grants: others, queued: s.queue.length });
  }

  /** Tells a queued task where it goes; a task that has gone meanwhile gives its grant back. */
  function notify(taskId: string, host: string): void {
    getExternalWorkflowHandle(taskId)
      .signal(placementGrantedSignal, { host })
      .catch((err: unknown) => {
        log.warn('a granted task is gone: its grant is released', { taskId, error: String(err) });
        if (s.reservations[taskId]?.host === host) delete s.reservations[taskId];
        kicked = true;
      });
  }

  setHandler(placeUpdate, async (req) => {
    const held = s.reservations[req.taskId];
    if (held && !req.exclude.includes(held.host)) return { host: held.host };
    // The host it held died under it: it is placed again, elsewhere.
    if (held) delete s.reservations[req.taskId];
    const waiting = position(req.taskId);
    if (waiting) return { queued: waiting };
    // A survey this young reads the same heartbeats (hosts beat every VSP_HOST_HEARTBEAT_SEC, 5 s):
    // the placement then completes in this one workflow task, with no survey activity before it.
    const fresh = Date.now() - s.surveyedAtMs < SURVEY_REUSE_MS && patched(SURVEY_REUSE_PATCH);
    if (!fresh) await refresh();
    // Asked again while the survey ran (a retried activity): the first answer stands.
    const again = s.reservations[req.taskId] ?? position(req.taskId);
    if (again) return 'host' in again ? { host: again.host } : { queued: again };
    s.decisions++;
    const never = neverFits(req, s.config, reportedHosts(s));
    if (never) return { refused: never };
    const entry: QueueEntry = { request: req, seq: s.seq++, since: now(), why: '' };
    // Behind those already waiting at its priority or higher: it starts now only if they can too.
    s.queue.splice(insertionIndex(s.queue, entry), 0, entry);
    grantQueued(req.taskId);
    const granted = s.reservations[req.taskId];
    if (granted) return { host: granted.host };
    const choice = choose(req, eligibleHosts(s), s.config);
    entry.why = 'none' in choice ? choice.none : 'tasks ahead of it in the queue';
    return { queued: position(req.taskId) as NonNullable<ReturnType<typeof position>> };
  });

  setHandler(releaseUpdate, ({ taskId }) => {
    delete s.reservations[taskId];
    s.queue = s.queue.filter((e) => e.request.taskId !== taskId);
    grantQueued();
  });

  setHandler(reserveMoveUpdate, async (req) => {
    await refresh();
    const r: Reservation = s.reservations[req.taskId] ?? {
      taskId: req.taskId,
      owner: req.owner,
      host: req.current,
      resources: req.resources,
      driver: req.driver,
      since: now(),
    };
    if (r.movingTo) return { refused: `task ${req.taskId} is already moving to ${r.movingTo}` };
    s.decisions++;
    const request: PlacementRequest = {
      taskId: req.taskId,
      owner: req.owner,
      resources: r.resources,
      driver: req.driver,
      labels: {},
      priority: 0,
      image: '',
      exclude: [req.current],
      ...(req.requested ? { host: req.requested } : {}),
    };
    const hosts = eligibleHosts(s);
    if (req.requested !== undefined) {
      if (!s.config.hosts.includes(req.requested))
        return {
          refused: `host '${req.requested}' is not in the cluster (hosts: ${s.config.hosts.join(', ')})`,
        };
      if (req.requested === req.current) return { refused: `the task already runs on host '${req.current}'` };
      const target = hosts.find((h) => h.host === req.requested);
      if (!target) {
        const view = s.views[req.requested];
        return {
          refused: s.drains[req.requested]
            ? `host '${req.requested}' is drained: it takes no tasks`
            : `host '${req.requested}' has no live worker: it cannot receive the VM (${view?.reason ?? 'never seen'})`,
        };
      }
      const problem = fitProblem(request, target, s.config);
      if (problem) return { refused: `host '${req.requested}' cannot take the task: ${problem}` };
    } else {
      const choice = choose(request, hosts, s.config);
      if ('none' in choice)
        return { refused: `no host other than '${req.current}' can take the task: ${choice.none}` };
      request.host = choice.host;
    }
    s.reservations[req.taskId] = { ...r, movingTo: request.host as string };
    return { host: request.host as string };
  });

  setHandler(settleMoveUpdate, ({ taskId, host }) => {
    const r = s.reservations[taskId];
    if (!r) return;
    // A migration moves the memory only: the disks stay where they were.
    const { movingTo: _settled, storageHost: _was, ...rest } = r;
    const storageHost = storageHostOf(r);
    s.reservations[taskId] = { ...rest, host, ...(storageHost !== host ? { storageHost } : {}) };
    grantQueued();
  });

  setHandler(settleStorageUpdate, ({ taskId, storageHost }) => {
    const r = s.reservations[taskId];
    if (!r) return;
    const { storageHost: _was, ...rest } = r;
    s.reservations[taskId] = { ...rest, ...(storageHost !== r.host ? { storageHost } : {}) };
    kicked = true;
  });

  setHandler(
    drainUpdate,
    (req) => {
      const order = {
        since: now(),
        maxParallel: req.maxParallel ?? 2,
        ...(req.deadlineSec !== undefined
          ? { deadline: new Date(Date.now() + req.deadlineSec * 1000).toISOString() }
          : {}),
      };
      s.drains[req.host] = order;
      kicked = true;
      log.info('host draining', { host: req.host, ...order });
      return order;
    },
    { validator: (req) => knownHost(req.host) },
  );

  setHandler(
    undrainUpdate,
    ({ host }) => {
      delete s.drains[host];
      grantQueued();
    },
    { validator: (req) => knownHost(req.host) },
  );

  setHandler(rebalanceSignal, () => {
    if (!s.config.rebalance?.everySec) return;
    s.balance ??= {
      rounds: 0,
      balanced: false,
      active: false,
      moved: 0,
      failed: 0,
      failures: {},
      inFlight: {},
    };
    s.balance.rounds++;
    s.balance.lastRoundAt = now();
    // Not known to be balanced until this round has looked.
    s.balance.balanced = false;
    s.balance.active = kicked = true;
  });

  setHandler(configureUpdate, (config) => {
    s.config = config;
    kicked = true;
    return s.config;
  });

  const snapshot = () => ({
    config: s.config,
    hosts: summarise(s),
    reservations: Object.values(s.reservations),
    queue: s.queue,
    ...(s.surveyedAtMs ? { surveyedAt: new Date(s.surveyedAtMs).toISOString() } : {}),
    decisions: s.decisions,
    ...(s.balance ? { balance: s.balance } : {}),
  });
  setHandler(schedulerStateQuery, snapshot);
  setHandler(refreshUpdate, async () => {
    await refresh();
    grantQueued();
    return snapshot();
  });
  setHandler(queuePositionQuery, (taskId) => position(taskId));

  function knownHost(host: unknown): void {
    if (typeof host !== 'string' || !s.config.hosts.includes(host))
      throw new Error(
        `host ${JSON.stringify(host)} is not in the cluster (hosts: ${s.config.hosts.join(', ')})`,
      );
  }

  const sweepEveryMs = (input.sweepEverySec ?? SWEEP_EVERY_SEC) * 1000;
  let sweptAtMs = Date.now();

  /**
   * Gives back what tasks hold whose workflows ended without releasing it (terminated, or lost): their
   * capacity would otherwise stay granted for good. A task that is moving is left for its move to settle.
   */
  async function sweep(): Promise<void> {
    sweptAtMs = Date.now();
    const held = [
      ...Object.values(s.reservations)
        .filter((r) => !r.movingTo)
        .map((r) => r.taskId),
      ...s.queue.map((e) => e.request.taskId),
    ];
    if (held.length === 0) return;
    const gone = await goneTasks(held).catch((err: unknown) => {
      log.warn('sweep: could not look at the tasks', { error: String(err) });
      return [];
    });
    if (gone.length === 0) return;
    const drop = new Set(gone);
    for (const id of gone) delete s.reservations[id];
    s.queue = s.queue.filter((e) => !drop.has(e.request.taskId));
    log.warn('sweep: released what ended tasks still held', { tasks: gone });
    grantQueued();
  }

  const limit = input.historyEventLimit ?? HISTORY_EVENT_LIMIT;
  const longHistory = () => workflowInfo().continueAsNewSuggested || workflowInfo().historyLength >= limit;
  while (!longHistory()) {
    // While tasks wait or hosts drain, hosts are looked at again now and then: one may have come up or
    // grown, a drain's deadline may have passed.
    const draining = Object.keys(s.drains).length > 0;
    const idleMs = Math.min(3_600_000, sweepEveryMs);
    await condition(() => kicked || longHistory(), s.queue.length || draining ? '15s' : idleMs);
    kicked = false;
    if (Date.now() - sweptAtMs >= sweepEveryMs && patched(SWEEP_PATCH)) await sweep();
    const rebalancing = s.balance?.active === true;
    if (s.balance) s.balance.active = false;
    if (s.queue.length === 0 && Object.keys(s.drains).length === 0 && !rebalancing) continue;
    await refresh();
    grantQueued();
    drainStep();
    if (rebalancing) balanceStep();
  }
  // The drain's and rebalancing's moves are this run's activities: they finish before the next run takes over.
  await condition(
    () => moving.size === 0 && Object.keys(s.balance?.inFlight ?? {}).length === 0 && allHandlersFinished(),
  );
  log.info('continuing as new', { historyLength: workflowInfo().historyLength, ...counts(s) });
  await continueAsNew<typeof Scheduler>({ ...input, config: s.config, state: s });
}

function counts(s: SchedulerState) {
  return {
    reservations: Object.keys(s.reservations).length,
    queued: s.queue.length,
    hosts: allocations(s.reservations).size,
  };
}

/**
 * One tick of the rebalancing Schedule (`vsp-rebalance`, created by the control worker when
 * VSP_SCHED_REBALANCE_EVERY_SEC is set): asks the scheduler for a round. The scheduler decides and moves;
 * a tick that finds no scheduler fails, and the next one tries again.
 */
export async function RebalanceTick(): Promise<void> {
  await getExternalWorkflowHandle(SCHEDULER_WORKFLOW_ID).signal(rebalanceSignal);
}
