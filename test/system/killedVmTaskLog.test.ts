import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { ensureAppliance, type Appliance } from '../../drivers/qemu/appliance';
import { QemuDriver } from '../../drivers/qemu/qemuDriver';
import { runCommand } from '../../drivers/qemu/runCommand';
import type { VmHandle } from '../../drivers/types';
import { DiskImageStaging } from '../../storage/diskImageStaging';
import { ImageCache } from '../../storage/imageCache';
import { VmStore } from '../../storage/vmStore';

/**
 * A QEMU killed with SIGKILL leaves its data disk mounted, its last metadata only in the ext4 journal.
 * Stage-out replays the journal (as an unprivileged account) before reading, so the task log that
 * reaches the owner is the real one, not the stale inode's bytes (before: 125 NUL bytes).
 */
describe('the task log of a killed VM (real QEMU)', () => {
  let appliance: Appliance;
  let work: string;
  let store: VmStore;
  let baseImage: string;
  const handles: VmHandle[] = [];
  const newDriver = () =>
    new QemuDriver({ store, hostName: 'test-host', appliance, accel: 'auto', pollMs: 250 });

  beforeAll(async () => {
    appliance = await ensureAppliance();
    work = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-killed-'));
    store = new VmStore(work);
    await store.init();
    const cache = new ImageCache({ dir: store.imagesDir, maxVirtualBytes: 1024 ** 3 });
    baseImage = (await cache.ensureFromFile(appliance.root.path, appliance.root.sha256)).path;
  });

  afterAll(async () => {
    const driver = newDriver();
    for (const h of handles.splice(0)) await driver.destroy(h);
    await fs.rm(work, { recursive: true, force: true });
  });

  async function untilConsole(file: string, text: string, timeoutMs = 120_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      if ((await fs.readFile(file, 'utf8').catch(() => '')).includes(text)) return;
      if (Date.now() > deadline) throw new Error(`console never showed ${text}`);
      await new Promise((r) => setTimeout(r, 200));
    }
  }

  test('SIGKILL after the task printed its lines: stage-out gives the real task.log', async () => {
    const vmId = 'killed-log';
    const paths = store.paths(vmId);
    await fs.mkdir(paths.inputsDir, { recursive: true });
    const staging = new DiskImageStaging();
    await staging.build(paths, 4 * 1024 * 1024);
    const lines = Array.from({ length: 5 }, (_, i) => `known line ${i + 1} of the task`);
    // The task's lines reach the disk (fdatasync of the log, as the guest's init does each second), then
    // it says so on the console and waits to be killed.
    const command = [
      ...lines.map((l) => `echo "${l}"`),
      'mkdir -p out && echo partial > out/partial.txt && sync -d out/partial.txt',
      'sync -d .vsp/task.log',
      'echo "VSP-PROGRESS 50 synced"',
      'sleep 600',
    ].join('\n');
    const driver = newDriver();
    const handle = await driver.create({
      vmId,
      owner: 'alice',
      command,
      vcpus: 1,
      memoryMiB: 256,
      baseImage,
      ports: [],
      timeLimitSec: 600,
    });
    handles.push(handle);
    const started = await driver.start(handle);
    await untilConsole(paths.consoleLog, 'VSP-PROGRESS 50 synced');
    process.kill(Number(started.state.pid), 'SIGKILL');
    await until(async () => (await driver.inspect(handle)).phase === 'missing');

    // What a reader that does not replay the journal sees (the bug): the stale inode.
    const stale = await runCommand('debugfs', ['-R', 'cat /.vsp/task.log', paths.dataDisk]);
    const { stdout: features } = await runCommand('dumpe2fs', ['-h', paths.dataDisk]);
    process.stderr.write(
      `\nFIGURE killed VM: journal needs recovery: ${/needs_recovery/.test(features)}; task.log without replay: ${JSON.stringify(stale.stdout.slice(0, 200))} (${stale.stdout.length} bytes)\n`,
    );

    const out = await staging.extract(paths, 'out');
    const log = await fs.readFile(out.taskLog!, 'utf8');
    process.stderr.write(`FIGURE killed VM: task.log after replay: ${JSON.stringify(log.slice(0, 400))}\n`);
    expect(log).not.toContain('\0');
    for (const l of lines) expect(log).toContain(`${l}\n`);
    expect(await fs.readFile(path.join(out.outputsDir, 'partial.txt'), 'utf8')).toBe('partial\n');
    // Replayed: the disk is clean now.
    expect((await runCommand('dumpe2fs', ['-h', paths.dataDisk])).stdout).not.toMatch(/needs_recovery/);
  }, 300_000);
});

async function until(ok: () => Promise<boolean>, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await ok())) {
    if (Date.now() > deadline) throw new Error('condition not met in time');
    await new Promise((r) => setTimeout(r, 100));
  }
}
