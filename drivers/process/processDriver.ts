import { spawn } from 'node:child_process';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { createLogger } from '../../logging/logger';
import type { VmStore } from '../../storage/vmStore';
import { applyCpuShare, hostCgroupCpu, processTree, removeCpuGroup } from '../cpuShare';
import { readTail } from '../../lib/fileRange';
import { lastProgress } from '../progress';
import { isSameProcessAlive, processStartTime, readPidFile } from '../processLiveness';
import { OWNER_NAME } from '../../spec/repoPath';
import { TaskAccounts } from './taskAccounts';
import type {
  CpuShare,
  DriverCapabilities,
  ExitResult,
  HypervisorDriver,
  VmConfig,
  VmHandle,
  VmStatus,
  WaitOptions,
} from '../types';
import { pathExists } from '../../lib/pathExists';

const log = createLogger('driver.process');

/**
 * The `process` driver runs the task command as a host process, for hosts without a hypervisor and for
 * orchestration tests. It is never a host's default driver: a task must name it. The command runs
 *  - as a uid of its own (TaskAccounts), never root, with no capabilities and no_new_privs (setpriv),
 *    under resource limits (prlimit: processes, file size, address space, open files, no core dumps);
 *  - in its own PID namespace (it sees only its own processes; when it ends, or is killed, every process it
 *    left behind dies with it) and mount namespace, where its home is at /home/<owner> (as in a VM), /tmp
 *    and /var/tmp are its own folder, and the host's VM store (other tasks, state files) is hidden;
 *  - with a clean environment: nothing of the worker's (its token) reaches the task.
 *
 * A small root wrapper, in its own session so that it outlives the worker, claims the VM with
 * `mkdir .started` before running anything (a retried start finds the claim and does nothing, so a command
 * never runs twice), keeps the task's stdout+stderr in task.log (a file the task cannot reach) and writes
 * the exit status atomically when the task ends.
 */
const WRAPPER = [
  'mkdir "$VSP_VM_DIR/.started" 2>/dev/null || exit 0',
  'echo $$ > "$VSP_VM_DIR/pid"',
  'umask 077',
  // A stop's SIGTERM reaches the task; the wrapper waits for it to end and records its status.
  'trap : TERM',
  'unshare --mount --propagation private --pid --fork --mount-proc --kill-child /bin/sh -c "$VSP_JAIL" \\',
  '  > "$VSP_VM_DIR/task.log" 2>&1 < /dev/null',
  'code=$?',
  'echo $code > "$VSP_VM_DIR/exit-status.tmp" && mv "$VSP_VM_DIR/exit-status.tmp" "$VSP_VM_DIR/exit-status"',
].join('\n');

/** Root, PID 1 of the task's new namespaces: builds the task's view of the file system, then runs it. */
const JAIL = [
  'set -e',
  'mount -t tmpfs -o mode=0755,size=64k,nosuid,nodev vsp-home /home',
  'mkdir "/home/$VSP_OWNER"',
  'mount --bind "$VSP_VM_DIR/home" "/home/$VSP_OWNER"',
  // /tmp before /var/tmp: the store (and so the source) may itself lie under /tmp or /var/tmp.
  'mount --bind "$VSP_VM_DIR/task-tmp" /tmp',
  'mount --bind /tmp /var/tmp',
  'mount -t tmpfs -o mode=1777,size=64m,nosuid,nodev vsp-shm /dev/shm',
  'if [ -d "$VSP_STORE" ]; then mount -t tmpfs -o mode=0000,size=4k,ro vsp-hidden "$VSP_STORE"; fi',
  'cd "/home/$VSP_OWNER"',
  // The task is not PID 1 (which ignores a stop's SIGTERM): this shell stays PID 1 and, when the task
  // ends, ends the namespace and with it whatever the task left running. `&` ignores SIGINT and SIGQUIT
  // in the task; env restores them.
  'prlimit $VSP_LIMITS -- setpriv --reuid "$VSP_UID" --regid "$VSP_UID" --clear-groups --no-new-privs \\',
  '  --inh-caps=-all --bounding-set=-all -- env -i --default-signal=INT,QUIT HOME="/home/$VSP_OWNER" \\',
  '  USER="$VSP_OWNER" LOGNAME="$VSP_OWNER" SHELL=/bin/sh PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8 \\',
  '  TMPDIR=/tmp VSP_TASK="$VSP_TASK" /bin/sh -c "$VSP_COMMAND" &',
  'wait $!',
].join('\n');

/** Per-task limits; processes count per uid, and each task has its own uid. */
export interface ProcessLimits {
  processes: number;
  fileBytes: number;
  openFiles: number;
}

export const DEFAULT_PROCESS_LIMITS: ProcessLimits = {
  processes: 512,
  fileBytes: 16 * 1024 ** 3,
  openFiles: 4096,
};

interface ProcessState {
  config: VmConfig;
  /** The task's own account (uid = gid). */
  uid: number;
  startedAt?: number;
  pid?: number;
  pidStartTime?: number;
}

export class ProcessDriver implements HypervisorDriver {
  readonly name = 'process';
  readonly capabilities: DriverCapabilities = {
    liveMigration: false,
    isolation: 'process',
    homeStaging: 'directory',
  };

  private readonly accounts: TaskAccounts;

  constructor(
    private readonly opts: {
      store: VmStore;
      hostName: string;
      pollMs?: number;
      accounts?: TaskAccounts;
      limits?: ProcessLimits;
    },
  ) {
    this.accounts = opts.accounts ?? new TaskAccounts();
    // The task's home is mounted over /home in its namespace: a store there would hide the home itself.
    const root = path.resolve(opts.store.root);
    if (root === '/home' || root.startsWith('/home/'))
      throw new Error(`the process driver cannot use a VM store under /home (${root})`);
  }

  /** Names the VM machine-wide, for the uid claim: several workers may share a machine. */
  private vmKey(vmId: string): string {
    return this.opts.store.paths(vmId).dir;
  }

  private get pollMs(): number {
    return this.opts.pollMs ?? 500;
  }

  async create(config: VmConfig): Promise<VmHandle> {
    const existing = await this.opts.store.readState<ProcessState>(config.vmId);
    if (!existing) {
      if (!OWNER_NAME.test(config.owner))
        throw new Error(`invalid owner name ${JSON.stringify(config.owner)}`);
      const uid = await this.accounts.claim(this.vmKey(config.vmId));
      await this.opts.store.writeState(config.vmId, { config, uid } satisfies ProcessState);
    }
    return this.handle(config.vmId);
  }

  private handle(vmId: string, state: VmHandle['state'] = {}): VmHandle {
    return { driver: this.name, vmId, host: this.opts.hostName, storageHost: this.opts.hostName, state };
  }

  private async state(vmId: string): Promise<ProcessState> {
    const s = await this.opts.store.readState<ProcessState>(vmId);
    if (!s) throw new Error(`VM ${vmId} does not exist on host ${this.opts.hostName}`);
    return s;
  }

  async start(handle: VmHandle): Promise<VmHandle> {
    const p = this.opts.store.paths(handle.vmId);
    const state = await this.state(handle.vmId);
    const claimed = await pathExists(path.join(p.dir, '.started'));
    if (!claimed) {
      // Root never runs a task: the uid comes from a range that excludes it, and this checks it again.
      if (!(state.uid >= 1000)) throw new Error(`refusing to run task ${handle.vmId} as uid ${state.uid}`);
      if (process.getuid?.() !== 0)
        throw new Error('the process driver must run as root to start each task under its own account');
      await giveTo(p.homeDir, state.uid);
      const tmp = path.join(p.dir, 'task-tmp');
      await fs.mkdir(tmp, { recursive: true });
      await giveTo(tmp, state.uid);
      const child = spawn('/bin/sh', ['-c', WRAPPER], {
        cwd: p.dir,
        detached: true,
        stdio: 'ignore',
        env: {
          PATH: '/usr/sbin:/usr/bin:/sbin:/bin',
          VSP_VM_DIR: p.dir,
          VSP_STORE: path.resolve(this.opts.store.root),
          VSP_JAIL: JAIL,
          VSP_OWNER: state.config.owner,
          VSP_UID: String(state.uid),
          VSP_LIMITS: limitArgs(this.opts.limits ?? DEFAULT_PROCESS_LIMITS, state.config.memoryMiB),
          VSP_TASK: state.config.vmId,
          VSP_COMMAND: state.config.command,
        },
      });
      child.unref();
      log.info({ vmId: handle.vmId, pid: child.pid }, 'task process started');
    }
    // The wrapper writes its pid once it holds the claim; a retry reads the same file.
    const pid = await waitForPid(path.join(p.dir, 'pid'), 10_000);
    if (state.pid === undefined) {
      const pidStartTime = await processStartTime(pid);
      const next: ProcessState = { ...state, pid, pidStartTime: pidStartTime ?? -1, startedAt: Date.now() };
      await this.opts.store.writeState(handle.vmId, next);
      return this.handle(handle.vmId, { pid, pidStartTime: next.pidStartTime ?? -1 });
    }
    return this.handle(handle.vmId, { pid: state.pid, pidStartTime: state.pidStartTime ?? -1 });
  }

  async inspect(handle: VmHandle): Promise<VmStatus> {
    const p = this.opts.store.paths(handle.vmId);
    const state = await this.opts.store.readState<ProcessState>(handle.vmId);
    if (!state) return { phase: 'missing', details: {} };
    const progress = lastProgress(await readTail(p.taskLog));
    const base = { progress: progress?.progress, progressMessage: progress?.message };
    const exitCode = await readExitCode(p.exitFile);
    if (exitCode !== undefined)
      return { ...base, phase: 'exited', exitCode, details: { pid: state.pid ?? 0 } };
    const proc = await this.taskProcess(handle.vmId, state);
    if (!proc) return { ...base, phase: 'created', details: {} };
    const alive = await isSameProcessAlive(proc.pid, proc.pidStartTime);
    return { ...base, phase: alive ? 'running' : 'missing', details: { pid: proc.pid } };
  }

  /**
   * The task's wrapper: from the state, or, when a worker died between the wrapper's start and the state
   * write, from the pid file the wrapper wrote, if that pid is still this VM's wrapper (its environment
   * names this folder; a reused pid does not).
   */
  private async taskProcess(
    vmId: string,
    state: ProcessState,
  ): Promise<{ pid: number; pidStartTime: number } | undefined> {
    if (state.pid !== undefined) return { pid: state.pid, pidStartTime: state.pidStartTime ?? -1 };
    const dir = this.opts.store.paths(vmId).dir;
    const pid = await readPidFile(path.join(dir, 'pid'));
    if (!pid) return undefined;
    const environ = await fs.readFile(`/proc/${pid}/environ`, 'utf8').catch(() => '');
    if (!environ.split('\0').includes(`VSP_VM_DIR=${dir}`)) return { pid, pidStartTime: -1 };
    return { pid, pidStartTime: (await processStartTime(pid)) ?? -1 };
  }

  recover(handle: VmHandle): Promise<VmStatus> {
    return this.inspect(handle);
  }

  async wait(handle: VmHandle, options: WaitOptions): Promise<ExitResult> {
    const state = await this.state(handle.vmId);
    const deadline = (state.startedAt ?? Date.now()) + state.config.timeLimitSec * 1000;
    for (;;) {
      const status = await this.inspect(handle);
      options.onProgress(status);
      const reported = { progress: status.progress, progressMessage: status.progressMessage };
      if (status.phase === 'exited') return { exitCode: status.exitCode ?? -1, timedOut: false, ...reported };
      if (status.phase === 'missing') {
        const tail = await readTail(this.opts.store.paths(handle.vmId).taskLog, 2048);
        throw new Error(`task process of ${handle.vmId} vanished without an exit status; log tail:\n${tail}`);
      }
      if (status.phase === 'created') throw new Error(`VM ${handle.vmId} was never started`);
      if (Date.now() > deadline) {
        await this.stop(handle, 5000);
        return { exitCode: -1, timedOut: true, ...reported };
      }
      if (options.signal.aborted) throw options.signal.reason ?? new Error('wait aborted');
      await sleep(this.pollMs);
    }
  }

  async stop(handle: VmHandle, timeoutMs: number): Promise<void> {
    const state = await this.opts.store.readState<ProcessState>(handle.vmId);
    const proc = state && (await this.taskProcess(handle.vmId, state));
    if (!proc || !(await isSameProcessAlive(proc.pid, proc.pidStartTime))) return;
    signalGroup(proc.pid, 'SIGTERM');
    const until = Date.now() + timeoutMs;
    while (Date.now() < until) {
      if (!(await isSameProcessAlive(proc.pid, proc.pidStartTime))) return;
      await sleep(100);
    }
    signalGroup(proc.pid, 'SIGKILL');
    log.warn({ vmId: handle.vmId, pid: proc.pid }, 'task process killed after stop timeout');
  }

  async destroy(handle: VmHandle): Promise<void> {
    await this.stop(handle, 5000);
    const state = await this.opts.store.readState<ProcessState>(handle.vmId);
    await this.opts.store.remove(handle.vmId);
    await removeCpuGroup(await hostCgroupCpu(), handle.vmId).catch(() => undefined);
    if (state?.uid !== undefined) await this.accounts.release(state.uid, this.vmKey(handle.vmId));
  }

  /** The task's whole process tree goes into its cgroup; what it starts later is born there. */
  async setCpuShare(handle: VmHandle, share: CpuShare): Promise<void> {
    const state = await this.opts.store.readState<ProcessState>(handle.vmId);
    const proc = state && (await this.taskProcess(handle.vmId, state));
    if (!proc || !(await isSameProcessAlive(proc.pid, proc.pidStartTime)))
      throw new Error(`task ${handle.vmId} does not run on this host: its CPU share cannot change`);
    await applyCpuShare(await hostCgroupCpu(), handle.vmId, await processTree(proc.pid), share);
    log.info({ vmId: handle.vmId, pid: proc.pid, ...share }, 'CPU share set');
  }
}

/** prlimit's arguments: the address space is the task's memory (floor 256 MiB: runtimes reserve a lot). */
function limitArgs(l: ProcessLimits, memoryMiB: number): string {
  const as = Math.max(memoryMiB, 256) * 1024 * 1024;
  return `--nproc=${l.processes} --fsize=${l.fileBytes} --as=${as} --nofile=${l.openFiles} --core=0`;
}

/** Hands a folder the task's account will own (its home, its /tmp): that account only, 0700. */
async function giveTo(dir: string, uid: number): Promise<void> {
  await fs.mkdir(dir, { recursive: true });
  for (const e of await fs.readdir(dir, { withFileTypes: true, recursive: true }))
    await fs.lchown(path.join(e.parentPath, e.name), uid, uid);
  await fs.lchown(dir, uid, uid);
  await fs.chmod(dir, 0o700);
}

function signalGroup(pid: number, signal: NodeJS.Signals): void {
  try {
    process.kill(-pid, signal); // the wrapper leads its own process group (detached)
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ESRCH') throw err;
  }
}

async function readExitCode(file: string): Promise<number | undefined> {
  try {
    const n = Number((await fs.readFile(file, 'utf8')).trim());
    return Number.isInteger(n) ? n : undefined;
  } catch {
    return undefined;
  }
}

async function waitForPid(file: string, timeoutMs: number): Promise<number> {
  const until = Date.now() + timeoutMs;
  for (;;) {
    const pid = await readPidFile(file); // not written yet: undefined
    if (pid) return pid;
    if (Date.now() > until)
      throw new Error(`the task wrapper did not start within ${timeoutMs} ms (${file})`);
    await sleep(50);
  }
}
