import { promises as fs } from 'node:fs';
import path from 'node:path';
import { WorkflowFailedError } from '@temporalio/client';
import { HOST_BRIDGE } from '../../deploy/devcluster/netns';
import { vmNicOf } from '../../drivers/qemu/vmNetwork';
import type { TaskSpecInput } from '../../spec/taskSpec';
import { until } from '../support/clusterFixture';
import { awaitAnswer, get, startPolling, summarizePolls } from '../support/httpPoller';
import { startNamespaceCluster, type NamespaceCluster } from '../support/namespaceCluster';
import { findVmId } from '../support/vmFolders';
import { linkExists, qemuHostsOf } from '../support/vmProcesses';

/**
 * A service task's VM keeps answering, at the same address, while the TaskLifecycle workflow migrates it
 * between two namespace test hosts whose workers have the VM network in their configuration
 * (VSP_VM_NETWORK, set by LocalCluster). Real Temporal, real QEMU under TCG; needs root.
 */
const HOSTS = ['a', 'b'];
const OWNER = 'alice';
const PORT = 8080;
const SUBNET = '10.77.14';

let ns: NamespaceCluster;

beforeAll(async () => {
  ns = await startNamespaceCluster({ hosts: HOSTS, prefix: 'vspsvc-', subnet: SUBNET, owners: [OWNER] });
}, 240_000);

afterAll(async () => {
  await ns?.stop();
}, 120_000);

test('an HTTP service polled at >= 10 req/s (3 s timeout) loses no request across a workflow migration', async () => {
  const { vsp, cluster, network } = ns;
  expect(cluster.vmNetwork).toEqual({ bridge: HOST_BRIDGE, subnet: SUBNET });
  const spec: TaskSpecInput = {
    owner: OWNER,
    driver: 'qemu',
    host: 'a',
    memoryMiB: 128,
    ports: [PORT],
    command: `echo hello-service > index.html && exec busybox httpd -f -p ${PORT} -h .`,
  };
  const { taskId } = await cluster.submitTask(OWNER, spec);
  const running = await until(
    'the service task running with an address',
    async () => {
      const s = await vsp.status(taskId);
      return s.phase === 'running' && s.address ? s : undefined;
    },
    180_000,
  );
  const vmId = await findVmId(
    HOSTS.map((h) => cluster.storeDir(h)),
    taskId,
  );
  const nic = vmNicOf(vmId, { bridge: HOST_BRIDGE, subnet: SUBNET });
  // The hashed address (nothing else holds one on this fresh segment), on the VM network's /24.
  expect(running).toMatchObject({ host: 'a', address: nic.address.split('/')[0] });
  expect(await linkExists(network.hosts.a.netns, nic.tap)).toBe(true);
  const url = `http://${running.address}:${PORT}/index.html`;
  // Polled from the root namespace (the segment's gateway): no host port forward is involved.
  expect(await awaitAnswer(url, 180_000)).toBe('hello-service\n');

  const poller = startPolling(url);
  // Windows before and after the move are counted in requests (about 2 s and 4 s at 20 per second).
  await poller.answers(40);
  const migrationStart = Date.now();
  const moved = await vsp.migrate(taskId, { host: 'b' });
  const migrationEnd = Date.now();
  await poller.answers(80);
  const polls = await poller.stop();

  const { requests, failed, perSecond, maxGapMs, slowestMs } = summarizePolls(polls);
  const m = moved.migrations?.at(-1);
  process.stderr.write(
    `service migration through the workflow: requests=${requests} failed=${failed.length} ` +
      `rate=${perSecond.toFixed(1)}/s maxGapBetweenAnswers=${maxGapMs}ms slowestRequest=${slowestMs}ms ` +
      `updateWall=${migrationEnd - migrationStart}ms qemuDowntime=${m?.downtimeMs}ms total=${m?.totalTimeMs}ms\n`,
  );
  expect(failed).toEqual([]);
  expect(perSecond).toBeGreaterThanOrEqual(10);
  expect(polls.some((p) => p.sentAt > migrationEnd)).toBe(true);
  expect(moved).toMatchObject({ phase: 'running', host: 'b', storageHost: 'a', address: running.address });
  expect(m).toMatchObject({ from: 'a', to: 'b', ok: true, diskTransferredBytes: 0 });
  expect(await qemuHostsOf(vmId, storeDirs())).toEqual(['b']);
  expect(await linkExists(network.hosts.b.netns, nic.tap)).toBe(true);
  expect(await linkExists(network.hosts.a.netns, nic.tap)).toBe(false);
  expect(await get(url)).toBe('hello-service\n');

  // A service runs until cancelled; cancelling stops the VM on b and removes its folder on a.
  await vsp.cancel(taskId, 'test done');
  await expect(vsp.result(taskId)).rejects.toBeInstanceOf(WorkflowFailedError);
  expect(await vsp.status(taskId)).toMatchObject({ phase: 'cancelled', host: 'b' });
  expect(await qemuHostsOf(vmId, storeDirs())).toEqual([]);
  for (const h of HOSTS) {
    expect(await linkExists(network.hosts[h].netns, nic.tap)).toBe(false);
    expect(await fs.readdir(path.join(cluster.storeDir(h), 'vms')).catch(() => [])).toEqual([]);
  }
  await expect(get(url)).rejects.toThrow();
}, 420_000);

function storeDirs(): Record<string, string> {
  return Object.fromEntries(HOSTS.map((h) => [h, ns.cluster.storeDir(h)]));
}
