import { parseInventory } from '../../deploy/cluster/inventory';
import { inventoryOf } from '../../deploy/vmcluster/cluster';
import { clusterConfig, gatewayMac } from '../../deploy/vmcluster/config';
import { qemuArgs } from '../../deploy/vmcluster/dom0';

const keys = {
  dir: '/var/lib/vsp/vmcluster/keys',
  identityFile: '/var/lib/vsp/vmcluster/keys/id_ed25519',
  hostKeys: {
    a: 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICSevDRJxxN4LUxPNw0q+XftH/RjbI0TeS5Ny/Y9/Zdp',
    b: 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKE0HcUyLkbonaRxVqKZ5wfqHdGkJxiGkJOzEaHUNwzL',
    c: 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOK7gZx5uLq1dJc6sP5QyQvU9r0fQG7cZ5zJ0eYc3vQm',
  },
};
const image = {
  hash: '0123456789abcdef',
  dir: '/cache/images/0123456789abcdef',
  disk: '/cache/images/0123456789abcdef/dom0.qcow2',
  xen: '/cache/images/0123456789abcdef/boot/xen',
  kernel: '/cache/images/0123456789abcdef/boot/vmlinuz',
  initrd: '/cache/images/0123456789abcdef/boot/initrd.img',
};

describe('virtual cluster configuration', () => {
  test('names and addresses follow the prefix and subnet; the gateway is .254', () => {
    const c = clusterConfig({ hosts: 3, prefix: 'vspxen', subnet: '10.77.30', stateRoot: '/state' });
    expect(c).toMatchObject({
      netns: 'vspxen',
      bridge: 'vspxen-br',
      hostVeth: 'vspxen-h',
      gateway: '10.77.30.254',
    });
    expect(c.hosts.map((h) => [h.name, h.address, h.tap, h.mac])).toEqual([
      ['a', '10.77.30.1', 'vspxen-t1', '52:54:00:4d:1e:01'],
      ['b', '10.77.30.2', 'vspxen-t2', '52:54:00:4d:1e:02'],
      ['c', '10.77.30.3', 'vspxen-t3', '52:54:00:4d:1e:03'],
    ]);
    expect(gatewayMac(c)).toBe('52:54:00:4d:1e:fe');
    expect(c.stateDir).toBe('/state/vspxen');
  });

  test('bad options are refused before anything runs, each named', () => {
    expect(() => clusterConfig({ hosts: 4, prefix: 'Bad-Prefix', subnet: '10.77.300', smp: 0 })).toThrow(
      /hosts must be 1 to 3.*prefix "Bad-Prefix".*subnet "10.77.300".*smp must be 1 to 8/,
    );
    expect(() => clusterConfig({ memMiB: 1024, dom0MemMiB: 1024 })).toThrow(/dom0MemMiB/);
  });

  test("the inventory vm-cluster writes is valid for `vsp cluster deploy`'s schema", () => {
    const inv = parseInventory(inventoryOf(clusterConfig(), keys));
    expect(inv.hosts.map((h) => [h.name, h.address, h.hostKey])).toEqual([
      ['a', '10.77.30.1', keys.hostKeys.a],
      ['b', '10.77.30.2', keys.hostKeys.b],
    ]);
    expect(inv.ssh).toMatchObject({ user: 'root', identityFile: keys.identityFile });
  });

  test("a dom0's command line has HAP, its identity, and no comma inside the multiboot module line", () => {
    const c = clusterConfig();
    const args = qemuArgs(c, c.hosts[1], image);
    expect(args[args.indexOf('-cpu') + 1]).toBe('qemu64,+npt');
    const modules = args[args.indexOf('-initrd') + 1].split(',');
    expect(modules).toHaveLength(2);
    expect(modules[0]).toContain(
      'systemd.hostname=b vsp.ip=10.77.30.2/24 vsp.peers=a=10.77.30.1+b=10.77.30.2',
    );
    expect(modules[1]).toBe(image.initrd);
  });
});
