import { spawn } from 'node:child_process';
import { promises as fs } from 'node:fs';
import { createLogger } from '../../logging/logger';

export type Accelerator = 'kvm' | 'tcg';

const log = createLogger('qemu-accel');
const MILESTONE = 'Linux version';
let cached: Promise<Accelerator> | undefined;

/**
 * Whether KVM really runs guests here. /dev/kvm can exist while KVM hangs (nested virtualisation that
 * does not work: the kernel decompressor runs, then nothing), so the probe boots the appliance kernel
 * under KVM and requires its first console line within `timeoutMs`; anything else means TCG. The
 * answer is cached per process. VSP_ACCEL=tcg|kvm skips the probe.
 */
export function probeAccelerator(
  kernel: string,
  timeoutMs = 5_000,
  qemuBinary = 'qemu-system-x86_64',
): Promise<Accelerator> {
  const forced = process.env.VSP_ACCEL;
  if (forced === 'tcg' || forced === 'kvm') return Promise.resolve(forced);
  cached ??= runProbe(kernel, timeoutMs, qemuBinary).then((accel) => {
    log.info({ accel }, 'accelerator chosen');
    return accel;
  });
  return cached;
}

async function runProbe(kernel: string, timeoutMs: number, qemuBinary: string): Promise<Accelerator> {
  try {
    await fs.access('/dev/kvm', fs.constants.R_OK | fs.constants.W_OK);
  } catch {
    return 'tcg';
  }
  const args = [
    '-accel',
    'kvm',
    '-machine',
    'pc',
    '-m',
    '128',
    '-display',
    'none',
    '-nodefaults',
    '-no-reboot',
    '-serial',
    'stdio',
    '-kernel',
    kernel,
    '-append',
    'console=ttyS0 panic=-1',
  ];
  return new Promise<Accelerator>((resolve) => {
    const child = spawn(qemuBinary, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let output = '';
    let settled = false;
    const finish = (accel: Accelerator, why: string) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      child.kill('SIGKILL');
      log.info({ accel, why }, 'KVM probe finished');
      resolve(accel);
    };
    const timer = setTimeout(
      () => finish('tcg', `no kernel output within ${timeoutMs} ms under KVM`),
      timeoutMs,
    );
    child.stdout.setEncoding('utf8');
    child.stdout.on('data', (chunk: string) => {
      output = (output + chunk).slice(-4096);
      if (output.includes(MILESTONE)) finish('kvm', 'the kernel booted under KVM');
    });
    child.stderr.resume();
    child.on('error', (err) => finish('tcg', `cannot run ${qemuBinary}: ${err.message}`));
    child.on('exit', (code) => finish('tcg', `probe exited with ${code} before the kernel printed`));
  });
}

/**
 * The host's TSC frequency in kHz, or undefined when this host does not tell it. Under TCG the guest's TSC is
 * the host's, and a microvm guest has no other clock (no HPET, no PM timer) to measure it against: its kernel
 * must be told (tsc_early_khz), or its own calibration against the PIT fails under load and it hangs. /proc/
 * cpuinfo's "cpu MHz" is the kernel's calibrated frequency when the TSC is constant and the CPU has no
 * APERF/MPERF counters (with them it is the current clock, not the TSC's). VSP_TSC_KHZ (workerConfig.ts)
 * overrides it.
 */
export async function hostTscKhz(cpuinfo = '/proc/cpuinfo'): Promise<number | undefined> {
  return tscKhzOf(await fs.readFile(cpuinfo, 'utf8').catch(() => ''));
}

/** hostTscKhz's reading of /proc/cpuinfo (pure, for tests). */
export function tscKhzOf(cpuinfo: string): number | undefined {
  const flags = /^flags\s*:(.*)$/m.exec(cpuinfo)?.[1].trim().split(/\s+/) ?? [];
  if (!flags.includes('constant_tsc') || flags.includes('aperfmperf')) return undefined;
  const mhz = /^cpu MHz\s*:\s*([0-9]+(?:\.[0-9]+)?)\s*$/m.exec(cpuinfo)?.[1];
  const khz = mhz === undefined ? NaN : Math.round(Number(mhz) * 1000);
  return khz >= 1_000 ? khz : undefined;
}
