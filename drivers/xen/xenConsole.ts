import { promises as fs } from 'node:fs';
import path from 'node:path';
import type { VmStore } from '../../storage/vmStore';
import { departedConsoleOf, setConsoleAside } from '../qemu/consoleLog';
import { domainName } from './domainConfig';

export const DEFAULT_CONSOLE_LOG_DIR = '/var/log/xen/console';

/** How a domain got to this host: `xl create`, or `xl migrate-receive` (named `<name>--incoming` then). */
export type Arrival = 'create' | 'incoming';

/**
 * A Xen guest's console in its VM folder. xenconsoled (`--log=guest`) appends each domain's console to
 * `<logDir>/guest-<domain name>.log`, named when it first sees the domain: a received domain keeps writing
 * to `guest-<name>--incoming.log` after xl renames it. Before a domain arrives, the driver makes that name
 * a link to the VM folder's `console.log`, so the guest's output lands where the QEMU driver's does: the
 * console follower reads progress and exit status there, and each host's part of the console is set aside
 * as the VM leaves and reaches the task's logs (activities/host/consoleSegments.ts).
 */
export class XenConsole {
  readonly logDir: string;

  constructor(
    private readonly store: VmStore,
    logDir = DEFAULT_CONSOLE_LOG_DIR,
  ) {
    this.logDir = logDir;
  }

  /** xenconsoled's log name for the domain of `vmId` arriving by `arrival`. */
  logOf(vmId: string, arrival: Arrival): string {
    const suffix = arrival === 'incoming' ? '--incoming' : '';
    return path.join(this.logDir, `guest-${domainName(vmId)}${suffix}.log`);
  }

  /**
   * Before the domain arrives: the VM folder's console exists (kept if it does: a retry loses nothing) and
   * xenconsoled's name for it links there. The link replaces any earlier file atomically.
   */
  async attach(vmId: string, arrival: Arrival): Promise<void> {
    const consoleLog = this.store.paths(vmId).consoleLog;
    await (await fs.open(consoleLog, 'a', 0o640)).close();
    await fs.mkdir(this.logDir, { recursive: true });
    const link = this.logOf(vmId, arrival);
    const tmp = `${link}.vsp-link`;
    await fs.rm(tmp, { force: true });
    await fs.symlink(consoleLog, tmp);
    await fs.rename(tmp, link);
  }

  /** Removes xenconsoled's names for the VM on this host (the links; never the console itself). */
  async detach(vmId: string): Promise<void> {
    for (const arrival of ['create', 'incoming'] as const)
      await fs.rm(this.logOf(vmId, arrival), { force: true });
  }

  /** As the VM leaves this host: what it printed here waits for the task's logs; the links go. */
  async setAside(vmId: string): Promise<void> {
    await this.detach(vmId);
    await setConsoleAside(this.store.paths(vmId).consoleLog, departedConsoleOf(this.store.root, vmId));
  }
}
