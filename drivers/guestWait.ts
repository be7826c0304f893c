import { watch, type FSWatcher } from 'node:fs';
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
  const waker = new ConsoleWaker(w.consoleLog);
  try {
    return await follow(w, options, follower, waker);
  } finally {
    waker.close();
  }
}

async function follow(
  w: GuestWatch,
  options: WaitOptions,
  follower: ConsoleFollower,
  waker: ConsoleWaker,
): Promise<ExitResult> {
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
    await waker.wait(w.pollMs, options.signal);
  }
}

/** Polls that a console write brings forward are still at least this far apart (a chatty guest). */
const MIN_POLL_MS = 50;

/**
 * The poll's pause, cut short when the console log changes: the guest prints its exit there, so a
 * short task's end is seen at once rather than up to a poll period later. Without a watch (the log
 * not there yet, a file system without inotify) it is the plain pause.
 */
class ConsoleWaker {
  private watcher?: FSWatcher;
  private changed = false;
  private wake?: () => void;

  constructor(private readonly file: string) {
    this.arm();
  }

  private arm(): void {
    if (this.watcher) return;
    try {
      this.watcher = watch(this.file, { persistent: false }, () => {
        this.changed = true;
        this.wake?.();
      });
      this.watcher.on('error', () => this.close());
    } catch {
      // Not written yet: each pause tries again.
    }
  }

  async wait(ms: number, signal: AbortSignal): Promise<void> {
    this.arm();
    await sleep(Math.min(MIN_POLL_MS, ms), signal);
    if (!this.changed && !signal.aborted) {
      const woken = new AbortController();
      this.wake = () => woken.abort();
      await sleep(ms - MIN_POLL_MS, AbortSignal.any([signal, woken.signal]));
      this.wake = undefined;
    }
    this.changed = false;
  }

  close(): void {
    this.watcher?.close();
    this.watcher = undefined;
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
