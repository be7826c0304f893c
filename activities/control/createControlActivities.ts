import { ApplicationFailure, Context } from '@temporalio/activity';
import { WorkflowNotFoundError, type Client } from '@temporalio/client';
import { decodeFromPayloadsAtIndex } from '@temporalio/common/lib/internal-non-workflow';
import { temporal } from '@temporalio/proto';
import { SchedulerClient } from '../../client/schedulerClient';
import { hostLivenessWorkflowId } from '../../config/names';
import { createLogger } from '../../logging/logger';
import { DEFAULT_SCHEDULER_CONFIG, type HostView, type SchedulerConfig } from '../../scheduler/model';
import { placementRequest, resourcesOf } from '../../scheduler/request';
import type { TaskSpec } from '../../spec/taskSpec';
import {
  placeUpdate,
  releaseUpdate,
  reserveMoveUpdate,
  settleMoveUpdate,
  settleStorageUpdate,
} from '../../workflows/scheduling/definitions';
import {
  cancelUpdate,
  localizeDisksUpdate,
  migrateUpdate,
  statusQuery,
  type TaskStatus,
} from '../../workflows/definitions';
import type { LivenessBeat } from '../host/hostLiveness';
import type { Placement } from '../types';

const log = createLogger('activities.control');

export interface ControlDeps {
  client: Client;
  hosts: string[];
  /** A host whose worker has not heartbeated for this long counts as down. */
  hostLivenessSec: number;
  /** The scheduler's configuration, which starts it if it does not run yet (default: the defaults). */
  scheduler?: SchedulerConfig;
  /** The cluster's default for moving a VM's disks after it migrates (spec `localizeDisksAfterMigration`). */
  localizeDisksAfterMigration?: boolean;
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
 * The control queue's activities. Liveness comes from each host worker's own heartbeat (a pending
 * activity of its liveness workflow, read with one describe() call): precise to its period, unlike a
 * task queue's pollers, which linger for minutes after a worker dies. The heartbeat also carries the
 * host's inventory. Placement is the scheduler workflow's (workflows/scheduler.ts): these activities
 * carry a task's requests to it, so that every control worker asks the one place that grants capacity.
 */
export function createControlActivities(deps: ControlDeps) {
  const schedulerConfig = deps.scheduler ?? { ...DEFAULT_SCHEDULER_CONFIG, hosts: deps.hosts };
  const scheduler = new SchedulerClient(deps.client, { config: schedulerConfig });

  async function readHost(host: string): Promise<{ status: HostStatus; beat?: LivenessBeat }> {
    let pending;
    try {
      const d = await deps.client.workflow.getHandle(hostLivenessWorkflowId(host)).describe();
      if (d.status.name !== 'RUNNING')
        return {
          status: { live: false, reason: `host ${host}'s liveness record is ${d.status.name.toLowerCase()}` },
        };
      pending = d.raw.pendingActivities?.[0];
    } catch (err) {
      if (err instanceof WorkflowNotFoundError)
        return {
          status: { live: false, reason: `host ${host} has no liveness record: its worker never started` },
        };
      throw err;
    }
    const payloads = pending?.heartbeatDetails?.payloads;
    const beat = payloads?.length
      ? await decodeFromPayloadsAtIndex<LivenessBeat>(
          deps.client.options.loadedDataConverter,
          0,
          payloads,
        ).catch(() => undefined)
      : undefined;
    const lastSeenMs = Math.max(
      toMs(pending?.lastHeartbeatTime) ?? 0,
      // A worker that has just picked the heartbeat up counts from then.
      pending?.state === temporal.api.enums.v1.PendingActivityState.PENDING_ACTIVITY_STATE_STARTED
        ? (toMs(pending.lastStartedTime) ?? 0)
        : 0,
    );
    if (lastSeenMs === 0)
      return { status: { live: false, reason: `host ${host}'s worker has not heartbeated yet` }, beat };
    const ageSec = (Date.now() - lastSeenMs) / 1000;
    const seen = `last heartbeat ${ageSec.toFixed(1)} s ago (${new Date(lastSeenMs).toISOString()})`;
    const suspect = ageSec > deps.hostLivenessSec / 3;
    const status: HostStatus =
      ageSec <= deps.hostLivenessSec
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
    return { status, beat };
  }

  /** The task's workflow id: a task asks for itself only. */
  const callerTask = () => {
    const id = Context.current().info.workflowExecution?.workflowId;
    if (!id) throw ApplicationFailure.nonRetryable('only a task workflow asks for its placement', 'NoTask');
    return id;
  };

  /** Runs a task's update, heartbeating meanwhile; a task still starting (or ending) is asked again later. */
  async function whileRunning(
    taskId: string,
    update: (handle: ReturnType<Client['workflow']['getHandle']>) => Promise<TaskStatus>,
  ): Promise<'moved' | 'not-running'> {
    const handle = deps.client.workflow.getHandle(taskId);
    if ((await handle.query(statusQuery)).phase !== 'running') return 'not-running';
    const ctx = Context.current();
    const beat = setInterval(() => ctx.heartbeat(), 5_000);
    try {
      await update(handle);
      return 'moved';
    } finally {
      clearInterval(beat);
    }
  }

  return {
    /** Whether `host` is live now (the workflow's HostDown decision). */
    async hostStatus(host: string): Promise<HostStatus> {
      return (await readHost(host)).status;
    },

    /** Every host's liveness and inventory, for the scheduler. */
    async surveyHosts(hosts: string[]): Promise<HostView[]> {
      return Promise.all(
        hosts.map(async (host) => {
          const { status, beat } = await readHost(host);
          return {
            host,
            live: status.live,
            reason: status.reason,
            ...(beat?.inventory ? { inventory: beat.inventory } : {}),
          };
        }),
      );
    },

    /**
     * Asks the scheduler for the task's resources: a host now, or a place in the queue (the scheduler
     * then signals the grant). A task that no host could ever run fails at once, saying what is missing.
     */
    async placeTask(spec: TaskSpec, opts: { exclude?: string[] } = {}): Promise<Placement> {
      const request = placementRequest(callerTask(), spec, schedulerConfig, opts.exclude ?? []);
      const result = await scheduler.update(placeUpdate, request);
      if ('refused' in result) throw ApplicationFailure.nonRetryable(result.refused, 'Unschedulable');
      log.info({ taskId: request.taskId, owner: spec.owner, ...result }, 'task placed');
      return result;
    },

    /** The task gives its resources back (its VM is gone), or leaves the queue. */
    async releasePlacement(): Promise<void> {
      await scheduler.update(releaseUpdate, { taskId: callerTask() });
    },

    /**
     * The host a running task's VM moves to, with its resources reserved there until the move settles:
     * the one asked for, checked (in the cluster, not the current host, live, with room), or the
     * scheduler's choice. Every refusal is non-retryable and says why: the task keeps running where it is.
     */
    async chooseMigrationTarget(req: {
      current: string;
      requested?: string;
      spec?: TaskSpec;
      driver?: string;
    }): Promise<{ host: string; localizeDisks: boolean }> {
      const taskId = callerTask();
      const spec = req.spec;
      const result = await scheduler.update(reserveMoveUpdate, {
        taskId,
        owner: spec?.owner ?? '',
        current: req.current,
        resources: spec ? resourcesOf(spec, schedulerConfig) : { vcpus: 0, memoryMiB: 0, diskMiB: 0 },
        driver: req.driver ?? spec?.driver ?? 'qemu',
        ...(req.requested ? { requested: req.requested } : {}),
      });
      if ('refused' in result) throw ApplicationFailure.nonRetryable(result.refused, 'NoMigrationTarget');
      log.info({ taskId, current: req.current, ...result }, 'migration target chosen');
      return { ...result, localizeDisks: deps.localizeDisksAfterMigration ?? false };
    },

    /** The migration ended: the task's resources stay on `host` only. */
    async settleMove(req: { host: string }): Promise<void> {
      await scheduler.update(settleMoveUpdate, { taskId: callerTask(), host: req.host });
    },

    /** The task's disks moved: they count on `host` from now on (a drain waits for that). */
    async settleStorage(req: { host: string }): Promise<void> {
      await scheduler.update(settleStorageUpdate, { taskId: callerTask(), storageHost: req.host });
    },

    /**
     * A drain's move: the task's own migrate update (the scheduler chooses the target, away from the
     * draining host). Heartbeats while the migration runs; a refusal or failure is final for this attempt.
     */
    async migrateTask(req: { taskId: string; to?: string }): Promise<'moved' | 'not-running'> {
      return whileRunning(req.taskId, (handle) =>
        handle.executeUpdate(migrateUpdate, { args: [req.to ? { host: req.to } : {}] }),
      );
    },

    /** A drain's storage evacuation: the task's disks move to the host where its VM runs. */
    async localizeTask(req: { taskId: string }): Promise<'moved' | 'not-running'> {
      return whileRunning(req.taskId, (handle) => handle.executeUpdate(localizeDisksUpdate, { args: [] }));
    },

    /**
     * Of these tasks, those whose workflow no longer runs (ended without giving its reservation back, e.g.
     * terminated by an operator, or never found): the scheduler's sweep releases what they hold.
     */
    async goneTasks(taskIds: string[]): Promise<string[]> {
      const gone: string[] = [];
      for (const taskId of taskIds) {
        const status = await deps.client.workflow
          .getHandle(taskId)
          .describe()
          .then(
            (d) => d.status.name,
            (err: unknown) => {
              if (err instanceof WorkflowNotFoundError) return 'NOT_FOUND';
              throw err;
            },
          );
        if (status !== 'RUNNING') gone.push(taskId);
        Context.current().heartbeat();
      }
      return gone;
    },

    /** Cancels a task through its cancel update (a drain's deadline passed). */
    async cancelTask(req: { taskId: string; reason: string }): Promise<void> {
      await deps.client.workflow
        .getHandle(req.taskId)
        .executeUpdate(cancelUpdate, { args: [{ reason: req.reason }] });
      log.info(req, 'task cancelled by the scheduler');
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
