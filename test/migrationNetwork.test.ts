import { promises as fs } from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { HOST_BRIDGE, type TestNetwork } from '../deploy/devcluster/netns';
import { buildQemuArgs } from '../drivers/qemu/commandLine';
import { QemuDriver } from '../drivers/qemu/qemuDriver';
import { runCommand } from '../drivers/qemu/runCommand';
import { vmNicOf, type VmNetworkOptions } from '../drivers/qemu/vmNetwork';
import type { VmConfig, VmHandle } from '../drivers/types';
import { DiskImageStaging } from '../storage/diskImageStaging';
import type { VmStore } from '../storage/vmStore';
import { startNfsTestHosts, type NfsTestHosts } from '../deploy/devcluster/nfsTestHosts';

/**
 * A VM's HTTP service on the cluster's VM network stays reachable, at the same address, while the VM
 * migrates between two test hosts (network namespaces bridged into one L2 segment). Real QEMU; needs root.
 */
const HOSTS = ['a', 'b'] as const;
type Host = (typeof HOSTS)[number];
const SUBNET = '10.77.11';
const PORT = 8080;
/** The acceptance bar: at least 10 requests per second, each given 3 s. */
const POLL_INTERVAL_MS = 50;
const REQUEST_TIMEOUT_MS = 3000;
const VM_NETWORK: VmNetworkOptions = { bridge: HOST_BRIDGE, subnet: SUBNET };

describe('VM network: buildQemuArgs and NIC identity (pure)', () => {
  const launch = {
    vmId: 'vm-1',
    accel: 'tcg' as const,
    memoryMiB: 128,
    vcpus: 1,
    vmlinuz: '/k',
    initrd: '/i',
    rootDisk: '/r.qcow2',
    dataDisk: '/d.img',
    qmpSocket: '/q.sock',
    consoleLog: '/c.log',
    pidFile: '/p.pid',
    owner: 'alice',
    portForwards: {},
  };

  test('a NIC gives a tap netdev with its MAC and vsp.ip, and no user-mode network', () => {
    const nic = vmNicOf('vm-1', VM_NETWORK);
    const args = buildQemuArgs({ ...launch, nic }).join(' ');
    expect(args).toContain(`-netdev tap,id=net0,ifname=${nic.tap},script=no,downscript=no`);
    expect(args).toContain(`-device virtio-net-pci,netdev=net0,mac=${nic.mac}`);
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

interface Poll {
  at: number;
  ok: boolean;
  ms: number;
  error?: string;
}

/** One GET on a fresh connection, within REQUEST_TIMEOUT_MS. */
function get(url: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const req = http.get(url, { agent: false, timeout: REQUEST_TIMEOUT_MS }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (c: string) => (body += c));
      res.on('end', () =>
        res.statusCode === 200 ? resolve(body) : reject(new Error(`HTTP ${res.statusCode}`)),
      );
      res.on('error', reject);
    });
    req.on('timeout', () => req.destroy(new Error(`no answer in ${REQUEST_TIMEOUT_MS} ms`)));
    req.on('error', reject);
  });
}

/** Polls `url` every POLL_INTERVAL_MS (one request at a time) until stopped. */
function startPolling(url: string): { stop: () => Promise<Poll[]> } {
  const polls: Poll[] = [];
  let running = true;
  const loop = (async () => {
    while (running) {
      const at = Date.now();
      try {
        await get(url);
        polls.push({ at, ok: true, ms: Date.now() - at });
      } catch (err) {
        polls.push({ at, ok: false, ms: Date.now() - at, error: String(err) });
      }
      await new Promise((r) => setTimeout(r, Math.max(0, POLL_INTERVAL_MS - (Date.now() - at))));
    }
  })();
  return {
    stop: async () => {
      running = false;
      await loop;
      return polls;
    },
  };
}

async function linkExists(netns: string, link: string): Promise<boolean> {
  const { stdout } = await runCommand('ip', ['netns', 'exec', netns, 'ip', '-o', 'link', 'show'], {
    timeoutMs: 15_000,
  });
  return stdout.split('\n').some((l) => l.split(': ')[1]?.split('@')[0] === link);
}

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
    const bootDeadline = Date.now() + 120_000;
    for (;;) {
      const body = await get(url).catch(() => undefined);
      if (body !== undefined) {
        expect(body).toBe(`hello from ${vmId}\n`);
        break;
      }
      if (Date.now() > bootDeadline) throw new Error(`the VM's service never answered at ${url}`);
      await new Promise((r) => setTimeout(r, 500));
    }

    const poller = startPolling(url);
    await new Promise((r) => setTimeout(r, 2000));
    const source = await drivers.a.describeForMigration(handle);
    const incoming = await drivers.b.prepareIncoming(source);
    const migrationStart = Date.now();
    const result = await drivers.a.migrate(handle, incoming, { downtimeLimitMs: 300 });
    const moved = await drivers.b.finishIncoming(incoming);
    started.push({ host: 'b', handle: moved });
    const migrationEnd = Date.now();
    await new Promise((r) => setTimeout(r, 3000));
    const polls = await poller.stop();

    const failed = polls.filter((p) => !p.ok);
    const ok = polls.filter((p) => p.ok);
    const spanSec = (polls[polls.length - 1].at - polls[0].at) / 1000;
    let maxGapMs = 0;
    for (let i = 1; i < ok.length; i++)
      maxGapMs = Math.max(maxGapMs, ok[i].at + ok[i].ms - (ok[i - 1].at + ok[i - 1].ms));
    const slowest = Math.max(...ok.map((p) => p.ms));
    console.log(
      `VM network migration: requests=${polls.length} failed=${failed.length} rate=${(polls.length / spanSec).toFixed(1)}/s ` +
        `maxGapBetweenAnswers=${maxGapMs}ms slowestRequest=${slowest}ms migrationWall=${migrationEnd - migrationStart}ms ` +
        `qemuDowntime=${result.downtimeMs}ms total=${result.totalTimeMs}ms`,
    );
    expect(failed).toEqual([]);
    expect(polls.length / spanSec).toBeGreaterThanOrEqual(10);
    expect(polls.some((p) => p.at > migrationEnd)).toBe(true);

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
