import { execFileSync } from 'node:child_process';
import { promises as fs, readFileSync } from 'node:fs';
import path from 'node:path';

import { isVmProcess } from '../../drivers/qemu/vmProcess';
import { createLogger, describeError } from '../../logging/logger';
import {
  clusterConfig,
  inventoryFile,
  type ClusterConfig,
  type HostConfig,
  type VmClusterOptions,
} from './config';
import {
  dom0Paths,
  dom0RssMiB,
  powerOffDom0,
  powerOnDom0,
  readPid,
  startDom0,
  stopDom0,
  type Dom0Boot,
} from './dom0';
import { builtImage, ensureImage, ensureKeys, type ClusterKeys } from './image';
import { withLock } from './lock';
import { networkDown, networkUp } from './network';
import { sshAnswers, sshTargets, type InventoryFile } from './ssh';

/**
 * The virtual test cluster: `up` builds (or finds) the dom0 image, creates the network and brings every
 * dom0 up in parallel, then writes the inventory (the same file an operator writes for real hosts) and
 * the cluster's state; `down` removes everything `up` made on this machine; `status` reports it.
 * `up` and `down` hold a lock per cluster, so concurrent runs wait for each other.
 */

const log = createLogger('vmcluster');
const LOCK_TIMEOUT_MS = 30 * 60_000;

/** The inventory contract (PLAN.md): deploy/cluster/inventory.ts owns the format; `cluster` is added later. */
export type Inventory = InventoryFile;

interface ClusterState {
  version: 1;
  prefix: string;
  startedAt: string;
  imageHash: string;
  hosts: (Dom0Boot & { address: string })[];
}

export interface ClusterUp {
  inventory: Inventory;
  inventoryFile: string;
  boots: Dom0Boot[];
  /** True when the cluster was already up as configured and was kept. */
  reused: boolean;
  /** Seconds for the whole `up`, including an image build. */
  seconds: number;
}

function stateFile(c: ClusterConfig): string {
  return path.join(c.stateDir, 'cluster.json');
}

function lockFile(c: ClusterConfig): string {
  return path.join(c.stateDir, 'lock');
}

async function readJson<T>(file: string): Promise<T | undefined> {
  const text = await fs.readFile(file, 'utf8').catch(() => undefined);
  return text === undefined ? undefined : (JSON.parse(text) as T);
}

async function writeJsonAtomic(file: string, value: unknown): Promise<void> {
  const tmp = `${file}.tmp-${process.pid}`;
  await fs.writeFile(tmp, `${JSON.stringify(value, null, 2)}\n`, { mode: 0o644 });
  await fs.rename(tmp, file);
}

/** The inventory of cluster `c`: each host's address and pinned host key, root's key. */
export function inventoryOf(c: ClusterConfig, keys: ClusterKeys): Inventory {
  return {
    version: 1,
    ssh: { user: 'root', identityFile: keys.identityFile },
    hosts: c.hosts.map((h) => ({
      name: h.name,
      address: h.address,
      hostKey: keys.hostKeys[h.name],
      labels: {},
    })),
  };
}

/** Whether the recorded cluster still runs as configured, on this image: every QEMU alive, ssh answering. */
async function runningAsConfigured(c: ClusterConfig, inv: Inventory, imageHash: string): Promise<boolean> {
  const state = await readJson<ClusterState>(stateFile(c));
  if (!state || state.imageHash !== imageHash) return false;
  if (state.hosts.map((h) => h.name).join() !== c.hosts.map((h) => h.name).join()) return false;
  for (const h of c.hosts) {
    const pid = state.hosts.find((s) => s.name === h.name)?.pid;
    if (!(await isVmProcess(pid, dom0Paths(h).qmpSocket))) return false;
  }
  const targets = await sshTargets(inv);
  const answers = await Promise.all(Object.values(targets).map(sshAnswers));
  return answers.every(Boolean);
}

/**
 * Builds the dom0 image when the cache has none (the slow, network-bound part of a first `up`), so a CI
 * run can make it while other tiers run; returns its folder.
 */
export async function clusterImage(o: VmClusterOptions = {}): Promise<string> {
  const c = clusterConfig(o);
  return (await ensureImage(c, await ensureKeys(c))).dir;
}

/**
 * Brings the cluster up (idempotent: a cluster already running as configured is kept) and returns its
 * inventory. Whatever fails on the way is torn down again, and the error says which host and why.
 */
export async function clusterUp(o: VmClusterOptions = {}): Promise<ClusterUp> {
  const c = clusterConfig(o);
  const started = Date.now();
  return withLock(lockFile(c), 'vm-cluster', log, LOCK_TIMEOUT_MS, async () => {
    const keys = await ensureKeys(c);
    const image = await ensureImage(c, keys);
    const inventory = inventoryOf(c, keys);
    const invFile = inventoryFile(c);
    if ((await readJson<Inventory>(invFile)) && (await runningAsConfigured(c, inventory, image.hash))) {
      log.info({ inventory: invFile }, 'cluster already up');
      const state = (await readJson<ClusterState>(stateFile(c)))!;
      return { inventory, inventoryFile: invFile, boots: state.hosts, reused: true, seconds: 0 };
    }
    await teardown(c);
    await fs.mkdir(c.stateDir, { recursive: true, mode: 0o755 });
    await networkUp(c);
    const targets = await sshTargets(inventory);
    const results = await Promise.allSettled(c.hosts.map((h) => startDom0(c, h, image, targets[h.name])));
    const failed = results.flatMap((r, i) =>
      r.status === 'rejected' ? [`${c.hosts[i].name}: ${describeError(r.reason)}`] : [],
    );
    if (failed.length > 0) {
      await teardown(c).catch((err: unknown) =>
        log.error({ err: describeError(err) }, 'cleanup after a failed up failed'),
      );
      throw new Error(`virtual cluster did not come up: ${failed.join('; ')}`);
    }
    const boots = results.map((r) => (r as PromiseFulfilledResult<Dom0Boot>).value);
    const state: ClusterState = {
      version: 1,
      prefix: c.prefix,
      startedAt: new Date(started).toISOString(),
      imageHash: image.hash,
      hosts: boots.map((b, i) => ({ ...b, address: c.hosts[i].address })),
    };
    await writeJsonAtomic(stateFile(c), state);
    await writeJsonAtomic(invFile, inventory);
    const seconds = Math.round((Date.now() - started) / 100) / 10;
    log.info({ inventory: invFile, seconds, boots }, 'cluster up');
    return { inventory, inventoryFile: invFile, boots, reused: false, seconds };
  });
}

/** Stops every dom0 and removes the network; the run folders keep the consoles and QEMU logs. */
async function teardown(c: ClusterConfig): Promise<void> {
  await fs.rm(inventoryFile(c), { force: true });
  for (const h of c.hosts) await stopDom0(h, await readPid(h));
  // Also kills a QEMU a crashed `up` started but never recorded: every dom0 runs in the netns.
  await networkDown(c);
  for (const h of c.hosts) await fs.rm(dom0Paths(h).disk, { force: true });
  await fs.rm(stateFile(c), { force: true });
}

/** Removes the cluster: QEMUs, netns, taps, veth, disk overlays, inventory. Safe to repeat, and after a crash. */
export async function clusterDown(o: VmClusterOptions = {}): Promise<void> {
  // Every possible host: a cluster brought up with more hosts than this call names still goes entirely.
  const c = clusterConfig({ ...o, hosts: 3 });
  await withLock(lockFile(c), 'vm-cluster', log, LOCK_TIMEOUT_MS, () => teardown(c));
  log.info({ netns: c.netns }, 'cluster down');
}

/** The running cluster's state and host `name`'s config; throws when the cluster is not up or has no such host. */
async function upHost(c: ClusterConfig, name: string): Promise<{ state: ClusterState; host: HostConfig }> {
  const state = await readJson<ClusterState>(stateFile(c));
  if (!state) throw new Error(`cluster ${c.prefix} is not up (no ${stateFile(c)})`);
  const host = c.hosts.find((h) => h.name === name && state.hosts.some((s) => s.name === name));
  if (!host)
    throw new Error(
      `cluster ${c.prefix} has no host ${JSON.stringify(name)} (hosts: ${state.hosts.map((s) => s.name).join(', ')})`,
    );
  return { state, host };
}

/**
 * Fault injection: cuts host `name`'s power (its QEMU quits: Xen, dom0 and its guests stop at once). The
 * cluster stays "up" for `down`, which removes it as usual; `powerOn` brings the host back.
 */
export async function powerOff(name: string, o: VmClusterOptions = {}): Promise<void> {
  const c = clusterConfig({ ...o, hosts: 3 });
  await withLock(lockFile(c), 'vm-cluster', log, LOCK_TIMEOUT_MS, async () => {
    const { host } = await upHost(c, name);
    const pid = await readPid(host);
    if (pid === undefined) throw new Error(`host ${name} of cluster ${c.prefix} has no running QEMU`);
    await powerOffDom0(host, pid);
  });
  log.info({ host: name, netns: c.netns }, 'host powered off');
}

/**
 * Brings host `name` back after `powerOff`: a cold boot from its own disk, so what was deployed on it
 * starts again as after a real power cut. Returns how it came up (seconds to ssh).
 */
export async function powerOn(name: string, o: VmClusterOptions = {}): Promise<Dom0Boot> {
  const c = clusterConfig({ ...o, hosts: 3 });
  return withLock(lockFile(c), 'vm-cluster', log, LOCK_TIMEOUT_MS, async () => {
    const { state, host } = await upHost(c, name);
    if (await isVmProcess(await readPid(host), dom0Paths(host).qmpSocket))
      throw new Error(`host ${name} of cluster ${c.prefix} is running: power it off first`);
    const inventory = await readJson<Inventory>(inventoryFile(c));
    if (!inventory) throw new Error(`cluster ${c.prefix} has no inventory at ${inventoryFile(c)}`);
    const target = (await sshTargets(inventory))[name];
    const boot = await powerOnDom0(c, host, await builtImage(c, state.imageHash), target);
    const hosts = state.hosts.map((s) => (s.name === name ? { ...s, ...boot } : s));
    await writeJsonAtomic(stateFile(c), { ...state, hosts });
    return boot;
  });
}

export interface HostStatus {
  name: string;
  address: string;
  running: boolean;
  pid?: number;
  mode?: 'cold' | 'warm';
  rssMiB?: number;
  ssh?: boolean;
}

export interface ClusterStatus {
  netns: string;
  up: boolean;
  inventoryFile: string;
  inventory?: Inventory;
  hosts: HostStatus[];
}

/** What runs now: per host, QEMU alive, its memory, ssh answering. */
export async function clusterStatus(o: VmClusterOptions = {}): Promise<ClusterStatus> {
  const c = clusterConfig({ ...o, hosts: 3 });
  const state = await readJson<ClusterState>(stateFile(c));
  const inventory = await readJson<Inventory>(inventoryFile(c));
  const targets = inventory ? await sshTargets(inventory) : {};
  const hosts: HostStatus[] = [];
  for (const s of state?.hosts ?? []) {
    const h = c.hosts.find((x) => x.name === s.name);
    const running = !!h && (await isVmProcess(s.pid, dom0Paths(h).qmpSocket));
    const target = targets[s.name];
    hosts.push({
      name: s.name,
      address: s.address,
      running,
      pid: s.pid,
      mode: s.mode,
      ...(running ? { rssMiB: await dom0RssMiB(s.pid) } : {}),
      ...(running && target
        ? {
            ssh: await sshAnswers(target),
          }
        : {}),
    });
  }
  const up = !!inventory && hosts.length > 0 && hosts.every((h) => h.running && h.ssh);
  return { netns: c.netns, up, inventoryFile: inventoryFile(c), ...(inventory ? { inventory } : {}), hosts };
}

/**
 * Last resort on Ctrl-C or a CI timeout, when there is no time for `down`: kills the dom0s and deletes the
 * network synchronously. `down` (or the next `up`) removes the rest.
 */
export function clusterKillSync(o: VmClusterOptions = {}): void {
  const c = clusterConfig({ ...o, hosts: 3 });
  for (const h of c.hosts) {
    const p = dom0Paths(h);
    try {
      const pid = Number(readFileSync(p.pidFile, 'utf8').trim());
      if (readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes(p.qmpSocket)) process.kill(pid, 'SIGKILL');
    } catch {
      // Not running.
    }
  }
  for (const args of [
    ['netns', 'del', c.netns],
    ['link', 'del', c.hostVeth],
  ]) {
    try {
      execFileSync('ip', args, { stdio: 'ignore', timeout: 10_000 });
    } catch {
      // Already gone.
    }
  }
}
