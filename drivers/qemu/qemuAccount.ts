import { promises as fs } from 'node:fs';
import path from 'node:path';
import { runCommand } from '../../lib/runCommand';

/**
 * The unprivileged account QEMU runs as (VSP_QEMU_USER, created by deploy/setup.sh). QEMU is started as
 * that account rather than with `-runas`: QEMU installs its seccomp filter before `-runas` drops root, and
 * the filter's `elevateprivileges=deny` then kills it at its own setuid (and `spawn=deny` at `-daemonize`'s
 * fork), so a sandboxed QEMU can only ever have been unprivileged from its first instruction.
 */
export interface QemuAccount {
  user: string;
  uid: number;
  gid: number;
}

export const DEFAULT_QEMU_USER = 'vsp-qemu';

/** QEMU's own seccomp sandbox: no obsolete calls, no setuid, no fork/exec, no scheduler or cgroup changes. */
export const QEMU_SANDBOX = 'on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny';

const USER_NAME = /^[a-z_][a-z0-9_-]{0,31}$/;
const ID_TIMEOUT_MS = 5_000;

/**
 * The account's ids. A worker that is not root cannot switch accounts: QEMU then runs as the worker's
 * own unprivileged account (undefined here). Refuses root and names that are not user names.
 */
export async function resolveQemuAccount(user: string): Promise<QemuAccount | undefined> {
  if (!USER_NAME.test(user)) throw new Error(`QEMU user ${JSON.stringify(user)} is not a user name`);
  if (process.getuid?.() !== 0) return undefined;
  const id = async (flag: string) => {
    try {
      return Number((await runCommand('id', [flag, user], { timeoutMs: ID_TIMEOUT_MS })).stdout.trim());
    } catch (err) {
      throw new Error(
        `QEMU user '${user}' does not exist on this host: run deploy/setup.sh (it creates it) or set VSP_QEMU_USER`,
        { cause: err },
      );
    }
  };
  const account = { user, uid: await id('-u'), gid: await id('-g') };
  if (account.uid === 0 || account.gid === 0)
    throw new Error(`QEMU user '${user}' is root (uid or gid 0): QEMU must run unprivileged`);
  return account;
}

/** Command words that run `cmd` as the account (no supplementary groups but its own, no new privileges). */
export function asAccount(
  account: QemuAccount | undefined,
  cmd: string,
  args: string[],
): { cmd: string; args: string[] } {
  if (!account) return { cmd, args };
  return {
    cmd: 'setpriv',
    args: [
      `--reuid=${account.uid}`,
      `--regid=${account.gid}`,
      '--init-groups',
      '--no-new-privs',
      '--',
      cmd,
      ...args,
    ],
  };
}

/**
 * Hands the VM's own files to the account, readable and writable by it alone: the disks, the console
 * log (created empty if missing, as QEMU opens it for appending) and the folder QEMU makes its QMP socket
 * in. Everything else in the VM folder, the store and the base-image cache stays root's.
 */
export async function giveToAccount(
  account: QemuAccount | undefined,
  files: { disks: string[]; consoleLog: string; runDir: string },
): Promise<void> {
  await fs.mkdir(files.runDir, { recursive: true, mode: 0o700 });
  await (await fs.open(files.consoleLog, 'a', 0o600)).close();
  await giveDisks(account, [...files.disks, files.consoleLog]);
  if (!account) return;
  await fs.chown(files.runDir, account.uid, account.gid);
  await fs.chmod(files.runDir, 0o700);
}

/** Files that the account alone may read and write (mode 0600). */
export async function giveDisks(
  account: Pick<QemuAccount, 'uid' | 'gid'> | undefined,
  files: string[],
): Promise<void> {
  if (!account) return;
  for (const file of files) {
    await fs.chown(file, account.uid, account.gid);
    await fs.chmod(file, 0o600);
  }
}

/**
 * Throws, naming the folder, when the account cannot search every folder down to `dir` (a private
 * temporary folder above the store, say): QEMU would fail later with a bare "Permission denied".
 */
export async function checkReachable(account: QemuAccount | undefined, dir: string): Promise<void> {
  if (!account) return;
  for (let d = path.resolve(dir); ; d = path.dirname(d)) {
    const st = await fs.stat(d);
    const search = st.uid === account.uid ? 0o100 : st.gid === account.gid ? 0o010 : 0o001;
    if ((st.mode & search) === 0)
      throw new Error(
        `QEMU's account '${account.user}' cannot reach ${dir}: ${d} (mode ${(st.mode & 0o777).toString(8)}) ` +
          'denies it search permission (chmod o+x, or put the store elsewhere)',
      );
    if (d === path.dirname(d)) return;
  }
}
