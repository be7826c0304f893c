import { spawn, execFile, type ChildProcess } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { addOwner } from '../repository/accounts/admin';
import { describeError } from '../logging/logger';
import { RepositoryClient } from '../repository/client';
import type { BenchReport } from './report';

/**
 * Repository throughput: upload and download of one large random file through the real server (a
 * child process, so its peak RSS is its own), side by side with `cp` + fsync of the same file on the
 * same disk in the same run. The server fsyncs every upload and the client every download, hence the
 * fsync on the cp side too.
 */

const run = promisify(execFile);

export function serverEntrypoint(): string {
  for (const candidate of [
    path.resolve(__dirname, '../repository/main.js'),
    path.resolve(process.cwd(), 'dist/repository/main.js'),
  ]) {
    if (existsSync(candidate)) return candidate;
  }
  throw new Error('dist/repository/main.js not found: run `npx tsc -p tsconfig.build.json` first');
}

export async function writeRandomFile(file: string, bytes: number): Promise<string> {
  const hash = createHash('sha256');
  const handle = await fs.open(file, 'w');
  try {
    for (let left = bytes; left > 0;) {
      const chunk = randomBytes(Math.min(left, 4 << 20));
      hash.update(chunk);
      await handle.write(chunk);
      left -= chunk.length;
    }
  } finally {
    await handle.close();
  }
  return hash.digest('hex');
}

/** Starts `node dist/repository/main.js` and waits for its "listening" log line. */
export async function startServerProcess(
  dataDir: string,
  serviceToken: string,
  /** More VSP_REPO_* settings, e.g. the SFTP and FTPS listeners. */
  extraEnv: NodeJS.ProcessEnv = {},
): Promise<{ child: ChildProcess; url: string }> {
  const child = spawn(process.execPath, [serverEntrypoint()], {
    env: {
      ...process.env,
      VSP_REPO_DIR: dataDir,
      VSP_REPO_LISTEN: '127.0.0.1:0',
      VSP_REPO_SERVICE_TOKEN: serviceToken,
      ...extraEnv,
    },
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  const url = await new Promise<string>((resolve, reject) => {
    let buffered = '';
    const onData = (chunk: Buffer): void => {
      buffered += chunk.toString();
      for (const line of buffered.split('\n')) {
        const m = /"url":"([^"]+)"/.exec(line);
        if (m && line.includes('listening')) {
          child.stderr?.off('data', onData);
          child.stderr?.resume();
          resolve(m[1]);
          return;
        }
      }
    };
    child.stderr?.on('data', onData);
    child.once('exit', (code) =>
      reject(new Error(`repository server exited with ${code} before listening: ${buffered}`)),
    );
  });
  return { child, url };
}

export async function stopServerProcess(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null) return;
  const exited = new Promise((resolve) => child.once('exit', resolve));
  child.kill('SIGTERM');
  await exited;
}

export async function peakRssMiB(pid: number): Promise<number> {
  const status = await fs.readFile(`/proc/${pid}/status`, 'utf8');
  const m = /^VmHWM:\s+(\d+) kB/m.exec(status);
  if (!m) throw new Error(`no VmHWM in /proc/${pid}/status`);
  return Number(m[1]) / 1024;
}

export async function timed(fn: () => Promise<unknown>): Promise<number> {
  const start = process.hrtime.bigint();
  await fn();
  return Number(process.hrtime.bigint() - start) / 1e9;
}

export const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

export async function benchRepository(opts: { sizeMiB?: number; runs?: number } = {}): Promise<BenchReport> {
  const sizeMiB = opts.sizeMiB ?? 1024;
  const runs = opts.runs ?? 3;
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-bench-repo-'));
  let child: ChildProcess | undefined;
  try {
    const src = path.join(dir, 'source.bin');
    const dst = path.join(dir, 'copy.bin');
    const dataDir = path.join(dir, 'data');
    const sha256 = await writeRandomFile(src, sizeMiB * 1024 * 1024);
    // The owner's own token: a service token (the hosts') reads base images only.
    const { token } = await addOwner(dataDir, 'bench');
    const started = await startServerProcess(dataDir, randomBytes(32).toString('base64url'));
    child = started.child;
    const client = new RepositoryClient({ url: started.url, token });

    const times = { cp: [] as number[], upload: [] as number[], download: [] as number[] };
    for (let i = 0; i < runs; i++) {
      times.cp.push(await timed(() => run('sh', ['-c', 'cp "$1" "$2" && sync "$2"', 'cp', src, dst])));
      await fs.rm(dst);
      times.upload.push(
        await timed(async () => {
          const info = await client.upload('bench', 'big.bin', src, { sha256 });
          if (info.sha256 !== sha256) throw new Error('upload stored different bytes');
        }),
      );
      times.download.push(
        await timed(async () => {
          const info = await client.download('bench', 'big.bin', dst);
          if (info.sha256 !== sha256) throw new Error('download returned different bytes');
        }),
      );
      await fs.rm(dst);
    }
    const serverPeak = await peakRssMiB(child.pid!);
    const cp = median(times.cp);
    const rate = (s: number): number => Math.round((sizeMiB / s) * 10) / 10;
    const ratio = (s: number): number => Math.round((cp / s) * 100) / 100;
    const rows = (['cp', 'upload', 'download'] as const).map((op) => ({
      operation: op === 'cp' ? 'cp + fsync (baseline)' : `repository ${op} (HTTP, sha256, fsync)`,
      'size (MiB)': sizeMiB,
      'median s': Math.round(median(times[op]) * 1000) / 1000,
      'MiB/s': rate(median(times[op])),
      'speed vs cp': ratio(median(times[op])),
    }));
    return {
      name: 'repository',
      title: 'Repository upload/download throughput vs cp',
      method:
        `One ${sizeMiB} MiB random file, ${runs} runs, medians. Upload and download go through RepositoryClient ` +
        'to the repository server running as a separate process (node dist/repository/main.js) on 127.0.0.1; ' +
        'both sides hash with SHA-256 and fsync. The baseline is `cp` + `sync FILE` of the same file on the same ' +
        'disk in the same run. Source data is in the page cache for all three. Server peak RSS is VmHWM from ' +
        '/proc/<pid>/status after all runs.',
      rows,
      summary: {
        'upload speed / cp speed': ratio(median(times.upload)),
        'download speed / cp speed': ratio(median(times.download)),
        'upload MiB/s': rate(median(times.upload)),
        'download MiB/s': rate(median(times.download)),
        'server peak RSS (MiB)': Math.round(serverPeak),
        'client peak RSS (MiB)': Math.round(process.resourceUsage().maxRSS / 1024),
      },
    };
  } finally {
    if (child) await stopServerProcess(child);
    await fs.rm(dir, { recursive: true, force: true });
  }
}

/**
 * Many clients at once: `clients` concurrent uploads of `sizeMiB` each (10 owners, each with its own
 * token), then every stored file checked by its checksum. Errors are counted, never retried.
 */
export async function benchRepositoryConcurrency(
  opts: { clients?: number; sizeMiB?: number } = {},
): Promise<BenchReport> {
  const clients = opts.clients ?? 100;
  const sizeMiB = opts.sizeMiB ?? 10;
  const owners = Array.from({ length: 10 }, (_, i) => `owner${i}`);
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-bench-repo-many-'));
  let child: ChildProcess | undefined;
  try {
    const dataDir = path.join(dir, 'data');
    const tokens = await Promise.all(owners.map(async (o) => (await addOwner(dataDir, o)).token));
    const srcs = await Promise.all(
      Array.from({ length: 4 }, async (_, i) => {
        const file = path.join(dir, `source${i}.bin`);
        return { file, sha256: await writeRandomFile(file, sizeMiB * 1024 * 1024) };
      }),
    );
    const started = await startServerProcess(dataDir, randomBytes(32).toString('base64url'));
    child = started.child;
    const perUpload: number[] = [];
    const errors: string[] = [];
    const wall = await timed(() =>
      Promise.all(
        Array.from({ length: clients }, async (_, i) => {
          const owner = i % owners.length;
          const src = srcs[i % srcs.length];
          const client = new RepositoryClient({ url: started.url, token: tokens[owner] });
          try {
            perUpload.push(await timed(() => client.upload(owners[owner], `many/${i}.bin`, src.file)));
          } catch (err) {
            errors.push(describeError(err));
          }
        }),
      ),
    );
    let mismatches = 0;
    for (const [o, owner] of owners.entries()) {
      const client = new RepositoryClient({ url: started.url, token: tokens[o] });
      for (const f of await client.list(owner, 'many/')) {
        const i = Number(f.path.slice('many/'.length, -'.bin'.length));
        if (f.sha256 !== srcs[i % srcs.length].sha256) mismatches++;
      }
    }
    const stored = clients - errors.length;
    const sorted = [...perUpload].sort((a, b) => a - b);
    const totalMiBps = Math.round(((stored * sizeMiB) / wall) * 10) / 10;
    return {
      name: 'repository-concurrency',
      title: `Repository: ${clients} concurrent clients uploading ${sizeMiB} MiB each`,
      method:
        `${clients} RepositoryClient uploads started at once over HTTP (10 owners with their own tokens) to the ` +
        'repository server as a separate process on 127.0.0.1; wall time from first start to last finish; then ' +
        "every stored file's SHA-256 compared with its source. Failed uploads are counted, not retried.",
      rows: [
        {
          clients,
          'MiB each': sizeMiB,
          'wall s': Math.round(wall * 100) / 100,
          'total MiB/s': totalMiBps,
          'median upload s': Math.round(median(sorted) * 100) / 100,
          'slowest upload s': Math.round((sorted.at(-1) ?? 0) * 100) / 100,
          errors: errors.length,
          'checksum mismatches': mismatches,
        },
      ],
      summary: {
        'total MiB/s': totalMiBps,
        errors: errors.length,
        'checksum mismatches': mismatches,
        'server peak RSS (MiB)': Math.round(await peakRssMiB(child.pid!)),
        ...(errors.length > 0 ? { 'first error': errors[0] } : {}),
      },
    };
  } finally {
    if (child) await stopServerProcess(child);
    await fs.rm(dir, { recursive: true, force: true });
  }
}
