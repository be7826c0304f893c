import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { ensureAppliance } from '../drivers/qemu/appliance';
import { probeAccelerator } from '../drivers/qemu/accelerator';
import { QemuDriver } from '../drivers/qemu/qemuDriver';
import { DiskImageStaging } from '../storage/diskImageStaging';
import { ImageCache } from '../storage/imageCache';
import { VmStore } from '../storage/vmStore';
import type { BenchReport } from './report';

const MiB = 1024 * 1024;
const FILES = 10;

async function timed<T>(fn: () => Promise<T>): Promise<[T, number]> {
  const t0 = process.hrtime.bigint();
  const r = await fn();
  return [r, Number(process.hrtime.bigint() - t0) / 1e6];
}

async function writeInputs(dir: string, totalBytes: number): Promise<void> {
  await fs.mkdir(dir, { recursive: true });
  const block = randomBytes(MiB);
  for (let f = 0; f < FILES; f++) {
    const fh = await fs.open(path.join(dir, `part-${f}.bin`), 'w');
    try {
      for (let off = 0; off < totalBytes / FILES; off += MiB) await fh.write(block, 0, MiB, off);
    } finally {
      await fh.close();
    }
  }
}

/** Milliseconds from `t0` until `line` shows on the console (bounded). */
async function untilConsoleLine(
  file: string,
  line: string,
  t0: number,
  timeoutMs = 120_000,
): Promise<number> {
  for (;;) {
    const text = await fs.readFile(file, 'utf8').catch(() => '');
    if (text.includes(line)) return Date.now() - t0;
    if (Date.now() - t0 > timeoutMs) throw new Error(`no "${line}" on ${file} within ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

const mbps = (bytes: number, ms: number) => Number((bytes / MiB / (ms / 1000)).toFixed(0));

/**
 * Data-disk staging: stage-in (mke2fs -d, via DiskImageStaging.build) and stage-out (debugfs rdump, via
 * extract) throughput against a plain cp -r + sync of the same files, for 100 MB and 1 GB of inputs; and
 * the time from start() to the task's first console line in a TCG VM.
 */
export async function benchStaging(): Promise<BenchReport> {
  const work = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-bench-staging-'));
  // QEMU's unprivileged account must reach the store (mkdtemp makes the folder private).
  await fs.chmod(work, 0o711);
  const store = new VmStore(path.join(work, 'store'));
  await store.init();
  const staging = new DiskImageStaging();
  const rows: BenchReport['rows'] = [];
  let bootMs = 0;
  let bootAccel = '';
  try {
    for (const sizeMB of [100, 1000]) {
      const bytes = sizeMB * MiB;
      const src = path.join(work, 'src', 'out');
      await writeInputs(src, bytes);
      const vm = store.paths(`bench-${sizeMB}`);
      await fs.mkdir(vm.dir, { recursive: true });
      // The inputs sit under out/ so that stage-out extracts the same bytes.
      execFileSync('cp', ['-r', path.join(work, 'src'), vm.inputsDir]);
      execFileSync('sync');
      const [, buildMs] = await timed(() => staging.build(vm, 16 * MiB));
      const [, cpInMs] = await timed(async () => {
        execFileSync('cp', ['-r', src, path.join(work, 'cp-in')]);
        execFileSync('sync');
      });
      const [, extractMs] = await timed(() => staging.extract(vm, 'out'));
      execFileSync('sync');
      const [, cpOutMs] = await timed(async () => {
        execFileSync('cp', ['-r', path.join(work, 'cp-in'), path.join(work, 'cp-out')]);
        execFileSync('sync');
      });
      rows.push({
        inputsMB: sizeMB,
        stageInMs: Math.round(buildMs),
        stageInMBps: mbps(bytes, buildMs),
        cpInMBps: mbps(bytes, cpInMs),
        stageOutMs: Math.round(extractMs),
        stageOutMBps: mbps(bytes, extractMs),
        cpOutMBps: mbps(bytes, cpOutMs),
      });
      for (const p of ['src', 'cp-in', 'cp-out'])
        await fs.rm(path.join(work, p), { recursive: true, force: true });
      await store.remove(`bench-${sizeMB}`);
    }

    const appliance = await ensureAppliance();
    // Probe outside the timing: its bounded KVM attempt is not boot time.
    const accel = await probeAccelerator(appliance.vmlinuz);
    const cache = new ImageCache({ dir: store.imagesDir, maxVirtualBytes: 1024 ** 3 });
    const base = await cache.ensureFromFile(appliance.root.path, appliance.root.sha256);
    const driver = new QemuDriver({ store, hostName: 'bench', appliance, accel });
    const vm = store.paths('bench-boot');
    await fs.mkdir(vm.inputsDir, { recursive: true });
    await staging.build(vm, MiB);
    const handle = await driver.create({
      vmId: 'bench-boot',
      owner: 'bench',
      command: 'echo VSP-PROGRESS 1 first-line',
      vcpus: 1,
      memoryMiB: 256,
      baseImage: base.path,
      ports: [],
      timeLimitSec: 120,
    });
    try {
      const t0 = Date.now();
      await driver.start(handle);
      bootMs = await untilConsoleLine(vm.consoleLog, 'VSP-PROGRESS 1 first-line', t0);
      bootAccel = accel;
    } finally {
      await driver.destroy(handle);
    }
  } finally {
    await fs.rm(work, { recursive: true, force: true });
  }
  const big = rows.find((r) => r.inputsMB === 1000)!;
  return {
    name: 'staging',
    title: 'Data-disk staging (mke2fs -d / debugfs rdump) vs plain cp',
    method:
      `${FILES} files of random data per size, on the local disk. Stage-in: DiskImageStaging.build ` +
      `(walk + mke2fs -d + tune2fs + fsync) against cp -r + sync. Stage-out: extract (dumpe2fs + debugfs ` +
      `rdump of the same bytes) against cp -r + sync. Boot: start() to the task's first console line, TCG.`,
    rows,
    summary: {
      'stage-in MB/s (1 GB)': big.stageInMBps,
      'cp MB/s (1 GB)': big.cpInMBps,
      'stage-out MB/s (1 GB)': big.stageOutMBps,
      [`boot to first output line (ms, ${bootAccel})`]: bootMs,
    },
  };
}
