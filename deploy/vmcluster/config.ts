import path from 'node:path';

/**
 * The virtual Xen cluster's names, addresses and places. Everything on this machine is named by the
 * prefix (netns `<prefix>`, bridge `<prefix>-br`, taps `<prefix>-t<i>`, host-side veth `<prefix>-h`), so
 * two clusters with different prefixes and subnets can run side by side and `down` finds every leftover.
 */

/** Host i (1-based) is named HOST_NAMES[i-1] and has address <subnet>.<i>. */
export const HOST_NAMES = ['a', 'b', 'c'] as const;
export type HostName = (typeof HOST_NAMES)[number];

export interface VmClusterOptions {
  /** Number of dom0s, 1 to 3 (default 2). */
  hosts?: number;
  /** Default $VSP_VMCLUSTER_PREFIX or 'vspxen'. */
  prefix?: string;
  /** First three octets of the /24 (default $VSP_VMCLUSTER_SUBNET or '10.77.30'); this machine is .254. */
  subnet?: string;
  /** Images and warm snapshots (default $VSP_VMCLUSTER_CACHE or /var/cache/vsp/vmcluster). */
  cacheDir?: string;
  /** Keys and the running cluster's state (default $VSP_VMCLUSTER_STATE or /var/lib/vsp/vmcluster). */
  stateRoot?: string;
  /** QEMU memory per dom0, MiB (default 2048); Xen gives dom0 `dom0MemMiB` of it (default 1024). */
  memMiB?: number;
  dom0MemMiB?: number;
  /** vCPUs per dom0 (default $VSP_VMCLUSTER_SMP or 1: see dom0.ts). */
  smp?: number;
  /** false: always boot cold and keep no warm snapshot (default true). */
  warm?: boolean;
}

export interface ClusterConfig {
  prefix: string;
  subnet: string;
  netns: string;
  bridge: string;
  /** The root namespace's end of the veth, holding `gateway`; its peer in the netns is on the bridge. */
  hostVeth: string;
  nsVeth: string;
  gateway: string;
  hosts: HostConfig[];
  cacheDir: string;
  keysDir: string;
  stateDir: string;
  memMiB: number;
  dom0MemMiB: number;
  smp: number;
  warm: boolean;
}

export interface HostConfig {
  name: HostName;
  index: number;
  address: string;
  tap: string;
  mac: string;
  runDir: string;
}

const PREFIX = /^[a-z][a-z0-9]{1,9}$/;
const SUBNET24 = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})$/;
/** 0x4d = 77: MACs in a private (locally administered) range, one per host index. */
const MAC_BASE = '52:54:00:4d';

export function clusterConfig(o: VmClusterOptions = {}): ClusterConfig {
  const count = o.hosts ?? 2;
  const prefix = o.prefix ?? process.env.VSP_VMCLUSTER_PREFIX ?? 'vspxen';
  const subnet = o.subnet ?? process.env.VSP_VMCLUSTER_SUBNET ?? '10.77.30';
  const memMiB = o.memMiB ?? 2048;
  const dom0MemMiB = o.dom0MemMiB ?? 1024;
  const smp = o.smp ?? Number(process.env.VSP_VMCLUSTER_SMP ?? 1);
  const bad: string[] = [];
  if (!Number.isInteger(count) || count < 1 || count > HOST_NAMES.length)
    bad.push(`hosts must be 1 to ${HOST_NAMES.length}, got ${count}`);
  if (!PREFIX.test(prefix))
    bad.push(`prefix ${JSON.stringify(prefix)} must be 2-10 lowercase letters/digits`);
  const octets = SUBNET24.exec(subnet);
  if (!octets || octets.slice(1).some((x) => Number(x) > 255))
    bad.push(`subnet ${JSON.stringify(subnet)} must be three octets like 10.77.30`);
  if (!Number.isInteger(memMiB) || memMiB < 768) bad.push(`memMiB must be an integer >= 768, got ${memMiB}`);
  if (!Number.isInteger(dom0MemMiB) || dom0MemMiB < 384 || dom0MemMiB > memMiB - 256)
    bad.push(`dom0MemMiB must be an integer from 384 to memMiB - 256, got ${dom0MemMiB}`);
  if (!Number.isInteger(smp) || smp < 1 || smp > 8) bad.push(`smp must be 1 to 8, got ${smp}`);
  if (bad.length > 0) throw new Error(`invalid virtual cluster options: ${bad.join('; ')}`);

  const cacheDir = o.cacheDir ?? process.env.VSP_VMCLUSTER_CACHE ?? '/var/cache/vsp/vmcluster';
  const stateRoot = o.stateRoot ?? process.env.VSP_VMCLUSTER_STATE ?? '/var/lib/vsp/vmcluster';
  const stateDir = path.join(stateRoot, prefix);
  const subnetByte = Number(octets![3]).toString(16).padStart(2, '0');
  return {
    prefix,
    subnet,
    netns: prefix,
    bridge: `${prefix}-br`,
    hostVeth: `${prefix}-h`,
    nsVeth: `${prefix}-v`,
    gateway: `${subnet}.254`,
    hosts: HOST_NAMES.slice(0, count).map((name, i) => ({
      name,
      index: i + 1,
      address: `${subnet}.${i + 1}`,
      tap: `${prefix}-t${i + 1}`,
      mac: `${MAC_BASE}:${subnetByte}:${(i + 1).toString(16).padStart(2, '0')}`,
      runDir: path.join(stateDir, 'run', name),
    })),
    cacheDir,
    keysDir: path.join(stateRoot, 'keys'),
    stateDir,
    memMiB,
    dom0MemMiB,
    smp,
    warm: o.warm ?? true,
  };
}

/** The fixed MAC of the root namespace's veth end: restored dom0s find the same neighbour as at snapshot. */
export function gatewayMac(c: ClusterConfig): string {
  return `${c.hosts[0].mac.slice(0, -2)}fe`;
}

export function inventoryFile(c: ClusterConfig): string {
  return path.join(c.stateDir, 'inventory.json');
}
