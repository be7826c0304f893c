/**
 * The cluster tier's harness: tests in test/cluster/ run against real Xen dom0s (QEMU VMs on this
 * machine) that the tier's global setup (test/cluster/globalSetup.ts) brings up once per run and its
 * teardown removes; never start or stop dom0s from a test (fault tests may kill one: then say so, and
 * leave the rest to teardown).
 *
 * API (keep it small):
 *   clusterInventory()            the inventory (PLAN.md's contract, validated by deploy/cluster/inventory.ts
 *                                 as `vsp cluster deploy --inventory` reads it), with `cluster` filled in:
 *                                 Temporal at 10.77.30.254:7233 (started by the global setup, reachable
 *                                 from every dom0), the repository URL the tests serve at
 *                                 http://10.77.30.254:8420 and its service token file, driver 'xen'
 *   repositoryToken()             that service token (serve the tests' repository with it)
 *   inventoryFile()               the path of that inventory file
 *   onHost(host, command, opts?)  runs a shell command as root on dom0 `host` ('a', 'b', ...) over ssh2
 *                                 (deploy/cluster/sshSession.ts: key auth, host key pinned by the
 *                                 inventory; one connection per host and test file, closed after the file,
 *                                 reopened after a failure): { code, signal, stdout, stderr }; opts:
 *                                 timeoutMs (default 120 s), stdin
 *   onHostOk(host, command, opts?) the same; a non-zero exit throws (RemoteCommandError); its stdout
 *   hostTarget(host)              the SshTarget, for a test's own SshSession
 *   GATEWAY                       this machine's address on the cluster network
 *
 * Without the global setup (e.g. a developer's `npm run vm-cluster -- up` then
 * `npx jest --selectProjects cluster`), the inventory of the running `vspxen` cluster is used.
 */
import { promises as fs } from 'node:fs';

import { loadInventory, type Inventory } from '../../deploy/cluster/inventory';
import {
  RemoteCommandError,
  SshSession,
  type ExecOptions,
  type ExecResult,
  type SshTarget,
} from '../../deploy/cluster/sshSession';
import { clusterConfig, inventoryFile as vmInventoryFile } from '../../deploy/vmcluster/config';
import { sshTargets } from '../../deploy/vmcluster/ssh';
import { CLUSTER_INVENTORY_ENV, GATEWAY } from './suiteEnv';

export type { ExecResult, Inventory, SshTarget };
export { GATEWAY };

export function inventoryFile(): string {
  return process.env[CLUSTER_INVENTORY_ENV] ?? vmInventoryFile(clusterConfig());
}

let cached: { file: string; inventory: Inventory; targets: Record<string, SshTarget> } | undefined;

async function load(): Promise<NonNullable<typeof cached>> {
  const file = inventoryFile();
  if (cached?.file === file) return cached;
  const inventory = await loadInventory(file).catch((err: unknown) => {
    throw new Error(`no usable cluster inventory at ${file}: is the cluster up (npm run test:cluster)?`, {
      cause: err,
    });
  });
  cached = { file, inventory, targets: await sshTargets(inventory) };
  return cached;
}

export async function clusterInventory(): Promise<Inventory> {
  return (await load()).inventory;
}

export async function repositoryToken(): Promise<string> {
  const tokenFile = (await clusterInventory()).cluster?.repositoryTokenFile;
  if (!tokenFile) throw new Error(`the inventory ${inventoryFile()} has no cluster.repositoryTokenFile`);
  return (await fs.readFile(tokenFile, 'utf8')).split('\n')[0].trim();
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

/** One ssh session per host, opened on first use (a TCG dom0 takes seconds per key exchange). */
const sessions = new Map<string, Promise<SshSession>>();

function session(host: string): Promise<SshSession> {
  let s = sessions.get(host);
  if (!s) {
    s = hostTarget(host).then((t) => SshSession.connect(t));
    sessions.set(host, s);
    s.catch(() => sessions.delete(host));
  }
  return s;
}

export async function onHost(host: string, command: string, opts: ExecOptions = {}): Promise<ExecResult> {
  const s = await session(host);
  try {
    return await s.exec(command, opts);
  } catch (err) {
    // The command could not start or outlived its timeout: the connection may be dead (its host powered
    // off, say); the next call opens a new one.
    sessions.delete(host);
    s.close();
    throw err;
  }
}

export async function onHostOk(host: string, command: string, opts: ExecOptions = {}): Promise<string> {
  const s = await session(host);
  const r = await onHost(host, command, opts);
  if (r.code !== 0) throw new RemoteCommandError(s.target.name, command, r);
  return r.stdout;
}

// Each test file gets its own module instance: its sessions end with it.
afterAll(async () => {
  const open = [...sessions.values()];
  sessions.clear();
  for (const s of await Promise.allSettled(open)) if (s.status === 'fulfilled') s.value.close();
});
