import { RetryState } from '@temporalio/common';
import { ActivityFailure, ApplicationFailure, TimeoutFailure } from '@temporalio/workflow';

/** The type of the innermost ApplicationFailure in a chain of causes. */
export function failureType(err: unknown): string | undefined {
  let type: string | undefined;
  for (let e: unknown = err; e instanceof Error; e = e.cause)
    if (e instanceof ApplicationFailure) type = e.type ?? undefined;
  return type;
}

/** The type of a failure the workflow itself raised (HostDown, OutputsNotStored), not of its causes. */
export function ownFailureType(err: unknown): string | undefined {
  return err instanceof ApplicationFailure ? (err.type ?? undefined) : undefined;
}

/** An activity that nobody ran or that stopped heartbeating: its host may be gone. */
export function isTimeout(err: unknown): boolean {
  for (let e: unknown = err; e instanceof Error; e = e.cause) if (e instanceof TimeoutFailure) return true;
  return false;
}

/**
 * The repository could not take the files: the host said so (`RepositoryUnavailable`), or a retryable
 * failure outlasted the step's tries. Either way the files are still safe on the host.
 */
export function isRepositoryAway(err: unknown): boolean {
  if (failureType(err) === 'RepositoryUnavailable') return true;
  if (!(err instanceof ActivityFailure) || isTimeout(err)) return false;
  const cause = err.cause;
  return (
    err.retryState === RetryState.MAXIMUM_ATTEMPTS_REACHED &&
    cause instanceof ApplicationFailure &&
    !cause.nonRetryable
  );
}

export function describe(err: unknown): string {
  const parts: string[] = [];
  let e: unknown = err;
  while (e instanceof Error && parts.length < 4) {
    // The wrapper around an activity's own failure says nothing the cause does not.
    if (!(e instanceof ActivityFailure)) parts.push(e.message);
    e = e.cause;
  }
  return parts.join(': ') || String(err);
}
