import { parseTaskInput } from '../../spec/taskInput';
import type { ClusterFixture } from './clusterFixture';

export interface Submitted {
  taskId: string;
  runId: string;
  resultsPath: string;
}

/**
 * Submits a task as its owner through the repository's task API (the owners' one front door): the
 * repository checks it, mints its capability and starts its workflow.
 */
export async function submitTask(
  fx: ClusterFixture,
  owner: string,
  spec: Record<string, unknown>,
): Promise<Submitted> {
  const res = await fetch(`${fx.cluster.repositoryUrl}/v1/owners/${owner}/tasks`, {
    method: 'POST',
    headers: {
      Authorization: `Bearer ${fx.cluster.ownerTokens.get(owner) ?? ''}`,
      'Content-Type': 'application/json',
    },
    body: JSON.stringify({ owner, ...spec }),
  });
  const body = (await res.json()) as Submitted & { error?: string };
  if (res.status !== 201) throw new Error(`submission refused: ${res.status} ${body.error ?? ''}`);
  return body;
}

/** The capability a task's workflow received, from its first history event. */
export async function capabilityOf(fx: ClusterFixture, taskId: string): Promise<string> {
  const history = await fx.temporal.workflow.getHandle(taskId).fetchHistory();
  const payload = history.events?.[0].workflowExecutionStartedEventAttributes?.input?.payloads?.[0];
  return parseTaskInput(JSON.parse(Buffer.from(payload?.data ?? []).toString('utf8'))).capability;
}
