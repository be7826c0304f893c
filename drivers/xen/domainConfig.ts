import { z } from 'zod';
import type { VmNic } from '../qemu/vmNetwork';

/**
 * PVH (the default) live-migrates; PV needs no hardware virtualisation but cannot live-migrate with a Xen
 * built without shadow paging (Debian's: no PV log-dirty mode), so PV hosts offer no live migration.
 */
export type XenGuestType = 'pvh' | 'pv';
export const XEN_GUEST_TYPES: readonly XenGuestType[] = ['pvh', 'pv'];

/** A physical CPU list as xl.cfg's `cpus` takes it: `2`, `1-3`, `1,3-5`. */
export const XEN_CPU_LIST = /^\d{1,4}(-\d{1,4})?(,\d{1,4}(-\d{1,4})?)*$/;

const ranges = (list: string) => list.split(',').map((part) => part.split('-').map(Number));

/** A CPU list setting (worker config, inventory): the syntax, and no range that runs backwards (`3-1`). */
export const xenCpuListSetting = z
  .string()
  .regex(XEN_CPU_LIST, 'a CPU list like 1-3 or 1,3')
  .refine(
    (list) => ranges(list).every(([from, to = from]) => from <= to),
    'a range runs backwards (3-1: write 1-3)',
  );

/** How many CPUs a CPU list names (`1-3,5`: 4). */
export function cpuListSize(list: string): number {
  const cpus = new Set<number>();
  for (const [from, to = from] of ranges(list)) {
    for (let c = from; c <= to; c++) cpus.add(c);
  }
  return cpus.size;
}

/** The launch inputs of a Xen domain: the same facts the QEMU command line is built from. */
export interface XenDomainLaunch {
  /** Domain name, `vsp-<vmId>`. */
  name: string;
  type: XenGuestType;
  memoryMiB: number;
  vcpus: number;
  /**
   * The physical CPUs the guest's vCPUs may run on (xl.cfg `cpus`), e.g. all but those dom0 is pinned to
   * (`dom0_max_vcpus=1 dom0_vcpus_pin`): guests then never share a CPU with dom0's work. Default: any.
   */
  cpus?: string;
  /** The guest appliance, booted directly: no bootloader, no emulated devices. */
  kernel: string;
  ramdisk: string;
  owner: string;
  /** The disks' block devices, by links named the same on every host (loopDisks.ts). */
  rootDisk: string;
  dataDisk: string;
  /** The hotplug script that hands those devices to blkback. */
  hotplugScript: string;
  /** On the cluster's VM network: a vif on this bridge with the VM's stable MAC and address. */
  nic?: VmNic & { bridge: string };
}

/** Characters that cannot appear inside an xl.cfg string (or a comma-separated disk/vif spec). */
const UNSAFE = /["\\\n\r,=]/;

export function domainName(vmId: string): string {
  return `vsp-${vmId}`;
}

/**
 * An xl domain config (xl.cfg(5)) for a VSP VM. PVH (or PV) boots the appliance kernel directly; both disks
 * are raw files behind loop devices on the `phy` backend (the kernel's blkback): no per-domain QEMU (qdisk),
 * whose start libxl bounds to 10 s, which a busy dom0 misses at a live migration's target; the loop
 * devices are attached beforehand and named by links (loopDisks.ts), so the hotplug script is quick too. The guest finds
 * its disks as /dev/xvda (root) and /dev/xvdb (data), its console on hvc0. Power-off, reboot and crash all
 * end the domain, as `-no-reboot` does for QEMU: the driver reads the outcome from the console log.
 */
export function renderDomainConfig(l: XenDomainLaunch): string {
  const strings: [string, string][] = [
    ['name', l.name],
    ['kernel', l.kernel],
    ['ramdisk', l.ramdisk],
    ['rootDisk', l.rootDisk],
    ['dataDisk', l.dataDisk],
    ['hotplugScript', l.hotplugScript],
  ];
  for (const [what, v] of strings)
    if (!v || UNSAFE.test(v))
      throw new Error(`Xen domain config: ${what} ${JSON.stringify(v)} has unsafe characters`);
  if (!Number.isInteger(l.memoryMiB) || l.memoryMiB < 64)
    throw new Error(`Xen domain config: memory ${l.memoryMiB} MiB`);
  if (!Number.isInteger(l.vcpus) || l.vcpus < 1) throw new Error(`Xen domain config: vcpus ${l.vcpus}`);
  if (!XEN_GUEST_TYPES.includes(l.type)) throw new Error(`Xen domain config: type ${JSON.stringify(l.type)}`);
  if (l.cpus !== undefined && !XEN_CPU_LIST.test(l.cpus))
    throw new Error(`Xen domain config: cpus ${JSON.stringify(l.cpus)} is not a CPU list like 1-3 or 1,3`);
  const cmdline = [
    'console=hvc0',
    'quiet',
    'panic=-1',
    `vsp.owner=${l.owner}`,
    'vsp.root=/dev/xvda',
    'vsp.data=/dev/xvdb',
    ...(l.nic ? [`vsp.ip=${l.nic.address}`] : []),
  ].join(' ');
  // `target=` comes last in a disk spec: xl takes the rest of the string as the path.
  const disks = [
    `format=raw,vdev=xvda,access=rw,backendtype=phy,script=${l.hotplugScript},target=${l.rootDisk}`,
    `format=raw,vdev=xvdb,access=rw,backendtype=phy,script=${l.hotplugScript},target=${l.dataDisk}`,
  ];
  const lines = [
    '# Written by VSP (drivers/xen): one task VM.',
    `name = "${l.name}"`,
    `type = "${l.type}"`,
    `kernel = "${l.kernel}"`,
    `ramdisk = "${l.ramdisk}"`,
    `cmdline = "${cmdline}"`,
    `memory = ${l.memoryMiB}`,
    `maxmem = ${l.memoryMiB}`,
    `vcpus = ${l.vcpus}`,
    ...(l.cpus !== undefined ? [`cpus = "${l.cpus}"`] : []),
    'on_poweroff = "destroy"',
    // A guest that did not power off (a kernel panic reboots it: panic=-1) stays until the driver has its
    // console and destroys it: destroyed at once, its last lines (the panic) never left the console ring.
    'on_reboot = "preserve"',
    'on_crash = "preserve"',
    `disk = [ ${disks.map((d) => `"${d}"`).join(', ')} ]`,
  ];
  if (l.nic) {
    for (const [what, v] of [
      ['bridge', l.nic.bridge],
      ['vifname', l.nic.tap],
      ['mac', l.nic.mac],
    ])
      if (UNSAFE.test(v))
        throw new Error(`Xen domain config: ${what} ${JSON.stringify(v)} has unsafe characters`);
    lines.push(`vif = [ "mac=${l.nic.mac},bridge=${l.nic.bridge},vifname=${l.nic.tap}" ]`);
  } else {
    lines.push('vif = [ ]');
  }
  return lines.join('\n') + '\n';
}
