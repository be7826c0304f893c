import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { createProgressDisplay } from '../../cli/progressDisplay';
import { z } from 'zod';
import { TaskClientError } from '../../client/taskClient';
import { RepositoryClient } from '../../repository/client';
import { DRIVER_NAMES } from '../../spec/taskSpec';
import { LocalCluster } from './localCluster';
import { stopAll, stopAllOnSignals } from './processes';
import { startTemporalDevServer } from './temporal';
import { repoRoot } from './tools';

/**
 * `npm start`: the whole task life on this machine, on real parts. Uses QEMU VMs when QEMU is installed,
 * the process driver otherwise, and says which.
 */
const say = (s: string) => process.stdout.write(`${s}\n`);

function qemuAvailable(): boolean {
  try {
    execFileSync('qemu-system-x86_64', ['--version'], { stdio: 'ignore', timeout: 10_000 });
    return true;
  } catch {
    return false;
  }
}

async function main(): Promise<void> {
  stopAllOnSignals();
  const demoDir = path.join(repoRoot(), '.vsp', 'demo');
  const runDir = path.join(demoDir, 'run');
  await fs.rm(runDir, { recursive: true, force: true });
  await fs.mkdir(runDir, { recursive: true });

  const chosen = process.env.VSP_DEMO_DRIVER;
  const driver = z.enum(DRIVER_NAMES).parse(chosen ?? (qemuAvailable() ? 'qemu' : 'process'));
  const why = chosen ? 'VSP_DEMO_DRIVER' : driver === 'process' ? 'QEMU not installed' : 'QEMU installed';
  say(
    `VSP demo: driver '${driver}' (${why}): ${driver === 'process' ? 'tasks run as host processes' : 'tasks run in VMs'}`,
  );

  const temporal = await startTemporalDevServer({
    dbFile: path.join(demoDir, 'temporal.db'),
    uiPort: Number(process.env.VSP_DEMO_UI_PORT ?? 8233),
    logFile: path.join(runDir, 'logs', 'temporal.log'),
  });
  say(`Temporal dev server at ${temporal.address}; web UI: ${temporal.uiUrl}`);

  const cluster = await new LocalCluster({
    temporalAddress: temporal.address,
    hosts: ['a', 'b'],
    baseDir: runDir,
    drivers: [driver],
    hostEnv: { VSP_ACCEL: process.env.VSP_ACCEL ?? 'auto' },
    owners: ['alice'],
  }).start();
  say(`repository at ${cluster.repositoryUrl}; host workers a and b; logs in ${cluster.logDir}`);
  const token = cluster.ownerToken('alice');
  say(
    `owner alice's token (sign in to the web page at ${cluster.repositoryUrl} with owner alice and this token, ` +
      `or use vsp):\n  export VSP_REPOSITORY_URL=${cluster.repositoryUrl}\n  export VSP_TOKEN=${token}`,
  );

  const repo = new RepositoryClient({ url: cluster.repositoryUrl, token });
  const input = path.join(runDir, 'frames.raw');
  await fs.writeFile(input, Buffer.concat([randomBytes(2 * 1024 * 1024), Buffer.alloc(6 * 1024 * 1024, 7)]));
  const uploaded = await repo.upload('alice', 'videos/frames.raw', input);
  say(`uploaded videos/frames.raw (${uploaded.size} bytes, sha256 ${uploaded.sha256.slice(0, 16)}...)`);

  // Submitted as owners do: through the repository's task API with alice's token.
  const tasks = cluster.tasks('alice');
  const { taskId } = await tasks.submit({
    // The process driver runs only tasks that name it.
    driver,
    name: 'encode',
    inputs: ['videos/frames.raw'],
    command: [
      'mkdir -p out',
      'echo VSP-PROGRESS 10 compressing',
      'gzip -9 -c videos/frames.raw > out/frames.raw.gz',
      'echo VSP-PROGRESS 80 checksumming',
      'sha256sum videos/frames.raw out/frames.raw.gz > out/SHA256SUMS',
      'echo "encoded on $(hostname) in $(pwd)" > out/report.txt',
      'echo VSP-PROGRESS 100 done',
    ].join(' && '),
  });
  say(`task ${taskId} started (vsp status ${taskId}); operators see it in Temporal:`);
  say(`  ${temporal.uiUrl}/namespaces/default/workflows/${taskId}`);
  say(`  temporal workflow describe -w ${taskId} --address ${temporal.address}`);

  const display = createProgressDisplay(process.stdout);
  try {
    const result = await tasks.watch(taskId, (s) => display.update(s));
    display.done();
    const phases = Object.entries(result.phaseMs)
      .map(([p, ms]) => `${p} ${ms} ms`)
      .join(', ');
    say(`task completed on host ${result.host}: ${phases}`);
    const outDir = path.join(runDir, 'outputs');
    await fs.mkdir(outDir, { recursive: true });
    for (const f of result.outputs) {
      const dest = path.join(outDir, path.basename(f.path));
      await repo.download('alice', f.path, dest);
      say(`  ${f.path}  ${f.size} bytes`);
    }
    say(
      `\n${await fs.readFile(path.join(outDir, 'SHA256SUMS'), 'utf8')}${await fs.readFile(path.join(outDir, 'report.txt'), 'utf8')}`,
    );
    say(`outputs downloaded to ${outDir}`);
  } catch (err) {
    display.done();
    throw new Error(
      `task ${taskId} failed: ${err instanceof TaskClientError ? err.reason : (err as Error).message}`,
      {
        cause: err,
      },
    );
  } finally {
    if (process.env.VSP_DEMO_KEEP === '1') {
      say('VSP_DEMO_KEEP=1: everything keeps running; press Ctrl-C to stop.');
      await new Promise(() => undefined);
    }
    await cluster.stop();
    await temporal.stop();
  }
  say('demo finished; everything stopped.');
}

main().then(
  () => process.exit(0),
  async (err: unknown) => {
    process.stderr.write(`demo failed: ${err instanceof Error ? err.message : String(err)}\n`);
    await stopAll().catch(() => undefined);
    process.exit(1);
  },
);
