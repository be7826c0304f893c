import { ApplicationFailure } from '@temporalio/activity';
import { WorkflowNotFoundError, type Client } from '@temporalio/client';
import { temporal } from '@temporalio/proto';
import { hostLivenessWorkflowId, SEARCH_ATTRIBUTES } from '../../config/names';
import { createLogger } from '../../logging/logger';
import type { TaskSpec } from '../../spec/taskSpec';
import type { Placement } from '../types';

const log = createLogger('activities.control');

export interface ControlDeps {
  client: Client;
  hosts: string[];
  /** A host whose worker has not heartbeated for this long counts as down. */
  hostLivenessSec: number;
}

/** Whether a host's worker is alive now, from its heartbeat (workflows/hostLiveness.ts). */
export interface HostStatus {
  live: boolean;
  /** Unix ms of the host worker's last heartbeat seen by Temporal (undefined: never seen). */
  lastSeenMs?: number;
  /** Why the host counts as down, or what shows it is up. */
  reason: string;
  /**
   * Set when a live host missed heartbeats (its last is older than a third of the liveness period, which a
   * healthy worker's heartbeat period stays well within): the moment it counts as down unless seen again.
   */
  downAtMs?: number;
}

const toMs = (t: { seconds?: unknown; nanos?: number | null } | null | undefined): number | undefined =>
  t?.seconds == null ? undefined : Number(t.seconds) * 1000 + Math.floor((t.nanos ?? 0) / 1e6);

/**
 * Placement: the live host with the fewest running tasks. Liveness comes from each host worker's own
 * heartbeat (a pending activity of its liveness workflow, read with one describe() call): precise to
 * its period, unlike a task queue's pollers, which linger for minutes after a worker dies and go quiet
 * while a busy worker has no free slot. Load comes from visibility (running workflows whose VspHost is
 * the host), plus the placements this worker made in the last seconds, which visibility may not show yet.
 */
export function createControlActivities(deps: ControlDeps) {
  const recent = new Map<string, number[]>();
  const RECENT_MS = 15_000;

  async function hostStatus(host: string): Promise<HostStatus> {
    let pending;
    try {
      const d = await deps.client.workflow.getHandle(hostLivenessWorkflowId(host)).describe();
      if (d.status.name !== 'RUNNING')
        return { live: false, reason: `host ${host}'s liveness record is ${d.status.name.toLowerCase()}` };
      pending = d.raw.pendingActivities?.[0];
    } catch (err) {
      if (err instanceof WorkflowNotFoundError)
        return { live: false, reason: `host ${host} has no liveness record: its worker never started` };
      throw err;
    }
    const lastSeenMs = Math.max(
      toMs(pending?.lastHeartbeatTime) ?? 0,
      // A worker that has just picked the heartbeat up counts from then.
      pending?.state === temporal.api.enums.v1.PendingActivityState.PENDING_ACTIVITY_STATE_STARTED
        ? (toMs(pending.lastStartedTime) ?? 0)
        : 0,
    );
    if (lastSeenMs === 0) return { live: false, reason: `host ${host}'s worker has not heartbeated yet` };
    const ageSec = (Date.now() - lastSeenMs) / 1000;
    const seen = `last heartbeat ${ageSec.toFixed(1)} s ago (${new Date(lastSeenMs).toISOString()})`;
    const suspect = ageSec > deps.hostLivenessSec / 3;
    return ageSec <= deps.hostLivenessSec
      ? {
          live: true,
          lastSeenMs,
          reason: `host ${host} is live: ${seen}`,
          ...(suspect ? { downAtMs: lastSeenMs + deps.hostLivenessSec * 1000 } : {}),
        }
      : {
          live: false,
          lastSeenMs,
          reason: `host ${host} is down: ${seen}, more than the liveness limit of ${deps.hostLivenessSec} s`,
        };
  }

  async function isLive(host: string): Promise<boolean> {
    return (await hostStatus(host)).live;
  }

  async function load(host: string): Promise<number> {
    const { count } = await deps.client.workflow.count(
      `${SEARCH_ATTRIBUTES.host}="${host}" AND ExecutionStatus="Running"`,
    );
    const now = Date.now();
    const pending = (recent.get(host) ?? []).filter((t) => now - t < RECENT_MS);
    recent.set(host, pending);
    return count + pending.length;
  }

  return {
    /** Whether `host` is live now (the workflow's HostDown decision, and placement). */
    hostStatus,

    async placeTask(spec: TaskSpec): Promise<Placement> {
      if (spec.host && !deps.hosts.includes(spec.host))
        throw ApplicationFailure.nonRetryable(
          `host '${spec.host}' is not in the cluster (hosts: ${deps.hosts.join(', ')})`,
          'UnknownHost',
        );
      const candidates = spec.host ? [spec.host] : deps.hosts;
      const live = (
        await Promise.all(candidates.map(async (h) => ((await isLive(h)) ? h : undefined)))
      ).filter((h): h is string => h !== undefined);
      // Retryable: a host may come back; the workflow bounds the wait with the activity's timeout.
      if (live.length === 0)
        throw new Error(`no live host among ${candidates.join(', ')}: is a host worker running?`);
      const loads = await Promise.all(live.map(async (host) => ({ host, load: await load(host) })));
      loads.sort((a, b) => a.load - b.load || a.host.localeCompare(b.host));
      const chosen = loads[0];
      recent.set(chosen.host, [...(recent.get(chosen.host) ?? []), Date.now()]);
      log.info({ owner: spec.owner, ...chosen, candidates: loads }, 'task placed');
      return chosen;
    },

    /**
     * The host a running task's VM moves to: the one asked for, checked (in the cluster, not the current
     * host, live), or else the least-loaded live host other than the current one. Every refusal is
     * non-retryable and says why: the task keeps running where it is.
     */
    async chooseMigrationTarget(req: { current: string; requested?: string }): Promise<Placement> {
      const { current, requested } = req;
      if (requested !== undefined) {
        if (!deps.hosts.includes(requested))
          throw ApplicationFailure.nonRetryable(
            `host '${requested}' is not in the cluster (hosts: ${deps.hosts.join(', ')})`,
            'UnknownHost',
          );
        if (requested === current)
          throw ApplicationFailure.nonRetryable(`the task already runs on host '${requested}'`, 'SameHost');
        if (!(await isLive(requested)))
          throw ApplicationFailure.nonRetryable(
            `host '${requested}' has no live worker: it cannot receive the VM`,
            'HostDown',
          );
        return { host: requested, load: await load(requested) };
      }
      const others = deps.hosts.filter((h) => h !== current);
      const live = (await Promise.all(others.map(async (h) => ((await isLive(h)) ? h : undefined)))).filter(
        (h): h is string => h !== undefined,
      );
      if (live.length === 0)
        throw ApplicationFailure.nonRetryable(
          `no live host other than '${current}' to migrate to (cluster: ${deps.hosts.join(', ')})`,
          'NoMigrationTarget',
        );
      const loads = await Promise.all(live.map(async (host) => ({ host, load: await load(host) })));
      loads.sort((a, b) => a.load - b.load || a.host.localeCompare(b.host));
      log.info({ current, ...loads[0], candidates: loads }, 'migration target chosen');
      return loads[0];
    },

    /**
     * A task cancelled through its `cancel` update asks for its own workflow's cancellation here (a
     * workflow cannot request it of itself), so it ends CANCELED as with `temporal workflow cancel`.
     */
    async requestCancellation(req: { taskId: string; runId: string }): Promise<void> {
      await deps.client.workflow.getHandle(req.taskId, req.runId).cancel();
      log.info(req, 'task cancellation requested through its cancel update');
    },
  };
}

export type ControlActivities = ReturnType<typeof createControlActivities>;
