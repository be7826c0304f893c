import path from 'node:path';
import type { VmPaths } from '../../storage/vmStore';
import type { VmConfig } from '../types';
import type { Accelerator } from './accelerator';
import type { Appliance } from './appliance';
import { QEMU_SANDBOX } from './qemuAccount';
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
  /** The guest's control port (COM2): a snapshot-restored guest reads its start message there. */
  controlSocket: string;
  consoleLog: string;
  owner: string;
  /** guest port -> host port on 127.0.0.1; empty: no network device. */
  portForwards: Record<number, number>;
  /** A tap on the cluster's VM network instead of user-mode networking (port forwards are then unused). */
  nic?: VmNic;
  /** A snapshot build (snapshot.ts): the guest init stops at its ready point and waits for its start message. */
  snapshot?: boolean;
}

/** The guest's control port socket, in QEMU's private folder. */
export function controlSocketOf(paths: VmPaths): string {
  return path.join(paths.runDir, 'control.sock');
}

/** Where the worker records QEMU's pid, in the VM's folder (root's: QEMU cannot rewrite it). */
export function pidFileOf(paths: VmPaths): string {
  return path.join(paths.dir, 'qemu.pid');
}

/** QEMU's own output (start errors, warnings), kept in the VM's folder. */
export function qemuLogOf(paths: VmPaths): string {
  return path.join(paths.dir, 'qemu.log');
}

/**
 * The launch of a VM from its configuration, the host's appliance and its folder here: the same for a
 * first boot and for a VM arriving by migration, whose disks may be elsewhere (`disks`, as QEMU opens them).
 */
export function vmLaunch(
  config: VmConfig,
  appliance: Appliance,
  paths: VmPaths,
  run: {
    accel: Accelerator;
    portForwards: Record<number, number>;
    nic?: VmNic;
    disks?: { root: string; data: string };
  },
): QemuLaunch {
  return {
    vmId: config.vmId,
    accel: run.accel,
    memoryMiB: config.memoryMiB,
    vcpus: config.vcpus,
    vmlinuz: appliance.vmlinuz,
    initrd: appliance.initrd,
    rootDisk: run.disks?.root ?? paths.rootDisk,
    dataDisk: run.disks?.data ?? paths.dataDisk,
    qmpSocket: paths.qmpSocket,
    controlSocket: controlSocketOf(paths),
    consoleLog: paths.consoleLog,
    owner: config.owner,
    portForwards: run.portForwards,
    nic: run.nic,
  };
}

/**
 * What the guest init learns about its task: on the kernel command line of a booted VM, in the start
 * message of a restored one (snapshot.ts).
 */
export function guestArgs(l: Pick<QemuLaunch, 'owner' | 'nic' | 'portForwards'>): string[] {
  const words = [`vsp.owner=${l.owner}`];
  if (l.nic) words.push(`vsp.ip=${l.nic.address}`);
  else if (Object.keys(l.portForwards).length > 0) words.push('vsp.net=1');
  return words;
}

/** QEMU option values separate sub-options with commas; a literal comma is doubled. */
export const opt = (value: string) => value.replace(/,/g, ',,');

/**
 * The QEMU command line of a VSP VM (pure, so it is testable and readable in one place). QEMU stays in the
 * foreground of its own session (vmProcess.ts startDetached): `-daemonize` forks, which the sandbox denies.
 */
export function buildQemuArgs(l: QemuLaunch): string[] {
  const forwards = Object.entries(l.portForwards);
  const append = ['console=ttyS0', 'quiet', 'panic=-1', ...guestArgs(l)];
  // init_on_free zeroes the pages the boot frees (the compressed kernel and initramfs): the saved state
  // then holds only what the guest uses (~64 instead of ~89 MiB here), and restores that much faster.
  if (l.snapshot) append.push('vsp.snapshot=1', 'init_on_free=1');
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
    '-chardev',
    `socket,id=vspctl,path=${opt(l.controlSocket)},server=on,wait=off`,
    '-device',
    'isa-serial,chardev=vspctl,index=1',
    '-drive',
    `file=${opt(l.rootDisk)},format=qcow2,if=virtio,cache=writeback,discard=unmap`,
    '-drive',
    `file=${opt(l.dataDisk)},format=raw,if=virtio,cache=writeback`,
    '-sandbox',
    QEMU_SANDBOX,
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
