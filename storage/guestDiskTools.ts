import { promises as fs } from 'node:fs';
import path from 'node:path';
import { runCommand, type RunResult } from '../lib/runCommand';
import { TaskAccounts } from '../drivers/process/taskAccounts';

const MiB = 1024 * 1024;

/** Bounds of one e2fsprogs run on a guest-written disk. */
export interface ToolLimits {
  timeoutMs: number;
  /** Address space of the tool. */
  memoryBytes: number;
  /** Largest file the tool may write (an extracted output; the image itself when it repairs it). */
  fileBytes: number;
}

export const DEFAULT_TOOL_LIMITS: ToolLimits = {
  timeoutMs: 30 * 60_000,
  memoryBytes: 1024 * MiB,
  fileBytes: 64 * MiB,
};

/**
 * Root, PID 1 of the tool's own namespaces. It opens the image (fd 3) and enters the work folder, then
 * covers the host's world-writable folders and the VM store with empty read-only mounts, so that the
 * tool, once it runs as an account of its own, can write nowhere but its work folder (a crafted name
 * like `../../etc/x` finds nothing writable). When the tool ends, its namespace and anything it started
 * end with it.
 */
const JAIL = [
  'set -e',
  'cd "$E2_WORK"',
  'if [ "$E2_WRITE" = 1 ]; then exec 3<>"$E2_IMAGE"; else exec 3<"$E2_IMAGE"; fi',
  'for d in /tmp /var/tmp /run/lock /dev/shm /dev/mqueue "$E2_HIDE"; do',
  '  if [ -d "$d" ]; then mount -t tmpfs -o ro,mode=0755,size=4k,nosuid,nodev,noexec vsp-e2fs-ro "$d"; fi',
  'done',
  'exec prlimit $E2_LIMITS -- setpriv --reuid "$E2_UID" --regid "$E2_UID" --clear-groups --no-new-privs \\',
  '  --inh-caps=-all --bounding-set=-all -- env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C "$@"',
].join('\n');

/**
 * Runs e2fsprogs (debugfs, e2fsck, dumpe2fs) on a disk image the guest wrote, which may be crafted: as an
 * unprivileged account of its own (claimed for the run, no capabilities, no_new_privs), under a time
 * limit and prlimit (memory, file size, a few processes and files), in PID and mount namespaces of its
 * own. The image is handed over as fd 3 (`/dev/fd/3`), owned by that account for the run and given back
 * after. Output the tool writes lands in `workDir`, which that account owns.
 */
export class GuestDiskTools {
  constructor(
    private readonly accounts = new TaskAccounts(),
    private readonly limits: ToolLimits = DEFAULT_TOOL_LIMITS,
  ) {}

  async run(
    image: string,
    tool: 'debugfs' | 'e2fsck' | 'dumpe2fs',
    /** The tool's arguments; `IMAGE` stands for the image. */
    args: string[],
    opts: {
      workDir: string;
      /** The tool changes the image (journal replay). */
      write?: boolean;
      /** Folder to hide from the tool: the VM store. */
      hide?: string;
      limits?: Partial<ToolLimits>;
      signal?: AbortSignal;
      maxBuffer?: number;
    },
  ): Promise<RunResult> {
    const limits = { ...this.limits, ...opts.limits };
    const key = `${path.resolve(image)}#${tool}#${process.pid}#${Math.random()}`;
    const uid = await this.accounts.claim(key);
    const st = await fs.stat(image);
    try {
      await fs.mkdir(opts.workDir, { recursive: true });
      await fs.chown(opts.workDir, uid, uid);
      await fs.chmod(opts.workDir, 0o700);
      await fs.chown(image, uid, uid);
      await fs.chmod(image, opts.write ? 0o600 : 0o400);
      const fileBytes = opts.write ? Math.max(limits.fileBytes, st.size) : limits.fileBytes;
      const toolArgs = args.map((a) => (a === 'IMAGE' ? '/dev/fd/3' : a));
      const jailArgs = [
        ...['--mount', '--propagation', 'private', '--pid', '--fork', '--kill-child', '--mount-proc'],
        ...['--', '/bin/sh', '-c', JAIL, 'vsp-e2fs', tool, ...toolArgs],
      ];
      return await runCommand('unshare', jailArgs, {
        timeoutMs: limits.timeoutMs,
        maxBuffer: opts.maxBuffer,
        signal: opts.signal,
        env: {
          PATH: '/usr/sbin:/usr/bin:/sbin:/bin',
          E2_WORK: opts.workDir,
          E2_IMAGE: image,
          E2_WRITE: opts.write ? '1' : '0',
          E2_HIDE: opts.hide ?? '',
          E2_UID: String(uid),
          E2_LIMITS: [
            `--as=${limits.memoryBytes}`,
            `--fsize=${fileBytes}`,
            '--nproc=8',
            '--nofile=64',
            '--core=0',
          ].join(' '),
        },
      }).catch((err: unknown) => {
        // Name the tool, not the jail around it; the tool's own words follow.
        const prefix = `unshare ${jailArgs.join(' ')}: `;
        const msg = (err as Error).message;
        const why = msg.startsWith(prefix) ? msg.slice(prefix.length) : msg;
        throw new Error(`${tool} ${args.join(' ')} on ${image} (unprivileged): ${why.trim()}`, {
          cause: (err as Error).cause ?? err,
        });
      });
    } finally {
      await fs.chown(image, st.uid, st.gid);
      await fs.chmod(image, st.mode & 0o7777);
      await this.accounts.release(uid, key);
    }
  }
}
