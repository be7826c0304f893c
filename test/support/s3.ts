import { randomBytes } from 'node:crypto';
import path from 'node:path';
import { startSeaweedS3, type SeaweedS3 } from '../../deploy/s3/seaweedfs';
import type { S3Settings } from '../../repository/store/backend';
import { testLogDir } from './testRun';

/**
 * A real S3 server for tests: SeaweedFS (deploy/s3/seaweedfs.ts), one per test file, and a fresh bucket
 * per call.
 */

export interface TestS3 {
  settings: S3Settings;
  /** Stops the server when its last user stops. */
  stop(): Promise<void>;
}

let shared: { weed: Promise<SeaweedS3>; users: number } | undefined;

/** An S3 bucket of its own on the test file's SeaweedFS (started by the first call). */
export async function startS3(): Promise<TestS3> {
  shared ??= {
    weed: startSeaweedS3({ logFile: path.join(testLogDir(), `weed-${randomBytes(4).toString('hex')}.log`) }),
    users: 0,
  };
  const mine = shared;
  mine.users += 1;
  const release = async (): Promise<void> => {
    mine.users -= 1;
    if (mine.users > 0) return;
    if (shared === mine) shared = undefined;
    await (await mine.weed).stop();
  };
  try {
    const settings = await (await mine.weed).bucket(`vsp-test-${randomBytes(6).toString('hex')}`);
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
