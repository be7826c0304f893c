import type { CpuShare, HypervisorDriver, VmHandle } from '../../drivers/types';
import { createLogger, describeError } from '../../logging/logger';
import { deadlineShare } from '../../scheduler/deadline';

const log = createLogger('activities.cpu');

/** What the workflow tells awaitVm about the task's CPU: the share asked for, and its deadline. */
export interface CpuPlan {
  share?: CpuShare;
  /** ISO time the task should be done by (spec `deadline`). */
  deadline?: string;
  /** ISO time the task began to run (the deadline's pace counts from there). */
  runningSince?: string;
}

/** A deadline is looked at no more often than this. */
const CHECK_MS = 5000;

/**
 * Keeps a running VM at its CPU share while awaitVm waits for it: the share asked for (the workflow's,
 * or a resize since, which `requested` holds), raised while a deadline says the task is behind
 * (scheduler/deadline.ts). A share is written only when it changes; a failure is logged, never fatal to
 * the task.
 */
export class CpuSteering {
  private appliedKey?: string;
  private checkedAt = 0;
  private busy = false;
  behind = false;

  constructor(
    private readonly driver: HypervisorDriver,
    private readonly handle: VmHandle,
    private readonly plan: CpuPlan,
    /** The share asked for now (a resize on this host since the wait began), if any. */
    private readonly requested: () => CpuShare | undefined,
    /** The wait's end (cancelled, e.g. before the VM is destroyed): no share is written after it. */
    private readonly signal: AbortSignal,
  ) {}

  /** The share asked for: the latest resize here, else the workflow's. */
  current(): CpuShare | undefined {
    return this.requested() ?? this.plan.share;
  }

  /** Called with each progress report; applies a changed share in the background. */
  observe(progress: number | undefined): void {
    const now = Date.now();
    if (
      this.signal.aborted ||
      this.busy ||
      (this.appliedKey !== undefined && now - this.checkedAt < CHECK_MS)
    )
      return;
    this.checkedAt = now;
    const asked = this.current();
    let share = asked;
    if (this.plan.deadline && this.plan.runningSince) {
      const verdict = deadlineShare(
        asked ?? {},
        progress,
        Date.parse(this.plan.runningSince),
        Date.parse(this.plan.deadline),
        now,
      );
      if (verdict.behind !== this.behind)
        log.info(
          {
            vmId: this.handle.vmId,
            progress,
            expected: Math.round(verdict.expected),
            behind: verdict.behind,
          },
          verdict.behind ? 'task behind its deadline: CPU share raised' : 'task on pace again',
        );
      this.behind = verdict.behind;
      if (verdict.behind) share = verdict.share;
    }
    const key = JSON.stringify(share ?? {});
    if (key === this.appliedKey) return;
    // Nothing asked, never raised: the VM keeps the host's default, no group is made for it.
    if ((share === undefined && this.appliedKey === undefined) || !this.driver.setCpuShare) {
      this.appliedKey = key;
      return;
    }
    this.busy = true;
    this.driver
      .setCpuShare(this.handle, share ?? {})
      .then(
        () => (this.appliedKey = key),
        (err: unknown) =>
          log.warn({ vmId: this.handle.vmId, err: describeError(err) }, 'could not set the CPU share'),
      )
      .finally(() => (this.busy = false));
  }
}
