import type { Logger } from '../logging/logger';
import type { VmStore } from '../storage/vmStore';
import { waitForGuest, type GuestWatch } from './guestWait';
import { hostVmLeftFor, readSavedVm, type SavedVm } from './savedVm';
import type {
  DriverCapabilities,
  ExitResult,
  IncomingVm,
  MigratableDriver,
  MigrationOptions,
  MigrationResult,
  MigrationSource,
  VmHandle,
  WaitOptions,
} from './types';

/** The live-migration steps of a driver, kept in a class of their own. */
export type MigrationSteps = Pick<
  MigratableDriver,
  'describeForMigration' | 'prepareIncoming' | 'migrate' | 'finishIncoming' | 'abortIncoming'
>;

/**
 * What the VM drivers (QEMU, Xen) share: their VMs' saved state in this host's store, and live migration
 * handed to their migration class.
 */
export abstract class StoredVmDriver {
  /** Both boot a guest from the staged data disk and move its memory only between hosts. */
  readonly capabilities: DriverCapabilities = {
    liveMigration: true,
    isolation: 'vm',
    homeStaging: 'disk-image',
  };
  protected abstract readonly migration: MigrationSteps;
  protected abstract readonly log: Logger;
  /** Poll period of `wait`; progress is reported on every poll. */
  protected abstract readonly pollMs: number;
  abstract stop(handle: VmHandle, timeoutMs: number): Promise<void>;

  constructor(private readonly where: { store: VmStore; hostName: string }) {}

  describeForMigration(handle: VmHandle): Promise<MigrationSource> {
    return this.migration.describeForMigration(handle);
  }

  prepareIncoming(source: MigrationSource): Promise<IncomingVm> {
    return this.migration.prepareIncoming(source);
  }

  migrate(handle: VmHandle, target: IncomingVm, options: MigrationOptions): Promise<MigrationResult> {
    return this.migration.migrate(handle, target, options);
  }

  finishIncoming(incoming: IncomingVm): Promise<VmHandle> {
    return this.migration.finishIncoming(incoming);
  }

  abortIncoming(incoming: IncomingVm): Promise<void> {
    return this.migration.abortIncoming(incoming);
  }

  /** A driver's `wait` for the VM `current` (from its state file); `stopTimeoutMs` bounds its stop. */
  protected waitForGuest(
    current: VmHandle,
    watch: Pick<GuestWatch, 'consoleLog' | 'probe' | 'waitGone'>,
    stopTimeoutMs: number,
    options: WaitOptions,
  ): Promise<ExitResult> {
    return waitForGuest(
      {
        ...watch,
        vmId: current.vmId,
        hostName: this.where.hostName,
        deadline: Number(current.state.deadline),
        pollMs: this.pollMs,
        log: this.log,
        stop: () => this.stop(current, stopTimeoutMs),
        migratedAway: () => this.migratedAway(current.vmId),
      },
      options,
    );
  }

  protected readState(vmId: string): Promise<SavedVm> {
    return readSavedVm(this.where.store, vmId, this.where.hostName);
  }

  /** The host a VM left this one for by live migration (undefined: it did not leave). */
  protected migratedAway(vmId: string): Promise<string | undefined> {
    return hostVmLeftFor(this.where.store, vmId, this.where.hostName);
  }
}
