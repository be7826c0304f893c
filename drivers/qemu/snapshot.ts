import { createHash, randomBytes } from 'node:crypto';
import { createWriteStream, promises as fs } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { pipeline } from 'node:stream/promises';
import { readRange } from '../../lib/fileRange';
import { pathExists } from '../../lib/pathExists';
import { runCommand } from '../../lib/runCommand';
import { createLogger, describeError } from '../../logging/logger';
import { sha256File } from '../../storage/imageCache';
import { createRootOverlay } from '../vmDisks';
import type { Appliance } from './appliance';
import { buildQemuArgs, guestArgs, type HostMachine, type QemuLaunch } from './commandLine';
import { asAccount, checkReachable, giveToAccount, type QemuAccount } from './qemuAccount';
import { QMP_TIMEOUT_MS, QmpClient, qmpCommand } from './qmp';
import { isVmProcess, killVmProcess, sleep, startDetached, waitForExit } from './vmProcess';

/**
 * Saved VM states to start tasks from instead of booting (issue 13). A snapshot is the appliance booted
 * with `vsp.snapshot=1` up to the init's ready point, before any disk or NIC driver has loaded, and saved
 * with QMP `migrate` (memory and device state only, no disk bytes). A task's VM starts with `-incoming
 * fd:3` from that state, with its own root overlay and data disk on the command line; once it runs, the
 * host writes the start message on its control port (COM2): the clock, a fresh entropy seed (the guest
 * reseeds its CRNG with it at once) and the vsp.* words a booted VM reads from its kernel command line.
 * The guest then loads its disk drivers, which probe the task's own disks, and goes on as after a boot.
 *
 * Snapshots are per host under `<store>/snapshots/<key>/`, the key hashing all that the saved state
 * depends on: the QEMU version, the appliance's kernel and initramfs, the base image, and the QEMU
 * command line of a template launch (machine, CPU, memory, vCPUs, accelerator, devices). Any change
 * makes a new key, hence a new build; a missing snapshot means a normal boot.
 */

/** What a snapshot's machine must match: a restore uses the same values. */
export interface SnapshotShape extends HostMachine {
  memoryMiB: number;
  vcpus: number;
  /** The base image of the root overlay (absolute path). */
  baseImage: string;
}

export interface QemuSnapshotsContext {
  /** `<store root>/snapshots`. */
  dir: string;
  appliance: Appliance;
  qemuBinary: string;
  account: () => Promise<QemuAccount | undefined>;
  /** Command words that run `cmd` in the host's network namespace, if any. */
  wrap: (cmd: string, args: string[]) => { cmd: string; args: string[] };
}

/** The guest's console lines around its ready point (deploy/guest/init). */
export const READY_LINE = 'VSP-READY';
export const RESUMED_LINE = 'VSP-RESUMED';
const STATE_FILE = 'state';
const META_FILE = 'meta.json';
/** A TCG boot on a busy 2-core host: generous, yet bounded. */
const BOOT_TIMEOUT_MS = 5 * 60_000;
const SAVE_TIMEOUT_MS = 2 * 60_000;
const LAUNCH_TIMEOUT_MS = 60_000;
/** After a failed build, the next attempt for the same key waits this long (each costs a boot). */
const RETRY_AFTER_MS = 10 * 60_000;
const POLL_MS = 20;
const DATA_PLACEHOLDER_BYTES = 1024 * 1024;
const SEED_BYTES = 64;
const CONSOLE_SCAN_BYTES = 64 * 1024;

/** The placeholder files a key is computed with: a restore's own paths replace them. */
const KEY_FILES = {
  rootDisk: '/snapshot/root.qcow2',
  dataDisk: '/snapshot/data.img',
  qmpSocket: '/snapshot/qmp.sock',
  controlSocket: '/snapshot/control.sock',
  consoleLog: '/snapshot/console.log',
};

type LaunchFiles = typeof KEY_FILES;

function templateLaunch(shape: SnapshotShape, appliance: Appliance, files: LaunchFiles): QemuLaunch {
  return {
    vmId: 'snapshot',
    accel: shape.accel,
    machine: shape.machine,
    tscKhz: shape.tscKhz,
    memoryMiB: shape.memoryMiB,
    vcpus: shape.vcpus,
    vmlinuz: appliance.vmlinuz,
    vmlinux: appliance.vmlinux,
    initrd: appliance.initrd,
    ...files,
    owner: 'snapshot',
    portForwards: {},
    snapshot: true,
  };
}

export class QemuSnapshots {
  private readonly log = createLogger('qemu-snapshot');
  private readonly builds = new Map<string, Promise<string>>();
  private readonly failedAt = new Map<string, number>();
  private readonly fileIds = new Map<string, Promise<string>>();
  private qemuVersion: Promise<string> | undefined;
  private staleSwept: Promise<void> | undefined;

  constructor(private readonly ctx: QemuSnapshotsContext) {}

  /** The key of a shape: a hash of everything the saved state depends on. */
  async keyOf(shape: SnapshotShape): Promise<string> {
    this.qemuVersion ??= runCommand(this.ctx.qemuBinary, ['--version'], { timeoutMs: 30_000 }).then(
      (r) => r.stdout.split('\n')[0],
    );
    const [qemu, vmlinuz, initrd, base] = await Promise.all([
      this.qemuVersion,
      this.fileId(this.ctx.appliance.vmlinuz),
      this.fileId(this.ctx.appliance.initrd),
      this.fileId(shape.baseImage),
    ]);
    const args = buildQemuArgs(templateLaunch(shape, this.ctx.appliance, KEY_FILES));
    // Paths name the files, the hashes their content: a rebuilt appliance at the same path changes the key.
    return createHash('sha256')
      .update(JSON.stringify({ qemu, vmlinuz, initrd, base, args }))
      .digest('hex')
      .slice(0, 32);
  }

  /**
   * The saved state to restore `shape` from, or undefined (boot normally) when none is built yet: a
   * build then starts in the background.
   */
  async lookup(shape: SnapshotShape): Promise<{ key: string; state: string } | undefined> {
    const key = await this.keyOf(shape);
    const state = path.join(this.ctx.dir, key, STATE_FILE);
    if (await pathExists(state)) return { key, state };
    const failed = this.failedAt.get(key);
    if (!this.builds.has(key) && (failed === undefined || Date.now() - failed > RETRY_AFTER_MS))
      this.build(shape).catch(() => undefined);
    return undefined;
  }

  /** Builds the snapshot of `shape` unless it exists; resolves with its folder. One build per key at a time. */
  build(shape: SnapshotShape): Promise<string> {
    return this.keyOf(shape).then((key) => {
      let running = this.builds.get(key);
      if (!running) {
        running = this.buildOnce(shape, key)
          .then(
            (dir) => (this.failedAt.delete(key), dir),
            (err: unknown) => {
              this.failedAt.set(key, Date.now());
              this.log.warn({ key, err: describeError(err) }, 'snapshot build failed: VMs boot instead');
              throw err;
            },
          )
          .finally(() => this.builds.delete(key));
        this.builds.set(key, running);
      }
      return running;
    });
  }

  /** Drops a snapshot that failed to restore: the next lookup builds it again. */
  async discard(key: string): Promise<void> {
    await fs.rm(path.join(this.ctx.dir, key), { recursive: true, force: true });
  }

  private async buildOnce(shape: SnapshotShape, key: string): Promise<string> {
    const dir = path.join(this.ctx.dir, key);
    if (await pathExists(path.join(dir, STATE_FILE))) return dir;
    this.staleSwept ??= this.sweepStaleBuilds();
    await this.staleSwept;
    const started = Date.now();
    await fs.mkdir(this.ctx.dir, { recursive: true });
    const tmp = await fs.mkdtemp(path.join(this.ctx.dir, `.build-${key.slice(0, 8)}-`));
    // QEMU's account reaches its files inside (mkdtemp makes the folder private).
    await fs.chmod(tmp, 0o711);
    const runDir = path.join(tmp, 'run');
    const files: LaunchFiles = {
      rootDisk: path.join(tmp, 'root.qcow2'),
      dataDisk: path.join(tmp, 'data.img'),
      qmpSocket: path.join(runDir, 'qmp.sock'),
      controlSocket: path.join(runDir, 'control.sock'),
      consoleLog: path.join(tmp, 'console.log'),
    };
    let pid: number | undefined;
    try {
      // The guest never reads these before its ready point; they only give the machine its two disks.
      await createRootOverlay(shape.baseImage, files.rootDisk);
      await fs.writeFile(files.dataDisk, '');
      await fs.truncate(files.dataDisk, DATA_PLACEHOLDER_BYTES);
      const account = await this.ctx.account();
      await checkReachable(account, tmp);
      await giveToAccount(account, {
        disks: [files.rootDisk, files.dataDisk],
        consoleLog: files.consoleLog,
        runDir,
      });
      const qemu = asAccount(
        account,
        this.ctx.qemuBinary,
        buildQemuArgs(templateLaunch(shape, this.ctx.appliance, files)),
      );
      pid = await startDetached(this.ctx.wrap(qemu.cmd, qemu.args), {
        qmpSocket: files.qmpSocket,
        logFile: path.join(tmp, 'qemu.log'),
        pidFile: path.join(tmp, 'qemu.pid'),
        timeoutMs: LAUNCH_TIMEOUT_MS,
      });
      await waitForConsoleLine(files.consoleLog, READY_LINE, pid, files.qmpSocket, BOOT_TIMEOUT_MS);
      const bytes = await saveState(files.qmpSocket, runDir, path.join(tmp, STATE_FILE), account);
      await fs.writeFile(
        path.join(tmp, META_FILE),
        JSON.stringify({
          key,
          shape,
          appliance: this.ctx.appliance.version,
          builtAt: new Date().toISOString(),
        }),
      );
      await stopQemu(pid, files.qmpSocket);
      pid = undefined;
      for (const f of [files.rootDisk, files.dataDisk, runDir])
        await fs.rm(f, { recursive: true, force: true });
      // Published whole or not at all; a concurrent build of the same key keeps the first.
      await fs.rename(tmp, dir).catch(async (err: unknown) => {
        if (!(await pathExists(path.join(dir, STATE_FILE)))) throw err;
      });
      this.log.info({ key, bytes, ms: Date.now() - started, ...shape }, 'snapshot built');
      return dir;
    } catch (err) {
      const tail = await fs.readFile(files.consoleLog, 'utf8').catch(() => '');
      throw new Error(`snapshot ${key}: build failed (console: ${tail.slice(-500).trim() || 'empty'})`, {
        cause: err,
      });
    } finally {
      if (pid !== undefined) await stopQemu(pid, files.qmpSocket);
      await fs.rm(tmp, { recursive: true, force: true });
    }
  }

  /**
   * Ends the builds an earlier worker left when it died mid-build (their QEMU waits at the ready point
   * forever) and removes their folders. Runs once, before this process's first build.
   */
  private async sweepStaleBuilds(): Promise<void> {
    for (const name of await fs.readdir(this.ctx.dir).catch(() => [] as string[])) {
      if (!name.startsWith('.build-')) continue;
      const tmp = path.join(this.ctx.dir, name);
      const pid = Number((await fs.readFile(path.join(tmp, 'qemu.pid'), 'utf8').catch(() => '')).trim());
      const qmpSocket = path.join(tmp, 'run', 'qmp.sock');
      if (await isVmProcess(pid, qmpSocket)) await stopQemu(pid, qmpSocket);
      await fs.rm(tmp, { recursive: true, force: true });
      this.log.info({ build: name, pid }, 'removed a snapshot build left by an earlier worker');
    }
  }

  private fileId(file: string): Promise<string> {
    // The image cache names images by their SHA-256; other files are hashed once per process and version.
    const named = /^([0-9a-f]{64})\.[a-z0-9]+$/.exec(path.basename(file));
    if (named) return Promise.resolve(named[1]);
    return fs.stat(file).then((st) => {
      const id = `${file}:${st.ino}:${st.size}:${st.mtimeMs}`;
      let hash = this.fileIds.get(id);
      if (!hash) {
        hash = sha256File(file);
        this.fileIds.set(id, hash);
      }
      return hash;
    });
  }
}

/**
 * Saves the stopped VM's state to `file` (QMP `migrate` to a unix socket this process listens on: the
 * QEMU 7.2 here has no file: URI, and its sandbox forbids exec:). Returns the state's size in bytes.
 */
async function saveState(
  qmpSocket: string,
  runDir: string,
  file: string,
  account: QemuAccount | undefined,
): Promise<number> {
  const socketPath = path.join(runDir, 'save.sock');
  const server = net.createServer();
  const received = new Promise<void>((resolve, reject) => {
    server.once('connection', (conn) => {
      server.close();
      pipeline(conn, createWriteStream(file, { mode: 0o600 })).then(resolve, reject);
    });
    server.once('error', reject);
  });
  await new Promise<void>((resolve, reject) => {
    server.once('listening', resolve).once('error', reject);
    server.listen(socketPath);
  });
  try {
    if (account) await fs.chown(socketPath, account.uid, account.gid);
    const qmp = await QmpClient.connect(qmpSocket, QMP_TIMEOUT_MS);
    try {
      await qmp.execute('stop');
      await qmp.execute('migrate', { uri: `unix:${socketPath}` });
      const deadline = Date.now() + SAVE_TIMEOUT_MS;
      for (;;) {
        const info = await qmp.execute<{ status?: string; 'error-desc'?: string }>('query-migrate');
        if (info.status === 'completed') break;
        if (info.status === 'failed' || info.status === 'cancelled')
          throw new Error(`saving the state ${info.status}: ${info['error-desc'] ?? 'no reason given'}`);
        if (Date.now() > deadline) throw new Error(`saving the state took over ${SAVE_TIMEOUT_MS} ms`);
        await sleep(POLL_MS * 5);
      }
    } finally {
      qmp.close();
    }
    await received;
  } finally {
    server.close();
  }
  const fh = await fs.open(file, 'r+');
  try {
    await fh.sync();
    return (await fh.stat()).size;
  } finally {
    await fh.close();
  }
}

/**
 * After a restore: waits until QEMU has loaded the state and runs the guest, then writes the start message on
 * the guest's control port and waits for the guest to confirm it. The clock is read as late as possible.
 */
export async function sendStartMessage(
  vm: { pid: number; qmpSocket: string; controlSocket: string; consoleLog: string },
  launch: Pick<QemuLaunch, 'owner' | 'nic' | 'portForwards'>,
  timeoutMs = LAUNCH_TIMEOUT_MS,
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (!(await isVmProcess(vm.pid, vm.qmpSocket))) throw new Error('QEMU exited while loading the snapshot');
    const { status } = await qmpCommand<{ status: string }>(vm.qmpSocket, 'query-status');
    if (status === 'running') break;
    // The state was saved stopped, and QEMU restores the saved run state: loaded, the guest waits for cont.
    if (status === 'paused') await qmpCommand(vm.qmpSocket, 'cont');
    else if (status !== 'inmigrate' && status !== 'prelaunch')
      throw new Error(`QEMU is in state ${status} after loading the snapshot`);
    if (Date.now() > deadline) throw new Error(`the snapshot did not load within ${timeoutMs} ms`);
    await sleep(POLL_MS);
  }
  const conn = await new Promise<net.Socket>((resolve, reject) => {
    const s = net.createConnection(vm.controlSocket);
    s.once('connect', () => resolve(s)).once('error', reject);
  });
  try {
    const now = Date.now();
    const words = [
      ...guestArgs(launch),
      `vsp.time=${Math.floor(now / 1000)}.${String((now % 1000) * 1e6).padStart(9, '0')}`,
      `vsp.seed=${randomBytes(SEED_BYTES).toString('hex')}`,
    ];
    conn.write(`${words.join(' ')}\n`);
    // The socket stays open until the guest has read the message: QEMU reads it as the UART drains.
    await waitForConsoleLine(
      vm.consoleLog,
      RESUMED_LINE,
      vm.pid,
      vm.qmpSocket,
      Math.max(0, deadline - Date.now()),
    );
  } finally {
    conn.destroy();
  }
}

/** The start of the console (where the guest's resume lines are), after a newline so lines match as `\n<line>`. */
async function consoleHead(consoleLog: string): Promise<string> {
  return `\n${(await readRange(consoleLog, 0, CONSOLE_SCAN_BYTES)).toString('utf8')}`;
}

/** Whether the guest has printed `line` early in its console. */
export async function consoleHasLine(consoleLog: string, line: string): Promise<boolean> {
  return (await consoleHead(consoleLog)).includes(`\n${line}`);
}

/** Waits for `line` on the console; fails early on the guest's VSP-ERROR or when QEMU exits. */
async function waitForConsoleLine(
  consoleLog: string,
  line: string,
  pid: number,
  qmpSocket: string,
  timeoutMs: number,
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const text = await consoleHead(consoleLog);
    if (text.includes(`\n${line}`)) return;
    const error = /^VSP-ERROR (.*)$/m.exec(text);
    if (error) throw new Error(`the guest failed: ${error[1]}`);
    if (!(await isVmProcess(pid, qmpSocket))) throw new Error(`QEMU exited before the guest printed ${line}`);
    if (Date.now() > deadline) throw new Error(`no ${line} from the guest within ${timeoutMs} ms`);
    await sleep(POLL_MS);
  }
}

/** Ends a QEMU this module started (QMP quit, then SIGKILL). */
async function stopQemu(pid: number, qmpSocket: string): Promise<void> {
  await qmpCommand(qmpSocket, 'quit').catch(() => undefined);
  if (!(await waitForExit(pid, qmpSocket, 5_000))) await killVmProcess(pid, qmpSocket);
}
