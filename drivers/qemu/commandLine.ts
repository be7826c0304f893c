import path from 'node:path';
import type { VmPaths } from '../../storage/vmStore';
import type { VmConfig } from '../types';
import type { Accelerator } from './accelerator';
import type { Appliance } from './appliance';
import { QEMU_SANDBOX } from './qemuAccount';
import type { VmNic } from './vmNetwork';

/**
 * The machine QEMU emulates. `microvm` (the default where it can boot): no PCI, no firmware to speak of,
 * virtio-mmio devices, the kernel entered at its PVH entry (the appliance's vmlinux), ACPI only for the power
 * button. `pc`: the i440FX PC with virtio-pci devices booting the compressed kernel, as VSP ran before; for
 * a host where microvm cannot boot (see chooseMachine) and for VMs started before microvm, whose migration
 * target must build the same machine (the VM's handle records it).
 */
export type QemuMachine = 'microvm' | 'pc';

/** What a host's VMs start on: the accelerator, the machine, the TSC frequency a TCG microvm kernel is told. */
export interface HostMachine {
  accel: Accelerator;
  machine: QemuMachine;
  tscKhz?: number;
}

export interface QemuLaunch {
  vmId: string;
  accel: Accelerator;
  machine: QemuMachine;
  memoryMiB: number;
  vcpus: number;
  vmlinuz: string;
  /** Required by microvm. */
  vmlinux?: string;
  initrd: string;
  /** The host's TSC frequency: a TCG microvm guest must be told it (accelerator.ts hostTscKhz). */
  tscKhz?: number;
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

/** The machine a started VM's handle records; a VM started before VSP chose machines ran on pc. */
export function recordedMachine(state: Record<string, string | number | boolean>): HostMachine {
  return {
    accel: state.accel as Accelerator,
    machine: state.machine === 'microvm' ? 'microvm' : 'pc',
    ...(typeof state.tscKhz === 'number' ? { tscKhz: state.tscKhz } : {}),
  };
}

/**
 * microvm where it boots: it needs the ELF kernel, and under TCG the host's TSC frequency (no clock in the
 * machine to calibrate against); else pc.
 */
export function chooseMachine(
  accel: Accelerator,
  appliance: Appliance,
  tscKhz: number | undefined,
): QemuMachine {
  return appliance.vmlinux && (accel === 'kvm' || tscKhz !== undefined) ? 'microvm' : 'pc';
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
    machine: QemuMachine;
    tscKhz?: number;
    portForwards: Record<number, number>;
    nic?: VmNic;
    disks?: { root: string; data: string };
  },
): QemuLaunch {
  return {
    vmId: config.vmId,
    accel: run.accel,
    machine: run.machine,
    memoryMiB: config.memoryMiB,
    vcpus: config.vcpus,
    vmlinuz: appliance.vmlinuz,
    vmlinux: appliance.vmlinux,
    initrd: appliance.initrd,
    tscKhz: run.tscKhz,
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
 * Kernel parameters that shorten a boot without changing what the guest can do: the crypto self-tests
 * (they check the kernel's own ciphers, at every boot) are skipped.
 */
const LEAN_KERNEL_ARGS = ['cryptomgr.notests'];

/** Per machine: its QEMU name and options, the kernel it boots, and how a virtio device attaches. */
const MACHINES: Record<QemuMachine, { machine: string; kernel: (l: QemuLaunch) => string; virtio: string }> =
  {
    microvm: {
      machine: 'microvm',
      kernel: (l) => {
        if (!l.vmlinux)
          throw new Error("the microvm machine needs the appliance's vmlinux; rebuild the appliance");
        return l.vmlinux;
      },
      virtio: 'device',
    },
    pc: { machine: 'pc', kernel: (l) => l.vmlinuz, virtio: 'pci' },
  };

/**
 * The QEMU command line of a VSP VM (pure, so it is testable and readable in one place). QEMU stays in the
 * foreground of its own session (vmProcess.ts startDetached): `-daemonize` forks, which the sandbox denies.
 */
export function buildQemuArgs(l: QemuLaunch): string[] {
  const m = MACHINES[l.machine];
  const forwards = Object.entries(l.portForwards);
  const append = ['console=ttyS0', 'quiet', 'panic=-1', ...LEAN_KERNEL_ARGS, ...guestArgs(l)];
  if (l.machine === 'microvm' && l.accel === 'tcg') {
    if (!l.tscKhz) throw new Error("a microvm under TCG needs the host's TSC frequency");
    append.push(`tsc_early_khz=${l.tscKhz}`);
  }
  // init_on_free zeroes the pages the boot frees (the compressed kernel and initramfs): the saved state
  // then holds only what the guest uses (~64 instead of ~89 MiB here), and restores that much faster.
  if (l.snapshot) append.push('vsp.snapshot=1', 'init_on_free=1');
  const args = [
    '-name',
    `vsp-${l.vmId}`,
    '-accel',
    l.accel,
    '-machine',
    m.machine,
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
    m.kernel(l),
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
    // The root first: the guest sees it as vda, the data disk as vdb. `file=` leads (migration.ts finds the
    // root drive by it).
    '-drive',
    `file=${opt(l.rootDisk)},format=qcow2,if=none,id=root,cache=writeback,discard=unmap`,
    '-device',
    `virtio-blk-${m.virtio},drive=root`,
    '-drive',
    `file=${opt(l.dataDisk)},format=raw,if=none,id=data,cache=writeback`,
    '-device',
    `virtio-blk-${m.virtio},drive=data`,
    '-sandbox',
    QEMU_SANDBOX,
  ];
  if (l.nic) {
    args.push(
      '-netdev',
      `tap,id=net0,ifname=${l.nic.tap},script=no,downscript=no`,
      '-device',
      `virtio-net-${m.virtio},netdev=net0,mac=${l.nic.mac}`,
    );
  } else if (forwards.length > 0) {
    const hostfwd = forwards.map(([guest, host]) => `,hostfwd=tcp:127.0.0.1:${host}-:${guest}`).join('');
    args.push('-netdev', `user,id=net0${hostfwd}`, '-device', `virtio-net-${m.virtio},netdev=net0`);
  }
  return args;
}
