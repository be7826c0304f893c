import { runCommand } from '../../lib/runCommand';
import { createLogger, describeError } from '../../logging/logger';

/**
 * Test hosts on one machine: each host is a network namespace `<prefix><name>` with its own address on
 * one L2 segment. The segment is a bridge in the root namespace (`<prefix>br`, holding the gateway
 * address, which the root namespace uses to reach the hosts) with one veth per host; inside each host the
 * veth ends on a bridge `br0` that carries the host's address and takes the taps of its VMs, so a VM with
 * a fixed MAC keeps its address wherever it runs. No default routes: traffic stays on the segment.
 *
 * Everything is named by the prefix, so `cleanupTestHosts(prefix)` removes the leftovers of a crashed run.
 */

const log = createLogger('devcluster.netns');

export const DEFAULT_NETNS_PREFIX = 'vsp-';
/** Inside every host namespace. */
export const HOST_BRIDGE = 'br0';
const HOST_UPLINK = 'uplink0';
/** Link names are at most 15 characters in Linux. */
const IFNAMSIZ = 15;
const HOST_NAME = /^[a-z][a-z0-9]*$/;
const PREFIX = /^[a-z][a-z0-9]*-$/;
const SUBNET24 = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})$/;
const IP_TIMEOUT_MS = 15_000;

export interface TestHost {
  name: string;
  netns: string;
  /** The host's address on the segment. */
  address: string;
}

export interface TestNetworkOptions {
  hosts: string[];
  /** Names every namespace and root-namespace link; cleanup removes all names with it. Default 'vsp-'. */
  prefix?: string;
  /** First three octets of the /24 of the segment; hosts get .1, .2, ...; the root bridge .254. */
  subnet?: string;
}

export interface TestNetwork {
  prefix: string;
  hosts: Record<string, TestHost>;
  /** First three octets of the segment's /24. */
  subnet: string;
  /** Address of the root namespace on the segment (its bridge). */
  gateway: string;
  /** Creates (idempotently) a tap on the host's bridge for a VM's NIC; returns its name. */
  addTap(host: string, tap: string): Promise<string>;
  /** Removes every namespace and link of this network, after killing what still runs inside. */
  teardown(): Promise<void>;
}

/** Command words that run a command inside a host namespace (`ip netns exec`). */
export function inNetns(netns: string, cmd: string, args: string[]): { cmd: string; args: string[] } {
  return { cmd: 'ip', args: ['netns', 'exec', netns, cmd, ...args] };
}

/** Namespaces, bridges and taps need root (CAP_NET_ADMIN): say so before anything half-happens. */
export function requireRoot(what = 'test hosts (network namespaces, bridges, taps)'): void {
  if (typeof process.getuid === 'function' && process.getuid() !== 0)
    throw new Error(`${what} need root: run as root (for example with sudo)`);
}

async function ip(args: string[]): Promise<string> {
  return (await runCommand('ip', args, { timeoutMs: IP_TIMEOUT_MS })).stdout;
}

async function ipIn(netns: string, args: string[]): Promise<string> {
  return ip(['netns', 'exec', netns, 'ip', ...args]);
}

function validate(opts: TestNetworkOptions): { prefix: string; subnet: string } {
  const prefix = opts.prefix ?? DEFAULT_NETNS_PREFIX;
  const subnet = opts.subnet ?? '10.77.0';
  const bad: string[] = [];
  if (!PREFIX.test(prefix))
    bad.push(`prefix ${JSON.stringify(prefix)} must be lowercase letters/digits ending in '-'`);
  const octets = SUBNET24.exec(subnet);
  if (!octets || octets.slice(1).some((o) => Number(o) > 255))
    bad.push(`subnet ${JSON.stringify(subnet)} must be three octets like 10.77.0`);
  if (opts.hosts.length === 0 || opts.hosts.length > 250) bad.push('give between 1 and 250 hosts');
  if (new Set(opts.hosts).size !== opts.hosts.length) bad.push('host names must be distinct');
  for (const h of opts.hosts) {
    if (!HOST_NAME.test(h)) bad.push(`host name ${JSON.stringify(h)} must be lowercase letters and digits`);
    else if (prefix.length + h.length > IFNAMSIZ)
      bad.push(`host name ${JSON.stringify(h)} is too long for prefix ${prefix} (link names <= ${IFNAMSIZ})`);
  }
  if (prefix.length + 2 > IFNAMSIZ) bad.push(`prefix ${prefix} is too long`);
  if (bad.length > 0) throw new Error(`invalid test network: ${bad.join('; ')}`);
  return { prefix, subnet };
}

/**
 * A bridge's own MAC, fixed. Without one, Linux gives a bridge the lowest MAC of its ports, so a VM's tap
 * joining it could change the host's MAC under its address, and peers holding the old one in their ARP
 * cache lose the host (NFS to it hangs) until that entry expires. Locally administered, from the address.
 */
function bridgeMac(subnet: string, hostPart: number): string {
  return [2, ...subnet.split('.').map(Number), 0, hostPart]
    .map((b) => b.toString(16).padStart(2, '0'))
    .join(':');
}

/**
 * Brings up the hosts, after removing leftovers with the same prefix. On failure, removes what it made.
 */
export async function createTestNetwork(opts: TestNetworkOptions): Promise<TestNetwork> {
  requireRoot();
  const { prefix, subnet } = validate(opts);
  await cleanupTestHosts(prefix);
  const rootBridge = `${prefix}br`;
  const gateway = `${subnet}.254`;
  const hosts: Record<string, TestHost> = {};
  const network: TestNetwork = {
    prefix,
    hosts,
    subnet,
    gateway,
    addTap: (host, tap) => addTap(hostOf(hosts, host), tap),
    teardown: () => cleanupTestHosts(prefix),
  };
  try {
    const bridge = ['type', 'bridge', 'stp_state', '0', 'forward_delay', '0'];
    await ip(['link', 'add', rootBridge, 'address', bridgeMac(subnet, 254), ...bridge]);
    await ip(['addr', 'add', `${gateway}/24`, 'dev', rootBridge]);
    await ip(['link', 'set', rootBridge, 'up']);
    for (const [i, name] of opts.hosts.entries()) {
      const netns = `${prefix}${name}`;
      const address = `${subnet}.${i + 1}`;
      await ip(['netns', 'add', netns]);
      hosts[name] = { name, netns, address };
      // The root end is named like the namespace; the host end is created inside it (no name clash).
      await ip(['link', 'add', netns, 'type', 'veth', 'peer', 'name', HOST_UPLINK, 'netns', netns]);
      await ip(['link', 'set', netns, 'master', rootBridge, 'up']);
      await ipIn(netns, ['link', 'set', 'lo', 'up']);
      await ipIn(netns, ['link', 'add', HOST_BRIDGE, 'address', bridgeMac(subnet, i + 1), ...bridge]);
      await ipIn(netns, ['link', 'set', HOST_UPLINK, 'master', HOST_BRIDGE, 'up']);
      await ipIn(netns, ['addr', 'add', `${address}/24`, 'dev', HOST_BRIDGE]);
      await ipIn(netns, ['link', 'set', HOST_BRIDGE, 'up']);
    }
  } catch (err) {
    await cleanupTestHosts(prefix).catch((e: unknown) =>
      log.error({ err: describeError(e) }, 'cleanup after a failed bring-up failed'),
    );
    throw new Error(`could not bring up test hosts ${opts.hosts.join(', ')}`, { cause: err });
  }
  log.info({ prefix, hosts: Object.values(hosts).map((h) => `${h.name}=${h.address}`) }, 'test hosts up');
  return network;
}

function hostOf(hosts: Record<string, TestHost>, name: string): TestHost {
  const h = hosts[name];
  if (!h)
    throw new Error(`unknown test host ${JSON.stringify(name)} (hosts: ${Object.keys(hosts).join(', ')})`);
  return h;
}

async function addTap(host: TestHost, tap: string): Promise<string> {
  if (!/^[a-z][a-z0-9]{0,14}$/.test(tap)) throw new Error(`invalid tap name ${JSON.stringify(tap)}`);
  const links = await ipIn(host.netns, ['-o', 'link', 'show']);
  if (!links.split('\n').some((l) => l.split(': ')[1]?.split('@')[0] === tap))
    await ipIn(host.netns, ['tuntap', 'add', tap, 'mode', 'tap']);
  await ipIn(host.netns, ['link', 'set', tap, 'master', HOST_BRIDGE, 'up']);
  return tap;
}

/** SIGKILLs whatever still runs in `netns` (only a crashed run leaves anything there). */
export async function killProcessesIn(netns: string): Promise<void> {
  const pids = (await ip(['netns', 'pids', netns]).catch(() => '')).split(/\s+/).filter(Boolean).map(Number);
  for (const pid of pids) {
    try {
      process.kill(pid, 'SIGKILL');
      log.warn({ netns, pid }, 'killed a process left in a namespace');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ESRCH') throw err;
    }
  }
}

/**
 * Removes every namespace and root-namespace link whose name starts with `prefix`: kills what still
 * runs in those namespaces (only a crashed run leaves anything), then deletes them. Idempotent.
 */
export async function cleanupTestHosts(prefix = DEFAULT_NETNS_PREFIX): Promise<void> {
  requireRoot();
  if (!PREFIX.test(prefix)) throw new Error(`invalid prefix ${JSON.stringify(prefix)}`);
  const namespaces = (await ip(['netns', 'list']))
    .split('\n')
    .map((l) => l.split(' ')[0])
    .filter((n) => n.startsWith(prefix));
  for (const netns of namespaces) {
    await killProcessesIn(netns);
    await ip(['netns', 'del', netns]);
  }
  const links = (await ip(['-o', 'link', 'show']))
    .split('\n')
    .map((l) => l.split(': ')[1]?.split('@')[0])
    .filter((n): n is string => !!n && n.startsWith(prefix));
  for (const link of links) {
    await ip(['link', 'del', link]).catch((err: unknown) => {
      // Deleting a namespace also deletes its veth peers, possibly just now.
      if (!/Cannot find device/.test(describeError(err))) throw err;
    });
  }
  if (namespaces.length + links.length > 0) log.info({ prefix, namespaces, links }, 'test hosts removed');
}
