import { ApplicationFailure } from '@temporalio/activity';
import type { Client } from '@temporalio/client';
import { temporal } from '@temporalio/proto';
import { hostTaskQueue, SEARCH_ATTRIBUTES } from '../../config/names';
import { createLogger } from '../../logging/logger';
import type { TaskSpec } from '../../spec/taskSpec';
import type { Placement } from '../types';

const log = createLogger('activities.control');

export interface ControlDeps {
  client: Client;
  hosts: string[];
  /** A host whose queue saw no poll for this long counts as down. */
  hostLivenessSec: number;
}

/**
 * Placement: the live host with the fewest running tasks. Liveness comes from the pollers on the
 * host's own task queue; load from visibility (running workflows whose VspHost is the host), plus the
 * placements this worker made in the last seconds, which visibility may not show yet.
 */
export function createControlActivities(deps: ControlDeps) {
  const recent = new Map<string, number[]>();
  const RECENT_MS = 15_000;

  async function isLive(host: string): Promise<boolean> {
    const res = await deps.client.workflowService.describeTaskQueue({
      namespace: deps.client.options.namespace,
      taskQueue: {
        name: hostTaskQueue(host),
        kind: temporal.api.enums.v1.TaskQueueKind.TASK_QUEUE_KIND_NORMAL,
      },
      taskQueueType: temporal.api.enums.v1.TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY,
    });
    const cutoff = Date.now() - deps.hostLivenessSec * 1000;
    return (res.pollers ?? []).some((p) => Number(p.lastAccessTime?.seconds ?? 0) * 1000 >= cutoff);
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
