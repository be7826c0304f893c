import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { runCommand } from '../../lib/runCommand';
import { DiskImageStaging, readDataDiskFile } from '../../storage/diskImageStaging';
import { isMountPoint, stagingImageOf } from '../../storage/stagingMount';
import { VmStore } from '../../storage/vmStore';

/**
 * Stage-in onto the data disk itself: prepare makes the disk to measure and mounts it on the inputs
 * folder, the inputs land there once, build publishes it. Root only (loop mounts); no VM, no server.
 */
const rootOnly = process.getuid?.() === 0 ? describe : describe.skip;

rootOnly('data disk staged in place', () => {
  let work: string;
  let store: VmStore;
  const staging = new DiskImageStaging();
  const MiB = 1024 * 1024;

  beforeAll(async () => {
    work = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-disk-staging-'));
    store = new VmStore(work);
    await store.init();
  });

  afterAll(async () => {
    await fs.rm(work, { recursive: true, force: true });
  });

  /** Loop devices still bound to a file under the test's folder. */
  async function loopsLeft(): Promise<string[]> {
    const { stdout } = await runCommand('losetup', ['--list', '--noheadings', '--output', 'BACK-FILE']);
    return stdout.split('\n').filter((l) => l.includes(work));
  }

  const plan = {
    files: [
      { path: 'in/a.bin', size: 3 * MiB },
      { path: 'in/deep/b.txt', size: 6 },
    ],
    outputRoomBytes: 4 * MiB,
  };

  it('takes the inputs on the mounted disk, keeps them across a retried prepare, and publishes the disk', async () => {
    const vm = store.paths('vm-in-place');
    await staging.prepare(vm, plan);
    expect(await isMountPoint(vm.inputsDir)).toBe(true);
    const a = Buffer.alloc(3 * MiB, 7);
    await fs.mkdir(path.join(vm.inputsDir, 'in', 'deep'), { recursive: true });
    await fs.writeFile(path.join(vm.inputsDir, 'in', 'a.bin'), a);
    // A retry (the worker restarted mid-download) finds the disk mounted with what was written.
    await staging.prepare(vm, plan);
    // (Buffer.equals: jest's toEqual walks a 3 MiB buffer byte by byte.)
    expect((await fs.readFile(path.join(vm.inputsDir, 'in', 'a.bin'))).equals(a)).toBe(true);
    await fs.writeFile(path.join(vm.inputsDir, 'in', 'deep', 'b.txt'), 'hello\n');

    const { bytes } = await staging.build(vm, plan.outputRoomBytes);
    expect(bytes).toBe((await fs.stat(vm.dataDisk)).size);
    expect(await isMountPoint(vm.inputsDir)).toBe(false);
    await expect(fs.access(vm.inputsDir)).rejects.toThrow();
    await expect(fs.access(stagingImageOf(vm.dataDisk))).rejects.toThrow();
    expect(await loopsLeft()).toEqual([]);
    expect(await readDataDiskFile(vm.dataDisk, 'in/deep/b.txt')).toBe('hello\n');
    const { stdout } = await runCommand('debugfs', ['-R', 'stat /in/a.bin', vm.dataDisk]);
    expect(stdout).toMatch(/Size: 3145728\b/);
    // The room asked for is free on the disk, beside the inputs.
    const { stdout: sb } = await runCommand('dumpe2fs', ['-h', vm.dataDisk]);
    const free = Number(/^Free blocks:\s+(\d+)/m.exec(sb)?.[1]) * 4096;
    expect(free).toBeGreaterThanOrEqual(plan.outputRoomBytes);
    // A retried build after it finished is a no-op.
    expect(await staging.build(vm, plan.outputRoomBytes)).toEqual({ bytes });
    await store.remove('vm-in-place');
  });

  it('leaves no mount or loop device behind when a stage-in cut short is removed', async () => {
    const vm = store.paths('vm-cut-short');
    await staging.prepare(vm, plan);
    await fs.writeFile(path.join(vm.inputsDir, 'partial'), 'x');
    await store.remove('vm-cut-short');
    expect(await isMountPoint(vm.inputsDir)).toBe(false);
    await expect(fs.access(vm.dir)).rejects.toThrow();
    expect(await loopsLeft()).toEqual([]);
  });

  it("refuses inputs under VSP's own folder before making anything", async () => {
    const vm = store.paths('vm-reserved');
    await expect(
      staging.prepare(vm, { files: [{ path: '.vsp/command', size: 1 }], outputRoomBytes: MiB }),
    ).rejects.toThrow(/input \.vsp\/ is reserved/);
    await expect(fs.access(stagingImageOf(vm.dataDisk))).rejects.toThrow();
    expect(await isMountPoint(vm.inputsDir)).toBe(false);
  });

  it('reports inputs larger than the free store as a full disk before making anything', async () => {
    const vm = store.paths('vm-too-big');
    const err = await staging
      .prepare(vm, { files: [{ path: 'huge.bin', size: 2 ** 52 }], outputRoomBytes: MiB })
      .catch((e: unknown) => e as NodeJS.ErrnoException);
    expect(err).toMatchObject({ code: 'ENOSPC', message: expect.stringMatching(/^No space left on device/) });
    await expect(fs.access(stagingImageOf(vm.dataDisk))).rejects.toThrow();
    expect(await isMountPoint(vm.inputsDir)).toBe(false);
  });
});
