import { execFile, execFileSync } from 'node:child_process';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { loadHostConfig } from '../../config/workerConfig';
import type { Appliance } from '../../drivers/qemu/appliance';
import { departedConsoleOf } from '../../drivers/qemu/consoleLog';
import { TIMEOUT_EXIT_CODE, VmMigratedError } from '../../drivers/vmOutcome';
import { vmNicOf } from '../../drivers/qemu/vmNetwork';
import { isMigratable, type VmConfig, type VmStatus } from '../../drivers/types';
import { cpuListSize, renderDomainConfig } from '../../drivers/xen/domainConfig';
import { LoopDisks, type LoopControl } from '../../drivers/xen/loopDisks';
import { DEFAULT_SSH_COMMAND, rawRootOf, XenDriver } from '../../drivers/xen/xenDriver';
import { xlRunner } from '../../drivers/xen/xl';
import { parseTaskSpec } from '../../spec/taskSpec';
import { VmStore } from '../../storage/vmStore';

/**
 * The Xen driver against a fake `xl`: this machine has no Xen hypervisor, so a small shell script placed
 * first on PATH stands in for the toolstack. It keeps each host's domains as files, logs every call, writes
 * the guest's console lines as xenconsoled would, and "migrates" by moving a domain to the target's folder.
 * Everything else is real: the VM store, the qcow2 overlay (qemu-img), the command written onto a real
 * ext4 data disk (debugfs), the disk paths under a mount root.
 */
const FAKE_XL = `#!/bin/bash
set -u
root="\${FAKE_XL_ROOT:?}"
self="\${FAKE_XL_SELF:-10.0.0.1}"
dir="$root/$self"
mkdir -p "$dir/domains" "$dir/console"
printf '%s %s\\n' "$self" "$*" >> "$root/calls.log"
knob() { cat "$root/knob-$1" 2>/dev/null || echo "$2"; }
nosuch() { echo "$1 is an invalid domain identifier (rc=-6)" >&2; exit 1; }
while [ "\${1:-}" != "\${1#-v}" ]; do shift; done
cmd="$1"; shift
# A domain: "<polls left> <state> <console log name>"; xenconsoled names the log when the domain appears.
case "$cmd" in
  info) echo "xen_version : 4.17-fake" ;;
  dmesg) echo "(XEN) d3v0 Triple fault - invoking HVM shutdown action 1"; cat "$dir/xen-dmesg" 2>/dev/null; true ;;
  create)
    name=$(sed -n 's/^name = "\\(.*\\)"$/\\1/p' "$1")
    [ -e "$dir/domains/$name" ] && { echo "domain $name exists" >&2; exit 3; }
    case "$(knob create ok)" in
      # xl builds the domain paused and unpauses it last: failing before that, the guest never ran.
      paused) echo "forever paused guest-$name.log" > "$dir/domains/$name"; echo "killed" >&2; exit 1 ;;
      dm-once) rm "$root/knob-create"; echo "libxl: error: libxl_create.c:1896:domcreate_devmodel_started: Domain 9:device model did not start: -9" >&2; exit 3 ;;
      late) echo "forever running guest-$name.log" > "$dir/domains/$name"; echo "VSP-START" >> "$dir/console/guest-$name.log"; exit 1 ;;
      # The guest dies early in its boot (Xen reports a reboot) before printing anything: once.
      boot-crash-once) rm "$root/knob-create"; echo "0 bootcrash guest-$name.log" > "$dir/domains/$name"; exit 0 ;;
    esac
    echo "$(knob polls 3) running guest-$name.log" > "$dir/domains/$name"
    printf 'VSP-START\\nVSP-PROGRESS 40 working\\n' >> "$dir/console/guest-$name.log" ;;
  list)
    f="$dir/domains/$1"; [ -e "$f" ] || nosuch "$1"
    read -r left state log < "$f"
    if [ "$left" != forever ]; then
      if [ "$left" -le 0 ] && [ "$(knob end exit)" = triplefault ]; then
        # Xen reboots an HVM/PVH guest that triple-faults; the guest's console says nothing.
        echo "(XEN) d7v0 Triple fault - invoking HVM shutdown action 1" >> "$dir/xen-dmesg"
        echo "Domain 7 has shut down, reason code 1 0x1" >> "$dir/xl-$1.log"
        left=forever; state=shutdown; echo "$left $state $log" > "$f"
      elif [ "$left" -le 0 ] && { [ "$(knob end exit)" = panic ] || [ "$state" = bootcrash ]; }; then
        # A kernel panic reboots the guest (panic=-1); on_reboot=preserve keeps the domain, shut down.
        printf 'Kernel panic - not syncing: fake\\n' >> "$dir/console/$log"
        echo "Domain 7 has shut down, reason code 1 0x1" >> "$dir/xl-$1.log"
        left=forever; state=shutdown; echo "$left $state $log" > "$f"
      elif [ "$left" -le 0 ]; then
        printf 'VSP-EXIT %s\\n' "$(knob exit 0)" >> "$dir/console/$log"; rm -f "$f"; nosuch "$1"
      fi
      [ "$left" = forever ] || echo "$((left - 1)) $state $log" > "$f"
    fi
    flags=-b----; [ "$state" = paused ] && flags=--p---; [ "$state" = shutdown ] && flags=---s--
    printf 'Name                 ID   Mem VCPUs\\tState\\tTime(s)\\n%s 7 256 1 %s 0.4\\n' "$1" "$flags" ;;
  domid) [ -e "$dir/domains/$1" ] && echo 7 || { echo "Can't get domid of domain name '$1', maybe this domain does not exist." >&2; exit 1; } ;;
  shutdown) [ -e "$dir/domains/$1" ] || nosuch "$1"; [ "$(knob shutdown ok)" = ok ] && rm -f "$dir/domains/$1"; true ;;
  destroy) [ -e "$dir/domains/$1" ] || nosuch "$1"; rm -f "$dir/domains/$1" ;;
  unpause) read -r left state log < "$dir/domains/$1"; echo "forever running $log" > "$dir/domains/$1" ;;
  migrate)
    [ "$1" = -s ] || { echo "usage: migrate -s SSH DOMAIN HOST" >&2; exit 2; }
    name="$3"; target="$4"; [ -e "$dir/domains/$name" ] || nosuch "$name"
    echo "migration target: Ready to receive domain." >&2
    if [ "$(knob migrate ok)" = guest-dies ]; then
      # The guest triple-faults as it is asked to suspend: xl waits for an answer that never comes.
      read -r left state log < "$dir/domains/$name"; echo "forever shutdown $log" > "$dir/domains/$name"
      echo "(XEN) d7v0 Triple fault - invoking HVM shutdown action 1" >> "$dir/xen-dmesg"
      echo "Domain 7 has shut down, reason code 1 0x1" >> "$dir/xl-$name.log"
      echo "libxl: error: libxl_dom_suspend.c:269:domain_suspend_common_pvcontrol_suspending: Domain 7:guest didn't acknowledge suspend, cancelling request" >&2
      echo "migration sender: libxl_domain_suspend failed (rc=-8)" >&2; exit 1
    fi
    if [ "$(knob migrate ok)" != ok ]; then echo "migration sender: Target reported failure" >&2; exit 1; fi
    echo "libxl: debug: libxl_dom_suspend.c:358:suspend_common_wait_guest_check: Domain 7:guest has suspended" >&2
    read -r left state log < "$dir/domains/$name"
    mkdir -p "$root/$target/domains" "$root/$target/console"; rm -f "$dir/domains/$name"
    echo "$left $state guest-$name--incoming.log" > "$root/$target/domains/$name"
    printf 'VSP-PROGRESS 60 moved\\n' >> "$root/$target/console/guest-$name--incoming.log"
    echo "migration target: Domain started successsfully." >&2
    echo "Migration successful." >&2 ;;
  *) echo "fake xl: unknown command $cmd" >&2; exit 2 ;;
esac
`;

const HOSTS = { a: '10.0.0.1', b: '10.0.0.2' } as const;
const cluster = {
  a: { address: HOSTS.a, exportPath: '/vsp' },
  b: { address: HOSTS.b, exportPath: '/vsp' },
};

let work: string;
let fakeRoot: string;
let mountRoot: string;
const stores: Record<string, VmStore> = {};
const appliance: Appliance = {
  version: 'test',
  kernelVersion: '6.1.0-test',
  vmlinuz: '/opt/vsp/appliance/vmlinuz',
  initrd: '/opt/vsp/appliance/initrd.img',
  root: { path: '/opt/vsp/appliance/root.qcow2', sha256: '0'.repeat(64), format: 'qcow2' },
};

/**
 * Stand-in loop devices: a "device" is a symlink to the file in the host's folder (losetup needs root and
 * the loop module); the links the domain configs name are the real LoopDisks logic.
 */
const loops = (host: string) => {
  const attached = new Map<string, string>();
  let next = 0;
  const control: LoopControl = {
    async attach(file) {
      const device = path.join(work, `loop-${host}-${next++}`);
      attached.set(device, file);
      return device;
    },
    async detach(device) {
      attached.delete(device);
    },
    async backingFile(device) {
      return attached.get(device);
    },
  };
  return {
    attached,
    disks: new LoopDisks(path.join(work, `run-${host}`), control, path.join(work, `scripts-${host}`)),
  };
};
let hostLoops: Record<'a' | 'b', ReturnType<typeof loops>>;

function driverOn(host: keyof typeof HOSTS, extra: Partial<ConstructorParameters<typeof XenDriver>[0]> = {}) {
  return new XenDriver({
    loopDisks: hostLoops[host].disks,
    store: stores[host],
    hostName: host,
    appliance,
    mountRoot,
    cluster,
    // The same xl, first on PATH, for both hosts; FAKE_XL_SELF tells it which host's domains it manages.
    xl: xlRunner(['xl'], {
      ...process.env,
      PATH: `${path.join(work, 'bin')}:${process.env.PATH ?? ''}`,
      FAKE_XL_ROOT: fakeRoot,
      FAKE_XL_SELF: HOSTS[host],
    }),
    consoleLogDir: path.join(fakeRoot, HOSTS[host], 'console'),
    xlLogDir: path.join(fakeRoot, HOSTS[host]),
    pollMs: 50,
    ...extra,
  });
}

async function calls(): Promise<string[]> {
  const text = await fs.readFile(path.join(fakeRoot, 'calls.log'), 'utf8').catch(() => '');
  await fs.rm(path.join(fakeRoot, 'calls.log'), { force: true });
  return text.split('\n').filter(Boolean);
}

const knob = (name: string, value: string) => fs.writeFile(path.join(fakeRoot, `knob-${name}`), value);

async function stagedVm(vmId: string, over: Partial<VmConfig> = {}): Promise<VmConfig> {
  const paths = stores.a.paths(vmId);
  await fs.mkdir(paths.dir, { recursive: true });
  execFileSync('mke2fs', ['-q', '-t', 'ext4', '-F', paths.dataDisk, '8M']);
  return {
    vmId,
    owner: 'alice',
    command: 'echo hello > out/x',
    vcpus: 1,
    memoryMiB: 256,
    baseImage: path.join(stores.a.imagesDir, 'base.qcow2'),
    ports: [],
    timeLimitSec: 600,
    ...over,
  };
}

beforeAll(async () => {
  work = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-xen-'));
  hostLoops = { a: loops('a'), b: loops('b') };
  const bin = path.join(work, 'bin');
  fakeRoot = path.join(work, 'xl-state');
  mountRoot = path.join(work, 'cluster');
  await fs.mkdir(bin);
  await fs.mkdir(mountRoot);
  await fs.mkdir(fakeRoot);
  await fs.writeFile(path.join(bin, 'xl'), FAKE_XL, { mode: 0o755 });
  for (const h of Object.keys(HOSTS) as (keyof typeof HOSTS)[]) {
    stores[h] = new VmStore(path.join(work, h, 'store'));
    await stores[h].init();
    // Stand-ins for the per-host mounts: one view of the cluster, the same on every host.
    await fs.symlink(stores[h].root, path.join(mountRoot, h));
  }
  execFileSync('qemu-img', [
    'create',
    '-q',
    '-f',
    'qcow2',
    path.join(stores.a.imagesDir, 'base.qcow2'),
    '64M',
  ]);
});

afterAll(async () => {
  await fs.rm(work, { recursive: true, force: true });
});

beforeEach(async () => {
  for (const f of await fs.readdir(fakeRoot).catch(() => [] as string[]))
    if (f.startsWith('knob-') || f === 'calls.log') await fs.rm(path.join(fakeRoot, f));
  // Every fake domain is domid 7: Xen's log starts afresh, as a real one never names a domid twice.
  for (const host of Object.values(HOSTS))
    await fs.rm(path.join(fakeRoot, host, 'xen-dmesg'), { force: true });
});

describe('xl domain config', () => {
  test('renders a PVH domain with disks under the mounts and the VM network vif', () => {
    const nic = vmNicOf('t1', { bridge: 'vspbr0', subnet: '10.77.0' });
    const text = renderDomainConfig({
      name: 'vsp-t1',
      type: 'pvh',
      memoryMiB: 512,
      vcpus: 2,
      kernel: '/k/vmlinuz',
      ramdisk: '/k/initrd',
      owner: 'alice',
      rootDisk: '/var/lib/vsp/cluster/a/vms/t1/root.img',
      dataDisk: '/var/lib/vsp/cluster/a/vms/t1/data.img',
      hotplugScript: '/run/vsp/xen/block',
      nic: { ...nic, bridge: 'vspbr0' },
    });
    expect(text).toBe(
      [
        '# Written by VSP (drivers/xen): one task VM.',
        'name = "vsp-t1"',
        'type = "pvh"',
        'kernel = "/k/vmlinuz"',
        'ramdisk = "/k/initrd"',
        `cmdline = "console=hvc0 quiet panic=-1 vsp.owner=alice vsp.root=/dev/xvda vsp.data=/dev/xvdb vsp.ip=${nic.address}"`,
        'memory = 512',
        'maxmem = 512',
        'vcpus = 2',
        'on_poweroff = "destroy"',
        'on_reboot = "preserve"',
        'on_crash = "preserve"',
        'disk = [ "format=raw,vdev=xvda,access=rw,backendtype=phy,script=/run/vsp/xen/block,target=/var/lib/vsp/cluster/a/vms/t1/root.img", ' +
          '"format=raw,vdev=xvdb,access=rw,backendtype=phy,script=/run/vsp/xen/block,target=/var/lib/vsp/cluster/a/vms/t1/data.img" ]',
        `vif = [ "mac=${nic.mac},bridge=vspbr0,vifname=${nic.tap}" ]`,
        '',
      ].join('\n'),
    );
    expect(nic.mac).toMatch(/^52:54:00:/);
  });

  test('refuses values that would break the config', () => {
    const base = {
      name: 'vsp-t1',
      type: 'pvh' as const,
      memoryMiB: 256,
      vcpus: 1,
      kernel: '/k',
      ramdisk: '/i',
      owner: 'alice',
      rootDisk: '/r',
      dataDisk: '/d',
      hotplugScript: '/s',
    };
    expect(() => renderDomainConfig({ ...base, rootDisk: '/r",x' })).toThrow(/rootDisk .* unsafe characters/);
    expect(() => renderDomainConfig({ ...base, memoryMiB: 10 })).toThrow(/memory 10 MiB/);
    expect(() => renderDomainConfig({ ...base, type: 'hvm' as 'pv' })).toThrow(/type "hvm"/);
    expect(renderDomainConfig({ ...base, type: 'pv' })).toContain('type = "pv"\n');
    expect(renderDomainConfig({ ...base, cpus: '1-3,5' })).toContain('vcpus = 1\ncpus = "1-3,5"\n');
    expect([cpuListSize('1'), cpuListSize('1-3,5'), cpuListSize('0-3,2-5')]).toEqual([1, 4, 6]);
    expect(() => renderDomainConfig({ ...base, cpus: '1"' })).toThrow(/cpus "1\\"" is not a CPU list/);
  });
});

describe('XenDriver (fake xl on PATH)', () => {
  test('create, start once, wait with progress, inspect, destroy: the exact xl commands', async () => {
    const driver = driverOn('a');
    const config = await stagedVm('t1');
    const handle = await driver.create(config);
    const paths = stores.a.paths('t1');
    // The root disk is a raw copy of the base (blkback reads raw files only), with no backing file.
    const info = JSON.parse(
      execFileSync('qemu-img', ['info', '--output=json', rawRootOf(paths.dir)], { encoding: 'utf8' }),
    ) as { format: string; 'virtual-size': number; 'backing-filename'?: string };
    expect(info).toMatchObject({ format: 'raw', 'virtual-size': 64 * 1024 * 1024 });
    expect(info['backing-filename']).toBeUndefined();
    expect(
      execFileSync('debugfs', ['-R', 'cat /.vsp/command', paths.dataDisk], {
        encoding: 'utf8',
        stdio: 'pipe',
      }),
    ).toBe('echo hello > out/x\n');
    expect(await driver.create(config)).toEqual(handle);
    expect(await calls()).toEqual([]);
    expect((await driver.inspect(handle)).phase).toBe('created');

    await knob('polls', '4');
    await knob('exit', '3');
    const started = await driver.start(handle);
    expect(await driver.start(handle)).toEqual(started);
    const cfgFile = path.join(paths.dir, 'domain.cfg');
    expect(await calls()).toEqual([
      '10.0.0.1 list vsp-t1',
      `10.0.0.1 create ${cfgFile}`,
      '10.0.0.1 domid vsp-t1',
    ]);
    const cfg = await fs.readFile(cfgFile, 'utf8');
    // The disks are loop devices attached before xl runs, named by links; the script only hands them over.
    const run = hostLoops.a.disks.dir;
    const script = path.join(work, 'scripts-a', 'vsp-block');
    expect(cfg).toContain(`backendtype=phy,script=${script},target=${run}/t1/root"`);
    expect(cfg).toContain(`script=${script},target=${run}/t1/data"`);
    expect((await fs.stat(script)).mode & 0o111).toBe(0o111);
    const device = await fs.readlink(path.join(run, 't1', 'root'));
    expect(hostLoops.a.attached.get(device)).toBe(`${mountRoot}/a/vms/t1/root.img`);
    expect(cfg).toContain('vif = [ ]');
    expect(started.state).toMatchObject({ domain: 'vsp-t1', domid: 7, diskRoot: 'vms/t1/root.img' });

    const seen: VmStatus[] = [];
    const result = await driver.wait(started, {
      onProgress: (s) => seen.push(s),
      signal: new AbortController().signal,
    });
    // The guest's last report comes with its exit, as under QEMU and the process driver.
    expect(result).toEqual({ exitCode: 3, timedOut: false, progress: 40, progressMessage: 'working' });
    expect(seen.length).toBeGreaterThan(0);
    expect(seen[0]).toMatchObject({ phase: 'running', progress: 40, progressMessage: 'working' });
    expect((await driver.inspect(started)).phase).toBe('exited');
    expect((await driver.recover(started)).exitCode).toBe(3);

    await calls();
    await driver.destroy(started);
    expect(await calls()).toEqual(['10.0.0.1 list vsp-t1']);
    expect(hostLoops.a.attached.has(device)).toBe(false);
    await expect(fs.access(path.join(run, 't1'))).rejects.toThrow();
    await expect(fs.access(paths.dir)).rejects.toThrow();
    await expect(fs.access(path.join(fakeRoot, HOSTS.a, 'console', 'guest-vsp-t1.log'))).rejects.toThrow();
  });

  test("the disks go to the account the exports squash root to (peers' loop devices write them as it)", async () => {
    const owner = { uid: process.getuid?.() ?? 0, gid: process.getgid?.() ?? 0 };
    const driver = driverOn('a', { diskOwner: owner });
    await driver.create(await stagedVm('owned-1'));
    const paths = stores.a.paths('owned-1');
    for (const disk of [rawRootOf(paths.dir), paths.dataDisk]) {
      const st = await fs.stat(disk);
      expect([disk, st.uid, st.gid, st.mode & 0o777]).toEqual([disk, owner.uid, owner.gid, 0o600]);
    }
  });

  test('stop asks the guest to shut down, then destroys a domain that ignores it', async () => {
    const driver = driverOn('a');
    const handle = await driver.create(await stagedVm('t2'));
    await knob('polls', 'forever');
    await knob('shutdown', 'ignore');
    const started = await driver.start(handle);
    await calls();
    await driver.stop(started, 300);
    const issued = await calls();
    expect(issued.slice(0, 3)).toEqual([
      '10.0.0.1 list vsp-t2',
      '10.0.0.1 shutdown vsp-t2',
      '10.0.0.1 list vsp-t2',
    ]);
    expect(issued.slice(-3)).toEqual([
      '10.0.0.1 list vsp-t2',
      '10.0.0.1 destroy vsp-t2',
      '10.0.0.1 list vsp-t2',
    ]);
    expect((await driver.inspect(started)).phase).toBe('missing');
    await driver.destroy(started);
  });

  test('a guest whose kernel panics: kept until its console is in, the error says it rebooted, then destroyed at once', async () => {
    const driver = driverOn('a');
    const started = await driver.start(await driver.create(await stagedVm('t9')));
    await knob('end', 'panic');
    const waited = driver.wait(started, { onProgress: () => {}, signal: new AbortController().signal });
    await expect(waited).rejects.toThrow(
      /its domain is shutdown: rebooted \(a kernel panic reboots the guest: panic=-1\) before the task finished; console tail:\n(.*\n)*Kernel panic - not syncing: fake/,
    );
    await calls();
    await driver.destroy(started);
    // No shutdown request to a domain that has shut down already: destroyed at once.
    expect((await calls()).filter((c) => !c.includes(' list '))).toEqual(['10.0.0.1 destroy vsp-t9']);
  });

  test("a guest that triple-faults: the error quotes Xen's own log, since its console says nothing", async () => {
    const driver = driverOn('a');
    const started = await driver.start(await driver.create(await stagedVm('t11')));
    await knob('end', 'triplefault');
    const waited = driver.wait(started, { onProgress: () => {}, signal: new AbortController().signal });
    // d3's fault in the same log is another domain's.
    await expect(waited).rejects.toThrow(
      /its domain is shutdown: triple-faulted \(Xen: d7v0 Triple fault - invoking HVM shutdown action 1\) before the task finished/,
    );
    // A worker that re-attaches (recover) learns the same.
    expect(await driver.recover(started)).toMatchObject({
      phase: 'missing',
      details: { reason: expect.stringMatching(/^the domain is shutdown: triple-faulted \(Xen: d7v0 /) },
    });
    await driver.destroy(started);
  });

  test('a guest that dies before its task starts is booted again (no task code ran), its first boot kept in the console', async () => {
    const driver = driverOn('a');
    const handle = await driver.create(await stagedVm('t10'));
    await knob('create', 'boot-crash-once');
    const started = await driver.start(handle);
    await calls();
    const r = await driver.wait(started, { onProgress: () => {}, signal: new AbortController().signal });
    expect(r).toEqual({ exitCode: 0, timedOut: false, progress: 40, progressMessage: 'working' });
    // Between its `list` polls, the driver read Xen's log for why the first boot ended.
    const issued = (await calls()).filter((c) => !c.includes(' list ') && !c.endsWith(' dmesg'));
    expect(issued.slice(0, 3)).toEqual([
      '10.0.0.1 destroy vsp-t10',
      expect.stringMatching(/^10\.0\.0\.1 create .*\/t10\/domain\.cfg$/),
      '10.0.0.1 domid vsp-t10',
    ]);
    const console = await fs.readFile(stores.a.paths('t10').consoleLog, 'utf8');
    expect(console).toMatch(
      /^VSP-HOST boot 1 ended before the task started \(rebooted \(a kernel panic reboots the guest: panic=-1\)\): booting again\n(.*\n)*VSP-START\n/m,
    );
    await driver.destroy(started);
  });

  test('the time limit ends the VM with the timeout exit code', async () => {
    const driver = driverOn('a');
    const handle = await driver.create(await stagedVm('t3', { timeLimitSec: 1 }));
    await knob('polls', 'forever');
    const started = await driver.start(handle);
    const r = await driver.wait(started, { onProgress: () => {}, signal: new AbortController().signal });
    expect(r).toEqual({
      exitCode: TIMEOUT_EXIT_CODE,
      timedOut: true,
      progress: 40,
      progressMessage: 'working',
    });
    expect(await calls()).toContain('10.0.0.1 shutdown vsp-t3');
    await driver.destroy(started);
  });

  test('a service VM needs the VM network, whose vif carries the stable MAC', async () => {
    await expect(driverOn('a').create(await stagedVm('t4', { ports: [8080] }))).rejects.toThrow(
      /needs the cluster VM network under Xen/,
    );
    const vmNetwork = { bridge: 'vspbr0', subnet: '10.77.0' };
    const driver = driverOn('a', { vmNetwork });
    const started = await driver.start(await driver.create(await stagedVm('t4', { ports: [8080] })));
    const nic = vmNicOf('t4', vmNetwork);
    const cfg = await fs.readFile(path.join(stores.a.paths('t4').dir, 'domain.cfg'), 'utf8');
    expect(cfg).toContain(`vif = [ "mac=${nic.mac},bridge=vspbr0,vifname=${nic.tap}" ]`);
    expect(cfg).toContain(`vsp.ip=${nic.address}`);
    expect(started.state).toMatchObject({ nicMac: nic.mac, nicAddress: nic.address });
    await driver.destroy(started);
  });

  test("PV guests (no live migration with Debian's Xen) are a host setting", async () => {
    const driver = driverOn('a', { guestType: 'pv' });
    expect(driver.capabilities.liveMigration).toBe(false);
    expect(isMigratable(driver)).toBe(false);
    expect(driverOn('a').capabilities.liveMigration).toBe(true);
    const started = await driver.start(await driver.create(await stagedVm('pv1')));
    const cfg = await fs.readFile(path.join(stores.a.paths('pv1').dir, 'domain.cfg'), 'utf8');
    expect(cfg).toContain('type = "pv"\n');
    await driver.destroy(started);
  });

  test('a failed xl create: a domain left paused never ran (destroyed, a retry may start it); a running one did', async () => {
    const driver = driverOn('a');
    const handle = await driver.create(await stagedVm('c1'));
    await knob('create', 'paused');
    await calls();
    await expect(driver.start(handle)).rejects.toThrow(/cannot start its Xen domain/);
    expect(await calls()).toContain('10.0.0.1 destroy vsp-c1');
    await expect(fs.access(path.join(stores.a.paths('c1').dir, 'started'))).rejects.toThrow();
    // A backend that missed libxl's time limit (a busy dom0): nothing ran, so the domain is built again.
    await knob('create', 'dm-once');
    const second = await driver.start(await driver.create(await stagedVm('c2')));
    expect((await calls()).filter((c) => c.includes(' create '))).toHaveLength(2);
    await driver.destroy(second);
    await knob('create', 'late');
    const started = await driver.start(handle);
    expect(started.state).toMatchObject({ domain: 'vsp-c1', domid: 7 });
    expect((await driver.inspect(started)).phase).toBe('running');
    await driver.destroy(started);
  });

  test('a missing mount is named before any domain is made', async () => {
    const driver = driverOn('a', { mountRoot: path.join(work, 'no-mounts') });
    await expect(driver.create(await stagedVm('t5'))).rejects.toThrow(
      /vms\/t5\/root.img is not reachable on a: is the store of a mounted at .*no-mounts\/a\?/,
    );
    expect(await calls()).toEqual([]);
    await stores.a.remove('t5');
  });

  test('without xl the driver says the Xen toolstack is missing', async () => {
    const driver = new XenDriver({
      store: stores.a,
      hostName: 'a',
      appliance,
      mountRoot,
      xl: xlRunner(['xl'], { PATH: path.join(work, 'empty') }),
    });
    await expect(driver.checkToolstack()).rejects.toThrow(/xl does not work here/);
    await expect(driver.checkToolstack().catch((e: Error) => Promise.reject(e.cause))).rejects.toThrow(
      /xl is not installed: install xen-utils \(the Xen toolstack\)/,
    );
    const handle = await driver.create(await stagedVm('t6'));
    await expect(driver.start(handle)).rejects.toThrow(/cannot start its Xen domain/);
    // The failed start released its claim: a later start may run it.
    await expect(fs.access(path.join(stores.a.paths('t6').dir, 'started'))).rejects.toThrow();
    await stores.a.remove('t6');
  });
});

describe('XenDriver live migration (xl migrate over ssh, fake xl)', () => {
  test('a to b moves only the domain; the disks stay on a; wait on a says where it went', async () => {
    const a = driverOn('a');
    const b = driverOn('b');
    await knob('polls', 'forever');
    const started = await a.start(await a.create(await stagedVm('m1')));
    const source = await a.describeForMigration(started);
    expect(source.disks).toEqual({
      root: { storageHost: 'a', path: 'vms/m1/root.img' },
      data: { storageHost: 'a', path: 'vms/m1/data.img' },
    });
    await calls();
    const incoming = await b.prepareIncoming(source);
    expect(incoming).toMatchObject({ vmId: 'm1', host: 'b', uri: 'ssh:10.0.0.2' });
    // b attached a's disk files to its own loop devices under the same link names before xl sends the VM.
    const linkB = path.join(hostLoops.b.disks.dir, 'm1', 'root');
    expect(hostLoops.b.attached.get(await fs.readlink(linkB))).toBe(`${mountRoot}/a/vms/m1/root.img`);
    expect(path.relative(hostLoops.b.disks.dir, linkB)).toBe(
      path.relative(hostLoops.a.disks.dir, path.join(hostLoops.a.disks.dir, 'm1', 'root')),
    );
    expect(await b.prepareIncoming(source)).toEqual(incoming);
    const progress: string[] = [];
    const r = await a.migrate(started, incoming, { onProgress: (p) => progress.push(p.status) });
    expect(r).toMatchObject({
      vmId: 'm1',
      from: 'a',
      to: 'b',
      diskTransferredBytes: 0,
      ramTransferredBytes: 256 * 1024 ** 2,
    });
    expect(progress[0]).toBe('setup');
    expect(progress.at(-1)).toBe('completed');
    expect(r.downtimeMs).toBeGreaterThanOrEqual(0);
    // Each host's part of the console: a's set aside for the task's logs, b's in b's VM folder.
    const departedA = await fs.readFile(departedConsoleOf(stores.a.root, 'm1'), 'utf8');
    expect(departedA).toContain('VSP-START');
    expect(departedA).not.toContain('moved');
    await expect(fs.lstat(path.join(fakeRoot, HOSTS.a, 'console', 'guest-vsp-m1.log'))).rejects.toThrow();
    // The domain left a: a's loop devices are detached.
    expect([...hostLoops.a.attached.values()].filter((f) => f.includes('/m1/'))).toEqual([]);
    const moved = await b.finishIncoming(incoming);
    expect(moved).toMatchObject({ host: 'b', storageHost: 'a', state: { domid: 7, migratedFrom: 'a' } });
    expect(await calls()).toEqual([
      '10.0.0.2 list vsp-m1',
      '10.0.0.1 list vsp-m1',
      `10.0.0.1 -vvv migrate -s ${DEFAULT_SSH_COMMAND} vsp-m1 10.0.0.2`,
      '10.0.0.2 list vsp-m1',
      '10.0.0.2 domid vsp-m1',
    ]);
    expect(await fs.readFile(stores.b.paths('m1').consoleLog, 'utf8')).toBe('VSP-PROGRESS 60 moved\n');
    expect(await b.inspect(moved)).toMatchObject({
      phase: 'running',
      progress: 60,
      progressMessage: 'moved',
    });
    await expect(
      a.wait(started, { onProgress: () => {}, signal: new AbortController().signal }),
    ).rejects.toThrow(VmMigratedError);
    // The storage host keeps the folder (the disks), marked as moved.
    expect((await stores.a.readState<{ handle: { host: string } }>('m1'))?.handle.host).toBe('b');

    // And back home: b is not the storage host, so it drops its folder once the VM left.
    const back = await a.prepareIncoming(await b.describeForMigration(moved));
    await b.migrate(moved, back, {});
    const home = await a.finishIncoming(back);
    expect(home).toMatchObject({ host: 'a', storageHost: 'a' });
    expect(await stores.b.readState('m1')).toBeUndefined();
    await a.destroy(home);
  });

  test('a failed migration leaves the VM running at the source, and the target cleans up', async () => {
    const a = driverOn('a');
    const b = driverOn('b');
    await knob('polls', 'forever');
    const started = await a.start(await a.create(await stagedVm('m2')));
    const incoming = await b.prepareIncoming(await a.describeForMigration(started));
    await knob('migrate', 'fail');
    await expect(a.migrate(started, incoming, {})).rejects.toThrow(
      /migration a -> b failed; it runs on here/,
    );
    expect((await a.inspect(started)).phase).toBe('running');
    await b.abortIncoming(incoming);
    expect(await stores.b.readState('m2')).toBeUndefined();
    await expect(fs.access(stores.b.paths('m2').dir)).rejects.toThrow();
    await expect(a.migrate(started, { ...incoming, host: 'a' }, {})).rejects.toThrow(/to its own host/);
    await a.destroy(started);
  });

  test('a guest that dies during its migration: the error says so, and why, instead of "it runs on here"', async () => {
    const a = driverOn('a');
    const b = driverOn('b');
    await knob('polls', 'forever');
    const started = await a.start(await a.create(await stagedVm('m4')));
    const incoming = await b.prepareIncoming(await a.describeForMigration(started));
    await knob('migrate', 'guest-dies');
    await expect(a.migrate(started, incoming, {})).rejects.toThrow(
      /migration a -> b failed; the guest died during it \(triple-faulted \(Xen: d7v0 Triple fault - invoking HVM shutdown action 1\)\): .*guest didn't acknowledge suspend/,
    );
    await b.abortIncoming(incoming);
    await a.destroy(started);
  });

  test('a guest that dies after arriving by migration is never booted again (its task ran on the source)', async () => {
    const a = driverOn('a');
    const b = driverOn('b');
    await knob('polls', '2');
    const started = await a.start(await a.create(await stagedVm('m5')));
    const incoming = await b.prepareIncoming(await a.describeForMigration(started));
    await a.migrate(started, incoming, {});
    const moved = await b.finishIncoming(incoming);
    await knob('end', 'panic');
    await expect(
      b.wait(moved, { onProgress: () => {}, signal: new AbortController().signal }),
    ).rejects.toThrow(/its domain is shutdown: rebooted/);
    expect((await calls()).filter((c) => c.startsWith('10.0.0.2 create'))).toEqual([]);
    await b.destroy(moved);
    await a.destroy(started);
  });

  test('a target that cannot reach the disks refuses before anything moves', async () => {
    const a = driverOn('a');
    await knob('polls', 'forever');
    const started = await a.start(await a.create(await stagedVm('m3')));
    const source = await a.describeForMigration(started);
    const blind = driverOn('b', { mountRoot: path.join(work, 'no-mounts') });
    await expect(blind.prepareIncoming(source)).rejects.toThrow(
      /no-mounts\/a\/vms\/m3\/root.img is not reachable on b: the NFS export of a is not mounted/,
    );
    await expect(a.prepareIncoming(source)).rejects.toThrow(/already runs on a/);
    await a.destroy(started);
  });
});

describe('Xen in the host worker configuration', () => {
  const HOST_ENV = {
    VSP_HOST: 'a',
    VSP_REPOSITORY_URL: 'http://127.0.0.1:1',
    VSP_REPOSITORY_TOKEN: 'abcdefghij',
  };

  test('VSP_DRIVERS accepts xen, with the mount root of its disks; a task may ask for xen', () => {
    const c = loadHostConfig({ ...HOST_ENV, VSP_DRIVERS: 'qemu,xen', VSP_DEFAULT_DRIVER: 'xen' });
    expect(c.drivers).toEqual(['qemu', 'xen']);
    expect(c.defaultDriver).toBe('xen');
    expect(c.mountRoot).toBe('/var/lib/vsp/cluster');
    expect(loadHostConfig({ ...HOST_ENV, VSP_MOUNT_ROOT: '/srv/vsp' }).mountRoot).toBe('/srv/vsp');
    for (const bad of ['srv/vsp', '/srv/vsp/', '/srv/../vsp'])
      expect(() => loadHostConfig({ ...HOST_ENV, VSP_MOUNT_ROOT: bad })).toThrow(
        /VSP_MOUNT_ROOT \(mountRoot\): mount root .* must be a normalised absolute folder/,
      );
    expect(() => loadHostConfig({ ...HOST_ENV, VSP_DRIVERS: 'xen,kvm' })).toThrow(/VSP_DRIVERS/);
    expect(loadHostConfig({ ...HOST_ENV, VSP_XEN_GUEST_CPUS: '1-3' }).xenGuestCpus).toBe('1-3');
    expect(() => loadHostConfig({ ...HOST_ENV, VSP_XEN_GUEST_CPUS: 'all' })).toThrow(
      /VSP_XEN_GUEST_CPUS \(xenGuestCpus\): a CPU list like 1-3 or 1,3/,
    );
    expect(() => loadHostConfig({ ...HOST_ENV, VSP_XEN_GUEST_CPUS: '1,3-1' })).toThrow(
      /VSP_XEN_GUEST_CPUS \(xenGuestCpus\): a range runs backwards/,
    );
    expect(parseTaskSpec({ owner: 'alice', command: 'true', driver: 'xen' }).driver).toBe('xen');
    expect(() => parseTaskSpec({ owner: 'alice', command: 'true', driver: 'lxc' })).toThrow(/driver/);
  });

  test('a host worker offering xen on a host without xl fails at start, saying xl is missing', async () => {
    // The built worker (npm run build), as deployed; this machine has no xl on PATH.
    const worker = path.join(__dirname, '..', '..', 'dist', 'workers', 'hostWorker.js');
    const env = {
      ...HOST_ENV,
      VSP_STORE_DIR: path.join(work, 'worker-store'),
      VSP_DRIVERS: 'xen',
      PATH: `${path.join(work, 'empty')}:/usr/bin:/bin`,
    };
    const { code, stderr } = await new Promise<{ code: number | null; stderr: string }>((resolve) => {
      const child = execFile(process.execPath, [worker], { env, timeout: 120_000 }, (_err, _out, err) =>
        resolve({ code: child.exitCode, stderr: err }),
      );
    });
    expect(code).toBe(1);
    expect(stderr).toMatch(/host worker failed/);
    expect(stderr).toMatch(/the Xen driver cannot run on host a: xl does not work here/);
    expect(stderr).toMatch(/xl is not installed: install xen-utils/);
  }, 150_000);
});
