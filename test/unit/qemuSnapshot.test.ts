import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { Appliance } from '../../drivers/qemu/appliance';
import { QemuSnapshots, type SnapshotShape } from '../../drivers/qemu/snapshot';

/** The snapshot key: everything a saved state depends on changes it, nothing else does (no QEMU runs). */
describe('QemuSnapshots.keyOf', () => {
  let dir: string;
  let appliance: Appliance;
  let shape: SnapshotShape;
  const snapshots = () =>
    new QemuSnapshots({
      dir: path.join(dir, 'snapshots'),
      appliance,
      // Prints its arguments: a stand-in for `qemu-system-x86_64 --version`.
      qemuBinary: '/bin/echo',
      account: () => Promise.resolve(undefined),
      wrap: (cmd, args) => ({ cmd, args }),
    });

  beforeAll(async () => {
    dir = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-snapkey-'));
    for (const f of ['vmlinuz', 'initrd', 'base.qcow2']) await fs.writeFile(path.join(dir, f), f);
    appliance = {
      version: 'v1',
      kernelVersion: 'k',
      vmlinuz: path.join(dir, 'vmlinuz'),
      initrd: path.join(dir, 'initrd'),
      root: { path: path.join(dir, 'base.qcow2'), sha256: '0'.repeat(64), format: 'qcow2' },
    };
    shape = {
      accel: 'tcg',
      machine: 'pc',
      memoryMiB: 256,
      vcpus: 1,
      baseImage: path.join(dir, 'base.qcow2'),
    };
  });

  afterAll(() => fs.rm(dir, { recursive: true, force: true }));

  test('is stable, and changes with the appliance files, the base image, memory, vCPUs and accelerator', async () => {
    const key = await snapshots().keyOf(shape);
    expect(key).toMatch(/^[0-9a-f]{32}$/);
    expect(await snapshots().keyOf({ ...shape })).toBe(key);
    const others = [
      await snapshots().keyOf({ ...shape, memoryMiB: 512 }),
      await snapshots().keyOf({ ...shape, vcpus: 2 }),
      await snapshots().keyOf({ ...shape, accel: 'kvm' }),
    ];
    // A rebuilt appliance at the same paths (new content) and a changed base image.
    await fs.writeFile(appliance.initrd, 'initrd, rebuilt');
    others.push(await snapshots().keyOf(shape));
    await fs.writeFile(shape.baseImage, 'base, changed');
    others.push(await snapshots().keyOf(shape));
    expect(new Set([key, ...others]).size).toBe(1 + others.length);
  });

  test('takes a cached image by the content hash in its name, without reading it', async () => {
    const sha = 'a'.repeat(64);
    // Neither file exists: the name is the identity.
    const key = await snapshots().keyOf({ ...shape, baseImage: path.join(dir, `${sha}.qcow2`) });
    expect(await snapshots().keyOf({ ...shape, baseImage: path.join(dir, 'other', `${sha}.qcow2`) })).toBe(
      key,
    );
    expect(
      await snapshots().keyOf({ ...shape, baseImage: path.join(dir, `${'b'.repeat(64)}.qcow2`) }),
    ).not.toBe(key);
  });

  test("a build first removes the folders of builds an earlier worker left, never killing a stranger's pid", async () => {
    const stale = path.join(dir, 'snapshots', '.build-stale');
    await fs.mkdir(stale, { recursive: true });
    // This process's own pid: its command line names no build socket, so it is no build's QEMU.
    await fs.writeFile(path.join(stale, 'qemu.pid'), `${process.pid}\n`);
    // The build itself fails here (no such base image), after the sweep.
    await expect(
      snapshots().build({ ...shape, baseImage: path.join(dir, `${'c'.repeat(64)}.qcow2`) }),
    ).rejects.toThrow(/build failed/);
    await expect(fs.access(stale)).rejects.toThrow();
  });
});
