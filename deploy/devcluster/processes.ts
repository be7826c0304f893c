import { spawn } from 'node:child_process';
import { closeSync, fstatSync, mkdirSync, openSync, readFileSync, readSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

import { createLogger, describeError } from '../../logging/logger';
import { liveGroupMembers } from './procTable';

const log = createLogger('devcluster.processes');

/** When a started process counts as ready; all given conditions must hold. */
export interface ReadyCondition {
  /** A TCP port that accepts connections. */
  port?: { host: string; port: number };
  /** A line that appears in the process's log file. */
  logLine?: RegExp;
  /** Any other check (e.g. an RPC); a throw counts as "not yet". */
  probe?: () => Promise<boolean>;
}

export interface SpawnManagedOptions {
  env?: NodeJS.ProcessEnv;
  cwd?: string;
  /** stdout and stderr are appended here, so a failed run keeps them. */
  logFile: string;
  readyWhen?: ReadyCondition;
  /** Default 30 s. */
  readyTimeoutMs?: number;
}

export interface ManagedProcess {
  name: string;
  pid: number;
  logFile: string;
  /** Sends `signal` (default SIGTERM) to the whole process group, SIGKILL after `graceMs` (default 5 s). */
  stop(signal?: NodeJS.Signals, graceMs?: number): Promise<void>;
  /** SIGKILL to the whole process group, now. */
  kill(): void;
  /** The exit code, or null when a signal ended it. */
  exited: Promise<number | null>;
}

const managed = new Set<ManagedProcess>();
const POLL_MS = 100;

/** The last `lines` lines of a log file, for error messages. */
export function tailLog(logFile: string, lines = 40): string {
  try {
    return readFileSync(logFile, 'utf8').trimEnd().split('\n').slice(-lines).join('\n');
  } catch (err) {
    return `(no log: ${describeError(err)})`;
  }
}

/**
 * Starts `cmd` in its own process group (so stopping it also stops whatever it started), logging to a
 * file, and resolves once it is ready. Throws, after killing it, when it exits or is not ready in time.
 */
export async function spawnManaged(
  name: string,
  cmd: string,
  args: string[],
  opts: SpawnManagedOptions,
): Promise<ManagedProcess> {
  mkdirSync(path.dirname(opts.logFile), { recursive: true });
  const fd = openSync(opts.logFile, 'a');
  // A restarted process appends to its predecessor's log: only lines after this offset are its own.
  const logStart = fstatSync(fd).size;
  let child;
  try {
    child = spawn(cmd, args, { env: opts.env, cwd: opts.cwd, detached: true, stdio: ['ignore', fd, fd] });
  } finally {
    closeSync(fd);
  }
  let spawnError: Error | undefined;
  let exitCode: number | null | undefined;
  let exitSignal: NodeJS.Signals | null = null;
  const exited = new Promise<number | null>((resolve) => {
    child.once('error', (err) => {
      spawnError = err;
      exitCode = null;
      resolve(null);
    });
    child.once('exit', (code, signal) => {
      exitCode = code;
      exitSignal = signal;
      resolve(code);
    });
  });
  const pid = child.pid;
  if (pid === undefined) {
    await exited;
    throw new Error(`${name}: could not start ${cmd}`, { cause: spawnError });
  }

  const proc: ManagedProcess = {
    name,
    pid,
    logFile: opts.logFile,
    exited,
    kill: () => signalGroup(pid, 'SIGKILL'),
    stop: (signal = 'SIGTERM', graceMs = 5000) =>
      stopGroup(proc, exited, () => exitCode !== undefined, signal, graceMs),
  };
  managed.add(proc);
  void exited.then(() => {
    // The group may outlive its leader; stopAll still has to reach the rest.
    if (liveGroupMembers(pid).length === 0) managed.delete(proc);
  });
  log.debug({ name, childPid: pid, cmd, args, logFile: opts.logFile }, 'started');

  if (opts.readyWhen) {
    const timeoutMs = opts.readyTimeoutMs ?? 30_000;
    try {
      await waitReady(opts.readyWhen, timeoutMs, () => exitCode !== undefined, opts.logFile, logStart);
    } catch (err) {
      const why =
        exitCode !== undefined
          ? `exited (${exitSignal ? `signal ${exitSignal}` : `code ${exitCode}`}) before it was ready`
          : `not ready after ${timeoutMs} ms`;
      await proc.stop('SIGKILL', 0);
      throw new Error(`${name} ${why}; last lines of ${opts.logFile}:\n${tailLog(opts.logFile)}`, {
        cause: spawnError ?? err,
      });
    }
  }
  return proc;
}

async function waitReady(
  cond: ReadyCondition,
  timeoutMs: number,
  hasExited: () => boolean,
  logFile: string,
  logStart: number,
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  let lastError: unknown;
  while (!hasExited()) {
    try {
      if (await isReady(cond, logFile, logStart)) return;
    } catch (err) {
      lastError = err;
    }
    if (Date.now() >= deadline) throw new Error('readiness deadline passed', { cause: lastError });
    await sleep(POLL_MS);
  }
  throw new Error('process exited', { cause: lastError });
}

async function isReady(cond: ReadyCondition, logFile: string, logStart: number): Promise<boolean> {
  if (cond.logLine && !cond.logLine.test(readLogFrom(logFile, logStart))) return false;
  if (cond.port && !(await acceptsConnections(cond.port.host, cond.port.port))) return false;
  if (cond.probe && !(await cond.probe())) return false;
  return true;
}

/** What a log file holds from byte `offset` on. */
function readLogFrom(logFile: string, offset: number): string {
  const fd = openSync(logFile, 'r');
  try {
    const size = fstatSync(fd).size;
    const buf = Buffer.alloc(Math.max(0, size - offset));
    const n = buf.length > 0 ? readSync(fd, buf, 0, buf.length, offset) : 0;
    return buf.subarray(0, n).toString('utf8');
  } finally {
    closeSync(fd);
  }
}

function acceptsConnections(host: string, port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = net.connect({ host, port });
    const done = (ok: boolean) => {
      socket.destroy();
      resolve(ok);
    };
    socket.setTimeout(1000, () => done(false));
    socket.once('connect', () => done(true));
    socket.once('error', () => done(false));
  });
}

function signalGroup(pgid: number, signal: NodeJS.Signals): void {
  try {
    process.kill(-pgid, signal);
  } catch (err) {
    // ESRCH: the group is already gone, which is what we want.
    if ((err as NodeJS.ErrnoException).code !== 'ESRCH') throw err;
  }
}

/** Polls until `done()` or the deadline; returns whether `done()` held. */
async function pollUntil(done: () => boolean, timeoutMs: number): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (!done()) {
    if (Date.now() >= deadline) return false;
    await sleep(20);
  }
  return true;
}

async function stopGroup(
  proc: ManagedProcess,
  exited: Promise<number | null>,
  hasExited: () => boolean,
  signal: NodeJS.Signals,
  graceMs: number,
): Promise<void> {
  const groupGone = () => hasExited() && liveGroupMembers(proc.pid).length === 0;
  if (!groupGone()) {
    signalGroup(proc.pid, signal);
    if (!(await pollUntil(groupGone, graceMs))) {
      if (signal !== 'SIGKILL')
        log.warn({ name: proc.name, pid: proc.pid, graceMs }, `no exit after ${signal}: SIGKILL`);
      signalGroup(proc.pid, 'SIGKILL');
      if (!(await pollUntil(groupGone, 5000))) {
        const left = liveGroupMembers(proc.pid).map((p) => `${p.pid} ${p.cmdline}`);
        throw new Error(`${proc.name}: process group ${proc.pid} survived SIGKILL: ${left.join('; ')}`);
      }
    }
  }
  await exited;
  managed.delete(proc);
}

/** Stops every process still managed, in parallel; reports every failure, after trying all. */
export async function stopAll(graceMs = 5000): Promise<void> {
  const results = await Promise.allSettled([...managed].map((p) => p.stop('SIGTERM', graceMs)));
  const failures = results.filter((r): r is PromiseRejectedResult => r.status === 'rejected');
  if (failures.length > 0) {
    throw new Error(`stopAll: ${failures.map((f) => describeError(f.reason)).join('; ')}`);
  }
}

/** Names and pids of the processes still managed. */
export function listManaged(): { name: string; pid: number }[] {
  return [...managed].map(({ name, pid }) => ({ name, pid }));
}

/** On process exit, SIGKILL whatever is still managed (exit handlers cannot wait for a graceful stop). */
process.once('exit', () => {
  for (const p of managed) p.kill();
});

let shuttingDown = false;

/** True once a signal handler from stopAllOnSignals began stopping everything: exits are then expected. */
export function isShuttingDown(): boolean {
  return shuttingDown;
}

/**
 * For command-line entry points: on SIGINT or SIGTERM, stop every managed process gracefully, then run
 * `onStopped` (if given) and exit with 128 + the signal number.
 */
export function stopAllOnSignals(onStopped?: () => Promise<void>): void {
  const handle = (signal: NodeJS.Signals, code: number) => {
    shuttingDown = true;
    log.info({ signal }, 'stopping managed processes');
    stopAll()
      .then(() => onStopped?.())
      .catch((err) => log.error({ err: describeError(err) }, 'stop failed'))
      .finally(() => process.exit(code));
  };
  process.once('SIGINT', () => handle('SIGINT', 130));
  process.once('SIGTERM', () => handle('SIGTERM', 143));
}
