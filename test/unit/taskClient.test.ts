import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { TaskClient, TaskClientError } from '../../client/taskClient';

/**
 * The owners' task client against a scripted HTTP server on loopback: what it sends (paths, owner from
 * whoami, bodies, bearer) and how it reports refusals. The real repository is the integration tier's.
 */
interface Seen {
  method: string;
  url: string;
  auth?: string;
  body: string;
}

let server: http.Server;
let url: string;
let seen: Seen[];
let answer: (req: Seen) => { status: number; body?: unknown };

beforeAll(async () => {
  server = http.createServer((req, res) => {
    let body = '';
    req.on('data', (c: Buffer) => (body += c.toString()));
    req.on('end', () => {
      const r: Seen = { method: req.method!, url: req.url!, auth: req.headers.authorization, body };
      seen.push(r);
      const a = answer(r);
      res.writeHead(a.status, { 'Content-Type': 'application/json' });
      res.end(a.body === undefined ? '' : JSON.stringify(a.body));
    });
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
});

afterAll(() => new Promise((r) => server.close(r)));

beforeEach(() => {
  seen = [];
  answer = (req) =>
    req.url === '/v1/whoami'
      ? { status: 200, body: { kind: 'owner', owner: 'alice' } }
      : { status: 200, body: {} };
});

test("the owner comes from the token (asked once); calls go to that owner's tasks with the bearer", async () => {
  const tasks = new TaskClient({ url, token: 'vsp_alicesalicesalice' });
  answer = (req) => {
    if (req.url === '/v1/whoami') return { status: 200, body: { kind: 'owner', owner: 'alice' } };
    if (req.method === 'POST' && req.url === '/v1/owners/alice/tasks')
      return { status: 201, body: { taskId: 't1', runId: 'r', resultsPath: 'results/t1' } };
    return { status: 200, body: { tasks: [] } };
  };
  expect(await tasks.submit({ command: 'true' }, { taskId: 't1' })).toEqual({
    taskId: 't1',
    runId: 'r',
    resultsPath: 'results/t1',
  });
  await tasks.list({ running: true, limit: 5 });
  await tasks.cancel('a b/c', 'done');
  expect(seen.map((s) => `${s.method} ${s.url} ${s.body}`)).toEqual([
    'GET /v1/whoami ',
    'POST /v1/owners/alice/tasks {"spec":{"command":"true"},"taskId":"t1"}',
    'GET /v1/owners/alice/tasks?running=1&limit=5 ',
    'POST /v1/owners/alice/tasks/a%20b%2Fc/cancel {"reason":"done"}',
  ]);
  expect(new Set(seen.map((s) => s.auth))).toEqual(new Set(['Bearer vsp_alicesalicesalice']));
});

test("a refusal carries the HTTP status and the server's message; an owner given is used as is", async () => {
  answer = () => ({ status: 403, body: { error: 'owner bob is not yours' } });
  const err = await new TaskClient({ url, token: 'vsp_x', owner: 'bob' }).list().catch((e: unknown) => e);
  expect(err).toBeInstanceOf(TaskClientError);
  expect(err).toMatchObject({ status: 403, reason: 'owner bob is not yours' });
  expect((err as Error).message).toBe('list tasks: 403 owner bob is not yours');
  expect(seen.map((s) => s.url)).toEqual(['/v1/owners/bob/tasks']);
});

test('a token that is not an owner’s is refused before any task call; a failed whoami is asked again', async () => {
  answer = () => ({ status: 200, body: { kind: 'admin' } });
  const admin = new TaskClient({ url, token: 'vsp_admin' });
  await expect(admin.list()).rejects.toThrow(/an admin token, not an owner's/);
  answer = () => ({ status: 401, body: { error: 'invalid token' } });
  const bad = new TaskClient({ url, token: 'vsp_bad' });
  await expect(bad.status('t')).rejects.toMatchObject({ status: 401, reason: 'invalid token' });
  await expect(bad.status('t')).rejects.toMatchObject({ status: 401 });
  expect(seen.filter((s) => s.url === '/v1/whoami')).toHaveLength(3);
  expect(seen.every((s) => s.url === '/v1/whoami')).toBe(true);
});

test('watch polls until the task ends, then returns its result, or throws its failure', async () => {
  let polls = 0;
  let results = 0;
  const ok = {
    taskId: 't',
    host: 'a',
    exitCode: 0,
    resultsPath: 'results/t',
    outputs: [],
    logs: [],
    phaseMs: {},
  };
  answer = (req) => {
    if (req.url === '/v1/whoami') return { status: 200, body: { kind: 'owner', owner: 'alice' } };
    // The last phase is seen a moment before the result is there: 409 once.
    if (req.url.endsWith('/result'))
      return ++results === 1
        ? { status: 409, body: { error: 'still completed' } }
        : { status: 200, body: ok };
    polls++;
    const [status, phase] = polls < 3 ? ['RUNNING', 'running'] : ['COMPLETED', 'completed'];
    return { status: 200, body: { taskId: 't', status, phase } };
  };
  const phases: (string | undefined)[] = [];
  const tasks = new TaskClient({ url, token: 'vsp_a' });
  expect(await tasks.watch('t', (s) => phases.push(s.phase), 1)).toEqual(ok);
  // A status change is reported once; the result is asked for only once the task has ended.
  expect(phases).toEqual(['running', 'completed']);
  expect(polls).toBe(4);
  expect(results).toBe(2);

  answer = (req) =>
    req.url.endsWith('/result')
      ? { status: 422, body: { error: 'the task exited with status 3' } }
      : { status: 200, body: { taskId: 't', status: 'FAILED', phase: 'failed' } };
  await expect(tasks.watch('t', undefined, 1)).rejects.toMatchObject({
    status: 422,
    reason: 'the task exited with status 3',
  });
});

test('an unreachable repository is a TaskClientError with status 0 naming it', async () => {
  const closed = http.createServer();
  await new Promise<void>((r) => closed.listen(0, '127.0.0.1', r));
  const port = (closed.address() as AddressInfo).port;
  await new Promise((r) => closed.close(r));
  const err = await new TaskClient({ url: `http://127.0.0.1:${port}`, token: 'vsp_a', owner: 'a' })
    .list()
    .catch((e: unknown) => e);
  expect(err).toMatchObject({ status: 0 });
  expect((err as Error).message).toMatch(
    new RegExp(`127\\.0\\.0\\.1:${port} did not answer: .*ECONNREFUSED`),
  );
});
