import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { loadHostConfig } from '../../config/workerConfig';
import { parseUidRange, TaskAccounts } from '../../drivers/process/taskAccounts';

const HOST_ENV = {
  VSP_HOST: 'a',
  VSP_REPOSITORY_URL: 'http://127.0.0.1:1',
  VSP_REPOSITORY_TOKEN: 'abcdefghij',
};

describe('the process driver is never a default', () => {
  test('the default driver is the first VM driver the host has', () => {
    expect(loadHostConfig(HOST_ENV).defaultDriver).toBe('qemu');
    expect(loadHostConfig({ ...HOST_ENV, VSP_DRIVERS: 'process,qemu' }).defaultDriver).toBe('qemu');
    expect(loadHostConfig({ ...HOST_ENV, VSP_DRIVERS: 'process,xen' }).defaultDriver).toBe('xen');
  });

  test('a host with only the process driver has no default: tasks must name it', () => {
    const c = loadHostConfig({ ...HOST_ENV, VSP_DRIVERS: 'process' });
    expect(c.drivers).toEqual(['process']);
    expect(c.defaultDriver).toBeUndefined();
  });

  test('VSP_DEFAULT_DRIVER=process is refused', () => {
    expect(() =>
      loadHostConfig({ ...HOST_ENV, VSP_DRIVERS: 'process,qemu', VSP_DEFAULT_DRIVER: 'process' }),
    ).toThrow(/VSP_DEFAULT_DRIVER=process: the process driver runs only tasks that name it/);
  });
});

describe('task accounts', () => {
  test('the uid range excludes root, system and user accounts', () => {
    expect(parseUidRange('3000000-3000009')).toEqual({ first: 3_000_000, last: 3_000_009 });
    for (const bad of ['0-10', '1000-200000', '5-', 'x', '200000-100000'])
      expect(() => parseUidRange(bad)).toThrow(/task uid range/);
    expect(loadHostConfig({ ...HOST_ENV, VSP_PROCESS_UIDS: '200000-200099' }).processUids).toEqual({
      first: 200_000,
      last: 200_099,
    });
    expect(() => loadHostConfig({ ...HOST_ENV, VSP_PROCESS_UIDS: '0-99' })).toThrow(
      /VSP_PROCESS_UIDS.*must lie within/,
    );
  });

  test('one uid per VM, stable for that VM, released at the end', async () => {
    const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-uids-'));
    try {
      const accounts = new TaskAccounts({ first: 200_000, last: 200_001 }, dir);
      const a = await accounts.claim('/store/vms/a');
      expect(await accounts.claim('/store/vms/a')).toBe(a);
      const b = await accounts.claim('/store/vms/b');
      expect(b).not.toBe(a);
      await expect(accounts.claim('/store/vms/c')).rejects.toThrow(/no free task uid in 200000-200001/);
      await accounts.release(a, '/store/vms/b'); // not b's: kept
      await expect(accounts.claim('/store/vms/c')).rejects.toThrow(/no free task uid/);
      await accounts.release(a, '/store/vms/a');
      expect(await accounts.claim('/store/vms/c')).toBe(a);
    } finally {
      await fs.rm(dir, { recursive: true, force: true });
    }
  });

  test('a claim whose VM is gone is taken back once it is old; a fresh one is not', async () => {
    const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-uids-'));
    try {
      const accounts = new TaskAccounts({ first: 200_000, last: 200_000 }, dir);
      const vmDir = path.join(dir, 'vm-a');
      await fs.mkdir(vmDir);
      expect(await accounts.claim(vmDir)).toBe(200_000);
      await fs.rm(vmDir, { recursive: true });
      // Gone, but claimed a moment ago (its VM folder may be on its way): kept.
      await expect(accounts.claim(path.join(dir, 'vm-b'))).rejects.toThrow(/no free task uid/);
      const old = new Date(Date.now() - 120_000);
      await fs.utimes(path.join(dir, '200000'), old, old);
      expect(await accounts.claim(path.join(dir, 'vm-b'))).toBe(200_000);
      expect(await fs.readFile(path.join(dir, '200000'), 'utf8')).toBe(path.join(dir, 'vm-b'));
    } finally {
      await fs.rm(dir, { recursive: true, force: true });
    }
  });
});
