import { ApplicationFailure, log, sleep } from '@temporalio/workflow';
import { tuned } from './activities';
import { describe, isRepositoryAway } from './failures';
import { setPhase, type TaskState } from './state';

/**
 * Stores what a host holds for the task (outputs, logs) with `store`, which has its own retries. While
 * the repository is unavailable the task waits in phase `awaiting-repository`, trying again now and
 * then, for at most the retention (input `tuning.repositoryRetentionSec`, default 7 days): the files
 * are safe on the host meanwhile, and nothing destroys them before they are stored. Past the retention
 * it fails with `OutputsNotStored`, its first cause the repository's last error.
 */
export async function untilStored<T>(t: TaskState, what: string, store: () => Promise<T>): Promise<T> {
  const back = t.status.phase;
  let until: number | undefined;
  for (;;) {
    try {
      const stored = await store();
      if (until !== undefined) {
        t.status.awaitingRepository = undefined;
        setPhase(t, back);
      }
      return stored;
    } catch (err) {
      if (!isRepositoryAway(err)) throw err;
      const now = Date.now();
      const retentionSec = tuned(t, 'repositoryRetentionSec');
      until ??= now + retentionSec * 1000;
      if (now >= until)
        throw ApplicationFailure.create({
          message: `${what} were not stored: the repository was unavailable for ${retentionSec} s (the retention), last: ${describe(err)}`,
          type: 'OutputsNotStored',
          nonRetryable: true,
          cause: err instanceof Error ? err : undefined,
        });
      if (t.status.phase !== 'awaiting-repository') {
        log.warn('the repository is unavailable: the files wait on their host', {
          what,
          error: describe(err),
        });
        t.status.awaitingRepository = {
          since: new Date(now).toISOString(),
          until: new Date(until).toISOString(),
          error: describe(err),
        };
        setPhase(t, 'awaiting-repository');
      } else if (t.status.awaitingRepository) t.status.awaitingRepository.error = describe(err);
      await sleep(Math.min(tuned(t, 'repositoryRetrySec') * 1000, Math.max(1, until - now)));
    }
  }
}
