import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { loadHostConfig } from '../../config/workerConfig';
import { buildQemuArgs } from '../../drivers/qemu/commandLine';
import { incomingTlsArgs, migrationIdentityOf } from '../../drivers/qemu/migrationTls';
import { asAccount, checkReachable, resolveQemuAccount } from '../../drivers/qemu/qemuAccount';
import { SAMPLE_LAUNCH } from '../support/qemuLaunch';

/** QEMU's privileges and TLS objects as they appear on its command line (pure parts; no QEMU runs). */

const launch = SAMPLE_LAUNCH;
const account = { user: 'vsp-qemu', uid: 64090, gid: 64091 };

test('QEMU runs sandboxed, in the foreground (no fork for -daemonize, no -runas setuid: both are denied)', () => {
  const args = buildQemuArgs(launch);
  expect(args[args.indexOf('-sandbox') + 1]).toBe(
    'on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny',
  );
  expect(args).not.toContain('-daemonize');
  expect(args).not.toContain('-runas');
});

test('QEMU starts as the account, with its groups and no new privileges', () => {
  expect(asAccount(account, 'qemu-system-x86_64', ['-m', '128'])).toEqual({
    cmd: 'setpriv',
    args: [
      '--reuid=64090',
      '--regid=64091',
      '--init-groups',
      '--no-new-privs',
      '--',
      'qemu-system-x86_64',
      '-m',
      '128',
    ],
  });
  // A worker that is not root cannot switch: QEMU then runs as the worker's own account.
  expect(asAccount(undefined, 'qemu-system-x86_64', [])).toEqual({ cmd: 'qemu-system-x86_64', args: [] });
});

test('a QEMU user that is not a user name is refused before anything runs', async () => {
  await expect(resolveQemuAccount('root; rm -rf /')).rejects.toThrow('is not a user name');
});

test('a store the account cannot reach is named, with the folder in the way', async () => {
  const tmp = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-reach-'));
  try {
    const store = path.join(tmp, 'store', 'vms', 'x');
    await fs.mkdir(store, { recursive: true });
    await fs.chmod(tmp, 0o700);
    await expect(checkReachable(account, store)).rejects.toThrow(
      `QEMU's account 'vsp-qemu' cannot reach ${store}: ${tmp} (mode 700) denies it search permission`,
    );
    await fs.chmod(tmp, 0o711);
    await expect(checkReachable(account, store)).resolves.toBeUndefined();
  } finally {
    await fs.rm(tmp, { recursive: true, force: true });
  }
});

test('the target verifies its client and admits the chosen source only', () => {
  expect(incomingTlsArgs('/etc/vsp/tls,x', 'a')).toEqual([
    '-object',
    'tls-creds-x509,id=vsp-migration-tls,dir=/etc/vsp/tls,,x,endpoint=server,verify-peer=on',
    '-object',
    'authz-simple,id=vsp-migration-authz,identity=CN=a',
  ]);
  expect(migrationIdentityOf('host-b')).toBe('CN=host-b');
});

test("the host worker's QEMU settings: account, TLS folder, remote disks", () => {
  const env = { VSP_HOST: 'a', VSP_REPOSITORY_URL: 'http://127.0.0.1:1', VSP_REPOSITORY_TOKEN: 'abcdefghij' };
  expect(loadHostConfig(env)).toMatchObject({ qemuUser: 'vsp-qemu', qemuRemoteDisks: 'nfs' });
  expect(loadHostConfig({ ...env, VSP_MIGRATION_TLS_DIR: '/etc/vsp/migration-tls' }).migrationTlsDir).toBe(
    '/etc/vsp/migration-tls',
  );
  expect(() => loadHostConfig({ ...env, VSP_QEMU_USER: 'root' })).toThrow(/QEMU must not run as root/);
  expect(() => loadHostConfig({ ...env, VSP_MIGRATION_TLS_DIR: 'tls' })).toThrow(/an absolute folder/);
  expect(() => loadHostConfig({ ...env, VSP_QEMU_REMOTE_DISKS: 'sshfs' })).toThrow(/qemuRemoteDisks/);
});
