import { promises as fs } from 'node:fs';
import net from 'node:net';

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

export async function readPidFile(file: string): Promise<number | undefined> {
  try {
    const pid = Number((await fs.readFile(file, 'utf8')).trim());
    return Number.isInteger(pid) && pid > 1 ? pid : undefined;
  } catch {
    return undefined;
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
