import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { createProgressDisplay } from '../../cli/progressDisplay';
import { z } from 'zod';
import { TaskClientError } from '../../client/taskClient';
import { RepositoryClient } from '../../repository/client';
import { DRIVER_NAMES } from '../../spec/taskSpec';
import { writeDemoSettings } from './demoSettings';
import { LocalCluster } from './localCluster';
import { stopAll, stopAllOnSignals } from './processes';
import { startTemporalDevServer } from './temporal';
import { repoRoot } from './tools';

/**
 * `npm start`: the whole task life on this machine, on real parts. Uses QEMU VMs when QEMU is installed,
 * the process driver otherwise, and says which. Listens on fixed ports (the README's addresses), prints
 * owner alice's token and the `export` lines for `vsp`, and writes them to the settings file `vsp` reads
 * by default, removed again when the demo stops.
 */
const say = (s: string) => process.stdout.write(`${s}\n`);

const LOOPBACK = '127.0.0.1';

/** `VSP_DEMO_<name>_PORT`, or the default; checked before anything starts. */
function demoPort(name: string, fallback: number): number {
  const variable = `VSP_DEMO_${name}_PORT`;
  const raw = process.env[variable];
  if (raw === undefined || raw === '') return fallback;
  const port = Number(raw);
  if (!/^\d{1,5}$/.test(raw) || port < 1 || port > 65535)
    throw new Error(`${variable} must be a TCP port from 1 to 65535, got ${JSON.stringify(raw)}`);
  return port;
}

/** Fails at once, naming the variable to change, when a port is taken (another demo, a Temporal server). */
async function requireFreePort(port: number, variable: string): Promise<void> {
  await new Promise<void>((resolve, reject) => {
    const server = net.createServer();
    server.once('error', (err: NodeJS.ErrnoException) =>
      reject(
        new Error(
          `port ${port} on ${LOOPBACK} is taken${err.code === 'EADDRINUSE' ? ' (another demo or server?)' : ''}: stop what uses it or set ${variable}`,
          { cause: err },
        ),
      ),
    );
    server.listen({ host: LOOPBACK, port }, () => server.close(() => resolve()));
  });
}

function qemuAvailable(): boolean {
  try {
    execFileSync('qemu-system-x86_64', ['--version'], { stdio: 'ignore', timeout: 10_000 });
    return true;
  } catch {
    return false;
  }
}

/** Removes the settings file the demo wrote, once it has written one. */
let removeSettings: () => Promise<void> = async () => undefined;

async function main(): Promise<void> {
  // Ctrl-C (the way out with VSP_DEMO_KEEP=1) and failures remove the settings file too.
  stopAllOnSignals(() => removeSettings());
  const demoDir = path.join(repoRoot(), '.vsp', 'demo');
  const runDir = path.join(demoDir, 'run');
  await fs.rm(runDir, { recursive: true, force: true });
  await fs.mkdir(runDir, { recursive: true });

  const ports = {
    repository: demoPort('REPOSITORY', 8420),
    temporal: demoPort('TEMPORAL', 7233),
    ui: demoPort('UI', 8233),
  };
  await requireFreePort(ports.repository, 'VSP_DEMO_REPOSITORY_PORT');
  await requireFreePort(ports.temporal, 'VSP_DEMO_TEMPORAL_PORT');
  await requireFreePort(ports.ui, 'VSP_DEMO_UI_PORT');

  const chosen = process.env.VSP_DEMO_DRIVER;
  const driver = z.enum(DRIVER_NAMES).parse(chosen ?? (qemuAvailable() ? 'qemu' : 'process'));
  const why = chosen ? 'VSP_DEMO_DRIVER' : driver === 'process' ? 'QEMU not installed' : 'QEMU installed';
  say(
    `VSP demo: driver '${driver}' (${why}): ${driver === 'process' ? 'tasks run as host processes' : 'tasks run in VMs'}`,
  );

  const temporal = await startTemporalDevServer({
    ip: LOOPBACK,
    port: ports.temporal,
    dbFile: path.join(demoDir, 'temporal.db'),
    uiPort: ports.ui,
    logFile: path.join(runDir, 'logs', 'temporal.log'),
  });

  const cluster = await new LocalCluster({
    temporalAddress: temporal.address,
    hosts: ['a', 'b'],
    baseDir: runDir,
    drivers: [driver],
    hostEnv: { VSP_ACCEL: process.env.VSP_ACCEL ?? 'auto' },
    owners: ['alice'],
    repositoryListen: { host: LOOPBACK, port: ports.repository },
  }).start();
  const token = cluster.ownerToken('alice');
  const settings = await writeDemoSettings(
    { VSP_REPOSITORY_URL: cluster.repositoryUrl, VSP_TOKEN: token, TEMPORAL_ADDRESS: temporal.address },
    path.join(runDir, 'vsp.env'),
  );
  removeSettings = settings.remove;
  const vspJs = path.join(repoRoot(), 'dist', 'cli', 'vsp.js');
  say(
    [
      '',
      `  web page (repository)  ${cluster.repositoryUrl}/   sign in as owner alice with the token below`,
      `  Temporal web UI        ${temporal.uiUrl}`,
      `  Temporal frontend      ${temporal.address}`,
      `  owner alice's token    ${token}`,
      `  logs                   ${cluster.logDir}`,
      '',
      `vsp and the temporal CLI, in another shell (vsp reads ${settings.file}${settings.byDefault ? ' by default' : ''}; these lines do the same):`,
      `  alias vsp='node ${vspJs}'`,
      ...(settings.byDefault ? [] : [`  export VSP_ENV_FILE=${settings.file}`]),
      `  export VSP_REPOSITORY_URL=${cluster.repositoryUrl}`,
      `  export VSP_TOKEN=${token}`,
      `  export TEMPORAL_ADDRESS=${temporal.address}`,
      '',
      "Live migration needs hosts with their own addresses and NFS-shared stores, which the demo's two host",
      'workers on this machine do not have: `vsp migrate` is refused here. Try it on namespace test hosts:',
      '`npx jest --runInBand test/system/migrationLifecycle.test.ts` (root; README, Development).',
      '',
    ].join('\n'),
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
    await removeSettings();
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
    await removeSettings().catch(() => undefined);
    process.exit(1);
  },
);
