import { spawn } from 'node:child_process';
import path from 'node:path';
import { Client, Connection } from '@temporalio/client';
import { TaskClient } from '../client/taskClient';
import { VspClient } from '../client/vspClient';
import { SshSession, RemoteCommandError } from '../deploy/cluster/sshSession';
import { ownerTokenIn } from '../deploy/devcluster/localCluster';
import { requireRoot } from '../deploy/devcluster/netns';
import { startNfsTestHosts } from '../deploy/devcluster/nfsTestHosts';
import { repoRoot } from '../deploy/devcluster/tools';
import { clusterDown, clusterUp } from '../deploy/vmcluster/cluster';
import { clusterConfig } from '../deploy/vmcluster/config';
import { startClusterServices, type ClusterServices } from '../deploy/vmcluster/services';
import { sshTargets } from '../deploy/vmcluster/ssh';
import { renderDomainConfig } from '../drivers/xen/domainConfig';
import { LoopDisks } from '../drivers/xen/loopDisks';
import { GUEST_DIED } from '../drivers/xen/xenMigration';
import type { MigrationResult, VmHandle } from '../drivers/types';
import { createLogger, describeError } from '../logging/logger';
import { DiskImageStaging } from '../storage/diskImageStaging';
import type { MigrationRecord, TaskResult } from '../workflows/definitions';
import { median, round } from './orchestration';
import { guestCommand, guestSeconds, untilLine } from './paperEvaluation';
import type { BenchReport } from './report';

/**
 * VSP on real Xen hosts (the virtual cluster of deploy/vmcluster/, deployed with `vsp cluster deploy`):
 * a task's create-to-first-output through the whole stack against the recipe's raw `xl create` of the same
 * appliance on the same dom0; `xl migrate` a -> b -> a of a running task (total time, downtime, memory
 * sent, disk bytes) against QEMU's migration of a guest of the same size on namespace hosts; and the
 * paper's Table 2 (file copy and CPU task, local against kernel-NFS disk) in PVH guests on the dom0s.
 * Root; brings the cluster up (warm snapshots when cached) and leaves it as it found it.
 */

export interface XenBenchOptions {
  workDir: string;
  quick?: boolean;
}

const log = createLogger('bench.xen');
const OWNER = 'bench';
const MEMORY_MIB = 192;
const STORE = '/var/lib/vsp/store';
const MOUNTS = '/var/lib/vsp/cluster';
const FIRST = 'VSP-PROGRESS 1 first';
const STEP_MS = 15 * 60_000;
/** The paper's Table 2 (seconds): file copy and mencoder, local and remote (NFS) disk, on its hosts A and B. */
const PAPER_TABLE2 = { copy: { local: 4.1, remote: 11.4 }, cpu: { local: 583, remote: 584 } };

type Ssh = (host: string, command: string, timeoutMs?: number) => Promise<string>;

function vspCli(args: string[]): Promise<{ code: number | null; out: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [path.join(repoRoot(), 'dist', 'cli', 'vsp.js'), ...args], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let out = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString()));
    child.stderr.on('data', (d: Buffer) => (out += d.toString()));
    child.once('error', reject);
    child.once('close', (code) => resolve({ code, out }));
  });
}

/**
 * The raw guest of the recipe: the appliance's kernel and disks in a's store, a domain config, `xl create`
 * by hand. The disks are prepared on a (a raw root, a data disk with the command and an optional input)
 * and attached to loop devices on `host` through its mount of a's store (local on a, kernel NFS on b),
 * before any timing: the domain config names them by links and the VSP worker's hotplug script.
 */
async function rawGuest(
  ssh: Ssh,
  o: { host: string; name: string; command: string; dataMiB: number; bigFileMiB?: number },
): Promise<string> {
  const appliance = (await ssh('a', 'ls -d /var/lib/vsp/appliance/*/ | head -1')).trim();
  if (!appliance) throw new Error('no appliance on a: was the cluster deployed?');
  const dir = `${STORE}/bench/${o.name}`;
  const tree = `${dir}/tree`;
  await ssh(
    'a',
    [
      'set -e',
      `rm -rf ${dir} && mkdir -p ${tree}/.vsp`,
      // The command goes onto the data disk where the VSP driver puts it.
      `cat > ${tree}/.vsp/command <<'EOF'\n${o.command}\nEOF`,
      `qemu-img convert -q -O raw ${appliance}root.qcow2 ${dir}/root.img`,
      ...(o.bigFileMiB ? [`head -c ${o.bigFileMiB}M /dev/urandom > ${tree}/big.bin`] : []),
      `mke2fs -q -t ext4 -d ${tree} ${dir}/data.img ${o.dataMiB}M`,
      `rm -rf ${tree}`,
      // A peer's root is squashed to this account on the export: its loop devices open the files as it.
      `chown vsp-qemu:vsp-qemu ${dir}/root.img ${dir}/data.img`,
    ].join('\n'),
  );
  const links = `/run/vsp/bench/${o.name}`;
  await ssh(
    o.host,
    `set -e; mkdir -p ${links}; for d in root data; do ` +
      `ln -sfn $(losetup --find --show --direct-io=on ${MOUNTS}/a/bench/${o.name}/$d.img) ${links}/$d; done`,
  );
  return renderDomainConfig({
    name: o.name,
    type: 'pvh',
    memoryMiB: MEMORY_MIB,
    vcpus: 1,
    kernel: `${appliance}vmlinuz`,
    ramdisk: `${appliance}initrd.cpio`,
    owner: OWNER,
    rootDisk: `${links}/root`,
    dataDisk: `${links}/data`,
    hotplugScript: new LoopDisks().script,
  });
}

/** Detaches the raw guest's loop devices on `host` and removes its disks from a's store. */
async function dropRawGuest(ssh: Ssh, host: string, name: string): Promise<void> {
  const links = `/run/vsp/bench/${name}`;
  await ssh(host, `for d in root data; do losetup -d $(readlink ${links}/$d) || true; done; rm -rf ${links}`);
  await ssh('a', `rm -rf ${STORE}/bench/${name}`);
}

/**
 * Runs `cfg` on `host` with `xl create`; returns ms from the command to `line` in the guest's console. A
 * boot that dies first (kept, shut down: see drivers/xen/domainConfig.ts) is no sample: it is destroyed
 * and the guest created again, as the driver does.
 */
async function xlCreateUntil(
  ssh: Ssh,
  host: string,
  name: string,
  cfg: string,
  line: string,
): Promise<number> {
  const file = `/run/vsp-bench-${name}.cfg`;
  const consoleLog = `/var/log/xen/console/guest-${name}.log`;
  await ssh(host, `cat > ${file} <<'EOF'\n${cfg}EOF`);
  for (let boot = 1; ; boot++) {
    const out = await ssh(
      host,
      `rm -f ${consoleLog}; s=$(date +%s%N); xl create ${file} >/dev/null || exit 1; i=0; ` +
        `until grep -qs '${line}' ${consoleLog}; do sleep 0.05; i=$((i+1)); ` +
        // Once a second (xl list costs the dom0 CPU the boot needs): has the guest died on the way?
        `if [ $((i % 20)) = 0 ] && xl list ${name} | awk 'NR == 2 { print $5 }' | grep -q s; then echo died; exit 0; fi; ` +
        `done; e=$(date +%s%N); echo $(( (e - s) / 1000000 ))`,
      STEP_MS,
    );
    if (out.trim() !== 'died') return Number(out.trim());
    if (boot >= 3) throw new Error(`${name} died before '${line}' in ${boot} boots on ${host}`);
    log.warn({ host, name, boot }, 'raw guest died before its first line: booting it again');
    await ssh(host, `xl destroy ${name}`);
  }
}

/** Waits until the domain `name` is gone from `host`; returns its console. */
async function awaitEnd(ssh: Ssh, host: string, name: string): Promise<string> {
  await ssh(host, `while xl domid ${name} >/dev/null 2>&1; do sleep 0.5; done`, STEP_MS);
  return (await ssh(host, `cat /var/log/xen/console/guest-${name}.log`)).replace(/\r/g, '');
}

const TOUR_ATTEMPTS = 4;

/**
 * One running task moved a -> b -> a with `vsp migrate`. Nested virtualisation here often crashes the guest
 * as a live migration starts (README, cluster tier): its task then fails, and the tour starts again with a
 * new task, up to TOUR_ATTEMPTS; the crashes are counted and reported, never taken as samples.
 */
async function migrationTour(
  ssh: Ssh,
  tasks: TaskClient,
  vsp: VspClient,
): Promise<{ migrations: MigrationRecord[]; attempts: number; crashes: string[] }> {
  const crashes: string[] = [];
  for (let attempt = 1; attempt <= TOUR_ATTEMPTS; attempt++) {
    const { taskId } = await tasks.submit({
      owner: OWNER,
      driver: 'xen',
      host: 'a',
      memoryMiB: MEMORY_MIB,
      timeLimitSec: 3600,
      // Released by `xl shutdown` (the guest TERMs the task): it ends with status 0.
      command:
        'i=0; stop=; trap "stop=1" TERM; ' +
        'while [ -z "$stop" ]; do i=$((i+1)); echo "VSP-PROGRESS 1 round $i"; sleep 1; done; exit 0',
    });
    await ssh(
      'a',
      `until grep -qs 'round 2' ${STORE}/vms/${taskId}-*/console.log; do sleep 0.2; done`,
      STEP_MS,
    );
    try {
      await vsp.migrate(taskId, { host: 'b' });
      await vsp.migrate(taskId, { host: 'a' });
    } catch (err) {
      const why = describeError(err);
      if (!why.includes(GUEST_DIED)) throw err;
      crashes.push(why.slice(0, 300));
      log.warn({ taskId, attempt, why }, 'the guest died during its migration: a new task tries again');
      await vsp.result(taskId).catch(() => undefined);
      continue;
    }
    const migrations: MigrationRecord[] = (await vsp.status(taskId)).migrations ?? [];
    const vmId = (await ssh('a', `ls ${STORE}/vms | grep '^${taskId}-'`)).trim();
    await ssh('a', `xl shutdown vsp-${vmId}`);
    const result = await vsp.result(taskId);
    if (result.exitCode !== 0) throw new Error(`task ${taskId} exited ${result.exitCode} after its tour`);
    return { migrations, attempts: attempt, crashes };
  }
  throw new Error(`every one of ${TOUR_ATTEMPTS} tours crashed its guest: ${crashes.join(' | ')}`);
}

/** QEMU (TCG) live migration of a running guest of the same size, on namespace hosts with nfs-ganesha. */
async function qemuMigration(workDir: string): Promise<MigrationResult> {
  const hosts = await startNfsTestHosts({
    hosts: ['a', 'b'] as const,
    prefix: 'vspxb-',
    subnet: '10.77.36',
    accel: 'tcg',
    parentDir: workDir,
  });
  try {
    const paths = hosts.stores.a.paths('xen-cmp');
    await new DiskImageStaging().build(paths, 16 * 1024 * 1024);
    const { a, b } = hosts.drivers;
    const vm: VmHandle = await a.start(
      await a.create({
        vmId: 'xen-cmp',
        owner: OWNER,
        command: 'i=0; while true; do i=$((i+1)); echo "VSP-PROGRESS 1 round $i"; sleep 1; done',
        vcpus: 1,
        memoryMiB: MEMORY_MIB,
        baseImage: hosts.baseImage,
        ports: [],
        timeLimitSec: 900,
      }),
    );
    hosts.started.push({ host: 'a', handle: vm });
    await untilLine(String(vm.state.consoleLog), /^VSP-PROGRESS 1 round 2/m);
    const incoming = await b.prepareIncoming(await a.describeForMigration(vm));
    const result = await a.migrate(vm, incoming, {});
    hosts.started.push({ host: 'b', handle: await b.finishIncoming(incoming) });
    return result;
  } finally {
    await hosts.stop();
  }
}

/** One cell: the median and the runs. */
const cell = (xs: number[], unit: string, digits = 1) =>
  `${round(median(xs), digits)} ${unit}${xs.length > 1 ? ` (${xs.map((x) => round(x, digits)).join(', ')})` : ''}`;

export async function benchXen(opts: XenBenchOptions): Promise<BenchReport> {
  requireRoot('the Xen benchmark (virtual cluster: netns, taps, QEMU)');
  const reps = opts.quick ? 1 : 3;
  const t0 = Date.now();
  const up = await clusterUp();
  const upSeconds = (Date.now() - t0) / 1000;
  let services: ClusterServices | undefined;
  const sessions = new Map<string, SshSession>();
  let connection: Connection | undefined;
  try {
    services = await startClusterServices(up.inventory, path.join(opts.workDir, 'xen-services'));
    const targets = await sshTargets(services.inventory);
    const ssh: Ssh = async (host, command, timeoutMs = 120_000) => {
      let s = sessions.get(host);
      if (!s) sessions.set(host, (s = await SshSession.connect(targets[host])));
      const r = await s.exec(command, { timeoutMs });
      if (r.code !== 0) throw new RemoteCommandError(host, command, r);
      return r.stdout;
    };

    // Deploy (idempotent): the figure is per host, as the deploy reports it.
    const deploy = await vspCli(['cluster', 'deploy', '--inventory', services.inventoryFile]);
    if (deploy.code !== 0) throw new Error(`vsp cluster deploy failed:\n${deploy.out.slice(-4000)}`);
    const deploySeconds = [...deploy.out.matchAll(/^(\S+): deployed in ([\d.]+) s, (.*)$/gm)].map(
      (m) => `${m[1]} ${m[2]} s (${m[3]})`,
    );
    log.info({ deploySeconds }, 'deployed');

    const token = ownerTokenIn(path.join(services.vsp.opts.baseDir, 'repository'), OWNER);
    const tasks = new TaskClient({ url: services.inventory.cluster!.repositoryUrl, token });
    connection = await Connection.connect({ address: services.temporal.address });
    const vsp = new VspClient(new Client({ connection, namespace: 'default' }));

    // 1. Create to first output: the raw recipe, then VSP through Temporal, alternating.
    const raw: number[] = [];
    const viaVsp: number[] = [];
    const vspPhases: TaskResult['phaseMs'][] = [];
    const firstCommand = `echo "${FIRST}"`;
    for (let i = 0; i < reps; i++) {
      // VSP first: its host worker installs the hotplug script (drivers/xen/loopDisks.ts) the raw guest names.
      const start = Date.now();
      const { taskId } = await tasks.submit({
        owner: OWNER,
        driver: 'xen',
        host: 'a',
        memoryMiB: MEMORY_MIB,
        timeLimitSec: 900,
        command: firstCommand,
      });
      await ssh(
        'a',
        `until grep -qs '${FIRST}' ${STORE}/vms/${taskId}-*/console.log; do sleep 0.05; done`,
        STEP_MS,
      );
      viaVsp.push(Date.now() - start);
      const result = await vsp.result(taskId);
      if (result.exitCode !== 0) throw new Error(`task ${taskId} exited ${result.exitCode}`);
      vspPhases.push(result.phaseMs);
      const name = `vsp-bench-raw-${i}`;
      const cfg = await rawGuest(ssh, {
        host: 'a',
        name,
        command: firstCommand,
        dataMiB: 16,
      });
      raw.push(await xlCreateUntil(ssh, 'a', name, cfg, FIRST));
      await awaitEnd(ssh, 'a', name);
      await dropRawGuest(ssh, 'a', name);
    }

    // 2. xl migrate a -> b -> a of a running task, through Temporal.
    const tour = await migrationTour(ssh, tasks, vsp);
    const migrations = tour.migrations;
    const qemu = await qemuMigration(opts.workDir);

    // 3. Table 2 on the Xen hosts: the disks in a's store, the guest on a (local) and on b (kernel NFS).
    const sizes = opts.quick
      ? { copyBytes: 32 * 1024 * 1024, rounds: 5, roundMiB: 16 }
      : { copyBytes: 128 * 1024 * 1024, rounds: 10, roundMiB: 32 };
    const copyMiB = sizes.copyBytes / 1024 / 1024;
    const t2: Record<'a' | 'b', { copy: number[]; cpu: number[] }> = {
      a: { copy: [], cpu: [] },
      b: { copy: [], cpu: [] },
    };
    for (let i = 0; i < (opts.quick ? 1 : 2); i++)
      for (const host of ['a', 'b'] as const) {
        const name = `vsp-bench-t2-${host}-${i}`;
        const cfg = await rawGuest(ssh, {
          host,
          name,
          command: guestCommand(sizes),
          dataMiB: 2 * copyMiB + 64,
          bigFileMiB: copyMiB,
        });
        await xlCreateUntil(ssh, host, name, cfg, 'VSP-PROGRESS 1 ready');
        const console = await awaitEnd(ssh, host, name);
        t2[host].copy.push(guestSeconds(console, 'copy'));
        t2[host].cpu.push(guestSeconds(console, 'cpu'));
        await dropRawGuest(ssh, host, name);
      }

    const rows: BenchReport['rows'] = [
      {
        measure: 'dom0s up (clusterUp)',
        value: `${round(upSeconds, 1)} s`,
        compare: up.reused ? 'already up' : up.boots.map((b) => `${b.name} ${b.mode}`).join(', '),
      },
      { measure: 'deploy per host (vsp cluster deploy)', value: deploySeconds.join('; '), compare: '' },
      { measure: 'create to first output: raw xl create (recipe)', value: cell(raw, 'ms', 0), compare: '' },
      {
        measure: 'create to first output: VSP task (submit -> first line)',
        value: cell(viaVsp, 'ms', 0),
        compare: `${round(median(viaVsp) / median(raw), 2)} x raw; phases ${JSON.stringify(vspPhases[0])}`,
      },
      {
        measure: 'migration tours (a -> b -> a) tried / guests crashed by nested virtualisation',
        value: `${tour.attempts} / ${tour.crashes.length}`,
        compare: tour.crashes.join(' | '),
      },
      ...migrations.map((m) => ({
        measure: `xl migrate ${m.from} -> ${m.to} (${MEMORY_MIB} MiB PVH, through Temporal)`,
        value: `total ${m.totalTimeMs} ms, downtime ${m.downtimeMs} ms`,
        compare: `RAM ${round((m.ramTransferredBytes ?? 0) / 1e6, 1)} MB, disk ${m.diskTransferredBytes} bytes`,
      })),
      {
        measure: `QEMU migrate a -> b (${MEMORY_MIB} MiB, TCG, nfs-ganesha, driver level)`,
        value: `total ${qemu.totalTimeMs} ms, downtime ${qemu.downtimeMs} ms`,
        compare: `RAM ${round(qemu.ramTransferredBytes / 1e6, 1)} MB, disk ${qemu.diskTransferredBytes} bytes`,
      },
      {
        measure: `Table 2 file copy (${copyMiB} MiB + sync): local (a) / kernel NFS (b)`,
        value: `${cell(t2.a.copy, 's', 2)} / ${cell(t2.b.copy, 's', 2)}`,
        compare: `remote/local ${round(median(t2.b.copy) / median(t2.a.copy), 2)}; paper ${PAPER_TABLE2.copy.local} / ${PAPER_TABLE2.copy.remote} s (${round(PAPER_TABLE2.copy.remote / PAPER_TABLE2.copy.local, 2)})`,
      },
      {
        measure: `Table 2 CPU task (${sizes.rounds} x ${sizes.roundMiB} MiB sha256): local (a) / kernel NFS (b)`,
        value: `${cell(t2.a.cpu, 's', 2)} / ${cell(t2.b.cpu, 's', 2)}`,
        compare: `remote/local ${round(median(t2.b.cpu) / median(t2.a.cpu), 2)}; paper (mencoder) ${PAPER_TABLE2.cpu.local} / ${PAPER_TABLE2.cpu.remote} s (${round(PAPER_TABLE2.cpu.remote / PAPER_TABLE2.cpu.local, 2)})`,
      },
    ];
    const xl = migrations
      .filter((m) => m.ok)
      .map((m) => ({
        total: m.totalTimeMs ?? 0,
        downtime: m.downtimeMs ?? 0,
        disk: m.diskTransferredBytes ?? 0,
      }));
    return {
      name: 'xen',
      title: 'VSP on real Xen hosts (virtual cluster): create, live migration, local vs kernel-NFS disk',
      method:
        `Two Xen 4.17 dom0s in QEMU (TCG, ${clusterConfig().smp} vCPU(s), dom0 1 GiB) from deploy/vmcluster, deployed with ` +
        `vsp cluster deploy; Temporal, the repository and the control worker on this machine. PVH guests of ` +
        `${MEMORY_MIB} MiB, 1 vCPU, the VSP appliance, raw disks on the phy backend. Create to first output: ` +
        `the recipe's raw xl create (disks prepared beforehand, timed in dom0 from xl create to the line in ` +
        `xenconsoled's log) against a VSP task submitted through the task API (timed here from submit to the ` +
        `line in the VM folder's console: staging, scheduling, disks, xl create, boot), ${reps} each, ` +
        `alternating. Migration: one running task moved a -> b -> a with vsp migrate (figures from xl -vvv ` +
        `as the driver records them); QEMU: the same guest size between two namespace hosts, driver level. ` +
        `Table 2: the paper's guest (copy a file + sync; CPU rounds) in a raw PVH guest whose disks are in a's ` +
        `store, run on a (local loop device) and on b (loop device over the kernel-NFS mount of a's export).`,
      rows,
      summary: {
        'create to first output, raw xl / VSP (median ms)': `${median(raw)} / ${median(viaVsp)}`,
        'xl migrate total / downtime (median ms)': `${median(xl.map((m) => m.total))} / ${median(xl.map((m) => m.downtime))}`,
        'xl migrate disk bytes': xl.map((m) => m.disk).join(', '),
        'QEMU migrate total / downtime (ms)': `${qemu.totalTimeMs} / ${qemu.downtimeMs}`,
        'Table 2 copy remote/local (Xen, paper A)': `${round(median(t2.b.copy) / median(t2.a.copy), 2)}, ${round(PAPER_TABLE2.copy.remote / PAPER_TABLE2.copy.local, 2)}`,
        'Table 2 CPU remote/local (Xen, paper A)': `${round(median(t2.b.cpu) / median(t2.a.cpu), 2)}, ${round(PAPER_TABLE2.cpu.remote / PAPER_TABLE2.cpu.local, 2)}`,
      },
    };
  } finally {
    for (const s of sessions.values()) s.close();
    await connection?.close();
    await services?.stop();
    if (!up.reused) await clusterDown();
  }
}
