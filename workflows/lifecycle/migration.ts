import { ApplicationFailure, log, patched } from '@temporalio/workflow';
import type { VmHandle } from '../../activities/types';
import type { IncomingVm } from '../../drivers/types';
import type { MigrateRequest, MigrationRecord, MigrationStep, TaskStatus } from '../definitions';
import { hostSteps, migrationControl, reservations, SCHEDULER_PATCH } from './activities';
import { describe, failureType } from './failures';
import { recordWhere, type TaskState } from './state';

/**
 * Why a running task cannot migrate now, or undefined when it can (checked in the update's validator,
 * after the request's shape).
 */
export function migrationRefusal(t: TaskState, req: MigrateRequest): string | undefined {
  const id = t.ref.taskId;
  if (t.status.phase !== 'running' || !t.handle || !t.host)
    return `task ${id} is not running (it is ${t.status.phase}): only a running task can migrate`;
  if (t.status.movingDisks)
    return `the disks of task ${id} are moving to ${t.status.movingDisks.to}: try again once they have moved`;
  if (t.migrating) return `task ${id} is already migrating to ${t.status.migrating?.to}`;
  if (req.host === t.host) return `task ${id} already runs on host ${t.host}`;
  return undefined;
}

/**
 * Live migration, step by step (activities/host/migrationActivities.ts): describe on the source,
 * prepare on the target, stop waiting at the source, send the memory, take over on the target. Until
 * the memory is sent the VM runs at the source, which every failure falls back to after removing what
 * the target prepared (the rollback); once it is sent the VM is on the target, where the wait resumes.
 */
export async function migrate(t: TaskState, req: MigrateRequest): Promise<TaskStatus> {
  t.migrating = true;
  const from = t.host as string;
  const fromHandle = t.handle as VmHandle;
  const vmId = fromHandle.vmId;
  const record: MigrationRecord = {
    from,
    to: req.host ?? '(placement)',
    storageHost: t.storageHost ?? from,
    startedAt: new Date().toISOString(),
    ok: false,
  };
  const step = (s: MigrationStep) => (t.status.migrating = { to: record.to, step: s });
  let incoming: IncomingVm | undefined;
  let left = false;
  /** The scheduler holds the task's resources on the target too, until the move settles. */
  let reserved = false;
  try {
    step('choosing-target');
    const target = await migrationControl.chooseMigrationTarget({
      current: from,
      requested: req.host,
      spec: t.spec,
      driver: t.driver,
    });
    record.to = target.host;
    t.localizeAfterMigration = t.spec.localizeDisksAfterMigration ?? target.localizeDisks;
    reserved = true;
    const to = record.to;
    const src = hostSteps(t, from);
    const dst = hostSteps(t, to);
    step('preparing');
    const source = await src(
      'migrate',
      'describeMigrationSource',
      `describe VM ${vmId} for migration to ${to}`,
      fromHandle,
    );
    incoming = await dst('migrate', 'prepareIncoming', `prepare VM ${vmId} to arrive from ${from}`, source);
    if (!t.wait) throw new Error('the task ended before its VM could move');
    step('transferring');
    t.wait.stoppedFor = 'migration';
    t.wait.scope.cancel();
    const result = await src('migrateOut', 'migrateOut', `send the memory of VM ${vmId} to ${to}`, {
      handle: fromHandle,
      target: incoming,
      maxBandwidthBytesPerSec: req.maxBandwidthMiBps
        ? Math.round(req.maxBandwidthMiBps * 1024 ** 2)
        : undefined,
    });
    // The source QEMU is gone: the VM runs on the target now, or nowhere.
    left = true;
    movedTo(t, to, from, incoming.handle);
    Object.assign(record, {
      totalTimeMs: result.totalTimeMs,
      downtimeMs: result.downtimeMs,
      ramTransferredBytes: result.ramTransferredBytes,
      diskTransferredBytes: result.diskTransferredBytes,
    });
    step('finishing');
    t.handle = await dst('migrate', 'finishIncoming', `take over VM ${vmId} on ${to}`, incoming);
    record.ok = true;
    log.info('VM migrated', { ...record });
    return t.status;
  } catch (err) {
    let why = describe(err);
    if (incoming && !left) {
      step('rolling-back');
      const taken = await rollBack(t, incoming);
      if (taken) {
        // The memory had been sent after all (a retried step): the VM runs on the target.
        movedTo(t, record.to, from, taken);
        record.ok = true;
        return t.status;
      }
    } else if (left) {
      why = `the VM left ${from} but ${record.to} did not take it over: ${why}`;
    }
    record.error = why;
    log.warn('migration failed', { ...record });
    throw ApplicationFailure.nonRetryable(
      `could not migrate task ${t.ref.taskId} from ${from} to ${record.to}: ${why}; it runs on ${t.host}`,
      'MigrationFailed',
      { ...record },
    );
  } finally {
    // Where the VM runs now keeps the task's resources; the other host's share is released.
    if (reserved && patched(SCHEDULER_PATCH))
      await reservations
        .settleMove({ host: t.host as string })
        .catch((err: unknown) =>
          log.error('could not settle the move with the scheduler', { error: describe(err) }),
        );
    t.migrations.push(record);
    t.status.migrations = t.migrations;
    t.status.migrating = undefined;
    t.migrating = false;
  }
}

/** The VM left `from` for `to`: it runs there now, and `from` keeps the console it wrote. */
function movedTo(t: TaskState, to: string, from: string, vm: VmHandle): void {
  t.host = to;
  t.handle = vm;
  recordWhere(t);
  const now = new Date().toISOString();
  const left = t.consoleSegments.at(-1);
  if (!left || left.host !== from) return;
  left.until = now;
  t.consoleSegments.push({ n: left.n + 1, host: to, since: now });
  const segment = { ...left };
  t.keepingConsoles.push(
    hostSteps(t, from)('migrate', 'keepConsoleSegment', `keep the console of ${from}`, t.ref, segment).then(
      () => undefined,
      (err: unknown) => log.warn('the console of a host the VM left is lost', { from, error: describe(err) }),
    ),
  );
}

/**
 * Removes what the target prepared. Returns the VM's handle there in the one case where the target
 * refuses because the VM already runs on it (the migration completed after all): it is finished then.
 */
async function rollBack(t: TaskState, incoming: IncomingVm): Promise<VmHandle | undefined> {
  const dst = hostSteps(t, incoming.host);
  try {
    await dst('rollback', 'abortIncoming', `remove incoming VM ${incoming.vmId}`, incoming);
    return undefined;
  } catch (err) {
    if (failureType(err) === 'IncomingAlreadyRunning')
      // It runs there: record it there even if taking over fails; the wait on that host then decides.
      return dst('migrate', 'finishIncoming', `take over VM ${incoming.vmId}`, incoming).catch(
        (e: unknown) => {
          log.error('the VM runs on the target, which could not take it over', { error: describe(e) });
          return incoming.handle;
        },
      );
    // A target that cannot be reached is down, and what it prepared is gone with it.
    log.warn('could not remove the incoming VM', { host: incoming.host, error: describe(err) });
    return undefined;
  }
}
