import { text } from 'node:stream/consumers';

import type { OwnerTaskSpec } from '../../client/taskClient';
import type { TaskStatus } from '../../workflows/definitions';
import { powerOff, powerOn } from '../../deploy/vmcluster/cluster';
import { until } from '../support/clusterFixture';
import {
  emulatorCrash,
  ensureDeployed,
  onHost,
  onHostOk,
  repo,
  submitTask,
  vspClient,
  whileTaskRuns,
} from './harness';

/**
 * Faults on real Xen hosts (issue 11, item 5), each ending as the reliability rules say: no data lost, a
 * clear error, nothing left behind. The task ticks once a second into out/ticks.txt until it is released
 * (`xl shutdown`: the guest's poweroff command TERMs it, and it exits 0), so every output proves by its
 * contiguous ticks that nothing was lost, and no test guesses how long anything takes.
 *
 * One power cut serves two faults: host b loses its power (its QEMU quits: deploy/vmcluster `powerOff`) while
 * it runs a task and while it receives a migration, and is powered on again (a cold boot from its own disk:
 * what was deployed on it starts again), so later tests get a healthy cluster.
 */

// Xen in QEMU/TCG with PVH guests on emulated NPT: some guest boots panic or triple-fault (harness.ts).
// Before its task starts, the driver boots it again; after, the task fails, as it must. Such a run is tried
// once more, its errors logged, so a nested-virtualisation fault does not fail the tier alone.
jest.retryTimes(1, { logErrorsBeforeRetry: true });

const OWNER = 'faults';
const STORE = '/var/lib/vsp/store';
const TASK_TIMEOUT_MS = 20 * 60_000;
const STEP_MS = 10 * 60_000;

const TICKER = [
  'mkdir -p out',
  'i=0',
  'stop=',
  "trap 'stop=1' TERM",
  'while [ -z "$stop" ]; do',
  '  i=$((i+1))',
  '  echo $i >> out/ticks.txt',
  '  echo "VSP-PROGRESS $((i < 99 ? i : 99)) tick $i"',
  '  sleep 1',
  'done',
  'exit 0',
].join('\n');

const seconds = (since: number) => Math.round((Date.now() - since) / 1000);

function figure(name: string, value: number | string, unit = ''): void {
  process.stderr.write(`cluster faults figure: ${name}: ${value}${unit ? ` ${unit}` : ''}\n`);
}

async function submitTicker(name: string, host: string, extra: Partial<OwnerTaskSpec> = {}): Promise<string> {
  const { taskId } = await submitTask(OWNER, {
    name,
    driver: 'xen',
    host,
    memoryMiB: 192,
    timeLimitSec: 1800,
    command: TICKER,
    outputDir: 'out',
    ...extra,
  });
  return taskId;
}

/** Waits until the task runs on `host` and its guest has reported tick `n` or later; fails if it ends first. */
function untilTicking(taskId: string, host: string, n: number): Promise<TaskStatus> {
  return whileTaskRuns(
    taskId,
    `${taskId} to tick ${n} on ${host}`,
    async (st) => (st.phase === 'running' && st.host === host && (st.progress ?? 0) >= n ? st : undefined),
    STEP_MS,
  );
}

const domain = (vmId: string) => `vsp-${vmId}`;

async function domid(host: string, vmId: string): Promise<number | undefined> {
  const r = await onHost(host, `xl domid ${domain(vmId)}`);
  return r.code === 0 ? Number(r.stdout.trim()) : undefined;
}

/** Releases the task where its VM runs now (xl shutdown: the guest TERMs the task), returns its result. */
async function release(taskId: string) {
  const vsp = await vspClient();
  const { host, vmId } = await vsp.status(taskId);
  await onHostOk(host!, `xl shutdown ${domain(vmId!)}`);
  return vsp.result(taskId);
}

/** The task's ticks as stored in the repository: 1..n without a gap (nothing lost), n. */
async function storedTicks(resultsPath: string): Promise<number> {
  const stored = await text(
    await (await repo(OWNER)).downloadStream(OWNER, `${resultsPath}/outputs/ticks.txt`),
  );
  const ticks = stored.trim().split('\n').map(Number);
  expect(ticks).toEqual(ticks.map((_, i) => i + 1));
  return ticks.length;
}

/** Nothing of VM `vmId` left on `host`: no domain, no VM folder, no loop device on its files. */
async function expectNothingLeft(host: string, vmId: string): Promise<void> {
  await until(
    `VM ${vmId} to leave no trace on ${host}`,
    async () => {
      const r = await onHost(
        host,
        `xl domid ${domain(vmId)} >/dev/null 2>&1 && echo domain; xl domid ${domain(vmId)}--incoming >/dev/null 2>&1 && echo incoming; ` +
          `test -e ${STORE}/vms/${vmId} && echo folder; losetup -a | grep -q ${vmId} && echo loop; true`,
      );
      return r.stdout.trim() === '' ? true : undefined;
    },
    STEP_MS,
  );
}

/**
 * Releases the task, checks it completed with exit 0 where `expected` says, its ticks whole in the
 * repository and nothing of its VM left on the host it ended on; returns the number of ticks.
 */
async function finish(
  taskId: string,
  vmId: string,
  expected: { host: string; storageHost?: string },
): Promise<number> {
  const result = await release(taskId);
  expect(result).toMatchObject({ ...expected, exitCode: 0 });
  const ticks = await storedTicks(result.resultsPath);
  await expectNothingLeft(expected.host, vmId);
  return ticks;
}

/** Powers `host` on again and waits until its host worker runs (what later tests need). */
async function bringBack(host: string): Promise<void> {
  const t0 = Date.now();
  const boot = await powerOn(host);
  await until(
    `the host worker on ${host} to run`,
    async () =>
      (await onHost(host, 'systemctl is-active vsp-host-worker.service')).stdout.trim() === 'active' ||
      undefined,
    STEP_MS,
  );
  figure(`dom0 ${host} power-on to ssh`, boot.sshReadySeconds, 's');
  figure(`dom0 ${host} power-on to host worker active`, Math.round((Date.now() - t0) / 100) / 10, 's');
}

beforeAll(async () => {
  const s = await ensureDeployed();
  if (s > 0) figure('deploy (first use in this run)', Math.round(s), 's');
}, 40 * 60_000);

describe('faults on real Xen hosts', () => {
  test(
    'systemctl restart of the host worker under a running task: the VM outlives it and is re-attached',
    async () => {
      const vsp = await vspClient();
      const taskId = await submitTicker('worker-restart', 'a');
      const running = await untilTicking(taskId, 'a', 2);
      const vmId = running.vmId!;
      const before = await domid('a', vmId);
      expect(before).toBeGreaterThan(0);
      const oldPid = (await onHostOk('a', 'systemctl show -p MainPID --value vsp-host-worker')).trim();

      await onHostOk('a', 'systemctl restart vsp-host-worker.service');
      const newPid = (await onHostOk('a', 'systemctl show -p MainPID --value vsp-host-worker')).trim();
      expect(newPid).not.toBe(oldPid);
      // The same domain still runs: the worker's restart did not touch it.
      expect(await domid('a', vmId)).toBe(before);
      // The new worker re-attached: the progress it reads from the guest's console goes on.
      const ticked = (await vsp.status(taskId)).progress ?? 0;
      await untilTicking(taskId, 'a', ticked + 2);

      expect(await finish(taskId, vmId, { host: 'a' })).toBeGreaterThan(ticked);
    },
    TASK_TIMEOUT_MS,
  );

  test(
    "host b powered off under a running task and as a migration's target: the task restarts on a and completes, the migration fails clearly and its task completes on a; b's leftovers go when it is back",
    async () => {
      const vsp = await vspClient();
      const migrating = await submitTicker('power-off-target', 'a');
      // Pinned to b: a restart after a host failure drops the pin and excludes the dead host.
      const stranded = await submitTicker('power-off-running', 'b', { onHostFailure: 'restart' });
      // The two guests boot side by side, one on each host.
      const [{ vmId: migratingVm }, { vmId: strandedVm, host: strandedHost }] = await Promise.all([
        untilTicking(migrating, 'a', 2),
        untilTicking(stranded, 'b', 2),
      ]);
      expect(strandedHost).toBe('b');

      const migration = vsp.migrate(migrating, { host: 'b' }).then(
        () => undefined,
        (e: unknown) => e,
      );
      // The target's xl has created the incoming domain: the transfer runs.
      await until(
        `the incoming domain of ${migratingVm} on b`,
        async () => (await domid('b', `${migratingVm}--incoming`)) !== undefined || undefined,
        STEP_MS,
      );
      const cut = Date.now();
      await powerOff('b');
      // b boots again while a finishes the tasks, once nothing placed after the cut can land on it.
      let back: Promise<void> | undefined;
      try {
        const err = await migration;
        figure('power cut of the target to the failed migration', seconds(cut), 's');
        expect(err).toBeInstanceOf(Error);
        // Nested virtualisation may crash the guest as the migration starts (harness.ts): then its task
        // fails, and only the stranded task's part can be checked on this machine.
        const crashed = await emulatorCrash(err, 'a', migratingVm!);
        if (crashed) {
          await expect(vsp.result(migrating)).rejects.toThrow();
          process.stderr.write(
            `cluster faults: NOT VERIFIED on this run: the migrating guest crashed (nested virtualisation: ${crashed.slice(0, 300)})\n`,
          );
        } else {
          const status = await vsp.status(migrating);
          expect(status).toMatchObject({ host: 'a', storageHost: 'a', phase: 'running' });
          const last = status.migrations?.at(-1);
          figure('failed migration error', JSON.stringify(last?.error));
          expect(last).toMatchObject({ from: 'a', to: 'b', ok: false, error: expect.stringMatching(/./) });
          // The guest never stopped for good: it ticks on a.
          await untilTicking(migrating, 'a', (status.progress ?? 0) + 2);
        }

        const restarted = await untilTicking(stranded, 'a', 1);
        figure('power cut to the stranded task running again on a', seconds(cut), 's');
        expect(restarted.restartedFrom).toEqual(['b']);
        expect(restarted.vmId).not.toBe(strandedVm);
        back = bringBack('b');
        back.catch(() => undefined); // no unhandled rejection while the finishes run: awaited in finally

        await Promise.all([
          crashed ? undefined : finish(migrating, migratingVm!, { host: 'a' }),
          finish(stranded, restarted.vmId!, { host: 'a' }),
        ]);
        expect((await onHost('a', 'pgrep -f "xl .*migrate"')).stdout).toBe('');
      } finally {
        await (back ?? bringBack('b'));
      }
      // What b held when its power went (the stranded VM's folder) is its reaper's: nothing of it stays.
      await expectNothingLeft('b', strandedVm!);
      await expectNothingLeft('b', migratingVm!);
    },
    TASK_TIMEOUT_MS,
  );
});
