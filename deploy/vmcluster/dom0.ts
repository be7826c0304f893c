import { createHash } from 'node:crypto';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

import { QmpClient } from '../../drivers/qemu/qmp';
import { runCommand } from '../../lib/runCommand';
import { isVmProcess, startDetached, waitForExit } from '../../drivers/qemu/vmProcess';
import { createLogger, describeError } from '../../logging/logger';
import type { ClusterConfig, HostConfig } from './config';
import { pathExists } from '../../lib/pathExists';
import { pruneUnused, touch } from './files';
import type { Dom0Image } from './image';
import { sshOnce, type SshTarget } from './ssh';

/**
 * One dom0 = one QEMU (TCG, `-cpu qemu64,+npt` so Xen reports HAP and PVH guests run) booting Xen as a
 * multiboot kernel with the Debian dom0 kernel and initrd as modules, on a throw-away qcow2 overlay over
 * the cached image, its NIC on the cluster's tap. A cold boot takes 30-120 s under TCG; a warm start
 * restores a saved QEMU state of the same dom0 after boot (same image, QEMU and command line) in seconds.
 */

const log = createLogger('vmcluster.dom0');

/** TCG translation cache: QEMU's default (1 GiB) counts in RSS; 256 MiB is as fast here. */
const TB_SIZE_MIB = 256;
const COLD_BOOT_TIMEOUT_MS = 15 * 60_000;
const SSH_READY_TIMEOUT_MS = 5 * 60_000;
const RESTORE_TIMEOUT_MS = 3 * 60_000;
const SNAPSHOT_TIMEOUT_MS = 5 * 60_000;
const QEMU_START_TIMEOUT_MS = 60_000;
const PROGRESS_EVERY_MS = 30_000;
const POLL_MS = 500;
const READY_LINE = 'VSP-DOM0-READY';
const BOOT_FAILURE = /Kernel panic|\(XEN\) Panic|vsp-dom0-setup: ERROR[^\r\n]*|VSP-DOM0-FAILED[^\r\n]*/;
/** Warm snapshots unused this long are removed. */
const UNUSED_SNAPSHOT_MS = 3 * 24 * 3600_000;

export interface Dom0Paths {
  disk: string;
  qmpSocket: string;
  serialSocket: string;
  serialLog: string;
  qemuLog: string;
  pidFile: string;
}

export function dom0Paths(h: HostConfig): Dom0Paths {
  return {
    disk: path.join(h.runDir, 'disk.qcow2'),
    qmpSocket: path.join(h.runDir, 'qmp.sock'),
    serialSocket: path.join(h.runDir, 'serial.sock'),
    serialLog: path.join(h.runDir, 'serial.log'),
    qemuLog: path.join(h.runDir, 'qemu.log'),
    pidFile: path.join(h.runDir, 'qemu.pid'),
  };
}

/** How a dom0 came up, and how long it took to answer on ssh (the figures the README quotes). */
export interface Dom0Boot {
  name: string;
  pid: number;
  mode: 'cold' | 'warm';
  /** From QEMU's start to the first successful ssh command. */
  sshReadySeconds: number;
  /** For a cold boot that saved a warm snapshot: how long saving took. */
  snapshotSeconds?: number;
}

function seconds(since: number): number {
  return Math.round((Date.now() - since) / 100) / 10;
}

/** `a=10.77.30.1+b=10.77.30.2`: the hosts a dom0 knows by name and host key (no commas: see below). */
function peersArg(c: ClusterConfig): string {
  return c.hosts.map((h) => `${h.name}=${h.address}`).join('+');
}

/** QEMU's command line for a dom0 (without -incoming); a warm snapshot is valid only for the same one. */
export function qemuArgs(c: ClusterConfig, h: HostConfig, image: Dom0Image): string[] {
  const p = dom0Paths(h);
  const xen = `dom0_mem=${c.dom0MemMiB}M,max:${c.dom0MemMiB}M console=com1 com1=115200,8n1 noreboot`;
  // Multiboot modules are separated by commas, so the dom0 command line must have none.
  const dom0 = [
    'root=/dev/vda rw console=hvc0 net.ifnames=0 panic=-1',
    `systemd.hostname=${h.name} vsp.ip=${h.address}/24 vsp.peers=${peersArg(c)}`,
  ].join(' ');
  // A TCG thread per vCPU, and one vCPU (config.ts) by default: two dom0s of 2 vCPUs each put four busy
  // threads on this machine's two cores, and deployed in 627 s where dom0s of one vCPU took 358 s (same
  // load), their guests surviving both live migrations. One thread per dom0 with 2 vCPUs (thread=single)
  // was as fast, but its guests crashed in nearly every live migration.
  return [
    ...['-name', `${c.prefix}-${h.name}`, '-machine', 'q35', '-accel', `tcg,tb-size=${TB_SIZE_MIB}`],
    ...[
      '-cpu',
      'qemu64,+npt',
      '-m',
      String(c.memMiB),
      '-smp',
      String(c.smp),
      '-display',
      'none',
      '-no-reboot',
    ],
    ...['-chardev', `socket,id=ser0,path=${p.serialSocket},server=on,wait=off,logfile=${p.serialLog}`],
    ...['-serial', 'chardev:ser0', '-qmp', `unix:${p.qmpSocket},server=on,wait=off`],
    ...['-kernel', image.xen, '-append', xen, '-initrd', `${image.kernel} ${dom0},${image.initrd}`],
    ...['-drive', `file=${p.disk},if=virtio,format=qcow2,cache=unsafe,discard=unmap`],
    ...['-netdev', `tap,id=n0,ifname=${h.tap},script=no,downscript=no`],
    ...['-device', `virtio-net-pci,netdev=n0,mac=${h.mac}`],
  ];
}

let qemuVersion: string | undefined;
async function getQemuVersion(): Promise<string> {
  qemuVersion ??= (await runCommand('qemu-system-x86_64', ['--version'])).stdout.split('\n')[0].trim();
  return qemuVersion;
}

/** The folder of this dom0's warm snapshot: keyed by the image, QEMU's version and the command line. */
export async function warmDir(c: ClusterConfig, h: HostConfig, image: Dom0Image): Promise<string> {
  const key = createHash('sha256')
    .update(JSON.stringify([image.hash, await getQemuVersion(), qemuArgs(c, h, image)]))
    .digest('hex')
    .slice(0, 16);
  return path.join(c.cacheDir, 'warm', `${h.name}-${key}`);
}

/** Clears the previous start's sockets and pid; its console stays (`serial.log.prev`) for diagnosis. */
async function clearRunFiles(h: HostConfig): Promise<Dom0Paths> {
  const p = dom0Paths(h);
  await fs.mkdir(h.runDir, { recursive: true, mode: 0o700 });
  for (const f of [p.qmpSocket, p.serialSocket, p.pidFile]) await fs.rm(f, { force: true });
  await fs.rename(p.serialLog, `${p.serialLog}.prev`).catch(() => undefined);
  return p;
}

async function freshRunDir(h: HostConfig, backing: string): Promise<Dom0Paths> {
  const p = await clearRunFiles(h);
  await fs.rm(p.disk, { force: true });
  await runCommand('qemu-img', ['create', '-q', '-f', 'qcow2', '-F', 'qcow2', '-b', backing, p.disk]);
  return p;
}

async function startQemu(c: ClusterConfig, h: HostConfig, args: string[]): Promise<number> {
  const p = dom0Paths(h);
  return startDetached(
    { cmd: 'ip', args: ['netns', 'exec', c.netns, 'qemu-system-x86_64', ...args] },
    { qmpSocket: p.qmpSocket, logFile: p.qemuLog, pidFile: p.pidFile, timeoutMs: QEMU_START_TIMEOUT_MS },
  );
}

/** The last line the dom0 printed, for progress and error messages. */
async function lastConsoleLine(serialLog: string): Promise<string> {
  const text = await fs.readFile(serialLog, 'utf8').catch(() => '');
  const lines = text
    // Terminal escapes (systemd's colours) would clutter the log line.
    // eslint-disable-next-line no-control-regex
    .replace(/\x1b\[[0-9;?]*[A-Za-z]/g, '')
    .split(/[\r\n]+/)
    .map((l) => l.trim())
    .filter(Boolean);
  return lines.at(-1) ?? '(nothing yet)';
}

/** Waits for the dom0's readiness line on the serial console (xen, sshd, network and NFS started). */
async function waitReadyLine(h: HostConfig, pid: number, started: number): Promise<void> {
  const p = dom0Paths(h);
  const deadline = Date.now() + COLD_BOOT_TIMEOUT_MS;
  let nextProgress = Date.now() + PROGRESS_EVERY_MS;
  const ready = new RegExp(`${READY_LINE} ${h.name}\\b`);
  for (;;) {
    const text = await fs.readFile(p.serialLog, 'utf8').catch(() => '');
    if (ready.test(text)) return;
    const failure = BOOT_FAILURE.exec(text);
    if (failure) throw new Error(`dom0 ${h.name} failed to boot: ${failure[0]} (console: ${p.serialLog})`);
    if (!(await isVmProcess(pid, p.qmpSocket)))
      throw new Error(`dom0 ${h.name}: QEMU exited during boot (console: ${p.serialLog}, log: ${p.qemuLog})`);
    if (Date.now() >= deadline)
      throw new Error(
        `dom0 ${h.name} not ready after ${COLD_BOOT_TIMEOUT_MS / 1000} s; last console line: ${await lastConsoleLine(p.serialLog)}`,
      );
    if (Date.now() >= nextProgress) {
      log.info(
        {
          host: h.name,
          seconds: seconds(started),
          console: (await lastConsoleLine(p.serialLog)).slice(0, 160),
        },
        'dom0 still booting',
      );
      nextProgress += PROGRESS_EVERY_MS;
    }
    await sleep(POLL_MS);
  }
}

/** Waits until ssh (key auth, host key checked) runs a command on the dom0. */
async function waitSsh(h: HostConfig, pid: number, target: SshTarget): Promise<void> {
  const p = dom0Paths(h);
  const deadline = Date.now() + SSH_READY_TIMEOUT_MS;
  for (;;) {
    const err = await sshOnce(target, 'true', { timeoutMs: 10_000 }).then(
      (r) => (r.code === 0 ? undefined : new Error(`exit ${r.code}: ${r.stderr}`)),
      (e: unknown) => e,
    );
    if (!err) return;
    if (!(await isVmProcess(pid, p.qmpSocket)))
      throw new Error(`dom0 ${h.name}: QEMU exited before ssh answered`);
    if (Date.now() >= deadline)
      throw new Error(`dom0 ${h.name}: no ssh after ${SSH_READY_TIMEOUT_MS / 1000} s`, { cause: err });
    await sleep(POLL_MS);
  }
}

/** Stops this dom0's QEMU (the overlay is disposable, so no guest shutdown). Idempotent. */
export async function stopDom0(h: HostConfig, pid: number | undefined): Promise<void> {
  const p = dom0Paths(h);
  if (pid === undefined || !(await isVmProcess(pid, p.qmpSocket))) return;
  process.kill(pid, 'SIGTERM');
  if (!(await waitForExit(pid, p.qmpSocket, 10_000))) {
    process.kill(pid, 'SIGKILL');
    await waitForExit(pid, p.qmpSocket, 10_000);
  }
}

/** Starts QEMU on the dom0's current disk and waits for its readiness line and ssh; stops it on failure. */
async function bootCold(
  c: ClusterConfig,
  h: HostConfig,
  image: Dom0Image,
  target: SshTarget,
  started: number,
): Promise<number> {
  const pid = await startQemu(c, h, qemuArgs(c, h, image));
  try {
    await waitReadyLine(h, pid, started);
    await waitSsh(h, pid, target);
  } catch (err) {
    await stopDom0(h, pid);
    throw err;
  }
  return pid;
}

/**
 * Cuts a dom0's power: QEMU quits at once (QMP `quit`), so Xen, dom0 and every guest stop mid-step, with
 * no shutdown, as on a host whose power fails. What dom0 had not yet written out is lost; its disk overlay
 * (with what it had written) stays for `powerOnDom0`. Resolves once QEMU is gone.
 */
export async function powerOffDom0(h: HostConfig, pid: number): Promise<void> {
  const p = dom0Paths(h);
  if (!(await isVmProcess(pid, p.qmpSocket))) throw new Error(`dom0 ${h.name} is not running (pid ${pid})`);
  const qmp = await QmpClient.connect(p.qmpSocket);
  try {
    // QEMU may close the socket before it answers `quit`.
    await qmp.execute('quit').catch(() => undefined);
  } finally {
    qmp.close();
  }
  if (!(await waitForExit(pid, p.qmpSocket, 30_000))) {
    process.kill(pid, 'SIGKILL');
    await waitForExit(pid, p.qmpSocket, 10_000);
  }
}

/**
 * Powers a dom0 on again after `powerOffDom0`: a cold boot from its own disk overlay, so what was deployed
 * on it (release, configuration, units) is there, as on a real host, and its services start as at any boot.
 * Resolves once the readiness line is printed and ssh answers.
 */
export async function powerOnDom0(
  c: ClusterConfig,
  h: HostConfig,
  image: Dom0Image,
  target: SshTarget,
): Promise<Dom0Boot> {
  const started = Date.now();
  const p = await clearRunFiles(h);
  if (!(await pathExists(p.disk)))
    throw new Error(`dom0 ${h.name} has no disk at ${p.disk}: bring the cluster up`);
  log.info({ host: h.name }, 'dom0 powering on (cold boot from its own disk)');
  const pid = await bootCold(c, h, image, target, started);
  const boot: Dom0Boot = { name: h.name, pid, mode: 'cold', sshReadySeconds: seconds(started) };
  log.info(boot, 'dom0 powered on');
  return boot;
}

/**
 * Freezes the booted, ssh-ready dom0 into a warm snapshot (QEMU's migration stream, gzip'd, plus the disk
 * overlay) and stops it. Written to a scratch folder renamed into place, so a crash leaves no half snapshot.
 */
async function saveWarm(h: HostConfig, pid: number, dir: string): Promise<void> {
  const p = dom0Paths(h);
  const scratch = `${dir}.tmp-${process.pid}`;
  await fs.rm(scratch, { recursive: true, force: true });
  await fs.mkdir(scratch, { recursive: true });
  const qmp = await QmpClient.connect(p.qmpSocket);
  try {
    await qmp.execute('stop');
    await qmp.execute('migrate-set-parameters', { 'max-bandwidth': 8 * 1024 ** 3 });
    await qmp.execute('migrate', { uri: `exec:gzip -1 > ${path.join(scratch, 'state.gz')}` });
    const deadline = Date.now() + SNAPSHOT_TIMEOUT_MS;
    for (;;) {
      const m = await qmp.execute<{ status?: string; 'error-desc'?: string }>('query-migrate');
      if (m.status === 'completed') break;
      if (m.status === 'failed' || m.status === 'cancelled')
        throw new Error(`saving dom0 ${h.name}'s state failed: ${m['error-desc'] ?? m.status}`);
      if (Date.now() >= deadline)
        throw new Error(`saving dom0 ${h.name}'s state took over ${SNAPSHOT_TIMEOUT_MS} ms`);
      await sleep(POLL_MS);
    }
  } catch (err) {
    await fs.rm(scratch, { recursive: true, force: true });
    throw err;
  } finally {
    qmp.close();
  }
  await stopDom0(h, pid);
  await fs.rename(p.disk, path.join(scratch, 'disk.qcow2'));
  await fs.rm(dir, { recursive: true, force: true });
  await fs.rename(scratch, dir);
}

/** Starts QEMU on a fresh overlay of the snapshot's disk, loads the saved state and lets it run. */
async function restoreWarm(c: ClusterConfig, h: HostConfig, image: Dom0Image, dir: string): Promise<number> {
  const p = await freshRunDir(h, path.join(dir, 'disk.qcow2'));
  const state = path.join(dir, 'state.gz');
  // QEMU runs an exec: URI through the shell: the path must be plain.
  if (!/^[A-Za-z0-9/._-]+$/.test(state))
    throw new Error(`snapshot path ${state} has characters a shell would interpret`);
  const pid = await startQemu(c, h, [...qemuArgs(c, h, image), '-incoming', `exec:zcat ${state}`]);
  const qmp = await QmpClient.connect(p.qmpSocket);
  try {
    const deadline = Date.now() + RESTORE_TIMEOUT_MS;
    for (;;) {
      const { status } = await qmp.execute<{ status: string }>('query-status');
      if (status === 'running') break;
      if (status === 'paused' || status === 'postmigrate' || status === 'prelaunch') {
        await qmp.execute('cont');
        continue;
      }
      if (status !== 'inmigrate')
        throw new Error(`dom0 ${h.name}: restored QEMU is '${status}', not running`);
      if (Date.now() >= deadline)
        throw new Error(`dom0 ${h.name}: restore took over ${RESTORE_TIMEOUT_MS} ms`);
      await sleep(200);
    }
  } catch (err) {
    await stopDom0(h, pid);
    throw err;
  } finally {
    qmp.close();
  }
  return pid;
}

/** A restored dom0's clock is the snapshot's: set it (Linux passes it on to Xen's wallclock for guests). */
async function fixClock(h: HostConfig, target: SshTarget): Promise<void> {
  const r = await sshOnce(target, `date -u -s @${(Date.now() / 1000).toFixed(3)} >/dev/null`, {
    timeoutMs: 30_000,
  });
  if (r.code !== 0) throw new Error(`dom0 ${h.name}: could not set the clock: ${r.stderr.trim()}`);
}

/**
 * Brings one dom0 up, ssh-ready: from its warm snapshot when there is one (a snapshot that fails to restore
 * is dropped and the dom0 boots cold); otherwise cold, then (when `c.warm`) saved as the snapshot and
 * restored from it, so every later run starts warm.
 */
export async function startDom0(
  c: ClusterConfig,
  h: HostConfig,
  image: Dom0Image,
  target: SshTarget,
): Promise<Dom0Boot> {
  const dir = await warmDir(c, h, image);
  if (c.warm && (await pathExists(path.join(dir, 'state.gz')))) {
    const started = Date.now();
    try {
      await touch(dir);
      const pid = await restoreWarm(c, h, image, dir);
      await waitSsh(h, pid, target);
      await fixClock(h, target);
      const boot: Dom0Boot = { name: h.name, pid, mode: 'warm', sshReadySeconds: seconds(started) };
      log.info(boot, 'dom0 up (warm snapshot)');
      return boot;
    } catch (err) {
      log.warn(
        { host: h.name, dir, err: describeError(err) },
        'warm snapshot unusable: dropping it, booting cold',
      );
      await stopDom0(h, await readPid(h));
      await fs.rm(dir, { recursive: true, force: true });
    }
  }
  const started = Date.now();
  await freshRunDir(h, image.disk);
  log.info({ host: h.name, address: h.address }, 'dom0 booting cold (30-120 s under TCG)');
  const coldPid = await bootCold(c, h, image, target, started);
  const sshReadySeconds = seconds(started);
  log.info({ host: h.name, sshReadySeconds }, 'dom0 booted cold');
  if (!c.warm) return { name: h.name, pid: coldPid, mode: 'cold', sshReadySeconds };
  const saving = Date.now();
  await saveWarm(h, coldPid, dir);
  const snapshotSeconds = seconds(saving);
  log.info({ host: h.name, snapshotSeconds, dir }, 'warm snapshot saved');
  await pruneUnused(path.join(c.cacheDir, 'warm'), UNUSED_SNAPSHOT_MS, log);
  const pid = await restoreWarm(c, h, image, dir);
  await waitSsh(h, pid, target);
  await fixClock(h, target);
  return { name: h.name, pid, mode: 'cold', sshReadySeconds, snapshotSeconds };
}

export async function readPid(h: HostConfig): Promise<number | undefined> {
  const pid = Number((await fs.readFile(dom0Paths(h).pidFile, 'utf8').catch(() => '')).trim());
  return Number.isInteger(pid) && pid > 1 ? pid : undefined;
}

/** Host memory QEMU uses for this dom0 (VmRSS), MiB; undefined when it is not running. */
export async function dom0RssMiB(pid: number): Promise<number | undefined> {
  const status = await fs.readFile(`/proc/${pid}/status`, 'utf8').catch(() => '');
  const kb = /^VmRSS:\s+(\d+) kB/m.exec(status)?.[1];
  return kb === undefined ? undefined : Math.round(Number(kb) / 1024);
}
