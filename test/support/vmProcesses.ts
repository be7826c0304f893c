import { promises as fs } from 'node:fs';
import { runCommand } from '../../lib/runCommand';

/**
 * What runs for a VM, read from the machine itself (not from what VSP believes): QEMU processes in the
 * process table and taps in the test hosts' namespaces.
 */

/** The hosts whose store a QEMU of `vmId` uses (its QMP socket is in the host's store), one per process. */
export async function qemuHostsOf(vmId: string, storeDirs: Record<string, string>): Promise<string[]> {
  const hosts: string[] = [];
  for (const pid of await fs.readdir('/proc')) {
    if (!/^\d+$/.test(pid)) continue;
    const cmdline = await fs.readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '');
    const args = cmdline.split('\0');
    if (!args[0]?.includes('qemu-system') || args[args.indexOf('-name') + 1] !== `vsp-${vmId}`) continue;
    const qmp = args.find((a) => a.startsWith('unix:') && a.includes(`/vms/${vmId}/run/qmp.sock`)) ?? '';
    hosts.push(Object.keys(storeDirs).find((h) => qmp.startsWith(`unix:${storeDirs[h]}/`)) ?? `? ${qmp}`);
  }
  return hosts.sort();
}

export async function linkExists(netns: string, link: string): Promise<boolean> {
  const { stdout } = await runCommand('ip', ['netns', 'exec', netns, 'ip', '-o', 'link', 'show'], {
    timeoutMs: 15_000,
  });
  return stdout.split('\n').some((l) => l.split(': ')[1]?.split('@')[0] === link);
}
