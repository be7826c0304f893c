import { execFileSync, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { addOwner } from '../repository/accounts/admin';
import { RepositoryClient } from '../repository/client';
import { DiskImageStaging } from '../storage/diskImageStaging';
import { downloadInputs, inputSizes } from '../storage/inputDownloads';
import { VmStore, type VmPaths } from '../storage/vmStore';
import { median, startServerProcess, stopServerProcess, writeRandomFile } from './repository';
import type { BenchReport } from './report';

const MiB = 1024 * 1024;
const BIG_FILES = 8;
const SMALL_BYTES = 4096;
/** Inputs a task may name (spec/taskSpec.ts). */
const MAX_INPUTS = 1000;

async function timed(fn: () => Promise<unknown>): Promise<number> {
  const t0 = process.hrtime.bigint();
  await fn();
  return Number(process.hrtime.bigint() - t0) / 1e6;
}

const sh = (script: string, ...args: string[]) => execFileSync('sh', ['-c', script, 'sh', ...args]);
const mbps = (bytes: number, ms: number) => Number((bytes / MiB / (ms / 1000)).toFixed(0));
const ratio = (refMs: number, ms: number) => Number((refMs / ms).toFixed(2));

/**
 * Stage-in as the host's stageIn activity does it: the inputs' sizes, the data disk made to measure and
 * mounted, the inputs downloaded onto it (SHA-256 checked on the way), the disk published.
 */
async function stageIn(
  staging: DiskImageStaging,
  client: RepositoryClient,
  vm: VmPaths,
  inputs: string[],
  outputRoomBytes: number,
): Promise<void> {
  const files = await inputSizes(client, 'bench', inputs);
  await staging.prepare(vm, { files, outputRoomBytes });
  await downloadInputs(client, 'bench', vm.inputsDir, { files, verified: {}, sync: !staging.syncsInputs });
  await staging.build(vm, outputRoomBytes);
}

/**
 * Data-disk staging side by side with the plain tools, in one run: 1 GiB of inputs from the repository
 * (a server process on loopback) to a ready data disk against `cp` + sync of the same files; 10,000
 * files of 4 KiB made into a data disk, and a task's 1000 small inputs staged in, against `tar` extraction
 * + sync; stage-out of the 1 GiB against `cp` + sync. (Boot times: the lifecycle benchmark.)
 */
export async function benchStaging(opts: { quick?: boolean } = {}): Promise<BenchReport> {
  const bigBytes = (opts.quick ? 64 : 1024) * MiB;
  const smallFiles = opts.quick ? 2000 : 10_000;
  const runs = opts.quick ? 1 : 3;
  const work = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-bench-staging-'));
  // QEMU's unprivileged account must reach the store (mkdtemp makes the folder private).
  await fs.chmod(work, 0o711);
  const store = new VmStore(path.join(work, 'store'));
  await store.init();
  const staging = new DiskImageStaging();
  const times = {
    cpIn: [] as number[],
    stageIn: [] as number[],
    cpOut: [] as number[],
    stageOut: [] as number[],
  };
  const small = {
    tar: [] as number[],
    build: [] as number[],
    tarInputs: [] as number[],
    inputs: [] as number[],
  };
  let child: ChildProcess | undefined;
  try {
    // The inputs sit under out/ so that stage-out extracts the same bytes (room for them declared).
    const src = path.join(work, 'src');
    await fs.mkdir(path.join(src, 'out'), { recursive: true });
    const inputs = Array.from({ length: BIG_FILES }, (_, i) => `out/part-${i}.bin`);
    const dataDir = path.join(work, 'repo');
    const { token } = await addOwner(dataDir, 'bench');
    const started = await startServerProcess(dataDir, randomBytes(32).toString('base64url'));
    child = started.child;
    const client = new RepositoryClient({ url: started.url, token });
    for (const input of inputs) {
      const file = path.join(src, input);
      await writeRandomFile(file, bigBytes / BIG_FILES);
      await client.upload('bench', input, file);
    }
    const cpDest = path.join(work, 'cp');
    const cpSync = async (from: string) => {
      await fs.rm(cpDest, { recursive: true, force: true });
      return timed(async () => sh('cp -r "$1" "$2" && sync "$2"/out/*', from, cpDest));
    };

    for (let run = 0; run < runs; run++) {
      times.cpIn.push(await cpSync(src));
      const vm = store.paths(`bench-${run}`);
      await fs.mkdir(vm.dir, { recursive: true });
      times.stageIn.push(await timed(() => stageIn(staging, client, vm, inputs, bigBytes + 16 * MiB)));
      times.stageOut.push(await timed(() => staging.extract(vm, 'out')));
      times.cpOut.push(await cpSync(src));
      await store.remove(`bench-${run}`);
    }
    await fs.rm(cpDest, { recursive: true, force: true });

    // Many small files, already on the host: the data-disk build against tar extraction.
    const smallSrc = path.join(work, 'small');
    for (let i = 0; i < smallFiles; i++) {
      const dir = path.join(smallSrc, `d${Math.floor(i / 500)}`);
      if (i % 500 === 0) await fs.mkdir(dir, { recursive: true });
      await fs.writeFile(path.join(dir, `f${i}`), randomBytes(SMALL_BYTES));
    }
    const tarFile = path.join(work, 'small.tar');
    sh('tar cf "$1" -C "$2" .', tarFile, smallSrc);
    /** Each run: `tar x` of `tar` + sync, then `stage` onto a fresh VM's data disk (after `setup`, untimed). */
    const besideTar = async (
      tar: string,
      tarMs: number[],
      stageMs: number[],
      stage: (vm: VmPaths) => Promise<unknown>,
      setup: (vm: VmPaths) => void = () => undefined,
    ) => {
      for (let run = 0; run < runs; run++) {
        const dest = path.join(work, 'untar');
        await fs.mkdir(dest);
        tarMs.push(await timed(async () => sh('tar xf "$1" -C "$2" && sync -f "$2"', tar, dest)));
        await fs.rm(dest, { recursive: true });
        const vm = store.paths(`small-${run}`);
        await fs.mkdir(vm.dir, { recursive: true });
        setup(vm);
        stageMs.push(await timed(() => stage(vm)));
        await store.remove(`small-${run}`);
      }
    };
    await besideTar(
      tarFile,
      small.tar,
      small.build,
      (vm) => staging.build(vm, 16 * MiB),
      (vm) => sh('cp -r "$1" "$2"', smallSrc, vm.inputsDir),
    );
    // As many small inputs as a task may name, from the repository (the stageIn path) against tar x.
    const names = Array.from({ length: MAX_INPUTS }, (_, i) => `d${Math.floor(i / 500)}/f${i}`);
    for (const name of names) await client.upload('bench', name, path.join(smallSrc, name));
    const fewTar = path.join(work, 'inputs.tar');
    sh('cd "$2" && tar cf "$1" d0 d1', fewTar, smallSrc);
    await besideTar(fewTar, small.tarInputs, small.inputs, (vm) =>
      stageIn(staging, client, vm, names, 16 * MiB),
    );
  } finally {
    if (child) await stopServerProcess(child);
    await fs.rm(work, { recursive: true, force: true });
  }
  const m = Object.fromEntries(
    Object.entries({ ...times, ...small }).map(([k, v]) => [k, median(v)]),
  ) as Record<keyof typeof times | keyof typeof small, number>;
  const smallTotal = smallFiles * SMALL_BYTES;
  const row = (what: string, ms: number, bytes: number, refMs: number) => ({
    operation: what,
    'median ms': Math.round(ms),
    'MiB/s': mbps(bytes, ms),
    'speed vs reference': ratio(refMs, ms),
  });
  return {
    name: 'staging',
    title: 'Data-disk staging vs cp and tar',
    method:
      `${runs} run(s), medians, each stage-in beside its reference in the same run. Stage-in: ${BIG_FILES} ` +
      `random files (${bigBytes / MiB} MiB in all) from the repository server (a separate process on ` +
      `127.0.0.1, SHA-256 checked) to a ready data disk (fsynced), as the stageIn activity does it; ` +
      `reference: cp -r + sync of the same files. Stage-out: extract (dumpe2fs + debugfs dump as an ` +
      `unprivileged account) of the same bytes; reference: cp -r + sync. Small files: ${smallFiles} files ` +
      `of ${SMALL_BYTES} bytes already on the host made into a data disk (mke2fs -d); reference: tar x + ` +
      `sync -f. Small inputs: ${MAX_INPUTS} of those (a task's most) staged in from the repository.`,
    rows: [
      row('cp -r + sync (reference)', m.cpIn, bigBytes, m.cpIn),
      row('stage-in: repository -> data disk ready', m.stageIn, bigBytes, m.cpIn),
      row('stage-out: data disk -> outputs folder', m.stageOut, bigBytes, m.cpOut),
      row(`tar x + sync, ${smallFiles} x 4 KiB (reference)`, m.tar, smallTotal, m.tar),
      row(`data disk of ${smallFiles} x 4 KiB`, m.build, smallTotal, m.tar),
      row(
        `tar x + sync, ${MAX_INPUTS} x 4 KiB (reference)`,
        m.tarInputs,
        MAX_INPUTS * SMALL_BYTES,
        m.tarInputs,
      ),
      row(`stage-in of ${MAX_INPUTS} x 4 KiB inputs`, m.inputs, MAX_INPUTS * SMALL_BYTES, m.tarInputs),
    ],
    summary: {
      [`stage-in / cp + sync (${bigBytes / MiB} MiB)`]: ratio(m.cpIn, m.stageIn),
      [`small files / tar (${smallFiles} x 4 KiB)`]: ratio(m.tar, m.build),
      [`stage-in of ${MAX_INPUTS} small inputs / tar`]: ratio(m.tarInputs, m.inputs),
      'stage-out / cp + sync': ratio(m.cpOut, m.stageOut),
      'stage-in MiB/s': mbps(bigBytes, m.stageIn),
    },
  };
}
