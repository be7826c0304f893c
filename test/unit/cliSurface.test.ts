import type { Command } from 'commander';
import {
  filterFromQuery,
  filterToQuery,
  parseDuration,
  parseSince,
  TASK_PHASES,
  visibilityQuery,
} from '../../client/taskFilter';
import { program, run } from '../../cli/vsp';

/**
 * `vsp` without servers: the task-list filters (shared by the CLI, the task API and VspClient), the help
 * of every command and option, and the errors a bad argument gets before anything is contacted.
 */

const NOW = Date.parse('2026-12-01T18:00:00Z');

describe('task-list filters', () => {
  test.each([
    ['90s', 90],
    ['30m', 1800],
    ['2h', 7200],
    ['7d', 604800],
    ['1h30m', 5400],
    ['45', 45],
  ])('duration %s is %i s', (text, secs) => expect(parseDuration(text)).toBe(secs));

  test.each(['', 'h', '1x', '1h 30m', '-1h', '1.5h', 'm30'])('duration %j is refused', (text) =>
    expect(() => parseDuration(text)).toThrow(/invalid duration .*use e\.g\. 90s/),
  );

  test('--since takes a duration back from now or an ISO 8601 time with its zone', () => {
    expect(parseSince('1h', NOW).toISOString()).toBe('2026-12-01T17:00:00.000Z');
    expect(parseSince('2026-11-30T12:00:00Z', NOW).toISOString()).toBe('2026-11-30T12:00:00.000Z');
    expect(parseSince('2026-11-30T13:00:00+01:00', NOW).toISOString()).toBe('2026-11-30T12:00:00.000Z');
    expect(parseSince('2026-11-30', NOW).toISOString()).toBe('2026-11-30T00:00:00.000Z');
  });

  test.each(['yesterday', '2026-11-30T12:00:00', '2026-13-45', '2026-11-30T25:00Z', 'now'])(
    '--since %j is refused, naming both forms',
    (text) => expect(() => parseSince(text, NOW)).toThrow(/since '.*' is (neither|not an ISO 8601 time)/),
  );

  test('the query parameters round-trip, and bad ones are refused with what is wrong', () => {
    const filter = {
      running: true,
      phase: 'staging-out' as const,
      host: 'host-a',
      since: new Date('2026-12-01T17:00:00Z'),
    };
    expect(filterFromQuery(filterToQuery(filter))).toEqual(filter);
    expect(filterFromQuery(new URLSearchParams())).toEqual({ running: false });
    expect(() => filterFromQuery(new URLSearchParams('phase=done'))).toThrow(
      /phase 'done' is not a task phase: use one of validating, .*cancelled/,
    );
    expect(() => filterFromQuery(new URLSearchParams('host=A"'))).toThrow(/host 'A"' is not a host name/);
    expect(() => filterFromQuery(new URLSearchParams('since=1h'))).toThrow(/since '1h' is not an ISO 8601/);
  });

  test('the visibility query has one clause per filter, on the Vsp* search attributes', () => {
    expect(
      visibilityQuery({
        owner: 'alice',
        running: true,
        phase: 'failed',
        host: 'a',
        since: new Date('2026-12-01T17:00:00Z'),
      }),
    ).toBe(
      'WorkflowType="TaskLifecycle" AND VspOwner="alice" AND ExecutionStatus="Running" AND VspPhase="failed"' +
        ' AND VspHost="a" AND StartTime >= "2026-12-01T17:00:00.000Z"',
    );
    expect(visibilityQuery({})).toBe('WorkflowType="TaskLifecycle"');
    expect(TASK_PHASES).toContain('awaiting-repository');
  });
});

describe('vsp help', () => {
  const all = (cmd: Command): Command[] => [cmd, ...cmd.commands.flatMap(all)];
  const named = (cmd: Command): string => {
    const names: string[] = [];
    for (let c: Command | null = cmd; c; c = c.parent) names.unshift(c.name());
    return names.join(' ');
  };

  test('every command and every option has a description', () => {
    const missing = all(program).flatMap((cmd) => [
      ...(cmd.description() ? [] : [named(cmd)]),
      ...cmd.options.filter((o) => !o.description).map((o) => `${named(cmd)} ${o.flags}`),
    ]);
    expect(missing).toEqual([]);
  });

  test('every command says that it takes --json, and the top level names the environment variables', () => {
    const withoutJson = all(program)
      .filter((cmd) => cmd.commands.length === 0)
      .filter((cmd) => !cmd.helpInformation().includes('--json'))
      .map(named);
    expect(withoutJson).toEqual([]);
    const top = fullHelp(program);
    for (const v of ['VSP_REPOSITORY_URL', 'VSP_TOKEN', 'VSP_OWNER', 'TEMPORAL_ADDRESS'])
      expect(top).toContain(v);
    expect(top).toMatch(/Exit codes: 0 done, 1 error, 2 invalid spec, 3 task failed, 4 task cancelled/);
  });

  test('the new commands and options are there: wait, download to -, list filters', () => {
    const cmd = (name: string) => program.commands.find((c) => c.name() === name)!;
    expect(cmd('wait').helpInformation()).toMatch(/wait, silently, until a task ends/);
    expect(cmd('download').helpInformation()).toMatch(/'-' for\s+standard output/);
    const list = cmd('list').helpInformation();
    for (const o of ['--phase <phase>', '--host <host>', '--since <time>', '--running', '--limit <n>'])
      expect(list).toContain(o);
  });

  test("the owners' commands say where their token comes from", () => {
    const owners = ['upload', 'download', 'ls', 'submit', 'watch', 'wait', 'status', 'cancel', 'list'];
    const cmd = (name: string) => program.commands.find((c) => c.name() === name)!;
    expect(owners.filter((name) => !fullHelp(cmd(name)).includes('Needs VSP_TOKEN'))).toEqual([]);
    expect(fullHelp(cmd('status'))).toMatch(/With --temporal: TEMPORAL_ADDRESS/);
  });

  /** A command's help as `--help` prints it: with the text added after (environment, exit codes). */
  function fullHelp(cmd: Command): string {
    let text = '';
    const write = jest.spyOn(process.stdout, 'write').mockImplementation((chunk) => {
      text += String(chunk);
      return true;
    });
    try {
      cmd.outputHelp();
    } finally {
      write.mockRestore();
    }
    return text;
  }
});

describe('vsp refuses bad arguments before contacting anything', () => {
  async function vsp(...args: string[]): Promise<{ code: number; err: string; out: string }> {
    let err = '';
    let out = '';
    const write = jest.spyOn(process.stderr, 'write').mockImplementation((chunk) => {
      err += String(chunk);
      return true;
    });
    const writeOut = jest.spyOn(process.stdout, 'write').mockImplementation((chunk) => {
      out += String(chunk);
      return true;
    });
    try {
      // Nothing listens there: an error naming the repository would mean it was contacted.
      const env = { VSP_REPOSITORY_URL: 'http://127.0.0.1:9', VSP_TOKEN: 'vsp_x' };
      Object.assign(process.env, env);
      return { code: await run(['node', 'vsp', ...args]), err, out };
    } finally {
      write.mockRestore();
      writeOut.mockRestore();
      delete process.env.VSP_REPOSITORY_URL;
      delete process.env.VSP_TOKEN;
    }
  }

  test('--since, --phase, --host and --limit name what is wrong', async () => {
    expect(await vsp('list', '--since', 'yesterday')).toEqual({
      code: 1,
      err: expect.stringMatching(/^vsp: since 'yesterday' is neither an ISO 8601 time .* nor a duration/),
      out: '',
    });
    expect((await vsp('list', '--phase', 'done')).err).toMatch(/^vsp: phase 'done' is not a task phase/);
    expect((await vsp('list', '--host', 'Host_A')).err).toMatch(/^vsp: host 'Host_A' is not a host name/);
    expect((await vsp('list', '--limit', 'ten')).err).toMatch(/^vsp: --limit must be a whole number/);
  });

  test('with --json the error is JSON too, with its exit code', async () => {
    const r = await vsp('--json', 'list', '--since', '2026-12-01T17:00');
    expect(r.code).toBe(1);
    expect(JSON.parse(r.err)).toEqual({
      error: expect.stringMatching(/^since '2026-12-01T17:00' is not an ISO 8601 time with its zone/),
      exitCode: 1,
    });
  });

  test('usage errors: the message and the help, or with --json one JSON line alone', async () => {
    const human = await vsp('list', '--bogus');
    expect(human.code).toBe(1);
    expect(human.err).toMatch(/^error: unknown option '--bogus'\n\nUsage: vsp list \[options\]/);
    for (const args of [
      ['--json', 'list', '--bogus'],
      ['list', '--bogus', '--json'],
    ])
      expect(await vsp(...args)).toEqual({
        code: 1,
        err: '{"error":"unknown option \'--bogus\'","exitCode":1}\n',
        out: '',
      });
    expect((await vsp('--json', 'status')).err).toBe(
      '{"error":"missing required argument \'task-id\'","exitCode":1}\n',
    );
    const help = await vsp('wait', '--help');
    expect(help).toMatchObject({ code: 0, err: '' });
    expect(help.out).toMatch(/^Usage: vsp wait \[options\] <task-id>/);
  });
});
