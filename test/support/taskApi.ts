import { parseTaskInput } from '../../spec/taskInput';
import type { ClusterFixture } from './clusterFixture';

/** The capability a task's workflow received, from its first history event. */
export async function capabilityOf(fx: ClusterFixture, taskId: string): Promise<string> {
  const history = await fx.temporal.workflow.getHandle(taskId).fetchHistory();
  const payload = history.events?.[0].workflowExecutionStartedEventAttributes?.input?.payloads?.[0];
  return parseTaskInput(JSON.parse(Buffer.from(payload?.data ?? []).toString('utf8'))).capability;
}
