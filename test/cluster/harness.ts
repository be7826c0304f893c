/**
 * The cluster tier's harness: tests in test/cluster/ run against real Xen dom0s (QEMU VMs on this
 * machine) that the tier's global setup (test/cluster/globalSetup.ts) brings up once per run and its
 * teardown removes; never start or stop dom0s from a test (fault tests may kill one: then say so, and
 * leave the rest to teardown).
 *
 * API (keep it small):
 *   clusterInventory()            the inventory (PLAN.md's contract, as `vsp cluster deploy --inventory`
 *                                 reads it), with `cluster` filled in: Temporal at 10.77.30.254:7233
 *                                 (started by the global setup, reachable from every dom0), the
 *                                 repository URL the tests serve at 10.77.30.254:8420, driver 'xen'
 *   inventoryFile()               the path of that inventory file
 *   onHost(host, command, opts?)  runs a shell command as root on dom0 `host` ('a', 'b', ...) over ssh2 (key
 *                                 auth, host key checked against the inventory; one connection per host and
 *                                 test file, closed after the file): { code, stdout, stderr }; opts:
 *                                 timeoutMs (default 120 s), input (stdin)
 *   onHostOk(host, command, opts?) the same; a non-zero exit throws with the command's stderr; stdout
 *   hostTarget(host)              address, user, key and host key, for a test's own ssh2 connection
 *   GATEWAY                       this machine's address on the cluster network
 *
 * Without the global setup (e.g. a developer's `npm run vm-cluster -- up` then
 * `npx jest --selectProjects cluster`), the inventory of the running `vspxen` cluster is used.
 */
import { promises as fs } from 'node:fs';

import { sshTargets, type Inventory } from '../../deploy/vmcluster/cluster';
import { clusterConfig, inventoryFile as vmInventoryFile } from '../../deploy/vmcluster/config';
import type { Client } from 'ssh2';

import { CLUSTER_INVENTORY_ENV, GATEWAY } from './suiteEnv';
import { okOutput, sshConnect, sshRun, type SshResult, type SshTarget } from '../../deploy/vmcluster/ssh';

export type { Inventory, SshResult, SshTarget };

export { GATEWAY };

export function inventoryFile(): string {
  return process.env[CLUSTER_INVENTORY_ENV] ?? vmInventoryFile(clusterConfig());
}

let cached: { file: string; inventory: Inventory; targets: Record<string, SshTarget> } | undefined;

async function load(): Promise<NonNullable<typeof cached>> {
  const file = inventoryFile();
  if (cached?.file === file) return cached;
  const text = await fs.readFile(file, 'utf8').catch((err: unknown) => {
    throw new Error(`no cluster inventory at ${file}: is the cluster up (npm run test:cluster)?`, {
      cause: err,
    });
  });
  const inventory = JSON.parse(text) as Inventory;
  cached = { file, inventory, targets: await sshTargets(inventory) };
  return cached;
}

export async function clusterInventory(): Promise<Inventory> {
  return (await load()).inventory;
}

export async function hostTarget(host: string): Promise<SshTarget> {
  const { inventory, targets } = await load();
  const t = targets[host];
  if (!t)
    throw new Error(
      `no host ${JSON.stringify(host)} in the cluster (hosts: ${inventory.hosts.map((h) => h.name).join(', ')})`,
    );
  return t;
}

/** One ssh connection per host, opened on first use (a TCG dom0 takes seconds per key exchange). */
const connections = new Map<string, Promise<Client>>();

function connection(host: string): Promise<Client> {
  let conn = connections.get(host);
  if (!conn) {
    conn = hostTarget(host).then((t) => sshConnect(t));
    connections.set(host, conn);
    // A closed connection (its host was powered off, say) is replaced on next use.
    conn.then(
      (c) => c.once('close', () => connections.delete(host)),
      () => connections.delete(host),
    );
  }
  return conn;
}

export async function onHost(
  host: string,
  command: string,
  opts: { timeoutMs?: number; input?: string | Buffer } = {},
): Promise<SshResult> {
  return sshRun(await connection(host), command, opts);
}

export async function onHostOk(
  host: string,
  command: string,
  opts: { timeoutMs?: number; input?: string | Buffer } = {},
): Promise<string> {
  return okOutput(`dom0 ${host}`, command, await onHost(host, command, opts));
}

// Each test file gets its own module instance: its connections end with it.
afterAll(async () => {
  const open = [...connections.values()];
  connections.clear();
  for (const c of await Promise.allSettled(open)) if (c.status === 'fulfilled') c.value.end();
});
