import { spawn, spawnSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { LIFECYCLE_PHASES } from '../../bench/orchestration';
import { repoRoot } from '../../deploy/devcluster/tools';
import { startClusterFixture, until, type ClusterFixture } from '../support/clusterFixture';
import { TaskClient } from '../../client/taskClient';
import { releaseTask, waitingCommand, waitingTaskDir } from '../support/releasedTasks';
import { temporalAddress } from '../support/temporalEnv';

let fx: ClusterFixture;
let tmp: string;

beforeAll(async () => {
  fx = await startClusterFixture({ hosts: ['a'], owners: ['carol', 'alice', 'bob'] });
  tmp = await fs.mkdtemp(path.join(os.tmpdir(), 'vsp-cli-'));
}, 180_000);

afterAll(async () => {
  await fx?.stop();
  if (tmp) await fs.rm(tmp, { recursive: true, force: true });
});

const VSP_JS = () => path.join(repoRoot(), 'dist', 'cli', 'vsp.js');

/** The CLI's environment as an owner has it: the repository and a token, no VSP_OWNER. */
function cliEnv(token: string | undefined): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {
    ...process.env,
    TEMPORAL_ADDRESS: temporalAddress(),
    VSP_REPOSITORY_URL: fx.cluster.repositoryUrl,
    VSP_TOKEN: token,
  };
  delete env.VSP_OWNER;
  return env;
}

function vsp(args: string[], opts: { input?: string; token?: string; as?: string } = {}) {
  const r = spawnSync(process.execPath, [VSP_JS(), ...args], {
    input: opts.input,
    encoding: 'utf8',
    cwd: tmp,
    env: cliEnv(opts.token ?? fx.cluster.ownerToken(opts.as ?? 'carol')),
    timeout: 120_000,
  });
  return { code: r.status, out: r.stdout, err: r.stderr };
}

/** The CLI running in the background (e.g. `watch`), for a test that acts while it runs. */
function vspInBackground(
  args: string[],
  as: string,
  env: NodeJS.ProcessEnv = {},
): Promise<{ code: number | null; out: string; err: string }> {
  const child = spawn(process.execPath, [VSP_JS(), ...args], {
    cwd: tmp,
    env: { ...cliEnv(fx.cluster.ownerToken(as)), ...env },
  });
  let out = '';
  let err = '';
  child.stdout.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr.on('data', (d: Buffer) => (err += d.toString()));
  return new Promise((resolve) => child.on('close', (code) => resolve({ code, out, err })));
}

test('upload, submit --watch, list and download through the vsp CLI', async () => {
  await fs.writeFile(path.join(tmp, 'words.txt'), 'b\na\nc\n');
  const up = vsp(['--json', 'upload', 'words.txt', 'in/words.txt']);
  expect(up.code).toBe(0);
  expect(JSON.parse(up.out).sha256).toBe(createHash('sha256').update('b\na\nc\n').digest('hex'));
  expect(vsp(['ls', 'in/']).out).toContain('in/words.txt');

  const spec = {
    driver: 'process',
    inputs: ['in/words.txt'],
    command: 'mkdir -p out && sort in/words.txt > out/sorted.txt',
  };
  const run = vsp(['--json', 'submit', '-', '--watch', '--task-id', `cli-${Date.now()}`], {
    input: JSON.stringify(spec),
  });
  expect(run.code).toBe(0);
  const result = JSON.parse(run.out.trim().split('\n').pop()!);
  const sorted = result.outputs.find((o: { path: string }) => o.path.endsWith('outputs/sorted.txt'));
  expect(vsp(['download', sorted.path, 'sorted.txt']).code).toBe(0);
  expect(await fs.readFile(path.join(tmp, 'sorted.txt'), 'utf8')).toBe('a\nb\nc\n');

  const listed = JSON.parse(vsp(['--json', 'list', '--owner', 'carol']).out);
  expect(listed.map((t: { taskId: string }) => t.taskId)).toContain(result.taskId);
  const table = vsp(['list']).out.split('\n');
  expect(table[0]).toMatch(/^TASK +STATUS +PHASE +HOST +STARTED$/);
  const row = table.find((l) => l.startsWith(`${result.taskId} `));
  expect(row?.indexOf('COMPLETED')).toBe(table[0].indexOf('STATUS'));
});

/** `tmux` on a socket of this test's own, so that it never meets a user's server. */
function tmux(socket: string, args: string[]): string {
  const r = spawnSync('tmux', ['-S', socket, ...args], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`tmux ${args[0]} failed: ${r.stderr}`);
  return r.stdout;
}

test('submit --watch on a terminal shows every phase, 100 % and the final state (read off the screen)', async () => {
  const id = `cli-screen-${Date.now()}`;
  // Once released, it ends before the next poll: its last phases and report reach the screen after it ended.
  const spec = {
    driver: 'process',
    command: `echo VSP-PROGRESS 30 warming; ${waitingCommand(id, 'echo VSP-PROGRESS 60 halfway; echo VSP-PROGRESS 99 last-words')}`,
  };
  await fs.writeFile(path.join(tmp, 'screen.json'), JSON.stringify(spec));
  const socket = path.join(tmp, 'tmux.sock');
  const env = cliEnv(fx.cluster.ownerToken('carol'));
  const vars = ['TEMPORAL_ADDRESS', 'VSP_REPOSITORY_URL', 'VSP_TOKEN', 'PATH'].flatMap((k) => [
    '-e',
    `${k}=${env[k] ?? ''}`,
  ]);
  // The pane waits on `read` after the CLI ended, so its last screen stays to be read.
  const command = `cd ${tmp} && ${process.execPath} ${VSP_JS()} submit screen.json --watch --task-id ${id}; echo vsp-exit=$?; read x`;
  tmux(socket, ['new-session', '-d', '-x', '160', '-y', '40', ...vars, 'sh', '-c', command]);
  const screenNow = () => tmux(socket, ['capture-pane', '-p', '-S', '-100']);
  try {
    await until('the running task on the screen', async () => /running .*\] 30% warming/.test(screenNow()));
    // The host told the workflow that step: the Temporal UI's VspProgress column has it while it runs.
    await until('VspProgress 30', async () => {
      const d = JSON.parse(vsp(['--json', 'describe', id]).out);
      return d.searchAttributes.VspProgress === 30 && d.details.includes('**30 %** warming');
    });
    expect(vsp(['status', id]).out).toMatch(/^running on \S+ \(30% warming\)$/m);
    await releaseTask(fx.cluster.storeDir('a'), id);
    const screen = await until('the CLI to end on the screen', async () => {
      const text = screenNow();
      return text.includes('vsp-exit=') ? text : undefined;
    });
    expect(screen).toContain('vsp-exit=0');
    const lines = screen.split('\n');
    const order = [...LIFECYCLE_PHASES, 'completed'];
    const at = order.map((phase) => lines.findIndex((l) => new RegExp(`^ *[0-9.]+s  ${phase}\\b`).test(l)));
    // Every phase on a line of its own, in the order the task went through them.
    expect(at.every((i) => i >= 0)).toBe(true);
    expect([...at].sort((a, b) => a - b)).toEqual(at);
    expect(lines[at.at(-1)!]).toMatch(/completed +on \S+ \[#{20}\] 100% last-words/);
    expect(screen).toMatch(new RegExp(`task ${id} completed on \\S+: \\d+ output file\\(s\\)`));
  } finally {
    tmux(socket, ['kill-server']);
  }
  // The report printed just before the end is the one recorded.
  const status = JSON.parse(vsp(['--json', 'status', id]).out);
  expect(status).toMatchObject({ phase: 'completed', progress: 99, progressMessage: 'last-words' });
  // `vsp describe` decodes the search attributes (the Temporal CLI prints protobuf maps).
  const described = vsp(['describe', id]).out;
  expect(described).toMatch(/^VspProgress +100$/m);
  expect(described).toMatch(/^VspPhase +completed$/m);
  expect(described).toMatch(/^summary +carol: echo VSP-PROGRESS 30/m);
});

test("download '-' writes the file's bytes to standard output, and nothing else (no file named '-')", async () => {
  const bytes = Buffer.concat([Buffer.from('line\n\x00\xff'), createHash('sha512').update('x').digest()]);
  // 4 MiB: more than the socket pair between this process and the CLI buffers, so a reader that stops
  // early always leaves the CLI bytes it cannot write.
  const blob = Buffer.concat(Array.from({ length: 60_000 }, () => bytes));
  await fs.writeFile(path.join(tmp, 'blob.bin'), blob);
  expect(vsp(['upload', 'blob.bin', 'in/blob.bin']).code).toBe(0);
  await fs.rm(path.join(tmp, 'blob.bin'));
  const raw = (args: string[]) =>
    spawnSync(process.execPath, [VSP_JS(), ...args], {
      cwd: tmp,
      env: cliEnv(fx.cluster.ownerToken('carol')),
      maxBuffer: 64 * 1024 * 1024,
    });
  for (const args of [
    ['download', 'in/blob.bin', '-'],
    ['--json', 'download', 'in/blob.bin', '-'],
  ]) {
    const r = raw(args);
    expect(r.stderr.toString()).toBe('');
    expect(r.status).toBe(0);
    expect(Buffer.compare(r.stdout, blob)).toBe(0);
  }
  expect(await fs.readdir(tmp)).not.toContain('-');
  // A reader that stops early (`| head`) ends it quietly, exit 1: the bytes were not all delivered.
  const early = spawn(process.execPath, [VSP_JS(), 'download', 'in/blob.bin', '-'], {
    cwd: tmp,
    env: cliEnv(fx.cluster.ownerToken('carol')),
  });
  let earlyErr = '';
  early.stderr.on('data', (d: Buffer) => (earlyErr += d.toString()));
  early.stdout.once('data', () => early.stdout.destroy());
  expect(await new Promise((resolve) => early.on('close', resolve))).toBe(1);
  expect(earlyErr).toBe('');
  // Empty listings say so, rather than printing nothing.
  expect(vsp(['ls', 'nothing/']).out).toBe('no files\n');
  expect(vsp(['image', 'ls']).out).toBe('no images\n');
  const missing = raw(['download', 'in/none.bin', '-']);
  expect(missing.status).toBe(1);
  expect(missing.stdout.length).toBe(0);
  expect(missing.stderr.toString()).toMatch(/404/);
});

test('wait blocks until the task ends and prints its result without a progress display; list filters by phase, host and since', async () => {
  const marker = `cli-wait-${Date.now()}`;
  const submitted = vsp(['--json', 'submit', '-', '--task-id', marker], {
    input: JSON.stringify({ driver: 'process', command: waitingCommand(marker) }),
  });
  expect(submitted.code).toBe(0);
  await until('the task to wait for its release', () => waitingTaskDir(fx.cluster.storeDir('a'), marker));
  const running = JSON.parse(
    vsp(['--json', 'list', '--phase', 'running', '--host', 'a', '--since', '10m']).out,
  );
  expect(running.map((t: { taskId: string }) => t.taskId)).toContain(marker);

  // Each `vsp wait` notes its status requests (a preloaded hook on fetch), so the task is released only
  // once both have seen it running: a wait that returned then could not have printed its result.
  const hook = path.join(tmp, 'note-polls.js');
  await fs.writeFile(
    hook,
    `const f = globalThis.fetch; globalThis.fetch = (url, ...rest) => {
      if (/\\/tasks\\/[^/]+$/.test(new URL(url).pathname)) require('fs').appendFileSync(process.env.POLLS, 'x');
      return f(url, ...rest);
    };`,
  );
  const polls = (name: string) => ({ NODE_OPTIONS: `--require ${hook}`, POLLS: path.join(tmp, name) });
  let ended = 0;
  const waiting = vspInBackground(['--json', 'wait', marker], 'carol', polls('polls-json')).finally(
    () => ended++,
  );
  const waitingHuman = vspInBackground(['wait', marker], 'carol', polls('polls-human')).finally(
    () => ended++,
  );
  await until('both waits to poll', async () =>
    Promise.all(['polls-json', 'polls-human'].map((f) => fs.stat(path.join(tmp, f)))).then(() => true),
  );
  expect(ended).toBe(0);
  await releaseTask(fx.cluster.storeDir('a'), marker);
  const [json, human] = await Promise.all([waiting, waitingHuman]);
  expect(json).toMatchObject({ code: 0, err: '' });
  const result = JSON.parse(json.out);
  expect(result.outputs.map((o: { path: string }) => o.path)).toContain(`results/${marker}/outputs/r.txt`);
  expect(human).toEqual({
    code: 0,
    out: `task ${marker} completed on a: ${result.outputs.length} output file(s) in results/${marker}\n`,
    err: '',
  });

  const failed = `cli-wait-fail-${Date.now()}`;
  vsp(['submit', '-', '--task-id', failed], { input: '{"driver":"process","command":"exit 3"}' });
  const waitedFail = vsp(['wait', failed]);
  expect(waitedFail.code).toBe(3);
  expect(waitedFail.out).toBe('');
  expect(waitedFail.err).toMatch(new RegExp(`^vsp: task ${failed} failed: .*exit.*\n$`));

  const ids = (args: string[]) =>
    (JSON.parse(vsp(['--json', 'list', ...args]).out) as { taskId: string }[]).map((t) => t.taskId);
  // Visibility follows the workflows' last upserts shortly after they end.
  await until('the listing to show both ends', async () => {
    const done = ids(['--phase', 'completed', '--since', '1h']);
    return done.includes(marker) && !done.includes(failed) && ids(['--phase', 'failed']).includes(failed);
  });
  expect(ids(['--host', 'a'])).toEqual(expect.arrayContaining([marker, failed]));
  expect(ids(['--host', 'b'])).toEqual([]);
  expect(ids(['--since', new Date(Date.now() + 60_000).toISOString()])).toEqual([]);
  const operator = vsp(['--json', 'list', '--temporal', '--owner', 'carol', '--phase', 'failed']);
  expect(JSON.parse(operator.out).map((t: { taskId: string }) => t.taskId)).toEqual([failed]);
  const bad = vsp(['list', '--since', 'last week']);
  expect(bad).toMatchObject({ code: 1, out: '' });
  expect(bad.err).toMatch(/since 'last week' is neither an ISO 8601 time .* nor a duration/);
});

test('vsp codec serve keeps serving until SIGTERM, then exits 0', async () => {
  const keyFile = path.join(tmp, 'payload.key');
  await fs.writeFile(keyFile, randomBytes(32).toString('base64url'), { mode: 0o600 });
  const child = spawn(
    process.execPath,
    [VSP_JS(), '--json', 'codec', 'serve', '--listen', '127.0.0.1:0', '--ui-origin', 'http://127.0.0.1:8233'],
    { env: { ...process.env, VSP_PAYLOAD_KEY_FILE: keyFile }, stdio: ['ignore', 'pipe', 'inherit'] },
  );
  const exited = new Promise<number | null>((resolve) => child.on('close', resolve));
  try {
    const ready = await new Promise<{ url: string }>((resolve, reject) => {
      let out = '';
      child.stdout.on('data', (d: Buffer) => {
        out += d.toString();
        if (out.includes('\n')) resolve(JSON.parse(out) as { url: string });
      });
      void exited.then((code) => reject(new Error(`vsp codec serve exited (${code}) before it was ready`)));
    });
    // Asked after the ready line: a command that had returned would no longer answer.
    const res = await fetch(`${ready.url}/encode`, { method: 'OPTIONS' });
    expect(res.status).toBe(204);
    expect(res.headers.get('access-control-allow-origin')).toBe('http://127.0.0.1:8233');
    child.kill('SIGTERM');
    expect(await exited).toBe(0);
  } finally {
    child.kill('SIGKILL');
  }
});

test('the CLI refuses a bad spec naming the field, and a bad token', () => {
  const bad = vsp(['submit', '-'], { input: JSON.stringify({ owner: 'carol', command: 'true', vcpus: 0 }) });
  expect(bad.code).toBe(2);
  expect(bad.err).toMatch(/vcpus/);
  const notJson = vsp(['submit', '-'], { input: '{owner:' });
  expect(notJson.code).toBe(1);
  expect(notJson.err).toMatch(/not valid JSON/);
  const denied = vsp(['ls'], { token: 'vsp_wrongwrongwrongwrongwrong' });
  expect(denied.code).toBe(1);
  expect(denied.err).toMatch(/401|token|auth/i);
});

test("alice's task through the CLI: submit, status, list, a failed migrate, watch while she cancels it; exit codes", async () => {
  const marker = `cli-cancel-${Date.now()}`;
  const submitted = vsp(['--json', 'submit', '-', '--task-id', marker], {
    as: 'alice',
    input: JSON.stringify({ driver: 'process', command: `echo started; sh -c 'sleep 300; echo ${marker}'` }),
  });
  expect(submitted.code).toBe(0);
  expect(JSON.parse(submitted.out)).toMatchObject({ taskId: marker, resultsPath: `results/${marker}` });
  await until(
    'the task to run',
    async () => vsp(['status', marker], { as: 'alice' }).out.startsWith('running on a') || undefined,
  );
  const listed = vsp(['--json', 'list', '--running'], { as: 'alice' });
  expect(JSON.parse(listed.out)).toEqual([expect.objectContaining({ taskId: marker, status: 'RUNNING' })]);

  // A migration that fails says why, on either path (not just that the update failed).
  for (const via of [[], ['--temporal']]) {
    const moved = vsp(['migrate', ...via, marker, '--to', 'zz'], { as: 'alice' });
    expect(moved.code).toBe(1);
    expect(moved.err).toMatch(/host 'zz' is not in the cluster \(hosts: a\)/);
  }

  const watching = vspInBackground(['watch', marker], 'alice');
  const cancelled = vsp(['cancel', marker, '--reason', 'test'], { as: 'alice' });
  expect(cancelled.code).toBe(0);
  expect(cancelled.out).toContain(`cancelling ${marker}`);
  const watched = await watching;
  expect(watched.err).toContain(`task ${marker} cancelled`);
  expect(watched.code).toBe(4);
  const status = vsp(['status', marker], { as: 'alice' });
  expect(status.out).toMatch(/^cancelled/);
  expect(status.code).toBe(4);
  // Ended: a second cancel is refused, with the repository's reason.
  const again = vsp(['cancel', marker], { as: 'alice' });
  expect(again.code).toBe(1);
  expect(again.err).toMatch(/409/);
});

test('a failed task: submit --watch and status exit 3 with the error and the log tail; failure.txt kept', () => {
  const id = `cli-fail-${Date.now()}`;
  const run = vsp(['submit', '-', '--watch', '--task-id', id], {
    as: 'alice',
    input: `{"driver":"process","command":"echo boom-${id} >&2; exit 3"}`,
  });
  expect(run.code).toBe(3);
  expect(run.err).toMatch(new RegExp(`task ${id} failed: .*exit`));
  expect(run.err).toContain(`the task's log (vsp logs ${id}) ---\nboom-${id}\n---`);
  const status = vsp(['status', id], { as: 'alice' });
  expect(status.code).toBe(3);
  expect(status.out).toMatch(/^failed/);
  const failure = vsp(['download', `results/${id}/logs/failure.txt`, '-'], { as: 'alice' });
  expect(failure).toMatchObject({ code: 0, out: 'the task command exited with status 3\n' });
});

test("vsp logs -f shows a running task's output within 2 s of it being printed, and ends with the task", async () => {
  const marker = `cli-logs-${Date.now()}`;
  const submitted = vsp(['--json', 'submit', '-', '--task-id', marker], {
    // Once released, a burst larger than one append may carry (64 KiB): it arrives whole, in order.
    input: JSON.stringify({
      driver: 'process',
      command: waitingCommand(marker, `yes abcdefgh | head -n 20000; echo ${marker}-done`),
    }),
  });
  expect(submitted.code).toBe(0);
  const client = new TaskClient({ url: fx.cluster.repositoryUrl, token: fx.cluster.ownerToken('carol') });
  let followed = '';
  const following = (async () => {
    for await (const chunk of await client.logs(marker, { follow: true }))
      followed += Buffer.from(chunk).toString();
  })();
  // Awaited below; a test that fails first must not leave its rejection unhandled.
  following.catch(() => undefined);
  const cli = vspInBackground(['logs', '-f', marker], 'carol');
  // From the moment the host's log has the line to the moment the follower has it.
  const dir = await until('the task to print', () => waitingTaskDir(fx.cluster.storeDir('a'), marker));
  const printed = Date.now();
  await until(
    'the follower to see the line',
    async () => followed.includes(`${marker}-started\n`) || undefined,
  );
  const latencyMs = Date.now() - printed;
  console.log(`live log latency (process driver): ${latencyMs} ms`);
  expect(latencyMs).toBeLessThan(2000);
  expect(dir).toBeDefined();

  // Refused: the log of a task that does not exist, an owner's token appending, another owner reading.
  const missing = vsp(['logs', `no-such-${marker}`]);
  expect(missing.code).toBe(1);
  expect(missing.err).toMatch(/404/);
  const url = `${fx.cluster.repositoryUrl}/v1/owners/carol/tasks/${marker}/logs`;
  const forged = await fetch(url, {
    method: 'POST',
    headers: { Authorization: `Bearer ${fx.cluster.ownerToken('carol')}` },
    body: 'forged\n',
  });
  expect(forged.status).toBe(403);
  expect(vsp(['logs', marker, '--owner', 'carol'], { as: 'alice' }).code).toBe(1);

  await releaseTask(fx.cluster.storeDir('a'), marker);
  await following;
  const whole = `${marker}-started\n${'abcdefgh\n'.repeat(20000)}${marker}-done\n`;
  expect(followed).toBe(whole);
  const shown = await cli;
  expect(shown.out).toBe(whole);
  expect(shown).toMatchObject({ code: 0, err: '' });
  // After the end: the same log, from any offset.
  expect(vsp(['logs', marker]).out).toBe(whole);
  expect(await client.logText(marker, { offset: 4 })).toBe(whole.slice(4));
});

test("alice's token cannot reach bob's tasks: list, status, cancel and a spec naming bob are refused", async () => {
  const bobs = await fx.cluster.submitTask('bob', { driver: 'process', command: 'true', name: 'bobs' });
  const list = vsp(['list', '--owner', 'bob'], { as: 'alice' });
  expect(list.code).toBe(1);
  expect(list.err).toMatch(/403/);
  expect(list.out).not.toContain(bobs.taskId);
  for (const args of [
    ['status', bobs.taskId],
    ['cancel', bobs.taskId],
    ['watch', bobs.taskId],
  ]) {
    const r = vsp(args, { as: 'alice' });
    expect(r.code).toBe(1);
    expect(r.err).toMatch(/404/);
  }
  expect(vsp(['--json', 'list'], { as: 'alice' }).out).not.toContain(bobs.taskId);
  const asBob = vsp(['submit', '-'], {
    as: 'alice',
    input: JSON.stringify({ owner: 'bob', driver: 'process', command: 'true' }),
  });
  expect(asBob.code).toBe(1);
  expect(asBob.err).toMatch(/403.*bob/);
  // Bob sees his own; an operator sees it through Temporal.
  expect(vsp(['list'], { as: 'bob' }).out).toContain(bobs.taskId);
  const operator = vsp(['--json', 'list', '--temporal', '--owner', 'bob'], { as: 'alice' });
  expect(operator.code).toBe(0);
  expect(JSON.parse(operator.out).map((t: { taskId: string }) => t.taskId)).toContain(bobs.taskId);
});
