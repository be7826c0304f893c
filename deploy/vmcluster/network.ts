import { runCommand } from '../../lib/runCommand';
import { createLogger, describeError } from '../../logging/logger';
import { killProcessesIn, requireRoot } from '../devcluster/netns';
import { gatewayMac, type ClusterConfig } from './config';

/**
 * The cluster's private segment: netns `<prefix>` holding bridge `<prefix>-br` with one tap per dom0
 * (QEMU runs in the netns and opens its tap there) and one end of a veth pair; the other end stays in the
 * root namespace with the gateway address (<subnet>.254), so the servers on this machine (Temporal, the
 * repository) are reachable from every dom0 there, and this machine reaches the dom0s directly. Nothing
 * else is attached to the segment: no default route, no forwarding.
 */

const log = createLogger('vmcluster.network');
const IP_TIMEOUT_MS = 15_000;

async function ip(args: string[]): Promise<string> {
  return (await runCommand('ip', args, { timeoutMs: IP_TIMEOUT_MS })).stdout;
}

async function netnsExists(netns: string): Promise<boolean> {
  return (await ip(['netns', 'list'])).split('\n').some((l) => l.split(' ')[0] === netns);
}

async function linkExists(name: string): Promise<boolean> {
  return runCommand('ip', ['link', 'show', 'dev', name], { timeoutMs: IP_TIMEOUT_MS }).then(
    () => true,
    () => false,
  );
}

/** Creates the segment (after removing leftovers of an earlier run); on failure removes what it made. */
export async function networkUp(c: ClusterConfig): Promise<void> {
  requireRoot('the virtual cluster (network namespace, bridge, taps, QEMU)');
  await networkDown(c);
  const inNs = (args: string[]) => ip(['-n', c.netns, ...args]);
  try {
    await ip(['netns', 'add', c.netns]);
    await inNs(['link', 'set', 'lo', 'up']);
    await inNs(['link', 'add', c.bridge, 'type', 'bridge', 'stp_state', '0', 'forward_delay', '0']);
    await inNs(['link', 'set', c.bridge, 'up']);
    const mac = gatewayMac(c);
    await ip([
      'link',
      'add',
      c.hostVeth,
      'address',
      mac,
      'type',
      'veth',
      'peer',
      'name',
      c.nsVeth,
      'netns',
      c.netns,
    ]);
    await ip(['addr', 'add', `${c.gateway}/24`, 'dev', c.hostVeth]);
    await ip(['link', 'set', c.hostVeth, 'up']);
    await inNs(['link', 'set', c.nsVeth, 'master', c.bridge, 'up']);
    for (const h of c.hosts) {
      await inNs(['tuntap', 'add', 'dev', h.tap, 'mode', 'tap']);
      await inNs(['link', 'set', h.tap, 'master', c.bridge, 'up']);
    }
  } catch (err) {
    await networkDown(c).catch((e: unknown) =>
      log.error({ err: describeError(e) }, 'cleanup after a failed network bring-up failed'),
    );
    throw new Error(`could not create the cluster network ${c.netns} (${c.subnet}.0/24)`, { cause: err });
  }
  log.info(
    { netns: c.netns, bridge: c.bridge, gateway: c.gateway, taps: c.hosts.map((h) => h.tap) },
    'network up',
  );
}

/** Removes the netns (with its bridge and taps, after killing what still runs in it) and the veth. Idempotent. */
export async function networkDown(c: ClusterConfig): Promise<void> {
  requireRoot('the virtual cluster (network namespace, bridge, taps, QEMU)');
  const hadNetns = await netnsExists(c.netns);
  if (hadNetns) {
    await killProcessesIn(c.netns);
    await ip(['netns', 'del', c.netns]);
  }
  // Deleting the netns deletes the veth pair with its inner end; a half-made run may have left only ours.
  const hadVeth = await linkExists(c.hostVeth);
  if (hadVeth)
    await ip(['link', 'del', c.hostVeth]).catch((err: unknown) => {
      // The netns deletion just above may remove the pair a moment later.
      if (!/Cannot find device/.test(describeError(err))) throw err;
    });
  if (hadNetns || hadVeth) log.info({ netns: c.netns, hostVeth: c.hostVeth }, 'network removed');
}
