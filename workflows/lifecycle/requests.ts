import { CancellationScope, log, patched, setHandler, workflowInfo } from '@temporalio/workflow';
import { placementGrantedSignal } from '../scheduling/definitions';
import {
  cancelUpdate,
  CancelRequestSchema,
  localizeDisksUpdate,
  migrateUpdate,
  MigrateRequestSchema,
  ProgressReportSchema,
  progressSignal,
  requestProblems,
  resizeUpdate,
  ResizeRequestSchema,
  statusQuery,
  type MigrateRequest,
  type TaskStatus,
} from '../definitions';
import type { VmHandle } from '../../activities/types';
import { cancellation, onHost } from './activities';
import { describe } from './failures';
import { migrate, migrationRefusal } from './migration';
import { diskMoveRefusal, LOCALIZE_PATCH, moveDisksHere } from './storage';
import { isFinishing, recordProgress, type TaskState } from './state';

/**
 * The status query, the cancel, migrate and resize updates (shapes checked in their validators), the scheduler's
 * grant, and the host's progress steps.
 */
export function handleRequests(t: TaskState): void {
  setHandler(statusQuery, () => t.status);
  setHandler(
    cancelUpdate,
    (req) => {
      t.cancelReason = req?.reason ?? '';
      t.status.error = `cancelled${req?.reason ? `: ${req.reason}` : ''}`;
      // Stops the work at once; the workflow's own cancellation (requested by the control worker, since a
      // workflow cannot request it of itself) then ends it CANCELED, as `temporal workflow cancel` does.
      t.main.cancel();
      const { workflowId, runId } = workflowInfo();
      void CancellationScope.nonCancellable(() =>
        cancellation.requestCancellation({ taskId: workflowId, runId }),
      ).catch((err: unknown) =>
        log.warn('could not request the workflow cancellation', { error: describe(err) }),
      );
      return t.status;
    },
    {
      validator: (req) => {
        const r = CancelRequestSchema.optional().safeParse(req);
        if (!r.success) throw new Error(requestProblems('cancel', r.error));
        if (t.cancelReason !== undefined) throw new Error(`task ${t.ref.taskId} is already being cancelled`);
        if (isFinishing(t))
          throw new Error(`task ${t.ref.taskId} is already ${t.status.phase}; nothing to cancel`);
      },
    },
  );
  setHandler(localizeDisksUpdate, () => moveDisksHere(t), {
    validator: () => {
      const refusal = t.continuing
        ? `task ${t.ref.taskId} is moving to its next run: try again in a moment`
        : diskMoveRefusal(t);
      if (refusal) throw new Error(refusal);
    },
  });
  setHandler(migrateUpdate, (req) => migrateThenLocalize(t, req), {
    validator: (req) => {
      const r = MigrateRequestSchema.safeParse(req);
      if (!r.success) throw new Error(requestProblems('migrate', r.error));
      const refusal = t.continuing
        ? `task ${t.ref.taskId} is moving to its next run: try again in a moment`
        : migrationRefusal(t, r.data);
      if (refusal) throw new Error(refusal);
    },
  });
  setHandler(
    resizeUpdate,
    async (req) => {
      const share = { ...t.status.cpuShare, ...req };
      if (share.capPercent === 0) delete share.capPercent;
      await onHost(t, t.host as string)(
        'short',
        'setCpuShare',
        `set the CPU share of VM ${t.ref.vmId}`,
        t.handle as VmHandle,
        share,
      );
      // Kept only once in force: the next host after a migration gets it too (awaitVm).
      t.status.cpuShare = share;
      return t.status;
    },
    {
      validator: (req) => {
        const r = ResizeRequestSchema.safeParse(req);
        if (!r.success) throw new Error(requestProblems('resize', r.error));
        const id = t.ref.taskId;
        if (t.status.phase !== 'running' || !t.handle || !t.host)
          throw new Error(
            `task ${id} is not running (it is ${t.status.phase}): only a running task can be resized`,
          );
        if (t.migrating) throw new Error(`task ${id} is migrating: resize it once it runs on its new host`);
      },
    },
  );
  // Only a task without a host takes a grant (it may come before the placement's answer that queued the
  // task); a late duplicate changes nothing.
  setHandler(placementGrantedSignal, ({ host }) => {
    if (t.host === undefined) t.granted ??= host;
  });
  setHandler(progressSignal, (report) => {
    const r = ProgressReportSchema.safeParse(report);
    if (!r.success) return;
    t.status.progress = r.data.progress;
    t.status.progressMessage = r.data.message;
    recordProgress(t);
  });
}

/**
 * A migration, then (spec or cluster `localizeDisksAfterMigration`) the disks' move to the new host. A
 * failed disk move is recorded in the status and leaves the migrated VM running on its NFS disks.
 */
async function migrateThenLocalize(t: TaskState, req: MigrateRequest): Promise<TaskStatus> {
  const status = await migrate(t, req);
  if (t.localizeAfterMigration && t.storageHost !== t.host && patched(LOCALIZE_PATCH))
    await moveDisksHere(t).catch((err: unknown) =>
      log.warn('the disks stay on their storage host after the migration', { error: describe(err) }),
    );
  return status;
}
