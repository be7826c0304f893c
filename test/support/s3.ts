import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { createWriteStream, promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { freePort } from '../../deploy/devcluster/ports';
import type { S3Settings } from '../../repository/store/backend';
import { ensureBucket } from '../../repository/store/s3Bytes';
import { testLogDir } from './testRun';

/**
 * A real S3 server for tests: SeaweedFS's `weed server -s3` (built once into the Go cache by
 * deploy/s3/build-seaweedfs.sh), one per test file on loopback ports, with credentials checked (an
 * identity of its own), and a fresh bucket per call.
 */

export interface TestS3 {
  settings: S3Settings;
  /** Stops the server when its last user stops. */
  stop(): Promise<void>;
}

interface Weed {
  child: ChildProcess;
  dir: string;
  endpoint: string;
  accessKey: string;
  secretKey: string;
  log: string;
}

let shared: { weed: Promise<Weed>; users: number } | undefined;

function weedBinary(): string {
  const script = path.join(__dirname, '../../deploy/s3/build-seaweedfs.sh');
  return execFileSync('bash', [script], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'] }).trim();
}

async function startWeed(): Promise<Weed> {
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
  const log = createWriteStream(path.join(testLogDir(), `weed-${path.basename(dir)}.log`));
  const child = spawn(
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
  return { child, dir, endpoint: `http://127.0.0.1:${s3}`, accessKey, secretKey, log: String(log.path) };
}

async function stopWeed(w: Weed): Promise<void> {
  if (w.child.exitCode === null && w.child.signalCode === null) {
    const exited = new Promise((resolve) => w.child.once('exit', resolve));
    w.child.kill('SIGTERM');
    const force = setTimeout(() => w.child.kill('SIGKILL'), 20_000);
    await exited;
    clearTimeout(force);
  }
  await fs.rm(w.dir, { recursive: true, force: true });
}

/** An S3 bucket of its own on the test file's SeaweedFS (started by the first call). */
export async function startS3(): Promise<TestS3> {
  shared ??= { weed: startWeed(), users: 0 };
  const mine = shared;
  mine.users += 1;
  const release = async (): Promise<void> => {
    mine.users -= 1;
    if (mine.users > 0) return;
    if (shared === mine) shared = undefined;
    await stopWeed(await mine.weed);
  };
  try {
    const w = await mine.weed;
    const settings: S3Settings = {
      endpoint: w.endpoint,
      bucket: `vsp-test-${randomBytes(6).toString('hex')}`,
      accessKey: w.accessKey,
      secretKey: w.secretKey,
      region: 'us-east-1',
    };
    // Polled until the server (master, volume, filer and gateway, started in turn) makes the bucket.
    const deadline = Date.now() + 90_000;
    for (;;) {
      try {
        await ensureBucket(settings);
        break;
      } catch (err) {
        if (w.child.exitCode !== null || Date.now() > deadline)
          throw new Error(`SeaweedFS did not come up (log: ${w.log})`, { cause: err });
        await new Promise((resolve) => setTimeout(resolve, 250));
      }
    }
    let stopped = false;
    return {
      settings,
      stop: async () => {
        if (!stopped) await release();
        stopped = true;
      },
    };
  } catch (err) {
    await release();
    throw err;
  }
}
