import { execFileSync, spawnSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { gunzipSync } from 'node:zlib';
import { ensureAppliance, type Appliance } from '../../drivers/qemu/appliance';
import { hostPortsOf, QemuDriver, TIMEOUT_EXIT_CODE } from '../../drivers/qemu/qemuDriver';
import type { VmConfig, VmHandle, VmStatus } from '../../drivers/types';
import { DiskImageStaging, readDataDiskFile } from '../../storage/diskImageStaging';
import { runCommand } from '../../lib/runCommand';
import { ImageCache } from '../../storage/imageCache';
import { VmStore } from '../../storage/vmStore';
import { untilConsoleLine } from '../support/guestConsole';

const KNOWN_LINES = Array.from({ length: 5 }, (_, i) => `known line ${i + 1} of the task`);

/** Real QEMU under TCG (KVM hangs on these machines): each boot costs seconds, so the VMs are few. */
describe('QemuDriver (real QEMU)', () => {
  let appliance: Appliance;
  let work: string;
  let store: VmStore;
  let baseImage: string;
  const staging = new DiskImageStaging();
  const handles: VmHandle[] = [];

  const newDriver = () =>
    new QemuDriver({ store, hostName: 'test-host', appliance, accel: 'auto', pollMs: 250 });

  beforeAll(async () => {
    appliance = await ensureAppliance();
    work = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-qemu-'));
    // QEMU's unprivileged account must reach the store (mkdtemp makes it private).
    await fs.chmod(work, 0o711);
    store = new VmStore(work);
    await store.init();
    const cache = new ImageCache({ dir: store.imagesDir, maxVirtualBytes: 1024 ** 3 });
    baseImage = (await cache.ensureFromFile(appliance.root.path, appliance.root.sha256)).path;
  });

  afterEach(async () => {
    const driver = newDriver();
    for (const h of handles.splice(0)) await driver.destroy(h);
  });

  afterAll(async () => {
    await fs.rm(work, { recursive: true, force: true });
  });

  /** Stage-in the way host activities do: inputs into inputsDir, then the data disk. */
  async function prepare(
    vmId: string,
    inputs: Record<string, Buffer>,
    roomMiB: number,
    overrides: Partial<VmConfig>,
  ) {
    const paths = store.paths(vmId);
    for (const [rel, data] of Object.entries(inputs)) {
      await fs.mkdir(path.dirname(path.join(paths.inputsDir, rel)), { recursive: true });
      await fs.writeFile(path.join(paths.inputsDir, rel), data);
    }
    await staging.build(paths, roomMiB * 1024 * 1024);
    const config: VmConfig = {
      vmId,
      owner: 'alice',
      command: 'true',
      vcpus: 1,
      memoryMiB: 256,
      baseImage,
      ports: [],
      timeLimitSec: 300,
      ...overrides,
    };
    const driver = newDriver();
    const handle = await driver.create(config);
    handles.push(handle);
    return { paths, driver, handle };
  }

  const noAbort = () => new AbortController().signal;

  async function expectNoTrace(vmId: string) {
    const paths = store.paths(vmId);
    await expect(fs.access(paths.dir)).rejects.toThrow();
    for (const pid of await fs.readdir('/proc')) {
      if (!/^\d+$/.test(pid)) continue;
      const cmdline = await fs.readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '');
      expect(cmdline).not.toContain(paths.dir);
    }
  }

  test('runs a CPU-bound task once across a worker restart and returns its outputs', async () => {
    const input = randomBytes(3 * 1024 * 1024);
    const command = [
      'echo run >> runs.txt',
      'echo VSP-PROGRESS 10 compressing',
      'grep " $HOME " /proc/mounts',
      'echo "user=$USER home=$HOME pwd=$(pwd)"',
      'mkdir -p out',
      'gzip -c data/input.bin > out/input.gz',
      'sha256sum data/input.bin | cut -d" " -f1 > out/input.sha256',
      'sleep 2',
      'echo VSP-PROGRESS 100 done',
    ].join('\n');
    const { paths, driver, handle } = await prepare('cpu-1', { 'data/input.bin': input }, 16, { command });
    expect(
      await driver.create({ ...(await store.readState<{ config: VmConfig }>('cpu-1'))!.config }),
    ).toEqual(handle);
    const started = await driver.start(handle);
    expect(started.state.pid).toEqual(expect.any(Number));

    // Simulated worker restart: a new driver re-attaches from the VM folder alone.
    const restarted = newDriver();
    const status = await restarted.recover(handle);
    expect(status.phase).toBe('running');
    expect(status.details).toMatchObject({
      accelerator: expect.stringMatching(/^(tcg|kvm)$/),
      memoryMiB: 256,
    });
    expect(status.details.qmpStatus).toBe('running');
    // A retried start on a started VM boots nothing.
    expect((await restarted.start(handle)).state.pid).toBe(started.state.pid);

    const seen: VmStatus[] = [];
    const result = await restarted.wait(handle, { onProgress: (s) => seen.push(s), signal: noAbort() });
    // The report printed just before the guest powered off comes with the exit, whether a poll saw it or not.
    expect(result).toEqual({ exitCode: 0, timedOut: false, progress: 100, progressMessage: 'done' });
    expect(seen.some((s) => s.progress === 10 && s.progressMessage === 'compressing')).toBe(true);
    expect((await restarted.inspect(handle)).phase).toBe('exited');

    expect(await readDataDiskFile(paths.dataDisk, 'runs.txt')).toBe('run\n');
    const out = await staging.extract(paths, 'out');
    const sha = createHash('sha256').update(input).digest('hex');
    expect((await fs.readFile(path.join(out.outputsDir, 'input.sha256'), 'utf8')).trim()).toBe(sha);
    expect(gunzipSync(await fs.readFile(path.join(out.outputsDir, 'input.gz'))).equals(input)).toBe(true);
    const log = await fs.readFile(out.taskLog!, 'utf8');
    expect(log).toMatch(/^\/dev\/vdb \/home\/alice ext4 rw/m);
    expect(log).toContain('user=alice home=/home/alice pwd=/home/alice');

    await restarted.destroy(handle);
    await restarted.destroy(handle);
    await expectNoTrace('cpu-1');
  });

  test('a QEMU killed mid-task makes wait fail with the console tail', async () => {
    const { paths, driver, handle } = await prepare('killed-1', {}, 4, {
      command: 'echo VSP-PROGRESS 5 working; sleep 600',
    });
    const started = await driver.start(handle);
    await untilConsoleLine(paths.consoleLog, 'VSP-PROGRESS 5');
    const waiting = driver.wait(handle, { onProgress: () => undefined, signal: noAbort() });
    process.kill(Number(started.state.pid), 'SIGKILL');
    await expect(waiting).rejects.toThrow(
      /QEMU exited before the task finished[\s\S]*console tail:[\s\S]*VSP-PROGRESS 5/,
    );
    expect((await driver.inspect(handle)).phase).toBe('missing');
  });

  test('SIGKILL after the task printed its lines: stage-out replays the journal and gives the real task.log', async () => {
    const { paths, driver, handle } = await prepare('killed-log', {}, 4, {
      // The lines reach the disk (fdatasync of the log, as the guest's init does each second), then the
      // task says so on the console and waits to be killed.
      command: [
        ...KNOWN_LINES.map((l) => `echo "${l}"`),
        'mkdir -p out && echo partial > out/partial.txt && sync -d out/partial.txt',
        'sync -d .vsp/task.log',
        'echo "VSP-PROGRESS 50 synced"',
        'sleep 600',
      ].join('\n'),
      timeLimitSec: 600,
    });
    const started = await driver.start(handle);
    await untilConsoleLine(paths.consoleLog, 'VSP-PROGRESS 50 synced', 120_000);
    const waiting = driver.wait(handle, { onProgress: () => undefined, signal: noAbort() });
    process.kill(Number(started.state.pid), 'SIGKILL');
    await expect(waiting).rejects.toThrow(/QEMU exited before the task finished/);

    // A reader that does not replay the journal sees the stale inode (before: empty, or NUL bytes).
    const { stdout: superblock } = await runCommand('dumpe2fs', ['-h', paths.dataDisk]);
    expect(superblock).toMatch(/needs_recovery/);
    const stale = (await runCommand('debugfs', ['-R', 'cat /.vsp/task.log', paths.dataDisk])).stdout;
    process.stderr.write(`\nFIGURE killed VM: task.log read without replay: ${JSON.stringify(stale)}\n`);

    const out = await staging.extract(paths, 'out');
    const log = await fs.readFile(out.taskLog!, 'utf8');
    expect(log).not.toContain('\0');
    for (const l of KNOWN_LINES) expect(log).toContain(`${l}\n`);
    expect(await fs.readFile(path.join(out.outputsDir, 'partial.txt'), 'utf8')).toBe('partial\n');
    expect((await runCommand('dumpe2fs', ['-h', paths.dataDisk])).stdout).not.toMatch(/needs_recovery/);
  });

  test('outputs larger than the declared room give a clear error', async () => {
    const { paths, driver, handle } = await prepare('full-1', {}, 4, {
      command: 'mkdir -p out; dd if=/dev/zero of=out/big bs=1M count=64',
    });
    await driver.start(handle);
    const result = await driver.wait(handle, { onProgress: () => undefined, signal: noAbort() });
    expect(result.exitCode).not.toBe(0);
    await expect(staging.extract(paths, 'out')).rejects.toThrow(
      'outputs exceeded the declared room of 4 MiB',
    );
  });

  test('the time limit stops the VM', async () => {
    const { driver, handle } = await prepare('slow-1', {}, 4, { command: 'sleep 600', timeLimitSec: 3 });
    await driver.start(handle);
    const result = await driver.wait(handle, { onProgress: () => undefined, signal: noAbort() });
    expect(result).toEqual({ exitCode: TIMEOUT_EXIT_CODE, timedOut: true });
    // Stopped either way: a guest that had started its task when the limit came ends it on the power
    // button and reports its exit ('exited'); one still booting reports none ('missing').
    expect(['exited', 'missing']).toContain((await driver.inspect(handle)).phase);
  });

  test('stop is graceful: the guest ends the task, records its status and unmounts the data disk', async () => {
    const { paths, driver, handle } = await prepare('stop-1', {}, 4, {
      command: 'echo "VSP-PROGRESS 1 up"; sleep 600',
    });
    await driver.start(handle);
    await untilConsoleLine(paths.consoleLog, 'VSP-PROGRESS 1 up', 120_000);
    await driver.stop(handle, 30_000);
    expect((await driver.inspect(handle)).phase).not.toBe('running');
    // The ACPI power button reached the guest's init, which ended the task (TERM) and powered off itself.
    const console = await fs.readFile(paths.consoleLog, 'utf8');
    expect(console).toContain('VSP-STOPPING');
    expect(console).toContain('VSP-EXIT 143');
    expect(await readDataDiskFile(paths.dataDisk, '.vsp/exit-status')).toBe('143\n');
    expect(await readDataDiskFile(paths.dataDisk, '.vsp/task.log')).toContain('VSP-PROGRESS 1 up');
  });

  test('QEMU runs as the unprivileged account under seccomp and can write only its own VM files', async () => {
    const { paths, driver, handle } = await prepare('sandbox-1', {}, 4, {
      command: 'echo "VSP-PROGRESS 1 up"; sleep 600',
    });
    const started = await driver.start(handle);
    await untilConsoleLine(paths.consoleLog, 'VSP-PROGRESS 1 up', 120_000);
    const uid = Number(execFileSync('id', ['-u', 'vsp-qemu'], { encoding: 'utf8' }));
    const gid = Number(execFileSync('id', ['-g', 'vsp-qemu'], { encoding: 'utf8' }));
    const status = await fs.readFile(`/proc/${Number(started.state.pid)}/status`, 'utf8');
    const field = (name: string) => new RegExp(`^${name}:\\s*(.*)$`, 'm').exec(status)?.[1].split(/\s+/);
    expect(field('Uid')).toEqual([uid, uid, uid, uid].map(String));
    expect(field('Gid')).toEqual([gid, gid, gid, gid].map(String));
    expect(uid).not.toBe(0);
    expect(field('Seccomp')).toEqual(['2']);
    expect(field('NoNewPrivs')).toEqual(['1']);
    // What the account may write, tried as the account itself.
    const writable = (file: string) =>
      spawnSync('setpriv', [`--reuid=${uid}`, `--regid=${gid}`, '--clear-groups', 'test', '-w', file])
        .status === 0;
    for (const own of [paths.rootDisk, paths.dataDisk, paths.consoleLog, paths.runDir])
      expect([own, writable(own)]).toEqual([own, true]);
    for (const other of [paths.dir, paths.stateFile, store.root, store.imagesDir, store.vmsDir, baseImage])
      expect([other, writable(other)]).toEqual([other, false]);
    await driver.destroy(started);
    await expectNoTrace('sandbox-1');
  });

  test('a service task keeps running and answers on its forwarded port until destroyed', async () => {
    const { driver, handle } = await prepare('svc-1', {}, 4, {
      command: 'echo hello-service > index.html && exec busybox httpd -f -p 8080 -h .',
      ports: [8080],
    });
    const started = await driver.start(handle);
    const hostPort = hostPortsOf(started)[8080];
    expect(hostPort).toBeGreaterThan(0);
    const deadline = Date.now() + 90_000;
    let body = '';
    while (Date.now() < deadline && !body.includes('hello-service')) {
      body = await fetch(`http://127.0.0.1:${hostPort}/index.html`, { signal: AbortSignal.timeout(3000) })
        .then((r) => r.text())
        .catch(() => '');
      if (!body.includes('hello-service')) await new Promise((r) => setTimeout(r, 500));
    }
    expect(body).toContain('hello-service');
    expect((await driver.inspect(started)).phase).toBe('running');
    await driver.destroy(started);
    expect((await driver.inspect(started)).phase).toBe('missing');
    await expect(
      fetch(`http://127.0.0.1:${hostPort}/`, { signal: AbortSignal.timeout(3000) }),
    ).rejects.toThrow();
  });
  describe('started from a snapshot', () => {
    const snapshotDriver = () =>
      new QemuDriver({
        store,
        hostName: 'test-host',
        appliance,
        accel: 'auto',
        pollMs: 250,
        snapshots: true,
      });
    // One driver, as in a worker: the build its first VM starts in the background is the one awaited.
    let snap: QemuDriver;
    const shape = () => ({ memoryMiB: 256, vcpus: 1, baseImage });
    // What each task prints: random bytes, its clock, its own data disk's mark, what it finds on its root.
    const command = [
      'echo "rand=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d " \\n")"',
      'echo "time=$(date +%s)"',
      'echo "mark=$(cat mark.txt) root=$(cat /var/tmp/vsp-mark 2>/dev/null || echo none)"',
      'cat mark.txt > /var/tmp/vsp-mark',
    ].join('\n');
    const outputOf = async (vmId: string) => {
      const log = await fs.readFile((await staging.extract(store.paths(vmId), 'none')).taskLog!, 'utf8');
      const field = (k: string) => new RegExp(`^${k}=(\\S+)`, 'm').exec(log)?.[1];
      return {
        rand: field('rand'),
        time: Number(field('time')),
        mark: field('mark'),
        root: /root=(\S+)/.exec(log)?.[1],
      };
    };
    const run = async (vmId: string) => {
      const { driver: _creator, handle } = await prepare(vmId, { 'mark.txt': Buffer.from(`${vmId}\n`) }, 4, {
        command,
      });
      const before = Date.now();
      const started = await snap.start(handle);
      expect(await snap.wait(started, { onProgress: () => undefined, signal: noAbort() })).toMatchObject({
        exitCode: 0,
      });
      const console = await fs.readFile(store.paths(vmId).consoleLog, 'utf8');
      return { started, before, after: Date.now(), console, ...(await outputOf(vmId)) };
    };

    beforeAll(() => {
      snap = snapshotDriver();
    });

    test('a VM boots while no snapshot exists; once built, VMs restore with their own disks, a reseeded RNG and the clock set', async () => {
      const booted = await run('snap-boot');
      expect(booted.started.state.snapshot).toBeUndefined();
      expect(booted.console).not.toContain('VSP-RESUMED');
      const dir = await snap.buildSnapshot(shape());
      const state = await fs.readFile(path.join(dir, 'state'));

      const first = await run('snap-1');
      const second = await run('snap-2');
      for (const r of [first, second]) {
        expect(r.started.state.snapshot).toBe(path.basename(dir));
        expect(r.console).toMatch(/^VSP-RESUMED/m);
        // The guest's clock is the host's (the snapshot's reads 2001), to the second.
        expect(r.time).toBeGreaterThanOrEqual(Math.floor(r.before / 1000) - 1);
        expect(r.time).toBeLessThanOrEqual(Math.ceil(r.after / 1000) + 1);
      }
      expect([first.mark, second.mark]).toEqual(['snap-1', 'snap-2']);
      // No writable state shared: the second sees nothing the first wrote on its root, and the saved state is unchanged.
      expect([first.root, second.root]).toEqual(['none', 'none']);
      expect((await fs.readFile(path.join(dir, 'state'))).equals(state)).toBe(true);
      expect(first.rand).toMatch(/^[0-9a-f]{32}$/);
      expect(second.rand).toMatch(/^[0-9a-f]{32}$/);
      expect(first.rand).not.toBe(second.rand);
    });

    test('a snapshot that does not restore is dropped and the VM boots', async () => {
      const dir = await snap.buildSnapshot(shape());
      const state = path.join(dir, 'state');
      await fs.truncate(state, Math.floor((await fs.stat(state)).size / 2));
      const r = await run('snap-bad');
      expect(r.started.state.snapshot).toBeUndefined();
      expect(r.console).not.toContain('VSP-RESUMED');
      expect(r.mark).toBe('snap-bad');
      await expect(fs.access(dir)).rejects.toThrow();
    });
  });
});
