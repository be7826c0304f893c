import { randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';

import { Connection } from '@temporalio/client';

import { HostKeyMismatchError, SshSession } from '../../deploy/cluster/sshSession';
import { clusterInventory, GATEWAY, hostTarget, onHost, onHostOk, repositoryToken } from './harness';

/**
 * The virtual cluster is what the other cluster tests take for granted: real Xen on every dom0 (with HAP,
 * so PVH guests run and can live-migrate), dom0s that reach each other (ssh with pinned host keys: what
 * `xl migrate` uses) and this machine (Temporal), and a kernel-NFS export of one host mountable on another.
 */
describe('virtual Xen cluster', () => {
  test('the inventory names each dom0 with its address and pinned host key, and a private root key', async () => {
    const inv = await clusterInventory();
    expect(inv.version).toBe(1);
    expect(inv.ssh.user).toBe('root');
    const subnet = GATEWAY.replace(/\.254$/, '');
    expect(inv.hosts.map((h) => [h.name, h.address])).toEqual([
      ['a', `${subnet}.1`],
      ['b', `${subnet}.2`],
    ]);
    for (const h of inv.hosts) expect(h.hostKey).toMatch(/^ssh-ed25519 [A-Za-z0-9+/=]+$/);
    expect(new Set(inv.hosts.map((h) => h.hostKey)).size).toBe(inv.hosts.length);
    expect((await fs.stat(inv.ssh.identityFile)).mode & 0o077).toBe(0);
    expect(inv.cluster?.temporalAddress).toBe(`${GATEWAY}:7233`);
    expect((await repositoryToken()).length).toBeGreaterThanOrEqual(16);
  });

  test('a host presenting another host key is refused', async () => {
    const a = await hostTarget('a');
    const b = await hostTarget('b');
    await expect(SshSession.connect({ ...a, hostKey: b.hostKey })).rejects.toBeInstanceOf(
      HostKeyMismatchError,
    );
  });

  test.each(['a', 'b'])(
    'dom0 %s runs Xen 4.17 with HAP (PVH and HVM guests) and its toolstack',
    async (host) => {
      const info = await onHostOk(host, 'xl info');
      const field = (name: string) => new RegExp(`^${name}\\s*:\\s*(.*)$`, 'm').exec(info)?.[1] ?? '';
      expect(field('xen_version')).toMatch(/^4\.17\./);
      expect(field('virt_caps').split(/\s+/)).toEqual(expect.arrayContaining(['pv', 'hvm', 'hap']));
      expect(Number(field('free_memory'))).toBeGreaterThan(512);
      expect(await onHostOk(host, 'xl list')).toMatch(/^Domain-0\s+0\s/m);
      expect((await onHostOk(host, 'hostname')).trim()).toBe(host);
      // A warm snapshot's clock is hours old until `up` sets it; a minute covers ssh under load.
      const skew = Number(await onHostOk(host, 'date +%s')) - Date.now() / 1000;
      expect(Math.abs(skew)).toBeLessThan(60);
    },
  );

  test("Temporal answers at the inventory's address on the cluster network", async () => {
    const connection = await Connection.connect({
      address: (await clusterInventory()).cluster!.temporalAddress,
    });
    try {
      const ns = await connection.workflowService.describeNamespace({ namespace: 'default' });
      expect(ns.namespaceInfo?.name).toBe('default');
    } finally {
      await connection.close();
    }
  });

  test.each([
    ['a', 'b'],
    ['b', 'a'],
  ])('dom0 %s reaches %s over ssh with pinned host keys, and Temporal on this machine', async (from, to) => {
    // BatchMode and StrictHostKeyChecking=yes: only the cluster key and the known host key can work.
    const peer = await onHostOk(from, `ssh -o BatchMode=yes -o StrictHostKeyChecking=yes ${to} hostname`);
    expect(peer.trim()).toBe(to);
    const inv = await clusterInventory();
    const [ip, port] = inv.cluster!.temporalAddress.split(':');
    const tcp = await onHost(
      from,
      `timeout 10 bash -c '</dev/tcp/${ip}/${port}' && ping -c 1 -W 5 ${GATEWAY} >/dev/null`,
    );
    expect(tcp).toMatchObject({ code: 0 });
  });

  test("a kernel-NFS export of a's disk is mountable on b, both ways writable", async () => {
    const dir = `/srv/vsp-nfs-check-${randomBytes(4).toString('hex')}`;
    const token = randomBytes(8).toString('hex');
    const inv = await clusterInventory();
    const a = inv.hosts.find((h) => h.name === 'a')!;
    const b = inv.hosts.find((h) => h.name === 'b')!;
    try {
      await onHostOk(
        'a',
        `mkdir -p ${dir} && echo ${token} > ${dir}/from-a && exportfs -o rw,sync,no_root_squash,no_subtree_check ${b.address}:${dir}`,
      );
      await onHostOk('b', `mkdir -p ${dir} && mount -t nfs -o vers=4.2 ${a.address}:${dir} ${dir}`);
      expect((await onHostOk('b', `cat ${dir}/from-a`)).trim()).toBe(token);
      expect(await onHostOk('b', `findmnt -n -o FSTYPE,SOURCE ${dir}`)).toMatch(
        new RegExp(`^nfs4\\s+${a.address}:${dir}`),
      );
      await onHostOk('b', `echo ${token}-b > ${dir}/from-b`);
      expect((await onHostOk('a', `cat ${dir}/from-b`)).trim()).toBe(`${token}-b`);
    } finally {
      await onHost('b', `umount ${dir}; rmdir ${dir}`);
      await onHost('a', `exportfs -u ${b.address}:${dir}; rm -rf ${dir}`);
    }
  });
});
