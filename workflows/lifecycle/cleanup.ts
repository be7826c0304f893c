import { CancellationScope, condition, log, patched } from '@temporalio/workflow';
import { hostSteps, LOCAL_PLACEMENT_PATCH, localControl, reservations, SCHEDULER_PATCH } from './activities';
import { describe, ownFailureType } from './failures';
import { untilStored } from './repositoryWait';
import { setPhase, type TaskState } from './state';

/**
 * The last chapter, on every path (completed, failed, cancelled), even while the workflow itself is
 * being cancelled: the logs and the console reach the repository, then the VM goes, then the task's
 * capability ends (so a reused workflow id cannot write into this run's folder), then its resources go
 * back to the scheduler. A dead host is left to its reaper.
 */
export async function cleanUp(t: TaskState): Promise<void> {
  await CancellationScope.nonCancellable(async () => {
    // A migration under way ends first (its steps are bounded): then the VM is in one known place.
    await condition(() => !t.migrating);
    const dead = deadHost(t);
    const live = (h: string | undefined): h is string => h !== undefined && h !== dead;
    if (t.host && t.storageHost) {
      setPhase(t, 'destroying');
      if (live(t.storageHost) && t.failure && ownFailureType(t.failure) !== 'OutputsNotStored')
        await keepLogs(t, t.storageHost);
      if (live(t.host)) await keepConsole(t, t.host);
      await destroy(t, live);
    }
    const releaser = [t.storageHost, t.host].find(live);
    if (releaser && !t.capabilityReleased)
      await hostSteps(t, releaser)('release', 'releaseCapability', 'end the task capability', t.ref).catch(
        (err: unknown) => log.warn('could not end the task capability', { error: describe(err) }),
      );
    // The VM is gone (or its host is): its resources go back to the scheduler, or the task leaves its queue.
    if (t.placementAsked && patched(SCHEDULER_PATCH))
      await (patched(LOCAL_PLACEMENT_PATCH) ? localControl : reservations)
        .releasePlacement()
        .catch((err: unknown) => log.error('could not release the task placement', { error: describe(err) }));
  });
}

/** The host a `HostDown` failure names, if the task failed with one. */
function deadHost(t: TaskState): string | undefined {
  if (ownFailureType(t.failure) !== 'HostDown') return undefined;
  for (let e: unknown = t.failure; e instanceof Error; e = e.cause) {
    const details = (e as { details?: unknown[] }).details;
    const host = (details?.[0] as { host?: unknown } | undefined)?.host;
    if (typeof host === 'string') return host;
  }
  return undefined;
}

/** Whatever the task left (its log, the reason it failed) reaches the owner's results before destroy. */
async function keepLogs(t: TaskState, host: string): Promise<void> {
  try {
    await untilStored(t, 'the task logs', () =>
      hostSteps(t, host)(
        'cleanup',
        'collectLogs',
        `keep the logs in ${t.ref.resultsPath}/logs`,
        t.ref,
        t.driver,
        t.status.error ?? 'failed',
      ),
    );
  } catch (err) {
    log.warn('could not collect the task logs', { error: describe(err) });
  }
}

async function keepConsole(t: TaskState, host: string): Promise<void> {
  // Stage-out kept it already (its result says so).
  if (t.consoleSegments.length === 0 || t.staged?.console) return;
  await Promise.all(t.keepingConsoles);
  try {
    t.consoleLogs = await untilStored(t, 'the console', () =>
      hostSteps(t, host)(
        'cleanup',
        'collectConsole',
        `keep the console in ${t.ref.resultsPath}/logs`,
        t.ref,
        t.consoleSegments,
      ),
    );
  } catch (err) {
    log.warn('could not collect the console', { error: describe(err) });
  }
}

/**
 * Stops the VM where it runs, then removes its folder where its disks live (they must not vanish under
 * it). The last of these steps also ends the task's capability (once the VM is gone nothing of the task
 * uses it): one step fewer. Its result says it did; a destroyVm of older histories returned nothing,
 * and cleanUp then asks releaseCapability, as those histories did.
 */
async function destroy(t: TaskState, live: (h: string | undefined) => h is string): Promise<void> {
  const { host, storageHost, ref, handle } = t;
  const left = [host, storageHost].filter((h) => !live(h));
  const released = (r: { capabilityReleased?: boolean } | undefined) => r?.capabilityReleased === true;
  try {
    if (live(host) && host !== storageHost) {
      const last = !live(storageHost);
      const stopped = await hostSteps(t, host)('cleanup', 'destroyVm', `stop VM ${ref.vmId}`, ref, handle, {
        releaseCapability: last,
      });
      t.capabilityReleased = released(stopped);
    }
    if (live(storageHost))
      t.capabilityReleased = released(
        await hostSteps(t, storageHost)('cleanup', 'destroyVm', `destroy VM ${ref.vmId}`, ref, handle, {
          releaseCapability: true,
        }),
      );
    if (left.length > 0)
      t.status.cleanupError = `host ${left[0]} is down: its VM folder is left to its reaper`;
  } catch (err) {
    // What is left on an unreachable host is its operator's (or reaper's) to clear.
    t.status.cleanupError = describe(err);
    log.error('could not destroy the VM', {
      vmId: ref.vmId,
      host,
      storageHost,
      error: t.status.cleanupError,
    });
  }
}
