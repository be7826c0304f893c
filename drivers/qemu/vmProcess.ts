import { spawn } from 'node:child_process';
import { promises as fs } from 'node:fs';
import net from 'node:net';
import { QmpClient } from './qmp';

/**
 * Whether `pid` is still the QEMU of this VM: the pid must exist and its command line must name the
 * VM's QMP socket, so a recycled pid of an unrelated process never counts as the VM.
 */
export async function isVmProcess(pid: number | undefined, qmpSocket: string): Promise<boolean> {
  if (!pid || !Number.isInteger(pid) || pid <= 1) return false;
  try {
    const cmdline = await fs.readFile(`/proc/${pid}/cmdline`, 'utf8');
    return cmdline.includes(qmpSocket);
  } catch {
    return false;
  }
}

/** Resolves true once the process is gone, false after `timeoutMs`. */
export async function waitForExit(pid: number, qmpSocket: string, timeoutMs: number): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (await isVmProcess(pid, qmpSocket)) {
    if (Date.now() >= deadline) return false;
    await sleep(100);
  }
  return true;
}

/** SIGKILLs this VM's QEMU (gone already is fine); true once it has exited, false after 5 s. */
export async function killVmProcess(pid: number, qmpSocket: string): Promise<boolean> {
  try {
    process.kill(pid, 'SIGKILL');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ESRCH') throw err;
  }
  return waitForExit(pid, qmpSocket, 5_000);
}

export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const timer = setTimeout(done, ms);
    function done() {
      clearTimeout(timer);
      signal?.removeEventListener('abort', done);
      resolve();
    }
    signal?.addEventListener('abort', done, { once: true });
  });
}

/** An unused TCP port on 127.0.0.1 (the kernel picks it; QEMU binds it a moment later). */
export function freeLocalPort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const port = (server.address() as net.AddressInfo).port;
      server.close(() => resolve(port));
    });
  });
}

const LOG_TAIL_BYTES = 4096;
const QMP_PROBE_MS = 1_000;

/**
 * Starts QEMU in a session of its own, detached from the worker so the VM outlives it, with its output
 * appended to `logFile`, and writes its pid to `pidFile`. Resolves with the pid once QMP answers (QEMU
 * has set up the machine); rejects with what QEMU printed when it exits first or stays silent past
 * `timeoutMs`. `cmd` must exec QEMU itself (ip netns exec and setpriv do), so the child's pid is QEMU's.
 * `fds` become QEMU's fds 3, 4... (a snapshot to restore from: `-incoming fd:3`).
 */
export async function startDetached(
  c: { cmd: string; args: string[] },
  o: { qmpSocket: string; logFile: string; pidFile: string; timeoutMs: number; fds?: number[] },
): Promise<number> {
  const log = await fs.open(o.logFile, 'a', 0o600);
  const from = (await log.stat()).size;
  let exited: string | undefined;
  let pid: number | undefined;
  try {
    const child = spawn(c.cmd, c.args, {
      detached: true,
      stdio: ['ignore', log.fd, log.fd, ...(o.fds ?? [])],
    });
    child.once('exit', (code, signal) => (exited = signal ? `killed by ${signal}` : `exit code ${code}`));
    child.once('error', (err) => (exited = err.message));
    child.unref();
    pid = child.pid;
  } finally {
    await log.close();
  }
  const deadline = Date.now() + o.timeoutMs;
  for (;;) {
    if (exited !== undefined || pid === undefined) {
      const tail = await readFrom(o.logFile, from);
      throw new Error(`QEMU did not start (${exited ?? 'no process'}): ${tail || 'it printed nothing'}`);
    }
    const answered = await QmpClient.connect(o.qmpSocket, QMP_PROBE_MS).then(
      (qmp) => (qmp.close(), true),
      () => false,
    );
    if (answered && (await isVmProcess(pid, o.qmpSocket))) break;
    if (Date.now() > deadline) {
      process.kill(pid, 'SIGKILL');
      throw new Error(`QEMU ${pid} did not answer on ${o.qmpSocket} within ${o.timeoutMs} ms`);
    }
    // Short: a VM restored from a snapshot answers within tens of milliseconds, and its start waits on it.
    await sleep(20);
  }
  await fs.writeFile(o.pidFile, `${pid}\n`);
  return pid;
}

/** What this launch printed (the log keeps earlier launches too), at most its last few KiB. */
async function readFrom(file: string, offset: number): Promise<string> {
  const text = await fs.readFile(file).catch(() => Buffer.alloc(0));
  return text
    .subarray(Math.max(offset, text.length - LOG_TAIL_BYTES))
    .toString('utf8')
    .trim();
}
