import type { Accelerator } from './accelerator';
import type { VmNic } from './vmNetwork';

export interface QemuLaunch {
  vmId: string;
  accel: Accelerator;
  memoryMiB: number;
  vcpus: number;
  vmlinuz: string;
  initrd: string;
  rootDisk: string;
  dataDisk: string;
  qmpSocket: string;
  consoleLog: string;
  pidFile: string;
  owner: string;
  /** guest port -> host port on 127.0.0.1; empty: no network device. */
  portForwards: Record<number, number>;
  /** A tap on the cluster's VM network instead of user-mode networking (port forwards are then unused). */
  nic?: VmNic;
}

/** QEMU option values separate sub-options with commas; a literal comma is doubled. */
const opt = (value: string) => value.replace(/,/g, ',,');

/** The QEMU command line of a VSP VM (pure, so it is testable and readable in one place). */
export function buildQemuArgs(l: QemuLaunch): string[] {
  const forwards = Object.entries(l.portForwards);
  const append = ['console=ttyS0', 'quiet', 'panic=-1', `vsp.owner=${l.owner}`];
  if (l.nic) append.push(`vsp.ip=${l.nic.address}`);
  else if (forwards.length > 0) append.push('vsp.net=1');
  const args = [
    '-name',
    `vsp-${l.vmId}`,
    '-accel',
    l.accel,
    '-machine',
    'pc',
    '-cpu',
    l.accel === 'kvm' ? 'host' : 'max',
    '-m',
    String(l.memoryMiB),
    '-smp',
    String(l.vcpus),
    '-nodefaults',
    '-display',
    'none',
    '-no-reboot',
    '-kernel',
    l.vmlinuz,
    '-initrd',
    l.initrd,
    '-append',
    append.join(' '),
    '-chardev',
    `file,id=console0,path=${opt(l.consoleLog)},append=on`,
    '-serial',
    'chardev:console0',
    '-qmp',
    `unix:${opt(l.qmpSocket)},server=on,wait=off`,
    '-drive',
    `file=${opt(l.rootDisk)},format=qcow2,if=virtio,cache=writeback,discard=unmap`,
    '-drive',
    `file=${opt(l.dataDisk)},format=raw,if=virtio,cache=writeback`,
    '-daemonize',
    '-pidfile',
    l.pidFile,
  ];
  if (l.nic) {
    args.push(
      '-netdev',
      `tap,id=net0,ifname=${l.nic.tap},script=no,downscript=no`,
      '-device',
      `virtio-net-pci,netdev=net0,mac=${l.nic.mac}`,
    );
  } else if (forwards.length > 0) {
    const hostfwd = forwards.map(([guest, host]) => `,hostfwd=tcp:127.0.0.1:${host}-:${guest}`).join('');
    args.push('-netdev', `user,id=net0${hostfwd}`, '-device', 'virtio-net-pci,netdev=net0');
  }
  return args;
}
