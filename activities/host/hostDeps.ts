import type { HypervisorDriver } from '../../drivers/types';
import type { RepositoryClient } from '../../repository/client';
import type { HomeStaging } from '../../storage/homeStaging';
import type { VmStore } from '../../storage/vmStore';
import type { ProgressReport } from '../../workflows/definitions';

/** A hypervisor driver with the staging that feeds it. */
export interface DriverBinding {
  driver: HypervisorDriver;
  staging: HomeStaging;
  /**
   * Turns the task's image name into the base-image path the driver boots (undefined: no image). An
   * owner's image comes through `repository` (the task's capability); the provider's with the host's own.
   */
  resolveImage?: (owner: string, image: string, fetch: ImageFetch) => Promise<string | undefined>;
}

/** How one task's image is fetched: with its credential, stoppable, with byte progress. */
export interface ImageFetch {
  repository: RepositoryClient;
  signal?: AbortSignal;
  onProgress?: (bytes: number, total: number | undefined) => void;
}

export interface HostDeps {
  hostName: string;
  store: VmStore;
  /** A client presenting a task's capability, for that task's transfers. */
  repositoryFor: (capability: string) => RepositoryClient;
  drivers: Record<string, DriverBinding>;
  /** The driver of tasks that name none: the host's first VM driver; none when it has only `process`. */
  defaultDriver?: string;
  /**
   * Tells a task's workflow its progress (the progress signal); awaitVm calls it at each 10 % step.
   * Absent: progress travels in heartbeats only.
   */
  reportProgress?: (taskId: string, report: ProgressReport) => Promise<void>;
}
