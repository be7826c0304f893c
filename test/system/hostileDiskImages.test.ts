import { randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { runCommand } from '../../lib/runCommand';
import { DiskImageStaging, UnusableOutputsError } from '../../storage/diskImageStaging';
import { GuestDiskTools } from '../../storage/guestDiskTools';
import { VmStore } from '../../storage/vmStore';
import { describeError } from '../../logging/logger';

/**
 * Stage-out from data disks a guest could have crafted, built here with debugfs as a hostile guest would
 * leave them. Each must be refused (or taken) with a clear message, with nothing written outside the
 * VM's outbox and the image given back as it was.
 */
const rootOnly = process.getuid?.() === 0 ? describe : describe.skip;

rootOnly('stage-out from hostile data disks', () => {
  let work: string;
  let store: VmStore;
  const staging = new DiskImageStaging();
  /** Where a name like ../../../../tmp/x would land if the tools followed it. */
  const escapeName = `vsp-escaped-${randomBytes(4).toString('hex')}`;

  beforeAll(async () => {
    work = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-hostile-'));
    store = new VmStore(work);
    await store.init();
  });

  afterAll(async () => {
    await fs.rm(work, { recursive: true, force: true });
    await fs.rm(path.join('/tmp', escapeName), { force: true });
  });

  /** A data disk as stage-in builds it (outputs room 8 MiB), then changed by `script` (debugfs -w). */
  async function hostileDisk(vmId: string, script: string[]) {
    const vm = store.paths(vmId);
    await fs.mkdir(path.join(vm.inputsDir, 'out'), { recursive: true });
    await fs.writeFile(path.join(vm.inputsDir, 'out', 'ok.txt'), 'fine\n');
    await staging.build(vm, 8 * 1024 * 1024);
    const scriptFile = path.join(vm.dir, 'hostile.debugfs');
    await fs.writeFile(scriptFile, ['mkdir /.vsp', ...script].join('\n') + '\n');
    await runCommand('debugfs', ['-w', '-f', scriptFile, vm.dataDisk]);
    await fs.rm(scriptFile);
    return vm;
  }

  /** The inode number of `name` in a folder of the disk (debugfs ls -p). */
  async function inodeOf(image: string, dir: string, name: string): Promise<number> {
    const { stdout } = await runCommand('debugfs', ['-R', `ls -p ${dir}`, image]);
    const line = stdout.split('\n').find((l) => l.split('/')[5] === name || l.includes(`/${name}/`));
    if (!line) throw new Error(`no ${name} in ${dir}:\n${stdout}`);
    return Number(line.split('/')[1]);
  }

  async function refusal(vm: ReturnType<VmStore['paths']>): Promise<UnusableOutputsError> {
    const err = await staging.extract(vm, 'out').then(
      () => undefined,
      (e: unknown) => e,
    );
    if (!(err instanceof UnusableOutputsError)) throw new Error(`not refused: ${String(err)}`);
    return err;
  }

  /** What the outbox holds: never anything but the log and (when taken) outputs, all root's. */
  async function outboxEntries(vm: ReturnType<VmStore['paths']>): Promise<string[]> {
    const all = await fs.readdir(vm.outboxDir, { recursive: true });
    for (const rel of all) {
      const st = await fs.lstat(path.join(vm.outboxDir, rel));
      expect(st.isFile() || st.isDirectory()).toBe(true);
      expect(st.uid).toBe(0);
    }
    return all.map(String).sort();
  }

  afterEach(async () => {
    // Nothing escaped, and the image went back to its owner.
    await expect(fs.stat(path.join('/tmp', escapeName))).rejects.toThrow();
    for (const vm of await store.list()) {
      const st = await fs.stat(store.paths(vm).dataDisk).catch(() => undefined);
      if (st) expect([st.uid, st.gid, st.mode & 0o777]).toEqual([0, 0, 0o644]);
    }
  });

  test('a plain disk: outputs and a long-named file come out intact', async () => {
    const long = 'n'.repeat(255);
    const vm = await hostileDisk('plain', [
      'mkdir /out/sub',
      `write /etc/hostname /out/sub/${long}`,
      'write /etc/hostname /.vsp/task.log',
    ]);
    const got = await staging.extract(vm, 'out');
    expect(await fs.readFile(path.join(got.outputsDir, 'ok.txt'), 'utf8')).toBe('fine\n');
    expect(await fs.readFile(path.join(got.outputsDir, 'sub', long), 'utf8')).toBe(
      await fs.readFile('/etc/hostname', 'utf8'),
    );
    expect(got.taskLog).toBe(path.join(vm.outboxDir, 'task.log'));
    expect(await outboxEntries(vm)).toEqual([
      'outputs',
      'outputs/ok.txt',
      'outputs/sub',
      `outputs/sub/${long}`,
      'task.log',
    ]);
  });

  test('the tools run as an account of their own, not root, and write only in their folder', async () => {
    const vm = await hostileDisk('account', []);
    const workDir = path.join(vm.dir, 'tool-work');
    await new GuestDiskTools().run(vm.dataDisk, 'debugfs', ['-R', 'dump /out/ok.txt got', 'IMAGE'], {
      workDir,
      hide: store.vmsDir,
    });
    const st = await fs.stat(path.join(workDir, 'got'));
    expect(st.uid).toBeGreaterThanOrEqual(3_000_000);
    expect((await fs.stat(workDir)).uid).toBe(st.uid);
    // A dump to a path outside its folder finds nothing it may write.
    const r = await new GuestDiskTools().run(
      vm.dataDisk,
      'debugfs',
      ['-R', `dump /out/ok.txt /tmp/${escapeName}`, 'IMAGE'],
      { workDir, hide: store.vmsDir },
    );
    expect(r.stderr).toMatch(/Read-only file system|Permission denied/);
  });

  test('a task log whose end never reached the disk (a hole) says so instead of ending in NUL bytes', async () => {
    const vm = await hostileDisk('log-hole', ['write /etc/hostname /.vsp/task.log']);
    const ino = await inodeOf(vm.dataDisk, '/.vsp', 'task.log');
    const text = await fs.readFile('/etc/hostname', 'utf8');
    await runCommand('debugfs', ['-w', '-R', `sif <${ino}> size ${text.length + 125}`, vm.dataDisk]);
    const got = await staging.extract(vm, 'out');
    expect(await fs.readFile(got.taskLog!, 'utf8')).toBe(
      `${text}\n[vsp] the last 125 bytes of this log never reached the disk: the VM stopped before writing them\n`,
    );
  });

  test('folders 1000 deep are refused', async () => {
    const chain = Array.from({ length: 1000 }, (_, i) => `/out${'/d'.repeat(i + 1)}`);
    const vm = await hostileDisk(
      'deep',
      chain.map((d) => `mkdir ${d}`),
    );
    const err = await refusal(vm);
    expect(err.reason).toBe('BadOutputs');
    expect(err.message).toMatch(/outputs nest deeper than 64 folders \(d\/d\/d/);
    expect(await outboxEntries(vm)).toEqual([]);
  });

  test('a huge sparse file is refused by its apparent size', async () => {
    const vm = await hostileDisk('sparse', ['write /etc/hostname /out/huge']);
    const ino = await inodeOf(vm.dataDisk, '/out', 'huge');
    await runCommand('debugfs', ['-w', '-R', `sif <${ino}> size 0x10000000000`, vm.dataDisk]);
    const err = await refusal(vm);
    expect(err.reason).toBe('OutputsTooLarge');
    expect(err.message).toMatch(
      /outputs of 1099511627781 bytes \(sparse files count by their size\) exceed the declared room of 8388608 bytes/,
    );
    expect(await outboxEntries(vm)).toEqual([]);
  });

  test('symlinks (to /etc/shadow, to ..), a device node and a FIFO are refused by name', async () => {
    const vm = await hostileDisk('links', [
      'symlink /out/shadow /etc/shadow',
      'symlink /out/up ..',
      'cd /out',
      'mknod disk b 8 0',
      'mknod pipe p',
    ]);
    const err = await refusal(vm);
    expect(err.reason).toBe('BadOutputs');
    for (const what of [
      'shadow (a symlink)',
      'up (a symlink)',
      'disk (not a regular file or folder)',
      'pipe (not a regular file or folder)',
    ])
      expect(err.message).toContain(what);
    expect(await outboxEntries(vm)).toEqual([]);
  });

  test("names with '/' and a second '..' or duplicate entry (debugfs mknod, ln) are refused", async () => {
    const vm = await hostileDisk('names', [
      'cd /out',
      `mknod ../../../../../../../../tmp/${escapeName} p`,
      'mkdir /out/d',
      'ln /out/ok.txt /out/d/..',
    ]);
    // Made a regular file, the entry whose name climbs out is what debugfs rdump would have written.
    const ino = await inodeOf(vm.dataDisk, '/out', `../../../../../../../../tmp/${escapeName}`);
    await runCommand('debugfs', ['-w', '-R', `sif <${ino}> mode 0100644`, vm.dataDisk]);
    const err = await refusal(vm);
    expect(err.reason).toBe('BadOutputs');
    expect(err.message).toContain(`"../../../../../../../../tmp/${escapeName}" (a name VSP cannot store)`);
    expect(err.message).toContain('ok.txt (a second entry of that name)');
    expect(await outboxEntries(vm)).toEqual([]);
  });

  test('a corrupted disk fails with the tool’s error, in bounded time', async () => {
    const vm = await hostileDisk('corrupt', []);
    const fh = await fs.open(vm.dataDisk, 'r+');
    try {
      // The primary superblock (offset 1024) and a stretch of group descriptors and inode tables.
      await fh.write(randomBytes(1024), 0, 1024, 1024);
      await fh.write(randomBytes(256 * 1024), 0, 256 * 1024, 4096);
    } finally {
      await fh.close();
    }
    const started = Date.now();
    const err = await staging.extract(vm, 'out').catch((e: unknown) => e as Error);
    process.stderr.write(`corrupted disk: ${describeError(err)}\n`);
    expect((err as Error).message).toMatch(
      /^dumpe2fs -h IMAGE on .*data\.img \(unprivileged\): dumpe2fs [\d.]+ \(.*\)\ndumpe2fs: Bad magic number in super-block/,
    );
    expect(Date.now() - started).toBeLessThan(60_000);
  });
});
