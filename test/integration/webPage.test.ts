import { createHash, randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import type { Browser, BrowserContext, Page } from 'playwright-core';
import { addOwner } from '../../repository/accounts/admin';
import { startRepositoryServer } from '../../repository/server';
import { TEMPORAL_NOT_CONFIGURED } from '../../repository/tasks/taskRequests';
import { CONTENT_SECURITY_POLICY } from '../../repository/http/webAssets';
import { repoRoot } from '../../deploy/devcluster/tools';
import { startClusterFixture, until, type ClusterFixture } from '../support/clusterFixture';
import { launchChromium } from '../support/headlessChromium';
import { waitingCommand } from '../support/releasedTasks';
import { temporalUiUrl } from '../support/temporalEnv';
import { testLogDir } from '../support/testRun';

/**
 * The repository's web page in headless Chromium against a real cluster (Temporal, repository, control
 * and host workers): sign in, upload with progress, run a task, follow it, download its output.
 */

let fx: ClusterFixture;
let browser: Browser | undefined;
let context: BrowserContext | undefined;
let page: Page;
let tmp: string;

/** Lines of random hex: over one upload chunk (8 MiB), so the page uploads in two requests. */
const LINES = 1_000_000;
const words = Buffer.from(
  Array.from({ length: LINES }, () => randomBytes(4).toString('hex'))
    .join('\n')
    .concat('\n'),
);
const sortedWords = Buffer.from(words.toString().trimEnd().split('\n').sort().join('\n').concat('\n'));
const sha256 = (b: Buffer) => createHash('sha256').update(b).digest('hex');

beforeAll(async () => {
  fx = await startClusterFixture({ hosts: ['a'], owners: ['dora', 'erin'] });
  tmp = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-web-'));
  browser = await launchChromium();
  context = await browser.newContext({ acceptDownloads: true, viewport: { width: 1280, height: 900 } });
  page = await context.newPage();
}, 240_000);

afterAll(async () => {
  await context?.close();
  await browser?.close();
  await fx?.stop();
  if (tmp) await fs.rm(tmp, { recursive: true, force: true });
}, 60_000);

const token = (owner: string) => fx.cluster.ownerTokens.get(owner) as string;

/** Waits for an element matching `selector` (jest has no locator matchers: Playwright's waitFor polls). */
async function present(selector: string, opts: { hasText?: RegExp | string; timeout?: number } = {}) {
  const loc = page.locator(selector, { hasText: opts.hasText }).first();
  await loc.waitFor({ state: 'attached', timeout: opts.timeout ?? 30_000 });
  return loc;
}

/**
 * The README's pictures: the web page and Temporal's web UI, with a running and a finished task. Into the
 * run's log folder; VSP_UPDATE_SCREENSHOTS=1 writes the README's own (docs/screenshots/), so a test run leaves
 * the checkout as it was.
 */
async function screenshot(name: string, of: Page = page): Promise<void> {
  const dir =
    process.env.VSP_UPDATE_SCREENSHOTS === '1'
      ? path.join(repoRoot(), 'docs', 'screenshots')
      : path.join(testLogDir(), 'screenshots');
  const file = path.join(dir, `${name}.png`);
  await fs.mkdir(path.dirname(file), { recursive: true });
  await of.screenshot({ path: file, fullPage: true });
  expect((await fs.stat(file)).size).toBeGreaterThan(10_000);
}

/** Temporal's web UI on the task's page, once it shows the task. */
async function temporalUiShot(name: string, taskId: string, status: RegExp): Promise<void> {
  const ui = await context!.newPage();
  try {
    await ui.setViewportSize({ width: 1280, height: 900 });
    await ui.goto(`${temporalUiUrl()}/namespaces/default/workflows/${encodeURIComponent(taskId)}`);
    await ui.getByText(taskId).first().waitFor({ timeout: 30_000 });
    await ui.getByText(status).first().waitFor({ timeout: 30_000 });
    await screenshot(name, ui);
  } finally {
    await ui.close();
  }
}

/** Browser-side code goes in as text: the test compiles without the DOM library. */
const sessionStorageLength = () => page.evaluate<number>('sessionStorage.length');

async function signIn(owner: string, secret: string, by: 'click' | 'keyboard' = 'click'): Promise<void> {
  await page.getByLabel('Owner', { exact: true }).fill(owner);
  await page.getByLabel('Access token').fill(secret);
  if (by === 'keyboard') await page.getByLabel('Access token').press('Enter');
  else await page.getByRole('button', { name: 'Sign in', exact: true }).click();
}

test('the page is served with its security headers, and refuses a bad token with a clear error', async () => {
  // Nothing the page asks for at load is missing (no favicon 404 in the console).
  const failed: string[] = [];
  page.on('response', (r) => void (r.status() >= 400 && failed.push(`${r.status()} ${r.url()}`)));
  const res = await page.goto(fx.cluster.repositoryUrl, { waitUntil: 'networkidle' });
  expect(failed).toEqual([]);
  page.removeAllListeners('response');
  expect(res?.status()).toBe(200);
  const headers = res!.headers();
  expect(headers['content-type']).toBe('text/html; charset=utf-8');
  expect(headers['content-security-policy']).toBe(CONTENT_SECURITY_POLICY);
  expect(headers['x-content-type-options']).toBe('nosniff');
  expect(headers['cache-control']).toBe('no-cache');

  await signIn('dora', 'vsp_notavalidtokennotavalidtoken');
  await present('#sign-in-error', { hasText: 'Sign-in refused: invalid access token.' });
  expect(await page.locator('#workspace').isHidden()).toBe(true);
  // Erin's good token is still not Dora's.
  await signIn('dora', token('erin'));
  await present('#sign-in-error', { hasText: 'This token does not belong to owner dora.' });
  expect(await page.locator('#workspace').isHidden()).toBe(true);
  expect(await sessionStorageLength()).toBe(0);
});

test('sign in, upload with progress, run a task, follow it and download its output', async () => {
  // Another owner's file and task, which Dora must not see.
  await fx.repo('erin').upload('erin', 'in/secret.txt', Readable.from([Buffer.from('erin only\n')]));
  const erinTask = await fx.cluster.submitTask('erin', { driver: 'process', command: 'true', name: 'erins' });
  // An image of Dora's own, which the images view lists from the image store.
  await fx.repo('dora').upload('dora', 'images/tiny.raw', Readable.from([Buffer.alloc(1 << 20)]));

  await signIn('dora', token('dora'), 'keyboard');
  await page.locator('#workspace').waitFor({ state: 'visible' });
  expect(await page.locator('#who-owner').textContent()).toBe('dora');
  expect(await page.locator('#sign-in-error').textContent()).toBe('');
  await present('#image-table tr[data-image$="tiny.raw"]');
  expect(await page.locator('#images-error').textContent()).toBe('');

  // Upload: record every value the progress bar shows.
  await page.evaluate(`{
    const bar = document.getElementById('upload-progress');
    window.progressSeen = [];
    new MutationObserver(() => window.progressSeen.push(bar.value)).observe(bar, { attributes: true });
  }`);
  await page.getByLabel('File to upload').setInputFiles({
    name: 'words.txt',
    mimeType: 'text/plain',
    buffer: words,
  });
  await page.getByLabel('Save as (path in your space)').fill('in/words.txt');
  // The second chunk's first attempt breaks off: the page asks the repository for the offset and resumes.
  const patches: string[] = [];
  await page.route('**/uploads/*', async (route) => {
    const req = route.request();
    if (req.method() !== 'PATCH') return route.continue();
    const offset = (await req.headerValue('upload-offset')) ?? '';
    patches.push(offset);
    if (offset !== '0' && patches.filter((o) => o === offset).length === 1) return route.abort('failed');
    return route.continue();
  });
  await page.getByRole('button', { name: 'Upload', exact: true }).click();
  const bar = await present('#upload-progress[data-state="done"]', { timeout: 60_000 });
  expect(await bar.getAttribute('value')).toBe('100');
  expect(await bar.isVisible()).toBe(true);
  const seen = await page.evaluate<number[]>('window.progressSeen');
  expect(seen.some((v) => v > 0 && v < 100)).toBe(true);
  expect(seen.at(-1)).toBe(100);
  expect(patches).toEqual(['0', String(8 << 20), String(8 << 20)]);
  await page.unroute('**/uploads/*');
  const row = await present('tr[data-path="in/words.txt"]');
  expect(await row.getAttribute('data-sha256')).toBe(sha256(words));
  expect(await row.locator('code.sha').textContent()).toBe(sha256(words));
  expect(await row.getAttribute('data-size')).toBe(String(words.length));
  expect((await fx.repo('dora').stat('dora', 'in/words.txt'))?.sha256).toBe(sha256(words));

  // A spec that is not JSON, then one with a bad field: both refused, with what is wrong.
  const specBox = page.getByLabel(/Task spec/);
  const runButton = page.getByRole('button', { name: 'Run task', exact: true });
  await specBox.fill('{"command": ');
  await runButton.click();
  await present('#run-error', { hasText: /^The spec is not valid JSON/ });
  // Each bad field is listed with its reason; a misspelt one with the field it most likely meant.
  await specBox.fill(JSON.stringify({ comand: 'true', vcpus: 0 }));
  await runButton.click();
  await present('#run-error li', { hasText: 'comand: unknown field (did you mean "command"?)' });
  const issues = await page.locator('#run-error li').allTextContents();
  expect(issues).toEqual(
    expect.arrayContaining(['command: required', expect.stringMatching(/^vcpus: .*>=1/)]),
  );
  expect(issues).toHaveLength(3);

  // Run a task that sorts the uploaded file.
  const spec = {
    name: 'sort',
    driver: 'process',
    inputs: ['in/words.txt'],
    command: 'mkdir -p out && LC_ALL=C sort in/words.txt > out/sorted.txt',
  };
  await specBox.fill(JSON.stringify(spec, null, 2));
  await runButton.click();
  await present('#task-detail[data-status]');
  expect(await page.locator('#run-error').textContent()).toBe('');
  expect(await page.locator('#task-detail').isVisible()).toBe(true);
  await present('#task-detail[data-status="COMPLETED"]', { timeout: 150_000 });
  expect(await page.locator('#task-detail-phase').textContent()).toBe('completed');
  expect(await page.locator('#task-detail-exit').textContent()).toBe('0');
  expect(await page.locator('#task-detail-host').textContent()).toBe('a');
  expect(await page.locator('#task-progress').getAttribute('data-progress')).toBe('100');
  expect(await page.locator('#task-progress-text').textContent()).toMatch(/^100% done/);
  // Every phase it went through, with how long it took; none still counting.
  const phases = await page.evaluate<string[]>(
    `[...document.querySelectorAll('#task-phases tbody tr')].map((r) => r.dataset.phase)`,
  );
  expect(phases).toEqual(expect.arrayContaining(['staging-in', 'running', 'staging-out', 'completed']));
  expect(await page.locator('#task-phases').textContent()).not.toContain('so far');
  expect(await page.locator('#task-cancel').isHidden()).toBe(true);
  const taskId = (await page.locator('#task-detail-id').textContent()) as string;
  expect(taskId).toMatch(/^dora-sort-/);
  // The list comes from Temporal's visibility, which catches up a little later than the task itself.
  await until('the task in the page list', async () => {
    await page.getByRole('button', { name: 'Refresh', exact: true }).click();
    return (await page.locator(`tr[data-task-id="${taskId}"][data-phase="completed"]`).count()) === 1;
  });

  // Download the output through the page and compare bytes.
  const output = await present('#task-outputs li[data-path$="outputs/sorted.txt"]');
  expect(await output.getAttribute('data-sha256')).toBe(sha256(sortedWords));
  const [download] = await Promise.all([
    page.waitForEvent('download'),
    output.getByRole('button', { name: /^Download / }).click(),
  ]);
  expect(download.suggestedFilename()).toBe('sorted.txt');
  const saved = path.join(tmp, 'sorted.txt');
  await download.saveAs(saved);
  expect(sha256(await fs.readFile(saved))).toBe(sha256(sortedWords));

  // Erin's space and task stay out of sight: not listed, not reachable with Dora's token.
  expect(await page.locator('tr[data-path="in/secret.txt"]').count()).toBe(0);
  await page.getByRole('button', { name: 'Home', exact: true }).click();
  await (await present('tr[data-folder="in/"]')).getByRole('button').click();
  await present('tr[data-path="in/words.txt"]');
  expect(await page.locator('tr[data-path="in/secret.txt"]').count()).toBe(0);
  expect(await page.locator(`tr[data-task-id="${erinTask.taskId}"]`).count()).toBe(0);
  const status = async (rest: string, init: RequestInit = {}, as = 'dora') => {
    const headers = { Authorization: `Bearer ${token(as)}`, 'Content-Type': 'application/json' };
    return (await fetch(fx.cluster.repositoryUrl + rest, { ...init, headers })).status;
  };
  const erinTaskPath = (owner: string) => `/v1/owners/${owner}/tasks/${encodeURIComponent(erinTask.taskId)}`;
  // Erin's task is real and Erin sees it: the 404 below is isolation, not absence.
  await until('erin to see her task', async () => (await status(erinTaskPath('erin'), {}, 'erin')) === 200);
  const probes = {
    files: await status('/v1/owners/erin/files'),
    tasks: await status('/v1/owners/erin/tasks'),
    task: await status(erinTaskPath('dora')),
    submitAsErin: await status('/v1/owners/dora/tasks', {
      method: 'POST',
      body: JSON.stringify({ owner: 'erin', command: 'true' }),
    }),
  };
  expect(probes).toEqual({ files: 403, tasks: 403, task: 404, submitAsErin: 403 });

  await page
    .getByRole('button', { name: /^Show task / })
    .first()
    .focus();
  await screenshot('web-page-finished');
  await temporalUiShot('temporal-ui-finished', taskId, /Completed/i);

  // A reload keeps the session (sessionStorage); sign-out forgets the token.
  await page.reload();
  await page.locator('#workspace').waitFor({ state: 'visible' });
  expect(await page.locator('#who-owner').textContent()).toBe('dora');
  await page.getByRole('button', { name: 'Sign out', exact: true }).click();
  await page.locator('#sign-in').waitFor({ state: 'visible' });
  expect(await page.evaluate<string | undefined>('document.activeElement?.id')).toBe('owner');
  expect(await sessionStorageLength()).toBe(0);
  await page.reload();
  await page.locator('#sign-in').waitFor({ state: 'visible' });
  expect(await page.locator('#workspace').isHidden()).toBe(true);
});

test('a running task shows progress, phase times and its live output, and can be cancelled; cancelled and failed runs show their logs and failure.txt; one row per run', async () => {
  await page.goto(fx.cluster.repositoryUrl);
  await signIn('dora', token('dora'));
  await page.locator('#workspace').waitFor({ state: 'visible' });

  // A task that reports progress, then waits (for a release that never comes: it is cancelled).
  const specBox = page.getByLabel(/Task spec/);
  await specBox.fill(
    JSON.stringify({
      name: 'live',
      driver: 'process',
      command: `echo VSP-PROGRESS 40 halfway; ${waitingCommand('web-live')}`,
    }),
  );
  await page.getByRole('button', { name: 'Run task', exact: true }).click();
  await present('#task-progress[data-progress="40"]', { timeout: 120_000 });
  expect(await page.locator('#task-progress-text').textContent()).toBe('40% halfway');
  await present('#task-phases tr[data-phase="running"]', { hasText: 'so far' });
  // The log viewer follows the task's output while it runs.
  await present('#task-log', { hasText: 'web-live-started' });
  expect(await page.locator('#task-log-state').textContent()).toBe('live');
  const taskId = (await page.locator('#task-detail-id').textContent()) as string;
  await screenshot('web-page-running');
  await temporalUiShot('temporal-ui-running', taskId, /Running/i);

  page.once('dialog', (d) => void d.accept());
  await page.getByRole('button', { name: 'Cancel task', exact: true }).click();
  // Temporal's name for the state: CANCELLED, which `vsp status` reports as exit code 4.
  await present('#task-detail[data-phase="cancelled"][data-status="CANCELLED"]', { timeout: 120_000 });
  // The last progress it reported stays in view (its message may not travel with the end's report).
  expect(await page.locator('#task-progress-text').textContent()).toMatch(/^40%( halfway)? \(cancelled\)$/);
  expect(await page.locator('#task-cancel').isHidden()).toBe(true);
  // Cancelled: no result, but its logs are in its results folder, and failure.txt is shown.
  await present(`#task-logs li[data-path="results/${taskId}/logs/failure.txt"]`);
  await present(`#task-logs li[data-path="results/${taskId}/logs/task.log"]`);
  expect(await page.locator('#task-failure').textContent()).toContain('cancelled by dora on the web page');

  // One id, two runs: the first completes, the second (another results folder) exits 3. Each row opens
  // its own run.
  const tasks = fx.cluster.tasks('dora');
  const first = await tasks.submit(
    { driver: 'process', command: 'echo first run' },
    { taskId: 'dora-twice' },
  );
  await tasks.watch(first.taskId, () => undefined);
  const second = await tasks.submit(
    { driver: 'process', command: 'echo second run; exit 3', resultsPath: 'results/dora-twice-2' },
    { taskId: 'dora-twice' },
  );
  await expect(tasks.watch(second.taskId, () => undefined)).rejects.toThrow();
  expect(second.runId).not.toBe(first.runId);
  await until('both runs in the page list', async () => {
    await page.getByRole('button', { name: 'Refresh', exact: true }).click();
    return (await page.locator('tr[data-task-id="dora-twice"]').count()) === 2;
  });
  for (const [run, status, output] of [
    [first.runId, 'COMPLETED', 'first run'],
    [second.runId, 'FAILED', 'second run'],
  ]) {
    await page.locator(`tr[data-run-id="${run}"]`).getByRole('button').click();
    await present(`#task-detail[data-run-id="${run}"][data-status="${status}"]`);
    expect(await page.locator('#task-detail-run').textContent()).toBe(run);
    // Each run's own output, not the latest run's.
    await present('#task-log-state', { hasText: 'ended' });
    expect(await page.locator('#task-log').textContent()).toBe(`${output}\n`);
  }
  // The failed run: its logs are listed although it has no result; its output and failure.txt are shown.
  await present('#task-logs li[data-path="results/dora-twice-2/logs/task.log"]');
  await present('#task-logs li[data-path="results/dora-twice-2/logs/failure.txt"]');
  expect(await page.locator('#task-detail-error').textContent()).toMatch(/\b3\b/);
  expect(await page.locator('#task-failure').textContent()).toMatch(/\b3\b/);
});

test('without Temporal the task endpoints answer 503 with the reason; the page files still serve', async () => {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-web-notemporal-'));
  const server = await startRepositoryServer({ dataDir: dir, port: 0 });
  try {
    const { token: t } = await addOwner(dir, 'fay');
    const res = await fetch(`${server.url}/v1/owners/fay/tasks`, {
      headers: { Authorization: `Bearer ${t}` },
    });
    expect(res.status).toBe(503);
    expect(((await res.json()) as { error: string }).error).toBe(TEMPORAL_NOT_CONFIGURED);
    const unauth = await fetch(`${server.url}/v1/owners/fay/tasks`);
    expect(unauth.status).toBe(401);
    for (const [file, type] of [
      ['/app.js', 'text/javascript; charset=utf-8'],
      ['/app.css', 'text/css; charset=utf-8'],
    ]) {
      const r = await fetch(server.url + file);
      expect([r.status, r.headers.get('content-type'), r.headers.get('x-content-type-options')]).toEqual([
        200,
        type,
        'nosniff',
      ]);
      const again = await fetch(server.url + file, { headers: { 'If-None-Match': r.headers.get('etag')! } });
      expect(again.status).toBe(304);
    }
    expect((await fetch(server.url + '/', { method: 'POST' })).status).toBe(405);
  } finally {
    await server.close();
    await fs.rm(dir, { recursive: true, force: true });
  }
});
