import { ApplicationFailure, Context } from '@temporalio/activity';
import {
  canLocalizeDisks,
  isMigratable,
  type DiskLocalizingDriver,
  type DiskMoveResult,
  type IncomingVm,
  type MigratableDriver,
  type MigrationOptions,
  type MigrationResult,
  type MigrationSource,
  type VmHandle,
} from '../../drivers/types';
import { createLogger, describeError } from '../../logging/logger';
import type { VmStore } from '../../storage/vmStore';
import type { DriverBinding } from './hostDeps';
import { readTaskRecord, saveTaskRecord, type TaskRecord } from './taskAccess';

const log = createLogger('activities.migration');

export interface MigrationDeps {
  hostName: string;
  /** This host's store: the incoming VM's folder gets its task's record (the orphan reaper reads it). */
  store: VmStore;
  drivers: Record<string, DriverBinding>;
  /** From the cluster configuration; progress callbacks are the activity's own. */
  migration?: Omit<MigrationOptions, 'onProgress' | 'signal'>;
}

export interface MigrateOutRequest {
  handle: VmHandle;
  target: IncomingVm;
  /** Per-migration overrides of the host's configured bandwidth cap (bytes per second). */
  maxBandwidthBytesPerSec?: number;
}

/**
 * Host-level steps of a live migration, each run by the worker of the host it names and idempotent.
 * Workflow order: describeMigrationSource (source) -> prepareIncoming (target) -> migrateOut (source)
 * -> finishIncoming (target); if migrateOut or finishIncoming fails, abortIncoming (target) and the VM
 * keeps running at the source. A failed migrateOut is not retryable (the VM runs at the source); a
 * retried migrateOut after a worker restart follows the migration QEMU still runs.
 */
export function createMigrationActivities(deps: MigrationDeps) {
  const { hostName } = deps;

  function driverFor(driverName: string): MigratableDriver {
    const binding = deps.drivers[driverName];
    if (!binding)
      throw ApplicationFailure.nonRetryable(
        `host ${hostName} has no '${driverName}' driver`,
        'DriverUnavailable',
      );
    if (!isMigratable(binding.driver))
      throw ApplicationFailure.nonRetryable(
        `driver '${driverName}' cannot live-migrate VMs`,
        'DriverCannotMigrate',
      );
    return binding.driver;
  }

  function localizerFor(driverName: string): DiskLocalizingDriver {
    const driver = deps.drivers[driverName]?.driver;
    if (!driver || !canLocalizeDisks(driver))
      throw ApplicationFailure.nonRetryable(
        `driver '${driverName}' on ${hostName} cannot move a running VM's disks`,
        'DriverCannotMoveDisks',
      );
    return driver;
  }

  /** Errors of a bad request (not worth a retry) become non-retryable failures. */
  async function run<T>(what: string, vmId: string, step: () => Promise<T>): Promise<T> {
    try {
      return await step();
    } catch (err) {
      if (err instanceof ApplicationFailure) throw err;
      const message = `${what} of VM ${vmId} on ${hostName}: ${describeError(err)}`;
      log.error({ vmId, what, err: describeError(err) }, 'migration step failed');
      if (/finish the migration instead/.test(message))
        throw ApplicationFailure.nonRetryable(message, 'IncomingAlreadyRunning');
      if (
        /already runs on|cannot migrate a VM to its own host|does not run on|no NFS export|not running/.test(
          message,
        )
      )
        throw ApplicationFailure.nonRetryable(message, 'MigrationRejected');
      throw new Error(message, { cause: err });
    }
  }

  return {
    /** On the source host: what the target needs to prepare the VM. */
    async describeMigrationSource(handle: VmHandle): Promise<MigrationSource & { task?: TaskRecord }> {
      return run('describe', handle.vmId, async () => {
        const source = await driverFor(handle.driver).describeForMigration(handle);
        const task = await readTaskRecord(deps.store, handle.vmId);
        return task ? { ...source, task } : source;
      });
    },

    /** On the target host: starts the VM waiting for its memory, its disks opened where they are. */
    async prepareIncoming(source: MigrationSource & { task?: TaskRecord }): Promise<IncomingVm> {
      return run('prepare incoming', source.config.vmId, async () => {
        const { task, ...rest } = source;
        if (task) await saveTaskRecord(deps.store, source.config.vmId, task);
        return driverFor(source.handle.driver).prepareIncoming(rest);
      });
    },

    /** On the source host: sends the memory, heartbeating the bytes sent; the source VM ends on success. */
    async migrateOut(req: MigrateOutRequest): Promise<MigrationResult> {
      const ctx = Context.current();
      const driver = driverFor(req.handle.driver);
      try {
        return await driver.migrate(req.handle, req.target, {
          ...deps.migration,
          ...(req.maxBandwidthBytesPerSec ? { maxBandwidthBytesPerSec: req.maxBandwidthBytesPerSec } : {}),
          onProgress: (p) => ctx.heartbeat({ step: 'migrate', ...p }),
          signal: ctx.cancellationSignal,
        });
      } catch (err) {
        // A failed migration leaves the VM running here, so a retry against the failed target is pointless.
        // The workflow then calls abortIncoming, which refuses (IncomingAlreadyRunning) in the one case
        // where the migration did complete (a retry after the source finished): then it finishes instead.
        throw ApplicationFailure.nonRetryable(
          `migration of VM ${req.handle.vmId} from ${hostName} to ${req.target.host} failed: ${describeError(err)}`,
          'MigrationFailed',
        );
      }
    },

    /** On the target host: waits until the VM runs here and records it; returns its new handle. */
    async finishIncoming(incoming: IncomingVm): Promise<VmHandle> {
      return run('finish incoming', incoming.vmId, () =>
        driverFor(incoming.handle.driver).finishIncoming(incoming),
      );
    },

    /** On the target host: removes the incoming VM (refused if it already runs: finish it then). */
    async abortIncoming(incoming: IncomingVm): Promise<void> {
      return run('abort incoming', incoming.vmId, () =>
        driverFor(incoming.handle.driver).abortIncoming(incoming),
      );
    },

    /**
     * On the host where the VM runs: mirrors its disks from their storage host into this host's store
     * while it runs, heartbeating the bytes copied, then switches the VM to them and records this host
     * as their storage host. On failure the VM keeps its disks where they were.
     */
    async localizeDisks(handle: VmHandle): Promise<DiskMoveResult> {
      const ctx = Context.current();
      const driver = localizerFor(handle.driver);
      return run('disk move', handle.vmId, () =>
        driver.localizeDisks(handle, {
          onProgress: (p) => ctx.heartbeat({ step: 'mirror', ...p }),
          signal: ctx.cancellationSignal,
        }),
      );
    },

    /** On the former storage host, once the new one is recorded: the VM's old folder and disks go. */
    async dropMovedDisks(handle: VmHandle): Promise<void> {
      return run('drop moved disks', handle.vmId, () => localizerFor(handle.driver).dropMovedDisks(handle));
    },
  };
}

export type MigrationActivities = ReturnType<typeof createMigrationActivities>;
