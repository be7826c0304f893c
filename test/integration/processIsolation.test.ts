import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { taskFailureMessage } from '../../client/vspClient';
import { startClusterFixture, until, type ClusterFixture } from '../support/clusterFixture';

/**
 * A `process` task runs as an account of its own: it cannot read the worker's token, environment or
 * files, nor another task's home, while its own work succeeds.
 */
let fx: ClusterFixture;
let tmp: string;

beforeAll(async () => {
  fx = await startClusterFixture({ hosts: ['a'], owners: ['alice', 'bob'] });
  tmp = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-isolation-'));
}, 180_000);

afterAll(async () => {
  await fx?.stop();
  if (tmp) await fs.rm(tmp, { recursive: true, force: true });
});

/** The VM folder on host a whose home holds `file`: another task's home, as the host sees it. */
async function homeHolding(file: string): Promise<string | undefined> {
  const vms = path.join(fx.cluster.storeDir('a'), 'vms');
  for (const vm of await fs.readdir(vms)) {
    const home = path.join(vms, vm, 'home');
    if (await fs.stat(path.join(home, file)).catch(() => undefined)) return home;
  }
  return undefined;
}

async function download(owner: string, repoPath: string): Promise<string> {
  const dest = path.join(tmp, `${Math.random().toString(36).slice(2)}`);
  await fx.repo(owner).download(owner, repoPath, dest);
  return fs.readFile(dest, 'utf8');
}

test("a process task cannot read the worker's token, environment and files, nor another task's home", async () => {
  const worker = fx.cluster.hostProcs.get('a');
  if (!worker) throw new Error('no worker for host a');
  const environ = await fs.readFile(`/proc/${worker.pid}/environ`, 'utf8');
  const token = /(?:^|\0)VSP_REPOSITORY_TOKEN=([^\0]+)/.exec(environ)?.[1];
  expect(token).toBeDefined();
  // The token as an operator keeps it on the host: a root-only file (deploy/production's env file).
  const tokenFile = path.join(fx.cluster.opts.baseDir, 'host-worker.env');
  await fs.writeFile(tokenFile, `VSP_REPOSITORY_TOKEN=${token}\n`, { mode: 0o600 });

  // Bob's task keeps its home busy until the test releases it (a file the test drops into that home).
  const bob = await fx.cluster.submitTask('bob', {
    driver: 'process',
    host: 'a',
    command: 'echo bob-secret > mine.txt && while [ ! -e release ]; do sleep 0.1; done',
  });
  const bobHome = await until('bob’s task to write its file', () => homeHolding('mine.txt'));

  const probes: Record<string, string> = {
    token: `cat ${tokenFile}`,
    environ: `cat /proc/${worker.pid}/environ`,
    otherHome: `cat ${bobHome}/mine.txt`,
    otherHomeList: `ls ${bobHome}`,
    store: `ls ${fx.cluster.storeDir('a')}/vms`,
    repository: `ls ${fx.cluster.repoDir}`,
    rootHome: 'ls /root',
  };
  const command = [
    'mkdir -p out',
    'id -u > out/uid.txt',
    'env > out/env.txt',
    'echo own-work > out/own.txt && cat out/own.txt > out/copy.txt',
    ...Object.entries(probes).map(
      ([name, probe]) =>
        `if ${probe} > /dev/null 2>&1; then echo "${name} read"; else echo "${name} denied"; fi >> out/probes.txt`,
    ),
  ].join('\n');
  const { taskId } = await fx.cluster.submitTask('alice', { driver: 'process', host: 'a', command });
  const result = await fx.vsp.result(taskId);
  await fs.writeFile(path.join(bobHome, 'release'), '');
  await fx.vsp.result(bob.taskId);

  const outputs = (name: string) => {
    const o = result.outputs.find((f) => f.path.endsWith(`/outputs/${name}`));
    if (!o) throw new Error(`no output ${name}`);
    return download('alice', o.path);
  };
  expect(await outputs('copy.txt')).toBe('own-work\n');
  const uid = Number((await outputs('uid.txt')).trim());
  expect(uid).toBeGreaterThanOrEqual(100_000);
  const env = await outputs('env.txt');
  expect(env).not.toContain(token!);
  expect(env).not.toMatch(/VSP_REPOSITORY|TEMPORAL_ADDRESS|VSP_STORE/);
  expect(env).toContain('HOME=/home/alice');
  expect((await outputs('probes.txt')).trim().split('\n')).toEqual(
    Object.keys(probes).map((name) => `${name} denied`),
  );
}, 180_000);

test('two tasks running at once have different accounts; each owns its home', async () => {
  const cmd = 'mkdir -p out && id -u > out/uid.txt && stat -c %u:%a "$HOME" > out/home.txt';
  const [x, y] = await Promise.all([
    fx.cluster.submitTask('alice', { driver: 'process', host: 'a', command: cmd }),
    fx.cluster.submitTask('alice', { driver: 'process', host: 'a', command: cmd }),
  ]);
  const read = async (taskId: string, name: string) => {
    const r = await fx.vsp.result(taskId);
    return download('alice', r.outputs.find((f) => f.path.endsWith(`/outputs/${name}`))!.path);
  };
  const [ux, uy] = [(await read(x.taskId, 'uid.txt')).trim(), (await read(y.taskId, 'uid.txt')).trim()];
  expect(ux).not.toBe(uy);
  expect((await read(x.taskId, 'home.txt')).trim()).toBe(`${ux}:700`);
});

test('outputs a process task leaves that root must not copy (a FIFO, a symlink to /etc/shadow) are refused by name', async () => {
  const { taskId } = await fx.cluster.submitTask('alice', {
    driver: 'process',
    host: 'a',
    command: 'mkdir -p out && echo fine > out/ok.txt && mkfifo out/pipe && ln -s /etc/shadow out/shadow',
  });
  const err = await fx.vsp.result(taskId).catch((e: unknown) => e);
  const message = taskFailureMessage(err);
  expect(message).toContain('outputs that cannot be stored');
  expect(message).toContain('pipe (not a regular file or folder)');
  expect(message).toContain('shadow (a symlink)');
  // The log still reached the owner.
  const status = await fx.vsp.status(taskId);
  const logs = await fx.repo('alice').list('alice', `${status.resultsPath}/logs/`);
  expect(logs.map((f) => f.path)).toContain(`${status.resultsPath}/logs/failure.txt`);
});
