import { ApplicationFailure, Context } from '@temporalio/activity';
import type { TaskRef, UploadedFile, VmHandle } from '../../../activities/types';
import type { IncomingVm } from '../../../drivers/types';
import type { Client } from '@temporalio/client';

/**
 * Stand-in control and host activities for workflow unit tests: no repository, no VM. Each records its
 * calls; a task's VM "runs" until the test releases it (never "long enough"), and a test can make the
 * repository unavailable, a migration step fail, or a host dead (no worker on its queue at all).
 */
export interface Call {
  host: string;
  name: string;
  taskId?: string;
}

/** A task with this name is queued by placement (the test grants it with the scheduler's signal). */
export const QUEUED_TASK = 'queue-me';

export class MockCluster {
  /** The control worker's Temporal client (the real requestCancellation uses one too). */
  client?: Client;
  readonly calls: Call[] = [];
  /** Exit code per task id whose VM may end now. */
  private readonly released = new Map<string, number>();
  /** Waits under way per `host/taskId` (a cancelled wait may still end while its successor starts). */
  private readonly waits = new Map<string, number>();
  /** Hosts the next placements choose, before any other. */
  readonly placeNext: string[] = [];
  /** Hosts that have no worker: their steps are never picked up, and hostStatus says they are down. */
  readonly dead = new Set<string>();
  /**
   * Dead hosts whose liveness record has not run out yet: the first hostStatus says live but missing its
   * heartbeats (downAtMs soon), later ones say down.
   */
  readonly dying = new Set<string>();
  /** Tasks whose stage-out finds the repository unavailable, while this holds. */
  readonly repositoryDown = new Set<string>();
  /** Tasks whose migrateOut fails (before the memory is sent). */
  readonly failMigrateOut = new Set<string>();
  /** The cluster's default for moving the disks after a migration (the control worker's configuration). */
  localizeAfterMigration = false;
  /** Tasks whose disk move fails before the switch (the disks stay where they were). */
  readonly failLocalize = new Set<string>();

  isWaiting(host: string, taskId: string): boolean {
    return (this.waits.get(`${host}/${taskId}`) ?? 0) > 0;
  }

  release(taskId: string, exitCode = 0): void {
    this.released.set(taskId, exitCode);
  }

  called(name: string, taskId?: string): Call[] {
    return this.calls.filter((c) => c.name === name && (taskId === undefined || c.taskId === taskId));
  }

  control() {
    return {
      placeTask: async (spec: { host?: string; name?: string }) => {
        this.calls.push({ host: 'control', name: 'placeTask' });
        // The scheduler's answer when no host has room: the test then sends the grant.
        if (spec.name === QUEUED_TASK)
          return { queued: { position: 3, of: 5, since: new Date().toISOString(), why: 'a: full' } };
        const next = this.placeNext.shift();
        if (next) return { host: next };
        if (spec.host) return { host: spec.host };
        // The first host not known dead, so a restarted task lands elsewhere.
        return { host: ['a', 'b'].find((h) => !this.dead.has(h)) as string };
      },
      chooseMigrationTarget: async (req: { current: string; requested?: string }) => {
        this.calls.push({ host: 'control', name: 'chooseMigrationTarget' });
        return {
          host: req.requested ?? (req.current === 'a' ? 'b' : 'a'),
          localizeDisks: this.localizeAfterMigration,
        };
      },
      releasePlacement: async () => {
        this.calls.push({ host: 'control', name: 'releasePlacement' });
      },
      settleMove: async () => {
        this.calls.push({ host: 'control', name: 'settleMove' });
      },
      settleStorage: async () => {
        this.calls.push({ host: 'control', name: 'settleStorage' });
      },
      requestCancellation: async (req: { taskId: string; runId: string }) => {
        this.calls.push({ host: 'control', name: 'requestCancellation', taskId: req.taskId });
        await this.client?.workflow.getHandle(req.taskId, req.runId).cancel();
      },
      hostStatus: async (host: string) => {
        this.calls.push({ host: 'control', name: 'hostStatus' });
        if (this.dying.delete(host))
          return { live: true, lastSeenMs: Date.now() - 5_000, downAtMs: Date.now() + 2_000 };
        return this.dead.has(host) ? { live: false, lastSeenMs: Date.now() - 600_000 } : { live: true };
      },
    };
  }

  host(host: string) {
    const record = (name: string, ref?: { taskId: string }) =>
      this.calls.push({
        host,
        name,
        taskId: ref?.taskId ?? Context.current().info.workflowExecution?.workflowId ?? '',
      });
    const handleOf = (ref: TaskRef): VmHandle => ({
      driver: 'process',
      vmId: ref.vmId,
      host,
      storageHost: host,
      state: {},
    });
    const file = (path: string): UploadedFile => ({ path, size: 1, sha256: '0'.repeat(64) });
    return {
      stageIn: async (ref: TaskRef) => {
        record('stageIn', ref);
        return { driver: 'process', files: ref.spec.inputs.length, bytes: 0 };
      },
      createVm: async (ref: TaskRef) => {
        record('createVm', ref);
        return handleOf(ref);
      },
      startVm: async (handle: VmHandle) => {
        record('startVm');
        return handle;
      },
      launchVm: async (ref: TaskRef) => {
        record('launchVm', ref);
        return { handle: handleOf(ref), createdAtMs: Date.now() };
      },
      awaitVm: async () => {
        record('awaitVm');
        const ctx = Context.current();
        const taskId = ctx.info.workflowExecution?.workflowId ?? '';
        const key = `${host}/${taskId}`;
        this.waits.set(key, (this.waits.get(key) ?? 0) + 1);
        try {
          for (let beat = 0; !this.released.has(taskId); beat++) {
            ctx.heartbeat({ progress: beat % 100, message: `beat ${beat}`, phase: 'running' });
            await ctx.sleep(50);
          }
        } finally {
          this.waits.set(key, (this.waits.get(key) ?? 1) - 1);
        }
        return { exitCode: this.released.get(taskId) as number, timedOut: false, progress: 100 };
      },
      stageOut: async (ref: TaskRef, _handle: VmHandle, _exit: unknown, segments?: { host: string }[]) => {
        record('stageOut', ref);
        if (this.repositoryDown.has(ref.taskId))
          throw ApplicationFailure.create({
            message: 'repository: 503 Service Unavailable',
            type: 'RepositoryUnavailable',
          });
        return {
          outputs: [file(`${ref.resultsPath}/outputs/o.txt`)],
          logs: [file(`${ref.resultsPath}/logs/task.log`)],
          // The console too, when the VM never left this host (the workflow then passes its segment).
          ...(segments?.at(-1)?.host === host
            ? { console: [file(`${ref.resultsPath}/logs/console.log`)] }
            : {}),
        };
      },
      collectLogs: async (ref: TaskRef) => {
        record('collectLogs', ref);
        return [file(`${ref.resultsPath}/logs/failure.txt`)];
      },
      collectConsole: async (ref: TaskRef) => {
        record('collectConsole', ref);
        return [file(`${ref.resultsPath}/logs/console.log`)];
      },
      keepConsoleSegment: async (ref: TaskRef) => {
        record('keepConsoleSegment', ref);
        return undefined;
      },
      destroyVm: async (ref: TaskRef, _handle: unknown, opts?: { releaseCapability?: boolean }) => {
        record('destroyVm', ref);
        if (opts?.releaseCapability) record('releaseCapability', ref);
        return { capabilityReleased: opts?.releaseCapability === true };
      },
      releaseCapability: async (ref: TaskRef) => {
        record('releaseCapability', ref);
      },
      describeMigrationSource: async (handle: VmHandle) => {
        record('describeMigrationSource');
        return { handle };
      },
      prepareIncoming: async (source: { handle: VmHandle }): Promise<IncomingVm> => {
        record('prepareIncoming');
        const vm = { ...source.handle, host };
        return { vmId: vm.vmId, host, uri: `tcp:127.0.0.1:1`, handle: vm };
      },
      migrateOut: async () => {
        record('migrateOut');
        const taskId = Context.current().info.workflowExecution?.workflowId ?? '';
        if (this.failMigrateOut.has(taskId))
          throw ApplicationFailure.nonRetryable(
            'migration failed: the target refused the stream',
            'MigrationRefused',
          );
        return { totalTimeMs: 10, downtimeMs: 1, ramTransferredBytes: 1024, diskTransferredBytes: 0 };
      },
      finishIncoming: async (incoming: IncomingVm) => {
        record('finishIncoming');
        return incoming.handle;
      },
      abortIncoming: async () => {
        record('abortIncoming');
      },
      localizeDisks: async (handle: VmHandle) => {
        record('localizeDisks');
        if (this.failLocalize.has(Context.current().info.workflowExecution?.workflowId ?? ''))
          throw ApplicationFailure.nonRetryable('the mirror of the data disk stopped', 'MirrorFailed');
        return {
          handle: { ...handle, storageHost: host },
          from: handle.storageHost,
          bytes: 4096,
          elapsedMs: 5,
        };
      },
      dropMovedDisks: async () => {
        record('dropMovedDisks');
      },
    };
  }
}
