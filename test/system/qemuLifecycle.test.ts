import { withBackend } from '../../repository/store/backend';
import { createHash, randomBytes } from 'node:crypto';
import { execFileSync } from 'node:child_process';
import { createReadStream, promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { gunzipSync } from 'node:zlib';
import { ApplicationFailure, WorkflowFailedError } from '@temporalio/client';
import { taskFailureMessage } from '../../client/vspClient';
import { ensureAppliance, type Appliance } from '../../drivers/qemu/appliance';
import { addBaseImage } from '../../repository/store/imageStore';
import type { TaskSpecInput } from '../../spec/taskSpec';
import { startClusterFixture, until, type ClusterFixture } from '../support/clusterFixture';
import { findVmId } from '../support/vmFolders';

/**
 * The task lifecycle with real QEMU VMs (TCG: KVM hangs on these machines) through the whole Temporal
 * workflow: one host worker with the qemu driver, a real repository and control worker. Each boot costs
 * seconds, so the VMs are few and their commands short.
 */
const HOST = 'q';
const OWNER = 'alice';
const sha256 = (b: Buffer | string) => createHash('sha256').update(b).digest('hex');

let fx: ClusterFixture;
let tmp: string;
let appliance: Appliance;

beforeAll(async () => {
  appliance = await ensureAppliance();
  tmp = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-qemu-e2e-'));
  fx = await startClusterFixture({
    hosts: [HOST],
    owners: [OWNER],
    drivers: ['qemu'],
    hostEnv: { VSP_ACCEL: 'tcg' },
  });
}, 180_000);

afterAll(async () => {
  // A failed test must not leave its VM running: kill what is left of this cluster's QEMUs, by pid.
  if (fx) for (const pid of qemuPids()) process.kill(pid, 'SIGKILL');
  await fx?.stop();
  if (tmp) await fs.rm(tmp, { recursive: true, force: true });
});

const storeDir = () => fx.cluster.storeDir(HOST);
const vmDir = (vmId: string) => path.join(storeDir(), 'vms', vmId);

/** QEMU processes whose command line lies in this cluster's folder (disks, sockets, pid files). */
function qemuPids(): number[] {
  const out = execFileSync('ps', ['-eo', 'pid=,args='], { encoding: 'utf8' });
  return out
    .split('\n')
    .filter((l) => l.includes('qemu-system') && l.includes(fx.cluster.opts.baseDir))
    .map((l) => Number(l.trim().split(/\s+/)[0]));
}

/** Running, not merely unreaped: a detached QEMU is reaped by its worker or init, which may take time. */
async function alive(pid: number): Promise<boolean> {
  const stat = await fs.readFile(`/proc/${pid}/stat`, 'utf8').catch(() => '');
  return stat !== '' && stat.slice(stat.lastIndexOf(')') + 2)[0] !== 'Z';
}

async function vmFolders(): Promise<string[]> {
  return fs.readdir(path.join(storeDir(), 'vms')).catch(() => [] as string[]);
}

async function socketsUnder(dir: string): Promise<string[]> {
  const found: string[] = [];
  for (const e of await fs.readdir(dir, { withFileTypes: true, recursive: true }))
    if (e.isSocket()) found.push(path.join(e.parentPath, e.name));
  return found;
}

async function uploadFile(repoPath: string, data: Buffer | string): Promise<void> {
  const f = path.join(tmp, `up-${randomBytes(6).toString('hex')}`);
  await fs.writeFile(f, data);
  await fx.repo(OWNER).upload(OWNER, repoPath, f);
  await fs.rm(f);
}

async function downloadText(repoPath: string): Promise<string> {
  return (await downloadBytes(repoPath)).toString('utf8');
}

async function downloadBytes(repoPath: string): Promise<Buffer> {
  const f = path.join(tmp, `down-${randomBytes(6).toString('hex')}`);
  await fx.repo(OWNER).download(OWNER, repoPath, f);
  const data = await fs.readFile(f);
  await fs.rm(f);
  return data;
}

function submit(spec: Omit<TaskSpecInput, 'owner'>) {
  return fx.cluster.submitTask(OWNER, { driver: 'qemu', host: HOST, timeLimitSec: 300, ...spec });
}

const vmIdOf = (taskId: string) => findVmId([storeDir()], taskId);

/** Waits until the VM's console shows `line` (the guest's VSP- lines reach it as they are printed). */
async function awaitConsole(vmId: string, line: string): Promise<void> {
  await until(
    `'${line}' on the console of ${vmId}`,
    async () =>
      (await fs.readFile(path.join(vmDir(vmId), 'console.log'), 'utf8')).includes(line) || undefined,
    120_000,
  );
}

async function qemuPidOf(vmId: string): Promise<number> {
  return until(`the QEMU pid of ${vmId}`, async () => {
    const pid = Number((await fs.readFile(path.join(vmDir(vmId), 'qemu.pid'), 'utf8')).trim());
    return pid > 1 ? pid : undefined;
  });
}

/** The workflow's failure, with the innermost ApplicationFailure (type, non-retryable flag). */
async function failureOf(taskId: string) {
  const err = await fx.vsp.result(taskId).then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(WorkflowFailedError);
  let app: ApplicationFailure | undefined;
  for (let e: unknown = err; e instanceof Error; e = e.cause) if (e instanceof ApplicationFailure) app = e;
  return { message: taskFailureMessage(err), app, status: await fx.vsp.status(taskId) };
}

test('a CPU-bound task runs in a VM: outputs match the host checksum, home is the mounted data disk', async () => {
  // Half random, half repetitive: gzip has real work to do and something to gain.
  const data = Buffer.concat([randomBytes(1536 * 1024), Buffer.alloc(1536 * 1024, 'vsp compress me ')]);
  await uploadFile('in/data.bin', data);
  const { taskId } = await submit({
    inputs: ['in/data.bin'],
    command: [
      'set -e',
      'pwd',
      'mount | grep home',
      'mkdir -p out',
      'gzip -9 -c in/data.bin > out/data.bin.gz',
      'sha256sum in/data.bin > out/data.sha256',
      'echo VSP-PROGRESS 100 done',
    ].join('\n'),
  });
  const result = await fx.vsp.result(taskId);
  expect(result.exitCode).toBe(0);
  expect(result.host).toBe(HOST);
  // The guest's last report, printed just before it powered off, is the one the task keeps.
  expect(await fx.vsp.status(taskId)).toMatchObject({ progress: 100, progressMessage: 'done' });

  const sums = await downloadText(`${result.resultsPath}/outputs/data.sha256`);
  expect(sums).toBe(`${sha256(data)}  in/data.bin\n`);
  const gz = await downloadBytes(`${result.resultsPath}/outputs/data.bin.gz`);
  expect(gz.length).toBeLessThan(data.length * 0.75);
  expect(sha256(gunzipSync(gz))).toBe(sha256(data));

  const taskLog = await downloadText(`${result.resultsPath}/logs/task.log`);
  expect(taskLog).toMatch(new RegExp(`^/home/${OWNER}$`, 'm'));
  expect(taskLog).toMatch(new RegExp(`^/dev/vdb on /home/${OWNER} type ext4`, 'm'));
  expect(await vmFolders()).toEqual([]);
  expect(qemuPids()).toEqual([]);
}, 180_000);

test('the host worker SIGKILLed mid-task and restarted: the VM keeps running, the task runs once', async () => {
  const { taskId } = await submit({
    command: [
      'echo run >> runs.txt',
      'echo VSP-PROGRESS 10 started',
      // Outlasts the heartbeat timeout (20 s) after which the new worker's awaitVm re-attaches.
      'sleep 40',
      'mkdir -p out && cp runs.txt out/runs.txt',
    ].join('\n'),
  });
  const vmId = await vmIdOf(taskId);
  await awaitConsole(vmId, 'VSP-PROGRESS 10');
  const pid = await qemuPidOf(vmId);

  await fx.cluster.killHost(HOST);
  expect(await alive(pid)).toBe(true);
  await fx.cluster.startHost(HOST);
  expect(await alive(pid)).toBe(true);

  const result = await fx.vsp.result(taskId);
  expect(result.exitCode).toBe(0);
  expect(await downloadText(`${result.resultsPath}/outputs/runs.txt`)).toBe('run\n');
  const consoleLog = await downloadText(`${result.resultsPath}/logs/console.log`);
  expect(consoleLog.match(/^VSP-START/gm)).toHaveLength(1);
  const hostLog = await fs.readFile(path.join(fx.cluster.logDir, `host-${HOST}.log`), 'utf8');
  expect(hostLog).toMatch(new RegExp(`"vmId":"${vmId}".*"phase":"running".*re-attached to VM`));
  expect(await alive(pid)).toBe(false);
  expect(await vmFolders()).toEqual([]);
}, 180_000);

test('QEMU killed mid-task: its live log showed the output within 2 s; the task fails clearly, its logs reach the repository, the host is clean', async () => {
  const marker = `before-kill-${Date.now()}`;
  const { taskId } = await submit({
    command: `echo ${marker}; sleep 1; sync; echo VSP-PROGRESS 10 started; sleep 120`,
  });
  // The owner follows the task's live log from the start (what `vsp logs -f` does).
  let followed = '';
  const following = (async () => {
    for await (const c of await fx.cluster.tasks(OWNER).logs(taskId, { follow: true }))
      followed += Buffer.from(c).toString();
  })();
  // Awaited below; a test that fails first must not leave its rejection unhandled.
  following.catch(() => undefined);
  const vmId = await vmIdOf(taskId);
  // From the guest printing the line (it is on the host's console file) to the follower having it.
  const consoleFile = path.join(vmDir(vmId), 'console.log');
  const printed = await until(
    'the task to print on the console',
    async () =>
      (await fs.readFile(consoleFile, 'utf8')).includes(`VSP-OUT ${marker}\r\n`) ? Date.now() : undefined,
    120_000,
  );
  await until('the follower to show the line', async () => followed.includes(`\n${marker}\n`) || undefined);
  const latencyMs = Date.now() - printed;
  console.log(`live log latency (QEMU console): ${latencyMs} ms`);
  expect(latencyMs).toBeLessThan(2000);
  await awaitConsole(vmId, 'VSP-PROGRESS 10');
  const pid = await qemuPidOf(vmId);
  process.kill(pid, 'SIGKILL');

  const { message, app, status } = await failureOf(taskId);
  expect(message).toMatch(/QEMU exited before the task finished/);
  expect(app?.type).toBe('VmFailed');
  expect(app?.nonRetryable).toBe(true);
  expect(status.phase).toBe('failed');

  const logs = (await fx.repo(OWNER).list(OWNER, `${status.resultsPath}/logs/`)).map((f) => f.path);
  expect(logs).toEqual(
    expect.arrayContaining([
      `${status.resultsPath}/logs/console.log`,
      `${status.resultsPath}/logs/task.log`,
      `${status.resultsPath}/logs/failure.txt`,
    ]),
  );
  expect(await downloadText(`${status.resultsPath}/logs/console.log`)).toContain('VSP-START');
  expect(await downloadText(`${status.resultsPath}/logs/task.log`)).toContain(marker);
  expect(await downloadText(`${status.resultsPath}/logs/failure.txt`)).toMatch(/QEMU exited/);
  // The follow ended with the task: the console as the owner reads it (the guest's prefix off).
  await following;
  expect(followed).toContain('VSP-START\n');
  expect(followed).toContain('VSP-PROGRESS 10 started\n');
  expect(followed).not.toContain('VSP-OUT');
  expect(await vmFolders()).toEqual([]);
  expect(qemuPids()).toEqual([]);
}, 180_000);

test('bad images are refused at submission or fail their tasks with clear non-retryable errors; inputs stay', async () => {
  await uploadFile('in/keep.txt', 'keep me\n');
  await uploadFile('images/not-an-image.img', 'this is a text file, not a disk image\n');
  const root = await fs.readFile(appliance.root.path);
  await uploadFile('images/truncated.qcow2', root.subarray(0, Math.floor(root.length / 2)));
  const outside = path.join(tmp, 'outside.qcow2');
  const withBacking = path.join(tmp, 'with-backing.qcow2');
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', outside, '64M']);
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', outside, '-F', 'qcow2', withBacking]);
  await uploadFile('images/with-backing.qcow2', await fs.readFile(withBacking));

  const cases = [
    { image: 'images/not-an-image.img', type: 'InvalidImage', problem: /is not a disk image/ },
    {
      image: 'images/truncated.qcow2',
      type: 'InvalidImage',
      problem: /is damaged or truncated|is not a readable disk image/,
    },
    {
      image: 'images/with-backing.qcow2',
      type: 'InvalidImage',
      problem: /has a backing file .*outside the image cache/,
    },
  ];
  // The repository's own inspection decides whether submission refuses an image (pre-flight) or a host
  // finds it bad when it boots it: wait for that verdict, then expect the matching refusal.
  const inspected = await until('the images inspected', async () => {
    const images = await fx.repo(OWNER).listImages(OWNER);
    const mine = cases.map((c) => images.find((i) => i.name === c.image));
    return mine.every((i) => i !== undefined && i.status !== 'inspecting') ? mine : undefined;
  });
  for (const [i, c] of cases.entries()) {
    const submitted = submit({ image: c.image, inputs: ['in/keep.txt'], command: 'true' });
    if (inspected[i]?.status === 'invalid') {
      await expect(submitted).rejects.toMatchObject({
        status: 400,
        reason: expect.stringContaining(`image: ${c.image} is not a usable VM image`),
      });
      continue;
    }
    const { message, app, status } = await failureOf((await submitted).taskId);
    expect(message).toMatch(new RegExp(`image '${c.image}' (?:${c.problem.source})`));
    expect(app?.type).toBe(c.type);
    expect(app?.nonRetryable).toBe(true);
    expect(status.phase).toBe('failed');
  }
  await expect(submit({ image: 'images/nowhere.qcow2', command: 'true' })).rejects.toMatchObject({
    status: 404,
    reason: expect.stringMatching(/images\/nowhere\.qcow2 is not in alice's space/),
  });
  for (const p of ['in/keep.txt', ...cases.map((c) => c.image)])
    expect(await fx.repo(OWNER).stat(OWNER, p)).toBeDefined();
  expect(await vmFolders()).toEqual([]);
}, 120_000);

/** The appliance root with a marker file /etc/vsp-image added (debugfs, no mount), as a new qcow2. */
async function markedImage(name: string, text: string): Promise<string> {
  const raw = path.join(tmp, `${name}.raw`);
  const image = path.join(tmp, `${name}.qcow2`);
  const marker = path.join(tmp, `${name}.marker`);
  await fs.writeFile(marker, text);
  await fs.chmod(marker, 0o644);
  execFileSync('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', appliance.root.path, raw]);
  execFileSync('debugfs', ['-w', '-R', `write ${marker} /etc/vsp-image`, raw], { stdio: 'ignore' });
  execFileSync('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, image]);
  await fs.rm(raw);
  return image;
}

/** Runs a task on `image` that copies the image's marker to its outputs; returns the marker's text. */
async function markerSeenBy(image: string): Promise<string> {
  const { taskId } = await submit({ image, command: 'mkdir -p out && cat /etc/vsp-image > out/which.txt' });
  const result = await fx.vsp.result(taskId);
  expect(result.exitCode).toBe(0);
  return downloadText(`${result.resultsPath}/outputs/which.txt`);
}

test("an owner's own image boots the task", async () => {
  const text = `own image ${Date.now()}\n`;
  await uploadFile('images/own.qcow2', await fs.readFile(await markedImage('own', text)));
  expect(await markerSeenBy('images/own.qcow2')).toBe(text);
}, 180_000);

test("a provider base image named 'base:<name>' boots the task; the owner sees it read-only", async () => {
  // Added on the repository host, as `vsp image add-base` does; the host fetches it through the owner's view.
  const text = `provider base image ${Date.now()}\n`;
  const image = await markedImage('base', text);
  const added = await withBackend(fx.cluster.repoDir, (backend) =>
    addBaseImage(backend, 'marked', createReadStream(image)),
  );
  expect(added).toMatchObject({ name: 'base:marked', status: 'ok', format: 'qcow2' });
  expect((await fx.repo(OWNER).listImages(OWNER)).map((i) => i.name)).toContain('base:marked');
  expect(await markerSeenBy('base:marked')).toBe(text);
}, 300_000);

test('a base image that does not exist is refused at submission, saying so', async () => {
  await expect(submit({ image: 'base:missing', command: 'true' })).rejects.toMatchObject({
    status: 404,
    reason: 'image: the provider has no base image missing',
  });
});

test('outputs larger than the declared room fail the task with a clear error, logs kept', async () => {
  const { taskId } = await submit({
    outputRoomMiB: 1,
    command: 'mkdir -p out && echo writing; dd if=/dev/zero of=out/big bs=1M count=32; sync',
  });
  const { message, app, status } = await failureOf(taskId);
  expect(message).toMatch(/declared (output )?room of 1 MiB/);
  expect(app?.nonRetryable).toBe(true);
  expect(status.phase).toBe('failed');
  expect(await downloadText(`${status.resultsPath}/logs/task.log`)).toContain('writing');
  expect(await vmFolders()).toEqual([]);
}, 180_000);

test('nothing is left on the host: no QEMU process, socket or VM folder', async () => {
  expect(qemuPids()).toEqual([]);
  expect(await vmFolders()).toEqual([]);
  expect(await socketsUnder(storeDir())).toEqual([]);
});
