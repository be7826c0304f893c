import { promises as fs } from 'node:fs';
import path from 'node:path';
import { runCommand } from '../lib/runCommand';
import { createLogger, describeError } from '../logging/logger';

const log = createLogger('staging-mount');
const TOOL_TIMEOUT_MS = 10 * 60_000;

/**
 * A data disk being filled: its image, made by the host, is loop-mounted (direct I/O, so the bytes are
 * cached once, not twice) on the VM's inputs folder while the inputs stream into it. Only an image no
 * guest has touched is ever mounted; a guest-written disk is read with GuestDiskReader.
 */
export function stagingImageOf(dataDisk: string): string {
  return `${dataDisk}.staging`;
}

/** Whether `dir` is a mount point (of this process's mount namespace). */
export async function isMountPoint(dir: string): Promise<boolean> {
  const want = path.resolve(dir);
  const info = await fs.readFile('/proc/self/mountinfo', 'utf8');
  // Field 5 is the mount point, with space, tab, newline and backslash written as octal escapes.
  return info.split('\n').some((line) => {
    const point = line.split(' ')[4];
    return (
      point !== undefined &&
      point.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8))) === want
    );
  });
}

export async function mountStagingImage(image: string, at: string, signal?: AbortSignal): Promise<void> {
  await fs.mkdir(at, { recursive: true });
  // `-o loop` gives a device that goes with the unmount (autoclear).
  await runCommand('mount', ['-t', 'ext4', '-o', 'loop,nosuid,nodev,noexec', image, at], {
    timeoutMs: TOOL_TIMEOUT_MS,
    signal,
  });
  // Direct I/O where the image's file system has it (not tmpfs, for one); buffered I/O works, slower.
  for (const device of await loopDevicesOf(image))
    await runCommand('losetup', ['--direct-io=on', device], { timeoutMs: TOOL_TIMEOUT_MS, signal }).catch(
      (err: unknown) =>
        log.warn({ image, device, err: describeError(err) }, 'loop device without direct I/O'),
    );
}

/**
 * Unmounts a staging image from `at` when mounted there and frees any loop device still bound to it
 * (a worker that died between the two); the unmount writes back what the kernel still held.
 */
export async function unmountStagingImage(image: string, at: string): Promise<void> {
  if (await isMountPoint(at)) await runCommand('umount', [at], { timeoutMs: TOOL_TIMEOUT_MS });
  for (const device of await loopDevicesOf(image))
    await runCommand('losetup', ['--detach', device], { timeoutMs: TOOL_TIMEOUT_MS });
}

async function loopDevicesOf(image: string): Promise<string[]> {
  if (!(await fs.stat(image).catch(() => undefined))) return [];
  const { stdout } = await runCommand(
    'losetup',
    ['--associated', image, '--noheadings', '--output', 'NAME'],
    {
      timeoutMs: TOOL_TIMEOUT_MS,
    },
  );
  return stdout
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l !== '');
}
