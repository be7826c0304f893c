import { createHash } from 'node:crypto';
import { createLogger, describeError } from '../../logging/logger';
import { runCommand } from '../../lib/runCommand';

/**
 * The cluster's VM network: one L2 segment that every host's bridge joins. A VM's NIC is a tap on the
 * bridge of the host it runs on, with a MAC and an address derived from its id, so the same VM answers
 * at the same address on any host and a live migration only moves where its frames enter the segment
 * (QEMU announces the MAC from the target once the guest resumes there).
 */

const log = createLogger('qemu.vm-network');

export interface VmNetworkOptions {
  /** Bridge on every host that the VMs' taps join (on the shared segment). */
  bridge: string;
  /** First three octets of the segment's /24, like '10.77.0'. */
  subnet: string;
  /** Host parts VM addresses are drawn from (inclusive); default 100..249, clear of hosts and gateway. */
  firstHost?: number;
  lastHost?: number;
}

/** What a VM's NIC is, fixed at its first boot and carried in its handle to every later host. */
export interface VmNic {
  tap: string;
  mac: string;
  /** Address with prefix length, like 10.77.0.123/24. */
  address: string;
}

const SUBNET24 = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})$/;
const LINK_NAME = /^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,14}$/;
const IP_TIMEOUT_MS = 15_000;
/** How long an address gets to answer the ARP probe before it counts as free. */
const ARP_WAIT_SEC = 1;
const MAX_ADDRESS_TRIES = 8;

export function validateVmNetwork(o: VmNetworkOptions): void {
  const bad: string[] = [];
  if (!LINK_NAME.test(o.bridge)) bad.push(`bridge ${JSON.stringify(o.bridge)} is not a link name`);
  const octets = SUBNET24.exec(o.subnet);
  if (!octets || octets.slice(1).some((x) => Number(x) > 255))
    bad.push(`subnet ${JSON.stringify(o.subnet)} must be three octets like 10.77.0`);
  const first = o.firstHost ?? 100;
  const last = o.lastHost ?? 249;
  if (!Number.isInteger(first) || !Number.isInteger(last) || first < 1 || last > 254 || first > last)
    bad.push(`host range ${first}..${last} must lie within 1..254`);
  if (bad.length > 0) throw new Error(`invalid VM network: ${bad.join('; ')}`);
}

/**
 * The NIC of a VM: tap `vsp<8 hex>`, a MAC under QEMU's 52:54:00 prefix and an address in the host
 * range, all from a hash of the id. `attempt` steps the address past ones found taken (chooseVmNic).
 */
export function vmNicOf(vmId: string, o: VmNetworkOptions, attempt = 0): VmNic {
  const h = createHash('sha256').update(vmId).digest();
  const first = o.firstHost ?? 100;
  const last = o.lastHost ?? 249;
  const hostPart = first + ((h.readUInt32BE(4) + attempt) % (last - first + 1));
  const mac = ['52', '54', '00', ...[h[0], h[1], h[2]].map((b) => b.toString(16).padStart(2, '0'))];
  return {
    tap: `vsp${h.subarray(8, 12).toString('hex')}`,
    mac: mac.join(':'),
    address: `${o.subnet}.${hostPart}/24`,
  };
}

/**
 * The NIC for a VM's first boot: its hashed address unless that is taken, by a VM of this host's store
 * (`takenHere`: address -> VM id) or by any machine answering ARP on the segment; then the next ones.
 * Two VMs booting at the same moment on different hosts can still pick the same address: nothing
 * answers yet. Throws, naming every taken address, when none of the first few is free.
 */
export async function chooseVmNic(
  vmId: string,
  o: VmNetworkOptions,
  wrap: Wrap,
  takenHere: ReadonlyMap<string, string>,
): Promise<VmNic> {
  const size = (o.lastHost ?? 249) - (o.firstHost ?? 100) + 1;
  const taken: string[] = [];
  for (let attempt = 0; attempt < Math.min(MAX_ADDRESS_TRIES, size); attempt++) {
    const nic = vmNicOf(vmId, o, attempt);
    const ip = nic.address.split('/')[0];
    const holder =
      takenHere.get(nic.address) ??
      ((await answersArp(wrap, o.bridge, ip)) ? 'a machine on the segment' : undefined);
    if (!holder) {
      if (taken.length > 0) log.warn({ vmId, taken, address: nic.address }, 'VM address collision avoided');
      return nic;
    }
    taken.push(`${ip} (held by ${holder})`);
  }
  throw new Error(
    `VM ${vmId}: no free address on the VM network ${o.subnet}.0/24 among its first ${taken.length} choices: ${taken.join(', ')}`,
  );
}

/** Duplicate address detection: whether anything on the bridge's segment answers ARP for `ip`. */
async function answersArp(wrap: Wrap, bridge: string, ip: string): Promise<boolean> {
  const c = wrap('busybox', ['arping', '-D', '-q', '-c', '1', '-w', String(ARP_WAIT_SEC), '-I', bridge, ip]);
  try {
    await runCommand(c.cmd, c.args, { timeoutMs: IP_TIMEOUT_MS });
    return false;
  } catch (err) {
    // arping -D exits 1 when the address answered; anything else means the probe itself failed.
    if ((err as Error).cause && ((err as Error).cause as { code?: unknown }).code === 1) return true;
    throw new Error(`cannot check whether ${ip} is free on bridge ${bridge}`, { cause: err });
  }
}

/** Reads a NIC back from a handle's state (undefined: the VM has user-mode networking or none). */
export function nicFromState(state: Record<string, unknown>): VmNic | undefined {
  const { nicTap, nicMac, nicAddress } = state;
  if (typeof nicTap === 'string' && typeof nicMac === 'string' && typeof nicAddress === 'string')
    return { tap: nicTap, mac: nicMac, address: nicAddress };
  return undefined;
}

export function nicState(nic: VmNic): Record<string, string> {
  return { nicTap: nic.tap, nicMac: nic.mac, nicAddress: nic.address };
}

type Wrap = (cmd: string, args: string[]) => { cmd: string; args: string[] };

async function ip(wrap: Wrap, args: string[]): Promise<string> {
  const c = wrap('ip', args);
  return (await runCommand(c.cmd, c.args, { timeoutMs: IP_TIMEOUT_MS })).stdout;
}

async function tapExists(wrap: Wrap, tap: string): Promise<boolean> {
  const links = await ip(wrap, ['-o', 'link', 'show']);
  return links.split('\n').some((l) => l.split(': ')[1]?.split('@')[0] === tap);
}

/**
 * Creates (idempotently) the VM's tap on the bridge, up, before QEMU opens it; owned by QEMU's account
 * (`owner`), which opens it unprivileged.
 */
export async function addVmTap(
  wrap: Wrap,
  bridge: string,
  tap: string,
  owner?: { uid: number; gid: number },
): Promise<void> {
  const ownedBy = owner ? ['user', String(owner.uid), 'group', String(owner.gid)] : [];
  if (!(await tapExists(wrap, tap))) await ip(wrap, ['tuntap', 'add', tap, 'mode', 'tap', ...ownedBy]);
  await ip(wrap, ['link', 'set', tap, 'master', bridge, 'up']).catch((err: unknown) => {
    throw new Error(`cannot attach tap ${tap} to bridge ${bridge}`, { cause: err });
  });
}

/** Removes the VM's tap once no QEMU holds it; missing is fine. Never throws: it is cleanup. */
export async function removeVmTap(wrap: Wrap, tap: string): Promise<void> {
  try {
    if (await tapExists(wrap, tap)) await ip(wrap, ['link', 'del', tap]);
  } catch (err) {
    log.warn({ tap, err: describeError(err) }, 'cannot remove a VM tap');
  }
}
