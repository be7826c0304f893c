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
