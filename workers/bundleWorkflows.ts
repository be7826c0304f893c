import { promises as fs } from 'node:fs';
import path from 'node:path';
import { bundleWorkflowCode } from '@temporalio/worker';

/**
 * Build step: bundles the workflows once (webpack takes seconds), so control workers start at once.
 * The control worker falls back to bundling at start when the bundle is missing.
 */
export const WORKFLOW_BUNDLE = path.join(__dirname, '..', 'workflow-bundle.js');

async function main(): Promise<void> {
  const { code } = await bundleWorkflowCode({
    workflowsPath: require.resolve('../workflows'),
    logger: {
      log: () => undefined,
      trace: () => undefined,
      debug: () => undefined,
      info: () => undefined,
      warn: console.warn,
      error: console.error,
    },
  });
  const tmp = `${WORKFLOW_BUNDLE}.tmp`;
  await fs.writeFile(tmp, code);
  await fs.rename(tmp, WORKFLOW_BUNDLE);
}

if (require.main === module) {
  main().catch((err: unknown) => {
    console.error('workflow bundling failed:', err);
    process.exit(1);
  });
}
