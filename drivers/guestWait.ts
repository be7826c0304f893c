import type { Logger } from '../logging/logger';
import { ConsoleFollower, consoleTail, type ConsoleState } from './qemu/consoleLog';
import { sleep } from './qemu/vmProcess';
import type { ExitResult, VmStatus, WaitOptions } from './types';
import { TIMEOUT_EXIT_CODE, VmMigratedError } from './vmOutcome';

/** After VSP-EXIT the guest powers off by itself; give it this long before stopping it. */
const POWEROFF_GRACE_MS = 15_000;

/** What a driver sees of its VM (a QEMU process, a Xen domain) at one poll. */
export interface GuestLiveness {
  /** The VM still exists: after VSP-EXIT it must power off or be stopped. */
  exists: boolean;
  /** It still runs the task; one that does not and printed no exit has died. */
  running: boolean;
  /** Why it ended, for the error when it ended without an exit. */
  endedWhy: string;
  /** Facts for the progress report. */
  details: VmStatus['details'];
}

/** How `waitForGuest` watches one driver's VM. */
export interface GuestWatch {
  vmId: string;
  hostName: string;
  consoleLog: string;
  /** Epoch ms when the time limit runs out (NaN: none). */
  deadline: number;
  pollMs: number;
  log: Logger;
  probe(): Promise<GuestLiveness>;
  /** True once the VM is gone, false when it is still there after `timeoutMs`. */
  waitGone(timeoutMs: number): Promise<boolean>;
  /** Stops the VM, forced soon: after the task ended or its time ran out. */
  stop(): Promise<void>;
  /** The host the VM left this one for by live migration (undefined: it did not). */
  migratedAway(): Promise<string | undefined>;
}

/**
 * A driver's `wait`: follows the guest's console until it reports its exit, the VM dies, or the time
 * limit runs out, reporting progress on every poll.
 */
export async function waitForGuest(w: GuestWatch, options: WaitOptions): Promise<ExitResult> {
  const follower = new ConsoleFollower(w.consoleLog);
  for (;;) {
    if (options.signal.aborted)
      throw new Error(`waiting for VM ${w.vmId} was aborted`, { cause: options.signal.reason });
    const live = await w.probe();
    // Read the console after the liveness check: a VM that printed VSP-EXIT and died is seen exiting.
    const cons = await follower.poll();
    if (cons.exitCode !== undefined) {
      if (live.exists && !(await w.waitGone(POWEROFF_GRACE_MS))) {
        w.log.warn({ vmId: w.vmId }, 'guest did not power off after VSP-EXIT: stopping it');
        await w.stop();
      }
      return { exitCode: cons.exitCode, timedOut: false, ...reported(cons) };
    }
    if (!live.running) {
      const movedTo = await w.migratedAway();
      if (movedTo !== undefined) throw new VmMigratedError(w.vmId, w.hostName, movedTo);
      const why = cons.guestError ? `the guest init failed: ${cons.guestError}` : live.endedWhy;
      throw new Error(`VM ${w.vmId}: ${why}; console tail:\n${await consoleTail(w.consoleLog)}`);
    }
    if (Number.isFinite(w.deadline) && Date.now() >= w.deadline) {
      w.log.warn({ vmId: w.vmId }, 'time limit reached: stopping the VM');
      await w.stop();
      return { exitCode: TIMEOUT_EXIT_CODE, timedOut: true, ...reported(await follower.poll()) };
    }
    options.onProgress({
      phase: 'running',
      ...reported(cons),
      details: { ...live.details, taskStarted: cons.started },
    });
    await sleep(w.pollMs, options.signal);
  }
}

/** A driver's `inspect` of a started VM that no longer runs: exited when the guest reported it, else missing. */
export function endedGuestStatus(cons: ConsoleState, details: VmStatus['details'], reason: string): VmStatus {
  const progress = reported(cons);
  if (cons.exitCode !== undefined) return { phase: 'exited', exitCode: cons.exitCode, ...progress, details };
  return { phase: 'missing', ...progress, details: { ...details, reason: cons.guestError ?? reason } };
}

/** The console's last progress report. */
function reported(cons: ConsoleState): Pick<VmStatus, 'progress' | 'progressMessage'> {
  return { progress: cons.progress, progressMessage: cons.progressMessage };
}
