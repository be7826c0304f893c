import type { QemuLaunch } from '../../drivers/qemu/commandLine';

/** A VM launch with placeholder paths, for tests of the QEMU command line (nothing runs). */
export const SAMPLE_LAUNCH: QemuLaunch = {
  vmId: 'vm-1',
  accel: 'tcg',
  memoryMiB: 128,
  vcpus: 1,
  machine: 'microvm',
  vmlinuz: '/k',
  vmlinux: '/k.elf',
  tscKhz: 2_600_000,
  initrd: '/i',
  rootDisk: '/r.qcow2',
  dataDisk: '/d.img',
  qmpSocket: '/run/q.sock',
  controlSocket: '/run/control.sock',
  consoleLog: '/c.log',
  owner: 'alice',
  portForwards: {},
};
