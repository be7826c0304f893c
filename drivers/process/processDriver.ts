import { spawn } from 'node:child_process';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { createLogger } from '../../logging/logger';
import type { VmStore } from '../../storage/vmStore';
import { lastProgress, readTail } from '../progress';
import { isSameProcessAlive, processStartTime } from '../processLiveness';
import type {
  DriverCapabilities,
  ExitResult,
  HypervisorDriver,
  VmConfig,
  VmHandle,
  VmStatus,
  WaitOptions,
} from '../types';

const log = createLogger('driver.process');

/**
 * The `process` driver runs the task command as a plain child process of the host, in the VM folder,
 * with the staged-in inputs as its home. It gives NO isolation and NO migration: it is for hosts
 * without a hypervisor and for orchestration tests.
 *
 * The command runs under a small shell wrapper started in its own session, so it outlives the worker.
 * The wrapper claims the VM with `mkdir .started` before running anything: a retried start finds the
 * claim and does nothing, so a command never runs twice. It writes the exit status atomically when done.
 */
const WRAPPER = [
  'mkdir "$VSP_VM_DIR/.started" 2>/dev/null || exit 0',
  'echo $$ > "$VSP_VM_DIR/pid"',
  'cd "$HOME" || exit 126',
  '/bin/sh -c "$VSP_COMMAND" > "$VSP_VM_DIR/task.log" 2>&1 < /dev/null',
  'code=$?',
  'echo $code > "$VSP_VM_DIR/exit-status.tmp" && mv "$VSP_VM_DIR/exit-status.tmp" "$VSP_VM_DIR/exit-status"',
].join('\n');

interface ProcessState {
  config: VmConfig;
  startedAt?: number;
  pid?: number;
  pidStartTime?: number;
}

export class ProcessDriver implements HypervisorDriver {
  readonly name = 'process';
  readonly capabilities: DriverCapabilities = {
    liveMigration: false,
    isolation: 'none',
    homeStaging: 'directory',
  };

  constructor(private readonly opts: { store: VmStore; hostName: string; pollMs?: number }) {}

  private get pollMs(): number {
    return this.opts.pollMs ?? 500;
  }

  async create(config: VmConfig): Promise<VmHandle> {
    const existing = await this.opts.store.readState<ProcessState>(config.vmId);
    if (!existing) await this.opts.store.writeState(config.vmId, { config } satisfies ProcessState);
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
    const claimed = await exists(path.join(p.dir, '.started'));
    if (!claimed) {
      const child = spawn('/bin/sh', ['-c', WRAPPER], {
        cwd: p.dir,
        detached: true,
        stdio: 'ignore',
        env: {
          HOME: p.homeDir,
          PATH: '/usr/local/bin:/usr/bin:/bin',
          USER: state.config.owner,
          LANG: 'C.UTF-8',
          VSP_TASK: state.config.vmId,
          VSP_VM_DIR: p.dir,
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
    if (state.pid === undefined) return { ...base, phase: 'created', details: {} };
    const alive = await isSameProcessAlive(state.pid, state.pidStartTime ?? -1);
    return { ...base, phase: alive ? 'running' : 'missing', details: { pid: state.pid } };
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
      if (status.phase === 'exited') return { exitCode: status.exitCode ?? -1, timedOut: false };
      if (status.phase === 'missing') {
        const tail = await readTail(this.opts.store.paths(handle.vmId).taskLog, 2048);
        throw new Error(`task process of ${handle.vmId} vanished without an exit status; log tail:\n${tail}`);
      }
      if (status.phase === 'created') throw new Error(`VM ${handle.vmId} was never started`);
      if (Date.now() > deadline) {
        await this.stop(handle, 5000);
        return { exitCode: -1, timedOut: true };
      }
      if (options.signal.aborted) throw options.signal.reason ?? new Error('wait aborted');
      await sleep(this.pollMs);
    }
  }

  async stop(handle: VmHandle, timeoutMs: number): Promise<void> {
    const state = await this.opts.store.readState<ProcessState>(handle.vmId);
    if (!state?.pid || !(await isSameProcessAlive(state.pid, state.pidStartTime ?? -1))) return;
    signalGroup(state.pid, 'SIGTERM');
    const until = Date.now() + timeoutMs;
    while (Date.now() < until) {
      if (!(await isSameProcessAlive(state.pid, state.pidStartTime ?? -1))) return;
      await sleep(100);
    }
    signalGroup(state.pid, 'SIGKILL');
    log.warn({ vmId: handle.vmId, pid: state.pid }, 'task process killed after stop timeout');
  }

  async destroy(handle: VmHandle): Promise<void> {
    await this.stop(handle, 5000);
    await this.opts.store.remove(handle.vmId);
  }
}

function signalGroup(pid: number, signal: NodeJS.Signals): void {
  try {
    process.kill(-pid, signal); // the wrapper leads its own process group (detached)
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ESRCH') throw err;
  }
}

async function exists(p: string): Promise<boolean> {
  return fs.stat(p).then(
    () => true,
    () => false,
  );
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
    try {
      const pid = Number((await fs.readFile(file, 'utf8')).trim());
      if (pid > 0) return pid;
    } catch {
      // not written yet
    }
    if (Date.now() > until)
      throw new Error(`the task wrapper did not start within ${timeoutMs} ms (${file})`);
    await sleep(50);
  }
}
