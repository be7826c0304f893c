import { promises as fs } from 'node:fs';

import type { z } from 'zod';

import type { InventorySchema } from '../cluster/inventory';
import { SshSession, type ExecOptions, type ExecResult, type SshTarget } from '../cluster/sshSession';

export type { SshTarget };

/** An inventory as written (defaults not applied); deploy/cluster/inventory.ts owns the format. */
export type InventoryFile = z.input<typeof InventorySchema>;

/** ssh targets of an inventory's hosts: key auth, the host key the inventory pins. */
export async function sshTargets(inv: InventoryFile): Promise<Record<string, SshTarget>> {
  const privateKey = await fs.readFile(inv.ssh.identityFile);
  return Object.fromEntries(
    inv.hosts.map((h) => [
      h.name,
      {
        name: h.name,
        address: h.address,
        port: inv.ssh.port ?? 22,
        user: inv.ssh.user ?? 'root',
        privateKey,
        hostKey: h.hostKey,
      },
    ]),
  );
}

/** Connects, runs one command, disconnects. */
export async function sshOnce(t: SshTarget, command: string, opts: ExecOptions = {}): Promise<ExecResult> {
  const session = await SshSession.connect(t);
  try {
    return await session.exec(command, opts);
  } finally {
    session.close();
  }
}

/** Whether the host runs `true` over ssh now. */
export function sshAnswers(t: SshTarget): Promise<boolean> {
  return sshOnce(t, 'true', { timeoutMs: 10_000 }).then(
    (r) => r.code === 0,
    () => false,
  );
}
