import { execFileSync } from 'node:child_process';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import {
  applyStoragePlan,
  checkCanActivate,
  checkQemuAccount,
  storageCommand,
  type CommandRunner,
} from '../../deploy/production/applyStorage';
import { replaceMarkedBlock } from '../../deploy/production/markedBlock';
import {
  EXPORTS_BEGIN,
  EXPORTS_END,
  parseClusterStorageConfig,
  planHostStorage,
  systemdEscapePath,
  type ClusterStorageConfig,
} from '../../deploy/production/storagePlan';
import { resolveForQemu, resolveUnderMounts } from '../../storage/diskLocator';
import { checkClusterExports } from '../../storage/nfsExport';

/**
 * The production storage deployment (kernel NFS): the plan each host derives from the cluster file, and
 * the files the storage command writes into a temporary root. Kernel NFS cannot run on this machine (no
 * nfs module), so `systemctl`/`exportfs` are checked as the exact commands issued, through the runner.
 */

const CLUSTER = {
  mountRoot: '/var/lib/vsp/cluster',
  storeDir: '/var/lib/vsp/store',
  clusterStorage: {
    a: { address: '10.0.0.1', exportPath: '/vsp' },
    b: { address: '10.0.0.2', exportPath: '/vsp' },
    'host-c': { address: '10.0.0.3', exportPath: '/vspc' },
  },
  qemuAccount: { user: 'vsp-qemu', uid: 64090, gid: 64091 },
};
const OPTS = 'rw,sync,no_subtree_check,secure,root_squash,anonuid=64090,anongid=64091,sec=sys';

let tmp: string;
beforeEach(async () => {
  tmp = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-prodstorage-'));
});
afterEach(async () => {
  await fs.rm(tmp, { recursive: true, force: true });
});

const config = (over: Record<string, unknown> = {}): ClusterStorageConfig =>
  parseClusterStorageConfig({ ...CLUSTER, ...over });

async function tree(root: string): Promise<Record<string, string>> {
  const out: Record<string, string> = {};
  for (const entry of await fs.readdir(root, { recursive: true, withFileTypes: true })) {
    if (!entry.isFile()) continue;
    const file = path.join(entry.parentPath, entry.name);
    out[path.relative(root, file)] = await fs.readFile(file, 'utf8');
  }
  return out;
}

describe('cluster storage plan', () => {
  test("a host exports its store to exactly the other hosts' addresses", () => {
    const plan = planHostStorage(config(), 'a');
    expect(plan.exportsBlock).toBe(
      [EXPORTS_BEGIN, `/vsp 10.0.0.2(${OPTS}) 10.0.0.3(${OPTS})`, EXPORTS_END].join('\n'),
    );
  });

  test("root is squashed to QEMU's account, and only the cluster's own hosts are clients", () => {
    const c = config();
    for (const host of Object.keys(c.clusterStorage)) {
      const lines = planHostStorage(c, host)
        .exportsBlock.split('\n')
        .filter((l) => l.startsWith('/'));
      expect(lines).toHaveLength(1);
      const clients = lines[0].split(/\s+/).slice(1);
      const peers = Object.entries(c.clusterStorage).filter(([h]) => h !== host);
      expect(clients.map((cl) => cl.split('(')[0]).sort()).toEqual(peers.map(([, e]) => e.address).sort());
      for (const client of clients) {
        // One address each: never a subnet, a wildcard or a name that DNS could redirect.
        expect(client).toMatch(/^\d+\.\d+\.\d+\.\d+\(/);
        const opts = /\((.*)\)$/.exec(client)?.[1].split(',') ?? [];
        expect(opts).toEqual(
          expect.arrayContaining(['root_squash', 'secure', 'anonuid=64090', 'anongid=64091']),
        );
        expect(opts).not.toEqual(expect.arrayContaining(['no_root_squash']));
        expect(opts).not.toContain('insecure');
      }
    }
    // The store is root's, open to QEMU's group only: the account owns the VM disks, not the folders.
    expect(planHostStorage(c, 'a').storeOwner).toEqual({ uid: 0, gid: 64091, mode: 0o750 });
  });

  test('a one-host cluster exports nothing (an exports line without clients would export to everyone)', () => {
    const plan = planHostStorage(config({ clusterStorage: { a: CLUSTER.clusterStorage.a } }), 'a');
    expect(plan.exportsBlock).not.toMatch(/^\/vsp/m);
    expect(plan.units.map((u) => u.name)).toEqual(['vsp.mount', 'var-lib-vsp-cluster-a.mount']);
  });

  test('mount units: binds of its own store, an automounted NFS mount per other host', () => {
    const plan = planHostStorage(config(), 'a');
    expect(plan.units.map((u) => [u.name, u.enable, u.stage])).toEqual([
      ['vsp.mount', true, 0],
      ['var-lib-vsp-cluster-a.mount', true, 0],
      ['var-lib-vsp-cluster-b.mount', false, 1],
      ['var-lib-vsp-cluster-b.automount', true, 1],
      ['var-lib-vsp-cluster-host\\x2dc.mount', false, 1],
      ['var-lib-vsp-cluster-host\\x2dc.automount', true, 1],
    ]);
    const remote = plan.units.find((u) => u.name === 'var-lib-vsp-cluster-host\\x2dc.mount')?.content ?? '';
    expect(remote).toContain('What=10.0.0.3:/vspc\n');
    expect(remote).toContain('Where=/var/lib/vsp/cluster/host-c\n');
    expect(remote).toContain('Type=nfs\n');
    expect(remote).toContain('Options=nfsvers=4.2,proto=tcp,hard,timeo=600,retrans=2,noatime\n');
    const exportBind = plan.units[0].content;
    expect(exportBind).toContain('What=/var/lib/vsp/store\nWhere=/vsp\nType=none\nOptions=bind\n');
    expect(exportBind).toContain('Before=nfs-server.service');
    expect(planHostStorage(config({ nfsVersion: '3' }), 'a').units[2].content).toContain(
      'Options=nfsvers=3,',
    );
  });

  test('a store exported at its own path needs no export bind', () => {
    const plan = planHostStorage(config({ storeDir: '/vsp' }), 'a');
    expect(plan.units.map((u) => u.name)).not.toContain('vsp.mount');
  });

  test('unit names follow systemd-escape --path', () => {
    const paths = ['/var/lib/vsp/cluster/host-c', '/srv/.hidden/x.y', '/a//b/', '/', '/v_s:p/h1'];
    const expected = execFileSync('systemd-escape', ['--path', ...paths], { encoding: 'utf8' })
      .trim()
      .split(/\s+/);
    expect(paths.map(systemdEscapePath)).toEqual(expected);
  });

  test('every host sees every disk at the same path, served by the store of its storage host', () => {
    const c = config();
    const hosts = Object.keys(c.clusterStorage);
    const plans = Object.fromEntries(hosts.map((h) => [h, planHostStorage(c, h)]));
    for (const storageHost of hosts) {
      const loc = { storageHost, path: 'vms/t1/root.qcow2' };
      const diskPath = resolveUnderMounts(loc, c.mountRoot);
      expect(diskPath).toBe(`/var/lib/vsp/cluster/${storageHost}/vms/t1/root.qcow2`);
      const exporter = plans[storageHost];
      const exported = exporter.exportsBlock.split('\n')[1];
      for (const viewer of hosts) {
        const mount = plans[viewer].mounts.find((m) => diskPath.startsWith(`${m.where}/`));
        expect(mount?.storeOf).toBe(storageHost);
        if (viewer === storageHost) {
          expect(mount).toMatchObject({ type: 'bind', what: c.storeDir });
        } else {
          // The viewer mounts the storage host's export, which is that host's store, open to the viewer.
          const e = c.clusterStorage[storageHost];
          expect(mount).toMatchObject({ type: 'nfs', what: `${e.address}:${e.exportPath}` });
          const exportBind = exporter.mounts.find((m) => m.where === e.exportPath);
          expect(exportBind?.what ?? e.exportPath).toBe(c.storeDir);
          expect(exported).toContain(`${c.clusterStorage[viewer].address}(${OPTS})`);
          // QEMU reaches the same file through the same export with nfs://.
          const src = resolveForQemu(loc, { host: viewer, storeRoot: c.storeDir, cluster: c.clusterStorage });
          expect(src).toMatchObject({ kind: 'nfs', server: e.address, path: `${e.exportPath}/${loc.path}` });
        }
      }
    }
  });

  test('bad configurations are named', () => {
    const bad = (input: object) => () =>
      parseClusterStorageConfig({ qemuAccount: CLUSTER.qemuAccount, ...input }, 'cluster.json');
    expect(bad({ clusterStorage: { A: { address: '10.0.0.1', exportPath: '/vsp' } } })).toThrow(
      /cluster.json: clusterStorage.A: host names are lower-case/,
    );
    expect(bad({ clusterStorage: { a: { address: '10.0.0.300', exportPath: '/vsp' } } })).toThrow(
      /clusterStorage.a.address: the export address must be an IPv4 address/,
    );
    expect(bad({ clusterStorage: { a: { address: '10.0.0.1', exportPath: 'vsp/x' } } })).toThrow(
      /clusterStorage.a.exportPath/,
    );
    expect(bad({})).toThrow(/clusterStorage:/);
    const { qemuAccount: _none, ...withoutAccount } = CLUSTER;
    expect(() => parseClusterStorageConfig(withoutAccount)).toThrow(/qemuAccount: qemuAccount is required/);
    expect(bad({ ...CLUSTER, qemuAccount: { uid: 0, gid: 5 } })).toThrow(
      /qemuAccount.uid: qemuAccount.uid must not be root's/,
    );
    expect(bad({ ...CLUSTER, qemuAccount: { user: 'Root!', uid: 7, gid: 7 } })).toThrow(
      /qemuAccount.user is a user name/,
    );
    expect(bad({ ...CLUSTER, mountRoot: 'relative' })).toThrow(/mountRoot must be an absolute path/);
    expect(bad({ ...CLUSTER, mountRoot: '/a/../b' })).toThrow(/mountRoot must be normalised/);
    expect(bad({ ...CLUSTER, storeDir: '/var/lib/vsp/cluster/store' })).toThrow(
      /storeDir .* and mountRoot .* must not contain each other/,
    );
    expect(
      bad({
        clusterStorage: {
          a: { address: '10.0.0.1', exportPath: '/vsp' },
          b: { address: '10.0.0.1', exportPath: '/vsp' },
        },
      }),
    ).toThrow(/hosts a and b have the same address 10.0.0.1/);
    expect(() => planHostStorage(config(), 'z')).toThrow(
      /host "z" is not in clusterStorage \(hosts: a, b, host-c\)/,
    );
  });
});

describe('marked block of /etc/exports', () => {
  test('appends to a file without markers and replaces the block in place later', () => {
    const admin = '# admin\n/srv/data 192.168.1.0/24(ro)\n';
    const once = replaceMarkedBlock(admin, 'B\nx\nE', 'B', 'E');
    expect(once).toBe('# admin\n/srv/data 192.168.1.0/24(ro)\n\nB\nx\nE\n');
    const moreAdmin = `${once}/srv/other 10.1.0.1(rw)\n`;
    expect(replaceMarkedBlock(moreAdmin, 'B\ny\nE', 'B', 'E')).toBe(
      '# admin\n/srv/data 192.168.1.0/24(ro)\n\nB\ny\nE\n/srv/other 10.1.0.1(rw)\n',
    );
    expect(replaceMarkedBlock('', 'B\nE', 'B', 'E')).toBe('B\nE\n');
  });

  test('refuses unpaired, repeated or reversed markers', () => {
    expect(() => replaceMarkedBlock('B\nx\n', 'B\nE', 'B', 'E')).toThrow(
      /1 "B" and 0 "E" lines: fix them by hand/,
    );
    expect(() => replaceMarkedBlock('B\nE\nB\nE\n', 'B\nE', 'B', 'E')).toThrow(/2 "B" and 2 "E"/);
    expect(() => replaceMarkedBlock('E\nB\n', 'B\nE', 'B', 'E')).toThrow(/in the wrong order/);
  });
});

describe('storage command', () => {
  async function writeCluster(c: unknown): Promise<string> {
    const file = path.join(tmp, 'cluster.json');
    await fs.writeFile(file, JSON.stringify(c));
    return file;
  }

  test('writes exports and units under --root, idempotently, keeping the administrator’s exports', async () => {
    const root = path.join(tmp, 'root');
    await fs.mkdir(path.join(root, 'etc'), { recursive: true });
    const admin = '# /etc/exports: the access control list\n/srv/iso 192.168.1.0/24(ro,no_subtree_check)\n';
    await fs.writeFile(path.join(root, 'etc/exports'), admin, { mode: 0o640 });
    const file = await writeCluster(CLUSTER);
    let printed = '';
    const first = await storageCommand(
      ['node', 'applyStorage', '--host', 'b', '--config', file, '--root', root],
      (t) => {
        printed += t;
      },
    );
    expect(first.commands).toEqual([]);
    expect(first.changes.map((c) => [c.action, c.file])).toEqual([
      ['update', '/etc/exports'],
      ['create', '/etc/systemd/system/vsp.mount'],
      ['create', '/etc/systemd/system/var-lib-vsp-cluster-b.mount'],
      ['create', '/etc/systemd/system/var-lib-vsp-cluster-a.mount'],
      ['create', '/etc/systemd/system/var-lib-vsp-cluster-a.automount'],
      ['create', '/etc/systemd/system/var-lib-vsp-cluster-host\\x2dc.mount'],
      ['create', '/etc/systemd/system/var-lib-vsp-cluster-host\\x2dc.automount'],
    ]);
    expect(printed).toContain('updated      /etc/exports');
    expect(printed).toContain('mount        /var/lib/vsp/cluster/a <- 10.0.0.1:/vsp (nfs, store of a)');
    const exportsText = await fs.readFile(path.join(root, 'etc/exports'), 'utf8');
    expect(exportsText).toBe(
      `${admin}\n${EXPORTS_BEGIN}\n/vsp 10.0.0.1(${OPTS}) 10.0.0.3(${OPTS})\n${EXPORTS_END}\n`,
    );
    expect((await fs.stat(path.join(root, 'etc/exports'))).mode & 0o777).toBe(0o640);
    for (const dir of [
      'var/lib/vsp/store',
      'vsp',
      'var/lib/vsp/cluster/a',
      'var/lib/vsp/cluster/b',
      'var/lib/vsp/cluster/host-c',
    ])
      expect((await fs.stat(path.join(root, dir))).isDirectory()).toBe(true);
    // The store: not writable by QEMU's account (owner and group are set only on the real host).
    expect((await fs.stat(path.join(root, 'var/lib/vsp/store'))).mode & 0o777).toBe(0o750);
    // systemd itself accepts every unit, and its name matches its mount point (systemd refuses otherwise).
    for (const c of first.changes.filter((c) => c.file.startsWith('/etc/systemd/')))
      execFileSync('systemd-analyze', ['verify', '--man=no', path.join(root, c.file)], { stdio: 'pipe' });
    const before = await tree(root);

    const second = await storageCommand(
      ['node', 'applyStorage', '--host', 'b', '--config', file, '--root', root],
      () => {},
    );
    expect(second.changes.every((c) => c.action === 'unchanged')).toBe(true);
    expect(await tree(root)).toEqual(before);

    // host-c leaves and a moves: a's units change in place, host-c's are removed, the admin's lines stay.
    const smaller = {
      ...CLUSTER,
      clusterStorage: { a: { address: '10.0.0.9', exportPath: '/vsp' }, b: CLUSTER.clusterStorage.b },
    };
    await writeCluster(smaller);
    const third = await storageCommand(
      ['node', 'applyStorage', '--host', 'b', '--config', file, '--root', root],
      () => {},
    );
    expect(third.changes.filter((c) => c.action !== 'unchanged').map((c) => [c.action, c.file])).toEqual([
      ['update', '/etc/exports'],
      ['update', '/etc/systemd/system/var-lib-vsp-cluster-a.mount'],
      ['remove', '/etc/systemd/system/var-lib-vsp-cluster-host\\x2dc.automount'],
      ['remove', '/etc/systemd/system/var-lib-vsp-cluster-host\\x2dc.mount'],
    ]);
    const after = await tree(root);
    expect(after['etc/exports']).toBe(`${admin}\n${EXPORTS_BEGIN}\n/vsp 10.0.0.9(${OPTS})\n${EXPORTS_END}\n`);
    expect(Object.keys(after).filter((f) => f.includes('host'))).toEqual([]);
    expect(after['etc/systemd/system/var-lib-vsp-cluster-a.mount']).toContain('What=10.0.0.9:/vsp\n');
  });

  test('a dry run reports and writes nothing; units it did not write are left alone', async () => {
    const root = path.join(tmp, 'root');
    const units = path.join(root, 'etc/systemd/system');
    await fs.mkdir(units, { recursive: true });
    await fs.writeFile(path.join(units, 'srv-backup.mount'), '[Mount]\nWhat=/dev/sdb1\nWhere=/srv/backup\n');
    const file = await writeCluster(CLUSTER);
    let printed = '';
    const r = await storageCommand(
      ['node', 'applyStorage', '--host', 'a', '--config', file, '--root', root, '--dry-run'],
      (t) => {
        printed += t;
      },
    );
    expect(r.changes.map((c) => c.action)).toEqual(Array(7).fill('create'));
    expect(printed).toContain('would create /etc/exports');
    expect(Object.keys(await tree(root))).toEqual(['etc/systemd/system/srv-backup.mount']);
  });

  test('activation starts binds, re-exports, then the automounts, in that order', async () => {
    const root = path.join(tmp, 'root');
    const issued: string[] = [];
    const run: CommandRunner = (cmd, args) => {
      issued.push([cmd, ...args].join(' '));
      return Promise.resolve();
    };
    const plan = planHostStorage(config(), 'a');
    await applyStoragePlan({ plan, root, activate: true, run });
    const show = 'systemctl show --property=UnitFileState,ActiveState';
    expect(issued).toEqual([
      'systemctl daemon-reload',
      `${show} vsp.mount var-lib-vsp-cluster-a.mount`,
      'systemctl enable --now vsp.mount var-lib-vsp-cluster-a.mount',
      `${show} nfs-server.service`,
      'systemctl enable --now nfs-server.service',
      'exportfs -ra',
      `${show} var-lib-vsp-cluster-b.automount var-lib-vsp-cluster-host\\x2dc.automount`,
      'systemctl enable --now var-lib-vsp-cluster-b.automount var-lib-vsp-cluster-host\\x2dc.automount',
    ]);
    // Again, on a host where every unit runs: nothing reloads, nothing is enabled again.
    issued.length = 0;
    const running: CommandRunner = (cmd, args) => {
      issued.push([cmd, ...args].join(' '));
      const units = args.filter((a) => /\.(mount|automount|service)$/.test(a)).length;
      return Promise.resolve({ stdout: 'ActiveState=active\nUnitFileState=enabled\n\n'.repeat(units) });
    };
    await applyStoragePlan({ plan, root, activate: true, run: running });
    expect(issued).toEqual([
      `${show} vsp.mount var-lib-vsp-cluster-a.mount`,
      `${show} nfs-server.service`,
      'exportfs -ra',
      `${show} var-lib-vsp-cluster-b.automount var-lib-vsp-cluster-host\\x2dc.automount`,
    ]);
    issued.length = 0;
    const moved = config({
      clusterStorage: { ...CLUSTER.clusterStorage, b: { address: '10.0.0.8', exportPath: '/vsp' } },
    });
    const withoutC = parseClusterStorageConfig({
      ...CLUSTER,
      clusterStorage: { a: moved.clusterStorage.a, b: moved.clusterStorage.b },
    });
    await applyStoragePlan({ plan: planHostStorage(withoutC, 'a'), root, activate: true, run });
    expect(issued).toEqual([
      'systemctl disable --now var-lib-vsp-cluster-host\\x2dc.automount',
      'systemctl disable --now var-lib-vsp-cluster-host\\x2dc.mount',
      'systemctl daemon-reload',
      `${show} vsp.mount var-lib-vsp-cluster-a.mount`,
      'systemctl enable --now vsp.mount var-lib-vsp-cluster-a.mount',
      'systemctl try-restart var-lib-vsp-cluster-b.mount',
      `${show} nfs-server.service`,
      'systemctl enable --now nfs-server.service',
      'exportfs -ra',
      `${show} var-lib-vsp-cluster-b.automount`,
      'systemctl enable --now var-lib-vsp-cluster-b.automount',
    ]);
  });

  test('clear errors: not root, NFS packages missing, unreadable or bad cluster file, broken markers', async () => {
    const empty = path.join(tmp, 'empty-bin');
    await fs.mkdir(empty);
    await expect(checkCanActivate(1000, empty)).rejects.toThrow(/must run as root/);
    // /usr/sbin is always searched: only a machine without the packages reports them missing.
    const hasExportfs = await fs.access('/usr/sbin/exportfs').then(
      () => true,
      () => false,
    );
    if (!hasExportfs)
      await expect(checkCanActivate(0, empty)).rejects.toThrow(/apt-get install nfs-kernel-server/);
    // QEMU's account must carry the cluster's numbers on every host.
    const ids = (uid: string, gid: string) => (flag: string) => Promise.resolve(flag === '-u' ? uid : gid);
    await expect(checkQemuAccount(CLUSTER.qemuAccount, ids('64090', '64091'))).resolves.toBeUndefined();
    await expect(checkQemuAccount(CLUSTER.qemuAccount, ids('999', '64091'))).rejects.toThrow(
      "QEMU's account vsp-qemu is 999:64091 here, but the cluster file says 64090:64091",
    );
    await expect(
      checkQemuAccount(CLUSTER.qemuAccount, () => Promise.reject(new Error('id: no such user'))),
    ).rejects.toThrow(/does not exist here: run deploy\/setup.sh with VSP_QEMU_UID=64090 VSP_QEMU_GID=64091/);

    const run = (args: string[]) => storageCommand(['node', 'applyStorage', ...args], () => {});
    await expect(run(['--host', 'a', '--config', path.join(tmp, 'none.json'), '--dry-run'])).rejects.toThrow(
      /cannot read the cluster file .*none.json/,
    );
    const file = await writeCluster({
      ...CLUSTER,
      clusterStorage: { a: { address: 'x', exportPath: '/vsp' } },
    });
    await expect(run(['--host', 'a', '--config', file, '--dry-run'])).rejects.toThrow(
      /invalid cluster file .*cluster.json: clusterStorage.a.address/,
    );
    await writeCluster(CLUSTER);
    await expect(run(['--host', 'a', '--config', file, '--root', path.join(tmp, 'nope')])).rejects.toThrow(
      /--root .*nope is not an existing folder/,
    );
    await expect(run(['--config', file])).rejects.toThrow(/required option '--host <name>' not specified/);
    const root = path.join(tmp, 'root');
    await fs.mkdir(path.join(root, 'etc'), { recursive: true });
    await fs.writeFile(path.join(root, 'etc/exports'), `${EXPORTS_BEGIN}\n/vsp 10.0.0.2(rw)\n`);
    await expect(run(['--host', 'a', '--config', file, '--root', root])).rejects.toThrow(/fix them by hand/);
    expect(await fs.readFile(path.join(root, 'etc/exports'), 'utf8')).toBe(
      `${EXPORTS_BEGIN}\n/vsp 10.0.0.2(rw)\n`,
    );
  });
});

describe("a host's check of the other hosts' stores", () => {
  test('through the kernel mounts: a mounted store answers; a missing one is named with its mount', async () => {
    const root = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-mounts-'));
    try {
      await fs.mkdir(path.join(root, 'b'));
      const endpoints = {
        a: { address: '10.0.0.1', exportPath: '/vsp' },
        b: { address: '10.0.0.2', exportPath: '/vsp' },
        c: { address: '10.0.0.3', exportPath: '/vsp' },
      };
      await expect(
        checkClusterExports('a', { a: endpoints.a, b: endpoints.b }, { libnfs: false, mountRoot: root }),
      ).resolves.toBeUndefined();
      await expect(checkClusterExports('a', endpoints, { libnfs: false, mountRoot: root })).rejects.toThrow(
        `host a cannot reach: the store of host c, mounted at ${root}/c, is unreachable`,
      );
    } finally {
      await fs.rm(root, { recursive: true, force: true });
    }
  });
});
