import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { createWriteStream, promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { S3Settings } from '../../repository/store/backend';
import { ensureBucket } from '../../repository/store/s3Bytes';
import { freePort } from '../devcluster/ports';
import { repoRoot } from '../devcluster/tools';

/**
 * A throw-away S3 server for the tests and benchmarks: SeaweedFS's `weed server -s3` (built once into the
 * Go cache by deploy/s3/build-seaweedfs.sh) on loopback ports, with credentials checked (an identity of
 * its own). Its data lives in a temp folder removed on stop.
 */

export interface SeaweedS3 {
  endpoint: string;
  accessKey: string;
  secretKey: string;
  /** The server's output. */
  logFile: string;
  /** Makes `bucket` (waiting for the server to come up: master, volume, filer and gateway start in turn). */
  bucket(name: string): Promise<S3Settings>;
  stop(): Promise<void>;
}

function weedBinary(): string {
  const script = path.join(repoRoot(), 'deploy', 's3', 'build-seaweedfs.sh');
  return execFileSync('bash', [script], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'] }).trim();
}

export async function startSeaweedS3(opts: { logFile: string }): Promise<SeaweedS3> {
  const bin = weedBinary();
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-s3-'));
  const accessKey = `vsp${randomBytes(6).toString('hex')}`;
  const secretKey = randomBytes(24).toString('hex');
  const config = path.join(dir, 's3.json');
  await fs.writeFile(
    config,
    JSON.stringify({
      identities: [
        { name: 'vsp', credentials: [{ accessKey, secretKey }], actions: ['Admin', 'Read', 'Write', 'List'] },
      ],
    }),
    { mode: 0o600 },
  );
  await fs.mkdir(path.join(dir, 'data'));
  const ports: number[] = [];
  for (let i = 0; i < 8; i++) ports.push(await freePort());
  const [master, masterGrpc, volume, volumeGrpc, filer, filerGrpc, s3, s3Grpc] = ports;
  const log = createWriteStream(opts.logFile);
  const child: ChildProcess = spawn(
    bin,
    [
      'server',
      `-dir=${path.join(dir, 'data')}`,
      '-ip=127.0.0.1',
      '-ip.bind=127.0.0.1',
      `-master.port=${master}`,
      `-master.port.grpc=${masterGrpc}`,
      `-volume.port=${volume}`,
      `-volume.port.grpc=${volumeGrpc}`,
      `-filer.port=${filer}`,
      `-filer.port.grpc=${filerGrpc}`,
      '-s3',
      `-s3.port=${s3}`,
      `-s3.port.grpc=${s3Grpc}`,
      `-s3.config=${config}`,
      '-master.volumeSizeLimitMB=256',
      '-volume.max=32',
      '-master.telemetry=false',
    ],
    { cwd: dir, stdio: ['ignore', 'pipe', 'pipe'] },
  );
  child.stdout?.pipe(log);
  child.stderr?.pipe(log);
  const endpoint = `http://127.0.0.1:${s3}`;
  return {
    endpoint,
    accessKey,
    secretKey,
    logFile: opts.logFile,
    bucket: async (bucket) => {
      const settings: S3Settings = { endpoint, bucket, accessKey, secretKey, region: 'us-east-1' };
      // Polled until the server makes the bucket.
      const deadline = Date.now() + 90_000;
      for (;;) {
        try {
          await ensureBucket(settings);
          return settings;
        } catch (err) {
          if (child.exitCode !== null || Date.now() > deadline)
            throw new Error(`SeaweedFS did not come up (log: ${opts.logFile})`, { cause: err });
          await new Promise((resolve) => setTimeout(resolve, 250));
        }
      }
    },
    stop: async () => {
      if (child.exitCode === null && child.signalCode === null) {
        const exited = new Promise((resolve) => child.once('exit', resolve));
        child.kill('SIGTERM');
        const force = setTimeout(() => child.kill('SIGKILL'), 20_000);
        await exited;
        clearTimeout(force);
      }
      await fs.rm(dir, { recursive: true, force: true });
    },
  };
}
