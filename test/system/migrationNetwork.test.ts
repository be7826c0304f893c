import { promises as fs } from 'node:fs';
import path from 'node:path';
import { HOST_BRIDGE, type TestNetwork } from '../../deploy/devcluster/netns';
import { buildQemuArgs } from '../../drivers/qemu/commandLine';
import { QemuDriver } from '../../drivers/qemu/qemuDriver';
import { vmNicOf, type VmNetworkOptions } from '../../drivers/qemu/vmNetwork';
import type { VmConfig, VmHandle } from '../../drivers/types';
import { DiskImageStaging } from '../../storage/diskImageStaging';
import type { VmStore } from '../../storage/vmStore';
import { startNfsTestHosts, type NfsTestHosts } from '../../deploy/devcluster/nfsTestHosts';
import { awaitAnswer, get, startPolling, summarizePolls } from '../support/httpPoller';
import { SAMPLE_LAUNCH } from '../support/qemuLaunch';
import { linkExists } from '../support/vmProcesses';

/**
 * A VM's HTTP service on the cluster's VM network stays reachable, at the same address, while the VM
 * migrates between two test hosts (network namespaces bridged into one L2 segment). Real QEMU; needs root.
 */
const HOSTS = ['a', 'b'] as const;
type Host = (typeof HOSTS)[number];
const SUBNET = '10.77.11';
const PORT = 8080;
const VM_NETWORK: VmNetworkOptions = { bridge: HOST_BRIDGE, subnet: SUBNET };

describe('VM network: buildQemuArgs and NIC identity (pure)', () => {
  const launch = SAMPLE_LAUNCH;

  test('a NIC gives a tap netdev with its MAC and vsp.ip, and no user-mode network', () => {
    const nic = vmNicOf('vm-1', VM_NETWORK);
    const args = buildQemuArgs({ ...launch, nic }).join(' ');
    expect(args).toContain(`-netdev tap,id=net0,ifname=${nic.tap},script=no,downscript=no`);
    expect(args).toContain(`-device virtio-net-device,netdev=net0,mac=${nic.mac}`);
    expect(args).toContain(`vsp.ip=${nic.address}`);
    expect(args).not.toMatch(/vsp\.net=1|user,id=net0/);
  });

  test('the NIC is stable per VM id, valid, and differs between VMs', () => {
    const nic = vmNicOf('vm-1', VM_NETWORK);
    expect(vmNicOf('vm-1', VM_NETWORK)).toEqual(nic);
    expect(nic.tap.length).toBeLessThanOrEqual(15);
    expect(nic.mac).toMatch(/^52:54:00(:[0-9a-f]{2}){3}$/);
    const host = Number(/^10\.77\.11\.(\d+)\/24$/.exec(nic.address)?.[1]);
    expect(host).toBeGreaterThanOrEqual(100);
    expect(host).toBeLessThanOrEqual(249);
    const other = vmNicOf('vm-2', VM_NETWORK);
    expect(other.tap).not.toBe(nic.tap);
    expect(other.mac).not.toBe(nic.mac);
  });

  test('a bad network option is a clear error', () => {
    expect(() => new QemuDriver({ vmNetwork: { bridge: 'br0', subnet: '10.77' } } as never)).toThrow(
      'invalid VM network: subnet "10.77" must be three octets like 10.77.0',
    );
  });
});

describe('VM network follows live migration (real QEMU, namespace hosts)', () => {
  let hosts: NfsTestHosts<Host> | undefined;
  let network: TestNetwork;
  let stores: Record<Host, VmStore>;
  let drivers: Record<Host, QemuDriver>;
  let baseImage: string;
  let started: { host: Host; handle: VmHandle }[];

  beforeAll(async () => {
    hosts = await startNfsTestHosts({
      hosts: HOSTS,
      prefix: 'vspnet-',
      subnet: SUBNET,
      vmNetwork: VM_NETWORK,
    });
    ({ network, stores, drivers, baseImage, started } = hosts);
  });

  afterAll(async () => {
    await hosts?.stop();
  });

  test('an HTTP service polled every 50 ms (>= 10 req/s, 3 s timeout) loses no request across a -> b', async () => {
    const vmId = 'vm-web';
    const paths = stores.a.paths(vmId);
    await fs.mkdir(paths.inputsDir, { recursive: true });
    await fs.writeFile(path.join(paths.inputsDir, 'index.html'), `hello from ${vmId}\n`);
    await new DiskImageStaging().build(paths, 4 * 1024 * 1024);
    const config: VmConfig = {
      vmId,
      owner: 'alice',
      command: `exec busybox httpd -f -p ${PORT} -h .`,
      vcpus: 1,
      memoryMiB: 128,
      baseImage,
      ports: [PORT],
      timeLimitSec: 600,
    };
    const handle = await drivers.a.start(await drivers.a.create(config));
    started.push({ host: 'a', handle });
    const nic = vmNicOf(vmId, VM_NETWORK);
    expect(handle.state).toMatchObject({ nicTap: nic.tap, nicMac: nic.mac, nicAddress: nic.address });
    expect(await linkExists(network.hosts.a.netns, nic.tap)).toBe(true);
    const url = `http://${nic.address.split('/')[0]}:${PORT}/index.html`;

    // Reached from the root namespace (the segment's gateway), not through any host port forward.
    expect(await awaitAnswer(url, 120_000)).toBe(`hello from ${vmId}\n`);

    const poller = startPolling(url);
    // Windows before and after the move are counted in requests (about 2 s and 3 s at 20 per second).
    await poller.answers(40);
    const source = await drivers.a.describeForMigration(handle);
    const incoming = await drivers.b.prepareIncoming(source);
    const migrationStart = Date.now();
    const result = await drivers.a.migrate(handle, incoming, { downtimeLimitMs: 300 });
    const moved = await drivers.b.finishIncoming(incoming);
    started.push({ host: 'b', handle: moved });
    const migrationEnd = Date.now();
    await poller.answers(60);
    const polls = await poller.stop();

    const { requests, failed, perSecond, maxGapMs, slowestMs } = summarizePolls(polls);
    console.log(
      `VM network migration: requests=${requests} failed=${failed.length} rate=${perSecond.toFixed(1)}/s ` +
        `maxGapBetweenAnswers=${maxGapMs}ms slowestRequest=${slowestMs}ms migrationWall=${migrationEnd - migrationStart}ms ` +
        `qemuDowntime=${result.downtimeMs}ms total=${result.totalTimeMs}ms`,
    );
    expect(failed).toEqual([]);
    expect(perSecond).toBeGreaterThanOrEqual(10);
    expect(polls.some((p) => p.sentAt > migrationEnd)).toBe(true);

    // Same NIC and address on b; the source QEMU and its tap are gone, so b answered the last requests.
    expect(moved).toMatchObject({ host: 'b' });
    expect(moved.state).toMatchObject({ nicTap: nic.tap, nicMac: nic.mac, nicAddress: nic.address });
    expect(await linkExists(network.hosts.b.netns, nic.tap)).toBe(true);
    expect(await linkExists(network.hosts.a.netns, nic.tap)).toBe(false);
    expect((await drivers.b.inspect(moved)).details.qmpStatus).toBe('running');
    expect(await get(url)).toBe(`hello from ${vmId}\n`);

    await drivers.b.destroy(moved);
    expect(await linkExists(network.hosts.b.netns, nic.tap)).toBe(false);
  });
});
