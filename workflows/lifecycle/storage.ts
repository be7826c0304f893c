import { ApplicationFailure, log, patched } from '@temporalio/workflow';
import type { VmHandle } from '../../activities/types';
import type { StorageMoveRecord, TaskStatus } from '../definitions';
import { hostSteps, reservations } from './activities';
import { describe } from './failures';
import { recordWhere, type TaskState } from './state';

/**
 * Marks histories whose tasks may move their disks (storage evacuation): a migration followed by a disk
 * move (`localizeDisksAfterMigration`) issues commands that older histories do not have.
 */
export const LOCALIZE_PATCH = 'vsp-localize-disks';

/** Why the task's disks cannot move now, or undefined when they can (the update's validator). */
export function diskMoveRefusal(t: TaskState): string | undefined {
  const id = t.ref.taskId;
  if (t.status.phase !== 'running' || !t.handle || !t.host)
    return `task ${id} is not running (it is ${t.status.phase}): only a running task's disks can move`;
  if (t.status.movingDisks) return `the disks of task ${id} are already moving to ${t.status.movingDisks.to}`;
  if (t.migrating) return `task ${id} is migrating to ${t.status.migrating?.to}: try again once it has moved`;
  if (t.storageHost === t.host) return `the disks of task ${id} are already on ${t.host}, where it runs`;
  return undefined;
}

/**
 * Storage evacuation: the VM's disks are mirrored, while it runs, from their storage host into the store
 * of the host where it runs, which then becomes its storage host. The order makes it safe: the switch
 * happens on that host, the new storage host is recorded here (this history) and with the scheduler,
 * and only then does the former storage host drop its copy. A failure before the switch leaves the
 * disks where they were, and the task runs on.
 */
export async function moveDisksHere(t: TaskState): Promise<TaskStatus> {
  patched(LOCALIZE_PATCH);
  t.migrating = true;
  const host = t.host as string;
  const from = t.storageHost as string;
  const vmId = t.ref.vmId;
  const record: StorageMoveRecord = { from, to: host, startedAt: new Date().toISOString(), ok: false };
  t.status.movingDisks = { from, to: host };
  try {
    const moved = await hostSteps(t, host)(
      'storage',
      'localizeDisks',
      `move the disks of VM ${vmId} from ${from}`,
      t.handle as VmHandle,
    );
    t.handle = moved.handle;
    t.storageHost = host;
    recordWhere(t);
    Object.assign(record, { ok: true, bytes: moved.bytes, mirrorMs: moved.elapsedMs });
    log.info('disks moved', { ...record });
  } catch (err) {
    record.error = describe(err);
    log.warn('the disks could not move', { ...record });
    throw ApplicationFailure.nonRetryable(
      `could not move the disks of task ${t.ref.taskId} from ${from} to ${host}: ${record.error}; they stay on ${from}`,
      'DiskMoveFailed',
      { ...record },
    );
  } finally {
    t.status.storageMoves = [...(t.status.storageMoves ?? []), record];
    t.status.movingDisks = undefined;
    t.migrating = false;
  }
  await reservations
    .settleStorage({ host })
    .catch((err: unknown) =>
      log.error('could not tell the scheduler where the disks are', { error: describe(err) }),
    );
  try {
    await hostSteps(t, from)(
      'cleanup',
      'dropMovedDisks',
      `remove the moved disks of VM ${vmId}`,
      t.handle as VmHandle,
    );
  } catch (err) {
    // Nothing of the task depends on that copy any more: its host's reaper or operator clears it.
    record.dropError = describe(err);
    log.warn('the former storage host kept its copy of the disks', { from, error: record.dropError });
  }
  return t.status;
}
