import { ApplicationFailure, Context } from '@temporalio/activity';
import { setTimeout as sleep } from 'node:timers/promises';

/** One attempt of the host heartbeat ends after this long (bounded attempts; the workflow loops). */
const ATTEMPT_MS = 60 * 60_000;

export interface HostLivenessDeps {
  hostName: string;
  /** How often the heartbeat reaches Temporal (the worker's heartbeat throttle is set to the same). */
  heartbeatMs: number;
}

/**
 * The host's heartbeat, run by its worker for as long as the worker lives (workflows/hostLiveness.ts).
 * Temporal records each beat as the pending activity's last heartbeat time, without a history event,
 * so the control worker reads a host's liveness with one describe() call (hostStatus).
 */
export function createHostLivenessActivities(deps: HostLivenessDeps) {
  const startedAt = new Date().toISOString();
  return {
    async hostHeartbeat(host: string): Promise<void> {
      if (host !== deps.hostName)
        throw ApplicationFailure.nonRetryable(
          `host ${deps.hostName} was asked to heartbeat for host ${host}`,
          'WrongHost',
        );
      const ctx = Context.current();
      const until = Date.now() + ATTEMPT_MS;
      while (Date.now() < until) {
        ctx.heartbeat({ host, pid: process.pid, workerStartedAt: startedAt });
        await sleep(deps.heartbeatMs, undefined, { signal: ctx.cancellationSignal });
      }
    },
  };
}

export type HostLivenessActivities = ReturnType<typeof createHostLivenessActivities>;
