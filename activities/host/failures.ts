import { ApplicationFailure, CancelledFailure } from '@temporalio/activity';
import { describeError } from '../../logging/logger';
import { RepositoryError } from '../../repository/client';

const NO_SPACE = /No space left on device|Disk quota exceeded|\bENOSPC\b|\bEDQUOT\b/;

/** True when `err` or one of its causes is a full disk (a tool's stderr counts: mke2fs says so). */
export function isNoSpace(err: unknown): boolean {
  for (let e: unknown = err, depth = 0; e instanceof Error && depth < 8; e = e.cause, depth++) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ENOSPC' || code === 'EDQUOT' || NO_SPACE.test(e.message)) return true;
  }
  return false;
}

/** The innermost RepositoryError of a chain of causes. */
function repositoryErrorIn(err: unknown): RepositoryError | undefined {
  let found: RepositoryError | undefined;
  for (let e: unknown = err, depth = 0; e instanceof Error && depth < 8; e = e.cause, depth++)
    if (e instanceof RepositoryError) found = e;
  return found;
}

/**
 * What a host step's error means for Temporal's retries. Errors that cannot heal fail the task at once,
 * with the cause first in the message (retries would only bury it): a full VM store (`StoreFull`), a
 * repository that refuses the request (401/403/404..., `RepositoryRefused`, its message kept). A
 * repository that cannot be reached or answers 5xx is `RepositoryUnavailable`, retried. Anything else
 * (already a Temporal failure, or unknown) passes unchanged.
 */
export function classifyHostError(err: unknown, hostName: string): unknown {
  if (err instanceof ApplicationFailure || err instanceof CancelledFailure) return err;
  if (isNoSpace(err))
    return ApplicationFailure.create({
      message: `No space left on device: the VM store of host ${hostName} is full (${describeError(err)})`,
      type: 'StoreFull',
      nonRetryable: true,
      cause: err instanceof Error ? err : undefined,
    });
  const repoErr = repositoryErrorIn(err);
  if (repoErr) {
    const unavailable = repoErr.kind === 'unavailable';
    return ApplicationFailure.create({
      message: unavailable ? `repository unavailable: ${describeError(err)}` : repoErr.message,
      type: unavailable ? 'RepositoryUnavailable' : 'RepositoryRefused',
      nonRetryable: !unavailable,
      details: [{ status: repoErr.status }],
      cause: err instanceof Error ? err : undefined,
    });
  }
  return err;
}

/** Runs a host step, its errors classified (classifyHostError). */
export async function classified<T>(hostName: string, work: () => Promise<T>): Promise<T> {
  try {
    return await work();
  } catch (err) {
    throw classifyHostError(err, hostName);
  }
}
