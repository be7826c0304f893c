import { execFileSync } from 'node:child_process';
import { createReadStream, promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { WorkflowFailedError } from '@temporalio/client';
import { taskFailureMessage } from '../client/vspClient';
import { ensureAppliance } from '../drivers/qemu/appliance';
import { withAdmin } from '../repository/admin';
import { addBaseImage } from '../repository/imageStore';
import { startClusterFixture, type ClusterFixture } from './support/clusterFixture';

/**
 * A task boots from one of the provider's base images, named `base:<name>` in its spec: the admin adds
 * the image on the repository host (as `vsp image add-base` does) and the host fetches it through the
 * owner's read-only view of the base images. One real QEMU VM (TCG).
 */
const HOST = 'b';
const OWNER = 'alice';

let fx: ClusterFixture;
let tmp: string;

beforeAll(async () => {
  tmp = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-base-image-'));
  fx = await startClusterFixture({
    hosts: [HOST],
    owners: [OWNER],
    drivers: ['qemu'],
    hostEnv: { VSP_ACCEL: 'tcg' },
  });
}, 180_000);

afterAll(async () => {
  await fx?.stop();
  if (tmp) await fs.rm(tmp, { recursive: true, force: true });
});

function submit(image: string, command: string) {
  return fx.vsp.submit({ owner: OWNER, driver: 'qemu', host: HOST, timeLimitSec: 300, image, command });
}

test("a task boots from a provider base image named 'base:<name>'", async () => {
  // The appliance root with a marker file added (debugfs, no mount), as the provider's own qcow2.
  const appliance = await ensureAppliance();
  const raw = path.join(tmp, 'base.raw');
  const image = path.join(tmp, 'base.qcow2');
  const marker = path.join(tmp, 'marker');
  const text = `provider base image ${Date.now()}\n`;
  await fs.writeFile(marker, text);
  await fs.chmod(marker, 0o644);
  execFileSync('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', appliance.root.path, raw]);
  execFileSync('debugfs', ['-w', '-R', `write ${marker} /etc/vsp-image`, raw], { stdio: 'ignore' });
  execFileSync('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, image]);
  await fs.rm(raw);
  const added = await withAdmin(fx.cluster.repoDir, (_a, db) =>
    addBaseImage(fx.cluster.repoDir, db, 'marked', createReadStream(image)),
  );
  expect(added).toMatchObject({ name: 'base:marked', status: 'ok', format: 'qcow2' });
  expect((await fx.repo(OWNER).listImages(OWNER)).map((i) => i.name)).toEqual(['base:marked']);

  const { taskId } = await submit('base:marked', 'mkdir -p out && cat /etc/vsp-image > out/which.txt');
  const result = await fx.vsp.result(taskId);
  expect(result.exitCode).toBe(0);
  const got = path.join(tmp, 'which.txt');
  await fx.repo(OWNER).download(OWNER, `${result.resultsPath}/outputs/which.txt`, got);
  expect(await fs.readFile(got, 'utf8')).toBe(text);
}, 300_000);

test('a base image that does not exist fails the task at once, saying so', async () => {
  const { taskId } = await submit('base:missing', 'true');
  const err = await fx.vsp.result(taskId).catch((e: unknown) => e);
  expect(err).toBeInstanceOf(WorkflowFailedError);
  expect(taskFailureMessage(err)).toMatch(/image 'base:missing' is not in the provider's base images/);
}, 120_000);
