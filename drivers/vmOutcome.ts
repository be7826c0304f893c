/** How a VM's task ended, as every VM driver reports it. */

/** Exit code reported when the time limit ended the task (as coreutils `timeout` does). */
export const TIMEOUT_EXIT_CODE = 124;

/** `wait` on the host a VM left by live migration: the task goes on at `to`, so wait there. */
export class VmMigratedError extends Error {
  constructor(
    readonly vmId: string,
    readonly from: string,
    readonly to: string,
  ) {
    super(`VM ${vmId} was migrated from ${from} to ${to}: wait for it there`);
    this.name = 'VmMigratedError';
  }
}
