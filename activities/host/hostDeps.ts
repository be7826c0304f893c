import type { HypervisorDriver } from '../../drivers/types';
import type { RepositoryClient } from '../../repository/client';
import type { HomeStaging } from '../../storage/homeStaging';
import type { VmStore } from '../../storage/vmStore';

/** A hypervisor driver with the staging that feeds it. */
export interface DriverBinding {
  driver: HypervisorDriver;
  staging: HomeStaging;
  /** Turns the task's image name into the base-image path the driver boots (undefined: no image). */
  resolveImage?: (owner: string, image: string) => Promise<string | undefined>;
}

export interface HostDeps {
  hostName: string;
  store: VmStore;
  repository: RepositoryClient;
  drivers: Record<string, DriverBinding>;
  /** The driver of tasks that name none: the host's first VM driver; none when it has only `process`. */
  defaultDriver?: string;
  /** Tells the task's workflow of its progress (coarse: the activity calls it at most every few seconds). */
  reportProgress?: (workflowId: string, progress: number, message?: string) => Promise<void>;
}
