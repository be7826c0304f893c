import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { BenchReport } from './report';

const MiB = 1024 * 1024;
const REPS = 3;

function timeMs(fn: () => void): number {
  const t0 = process.hrtime.bigint();
  fn();
  return Number(process.hrtime.bigint() - t0) / 1e6;
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)];
}

/** A fully allocated file: random 1 MiB blocks, so neither the file system nor qemu-img can skip any. */
async function writeAllocated(file: string, bytes: number): Promise<void> {
  const fh = await fs.open(file, 'w');
  try {
    const block = randomBytes(MiB);
    for (let off = 0; off < bytes; off += MiB) {
      block.writeUInt32LE(off / MiB, 0);
      await fh.write(block, 0, MiB, off);
    }
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/**
 * VM root disk creation on the local disk: a qcow2 CoW overlay on a cached base (VSP's way) against a
 * full copy of the base (the paper's way: cp + sync), for two base sizes and both base formats.
 */
export async function benchVmCreation(): Promise<BenchReport> {
  const work = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-bench-vmcreate-'));
  const rows: BenchReport['rows'] = [];
  try {
    for (const sizeMiB of [256, 1024]) {
      const raw = path.join(work, `base-${sizeMiB}.raw`);
      await writeAllocated(raw, sizeMiB * MiB);
      const qcow2 = path.join(work, `base-${sizeMiB}.qcow2`);
      execFileSync('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, qcow2]);
      for (const [format, base] of [
        ['raw', raw],
        ['qcow2', qcow2],
      ] as const) {
        const overlay: number[] = [];
        const copy: number[] = [];
        for (let i = 0; i < REPS; i++) {
          const ov = path.join(work, `overlay-${i}.qcow2`);
          overlay.push(
            timeMs(() =>
              execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', format, ov]),
            ),
          );
          await fs.rm(ov);
          const cp = path.join(work, `copy-${i}.${format}`);
          copy.push(
            timeMs(() => {
              execFileSync('cp', [base, cp]);
              execFileSync('sync', ['-f', cp]);
            }),
          );
          await fs.rm(cp);
        }
        const o = median(overlay);
        const c = median(copy);
        rows.push({
          base: format,
          baseMiB: sizeMiB,
          baseFileMiB: Math.round((await fs.stat(base)).size / MiB),
          overlayMs: Number(o.toFixed(1)),
          copySyncMs: Number(c.toFixed(0)),
          copyOverOverlay: Number((c / o).toFixed(0)),
        });
      }
      await fs.rm(raw);
      await fs.rm(qcow2);
    }
  } finally {
    await fs.rm(work, { recursive: true, force: true });
  }
  const at = (fmt: string, size: number) => rows.find((r) => r.base === fmt && r.baseMiB === size)!;
  return {
    name: 'vm-creation',
    title: 'VM root disk creation: CoW overlay vs full copy',
    method:
      `Fully allocated bases (random data) of 256 MiB and 1 GiB, raw and qcow2, on the local disk. ` +
      `Overlay: qemu-img create -f qcow2 -b base -F fmt. Copy: cp base + sync -f (the paper's way). ` +
      `Median of ${REPS} runs each, side by side in one run.`,
    rows,
    summary: {
      'overlay ms (1 GiB raw)': at('raw', 1024).overlayMs,
      'copy+sync ms (1 GiB raw)': at('raw', 1024).copySyncMs,
      'copy/overlay ratio (1 GiB raw)': at('raw', 1024).copyOverOverlay,
      'copy growth 256 MiB -> 1 GiB (raw)': `x${(Number(at('raw', 1024).copySyncMs) / Number(at('raw', 256).copySyncMs)).toFixed(1)}`,
      'overlay growth 256 MiB -> 1 GiB (raw)': `x${(Number(at('raw', 1024).overlayMs) / Number(at('raw', 256).overlayMs)).toFixed(1)}`,
    },
  };
}
