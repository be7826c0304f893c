import { TestWorkflowEnvironment } from '@temporalio/testing';
import { bundleWorkflowCode, Runtime, type WorkflowBundle } from '@temporalio/worker';
import { resolveTemporalCli } from '../../../deploy/devcluster/tools';

function quietLogger() {
  const none = () => undefined;
  return { log: none, trace: none, debug: none, info: none, warn: none, error: none };
}

/**
 * A local Temporal dev server from the installed CLI (deploy/devcluster/tools.ts) and the workflows of
 * `workflowsPath` bundled, for workflow tests with stand-in activities; the SDK's own logs silenced. Not
 * the time-skipping test server: the SDK downloads it at first use, which this project's machines cannot.
 */
export async function startWorkflowTestEnv(
  workflowsPath: string,
  serverArgs: string[] = [],
): Promise<{ env: TestWorkflowEnvironment; bundle: WorkflowBundle }> {
  Runtime.install({ logger: quietLogger() });
  const [env, bundle] = await Promise.all([
    TestWorkflowEnvironment.createLocal({
      server: { executable: { type: 'existing-path', path: resolveTemporalCli() }, extraArgs: serverArgs },
    }),
    bundleWorkflowCode({ workflowsPath, logger: quietLogger() }),
  ]);
  return { env, bundle };
}
