import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { startRepositoryServer } from '../../repository/server';
import { PG_SCHEMA_VERSION } from '../../repository/store/pgMetadata';
import { runAdminCli } from '../support/adminCli';
import { startPostgres, type TestDatabase } from '../support/postgres';
import { startS3, type TestS3 } from '../support/s3';

// `vsp repository migrate` on the `cluster` backend: the schema and the bucket, once; servers refuse less.
let db: TestDatabase;
let s3: TestS3;
let dataDir: string;
const saved = { ...process.env };

beforeAll(async () => {
  [db, s3] = await Promise.all([startPostgres(), startS3()]);
  dataDir = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-migrate-'));
  Object.assign(process.env, {
    VSP_REPOSITORY_BACKEND: 'cluster',
    VSP_REPOSITORY_PG_URL: db.url,
    VSP_REPOSITORY_S3_ENDPOINT: s3.settings.endpoint,
    // Not made yet: migrate creates it.
    VSP_REPOSITORY_S3_BUCKET: `${s3.settings.bucket}-new`,
    VSP_REPOSITORY_S3_ACCESS_KEY: s3.settings.accessKey,
    VSP_REPOSITORY_S3_SECRET_KEY: s3.settings.secretKey,
  });
}, 180_000);

afterAll(async () => {
  process.env = saved;
  await Promise.all([db?.stop(), s3?.stop()]);
  await fs.rm(dataDir, { recursive: true, force: true });
}, 120_000);

test('a server refuses an unmigrated database; migrate makes the schema and bucket once', async () => {
  await expect(startRepositoryServer({ dataDir, port: 0 })).rejects.toThrow(
    new RegExp(`schema 0 but this VSP needs ${PG_SCHEMA_VERSION}: run \`vsp repository migrate\``),
  );
  const first = JSON.parse(await runAdminCli(dataDir, '--json', 'repository', 'migrate'));
  expect(first).toEqual({
    backend: 'cluster',
    fromVersion: 0,
    toVersion: PG_SCHEMA_VERSION,
    bucketCreated: true,
  });
  const again = JSON.parse(await runAdminCli(dataDir, '--json', 'repository', 'migrate'));
  expect(again).toMatchObject({ fromVersion: PG_SCHEMA_VERSION, bucketCreated: false });
  const server = await startRepositoryServer({ dataDir, port: 0 });
  await server.close();
});

test('settings are validated naming the variable', async () => {
  const { backendSettingsFromEnv } = await import('../../repository/store/backend.js');
  expect(() => backendSettingsFromEnv({ VSP_REPOSITORY_BACKEND: 'nfs' })).toThrow(/must be local or cluster/);
  expect(() => backendSettingsFromEnv({ VSP_REPOSITORY_BACKEND: 'cluster' })).toThrow(
    /VSP_REPOSITORY_PG_URL is required/,
  );
  expect(() =>
    backendSettingsFromEnv({ ...process.env, VSP_REPOSITORY_S3_ENDPOINT: 'http://h:1/path' }),
  ).toThrow(/VSP_REPOSITORY_S3_ENDPOINT="http:\/\/h:1\/path" must be http\(s\):\/\/host:port/);
});
