import { mkdtempSync, mkdirSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { MigrateOutput } from '../../drivers/xen/migrateOutput';
import {
  bytesWrittenByChildren,
  consoleLoggingProblem,
  isXlMigrateOf,
  xlMigrationOf,
} from '../../drivers/xen/xl';

/** What the Xen driver reads from xl and from /proc, parsed without a hypervisor. */

// Lines of a real `xl -vvv migrate` (Xen 4.17, Debian bookworm dom0s), the target's through ssh.
const XL_MIGRATE = [
  'libxl: debug: libxl_domain.c:2309:libxl_retrieve_domain_configuration: Domain 2:ao 0x5652da983410: inprogress: poller=0x5652da97e280, flags=ic',
  'migration target: Ready to receive domain.',
  'Saving to migration stream new xl format (info 0x3/0x0/1361)',
  'xc: info: Saving domain 2, type x86 HVM',
  'xc: info: Restoring domain',
  'libxl: debug: libxl_dom_suspend.c:203:domain_suspend_callback_common: Domain 2:issuing PVH/HVM suspend request via XenBus control node',
  'libxl: debug: libxl_dom_suspend.c:281:domain_suspend_common_pvcontrol_suspending: Domain 2:guest acknowledged suspend request',
  'libxl: debug: libxl_dom_suspend.c:358:suspend_common_wait_guest_check: Domain 2:guest has suspended',
  'xc: info: Restore successful',
  'migration target: Transfer complete, requesting permission to start domain.',
  'migration sender: Target has acknowledged transfer.',
  'migration sender: Giving target permission to start.',
  'migration target: Got permission, starting domain.',
  'migration target: Domain started successsfully.',
  'migration sender: Target reported successful startup.',
  'Migration successful.',
];

describe('xl migrate output', () => {
  test('downtime runs from the suspend request to the target starting the domain; phases follow xl', () => {
    let now = 1000;
    const out = new MigrateOutput(256 * 1024 ** 2, () => now);
    expect(out.progress()).toMatchObject({ status: 'setup', transferredBytes: 0 });
    const phases: string[] = [];
    for (const line of XL_MIGRATE) {
      now += line.includes('Restoring') ? 40_000 : 100;
      out.add(line);
      out.sent(line.includes('Restoring') ? 200 * 1024 ** 2 : 0);
      phases.push(out.progress().status);
    }
    expect(phases[1]).toBe('active');
    expect(phases[5]).toBe('device');
    out.completed();
    // From line 6 (the request) to line 14 (started): 8 lines, 100 ms each.
    expect(out.figures()).toEqual({
      totalTimeMs: 41_500,
      downtimeMs: 800,
      ramTransferredBytes: 200 * 1024 ** 2,
    });
    expect(out.progress()).toMatchObject({ status: 'completed', remainingBytes: 0 });
  });

  test('without stream bytes the memory size stands in once complete; without the lines, no downtime', () => {
    const out = new MigrateOutput(64 * 1024 ** 2);
    out.add('Migration successful.');
    expect(out.progress().transferredBytes).toBe(0);
    out.completed();
    expect(out.figures()).toMatchObject({ downtimeMs: 0, ramTransferredBytes: 64 * 1024 ** 2 });
  });
});

test("a failed migration's error keeps xl's error lines, not its debug chatter", () => {
  const out = new MigrateOutput(64 * 1024 ** 2);
  for (const line of [
    'libxl: debug: libxl_domain.c:512:libxl_domain_suspend: Domain 3:ao 0x5: create: how=(nil)',
    'xc: info: Restoring domain',
    'Timeout, server 10.77.30.2 not responding.\r',
    'libxl: error: libxl_utils.c:505:libxl_read_exactly: file/stream truncated reading ipc msg header',
    'migration sender: libxl_domain_suspend failed (rc=-3)',
    'migration sender: libxl_domain_suspend failed (rc=-3)',
    'Migration failed, resuming at sender.',
  ])
    out.add(line);
  expect(out.failure()).toBe(
    'Timeout, server 10.77.30.2 not responding.; ' +
      'libxl: error: libxl_utils.c:505:libxl_read_exactly: file/stream truncated reading ipc msg header; ' +
      'migration sender: libxl_domain_suspend failed (rc=-3); Migration failed, resuming at sender.',
  );
  expect(new MigrateOutput(1).failure()).toBeUndefined();
});

describe('xenconsoled command line', () => {
  const dir = '/var/log/xen/console';
  test.each([
    [
      ['/usr/lib/xen-4.17/bin/xenconsoled', '--log=guest', `--log-dir=${dir}`, '--pid-file', '/run/x.pid'],
      undefined,
    ],
    [['xenconsoled', '--log', 'all'], undefined],
    [['xenconsoled', '--pid-file', '/run/x.pid'], 'xenconsoled does not log guest consoles (--log=none)'],
    [['xenconsoled', '--log=hv'], 'xenconsoled does not log guest consoles (--log=hv)'],
    [
      ['xenconsoled', '--log=guest', '--log-dir=/tmp/c'],
      `xenconsoled logs guest consoles to /tmp/c, not ${dir}`,
    ],
  ])('%j', (argv, problem) => {
    expect(consoleLoggingProblem(argv, dir)).toBe(problem);
  });
});

describe('processes the driver looks for', () => {
  let proc: string;
  beforeAll(() => {
    proc = mkdtempSync(path.join(os.tmpdir(), 'vsp-proc-'));
    const fake = (pid: number, argv: string[], comm: string, ppid: number, wchar: number) => {
      mkdirSync(path.join(proc, String(pid)));
      writeFileSync(path.join(proc, String(pid), 'cmdline'), argv.join('\0') + '\0');
      writeFileSync(path.join(proc, String(pid), 'stat'), `${pid} (${comm}) S ${ppid} ${pid} ${pid} 0 -1`);
      writeFileSync(path.join(proc, String(pid), 'io'), `rchar: 10\nwchar: ${wchar}\nsyscr: 1\n`);
    };
    fake(100, ['xl', '-vvv', 'migrate', '-s', 'ssh -o BatchMode=yes', 'vsp-t1', '10.0.0.2'], 'xl', 1, 5);
    fake(
      101,
      ['/usr/lib/xen-4.17/bin/libxl-save-helper', '--save-domain'],
      'libxl-save-help',
      100,
      7_000_000,
    );
    fake(102, ['ssh', '10.0.0.2', 'xl', 'migrate-receive'], 'ssh', 100, 99);
    fake(200, ['xl', 'migrate', 'vsp-t10', '10.0.0.2'], 'xl', 1, 0);
    mkdirSync(path.join(proc, 'self'));
  });
  afterAll(() => rmSync(proc, { recursive: true, force: true }));

  test('an xl migrate of one domain, by its command line', async () => {
    expect(await xlMigrationOf('vsp-t1', proc)).toBe(100);
    expect(await xlMigrationOf('vsp-t10', proc)).toBe(200);
    expect(await xlMigrationOf('vsp-t2', proc)).toBeUndefined();
    expect(isXlMigrateOf(['xl', 'migrate-receive'], 'vsp-t1')).toBe(false);
    expect(isXlMigrateOf(['ssh', 'x', 'xl', 'migrate', 'vsp-t1', 'h'], 'vsp-t1')).toBe(false);
    expect(isXlMigrateOf(['xl', 'list', 'migrate', 'vsp-t1', 'h'], 'vsp-t1')).toBe(false);
  });

  test('the memory stream: what the save helper child of xl wrote', async () => {
    expect(await bytesWrittenByChildren(100, 'libxl-save-help', proc)).toBe(7_000_000);
    expect(await bytesWrittenByChildren(200, 'libxl-save-help', proc)).toBe(0);
  });
});
