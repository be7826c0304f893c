import { proxyActivities } from '@temporalio/workflow';
import type { HostLivenessActivities } from '../activities/host/hostLiveness';
import { hostTaskQueue } from '../config/names';

export interface HostLivenessInput {
  host: string;
  /** The host worker's heartbeat period. */
  heartbeatSec: number;
}

/**
 * One per host (id `vsp-host-liveness-<host>`, started by the host worker): keeps a `hostHeartbeat`
 * activity pending on the host's own queue. While the worker lives, the activity's last heartbeat time
 * (shown by describe(), no history event per beat) is at most one period old; when the worker dies,
 * it stops, and the retry waits for the next worker of that host. The control worker's hostStatus
 * reads it. The activity never completes (an attempt ends by its timeout, then the next one starts), so
 * neither beats nor attempts add history events.
 */
export async function HostLiveness(input: HostLivenessInput): Promise<void> {
  const { hostHeartbeat } = proxyActivities<HostLivenessActivities>({
    taskQueue: hostTaskQueue(input.host),
    startToCloseTimeout: '24h',
    heartbeatTimeout: `${input.heartbeatSec * 3}s`,
    // Unlimited attempts: a host may be down for days and still come back.
    retry: { initialInterval: '1s', maximumInterval: `${input.heartbeatSec}s`, backoffCoefficient: 2 },
  });
  await hostHeartbeat(input.host);
}
