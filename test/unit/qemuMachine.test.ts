import { loadHostConfig } from '../../config/workerConfig';
import { tscKhzOf } from '../../drivers/qemu/accelerator';
import type { Appliance } from '../../drivers/qemu/appliance';
import { buildQemuArgs, chooseMachine } from '../../drivers/qemu/commandLine';
import { SAMPLE_LAUNCH } from '../support/qemuLaunch';

/** The QEMU machine a VM gets and what it boots (pure: no QEMU runs). */

const appliance: Appliance = {
  version: 'v',
  kernelVersion: 'k',
  vmlinuz: '/a/vmlinuz',
  vmlinux: '/a/vmlinux',
  initrd: '/a/initrd.cpio',
  root: { path: '/a/root.qcow2', sha256: '0'.repeat(64), format: 'qcow2' },
};
const after = (args: string[], flag: string) => args.filter((_, i) => args[i - 1] === flag);
const virtio = (args: string[]) => after(args, '-device').filter((d) => d.startsWith('virtio-'));

test('microvm where it can boot: KVM, or TCG with the host TSC known; else pc', () => {
  expect(chooseMachine('kvm', appliance, undefined)).toBe('microvm');
  expect(chooseMachine('tcg', appliance, 2_600_000)).toBe('microvm');
  expect(chooseMachine('tcg', appliance, undefined)).toBe('pc');
  expect(chooseMachine('kvm', { ...appliance, vmlinux: undefined }, undefined)).toBe('pc');
});

test('microvm boots the ELF kernel with virtio-mmio disks, root first, and tells a TCG kernel its TSC', () => {
  const args = buildQemuArgs(SAMPLE_LAUNCH);
  expect(after(args, '-machine')).toEqual(['microvm']);
  expect(after(args, '-kernel')).toEqual([SAMPLE_LAUNCH.vmlinux]);
  expect(virtio(args)).toEqual(['virtio-blk-device,drive=root', 'virtio-blk-device,drive=data']);
  expect(after(args, '-drive')[0]).toMatch(/^file=\/r\.qcow2,format=qcow2,if=none,id=root,/);
  expect(after(args, '-append')[0].split(' ')).toContain('tsc_early_khz=2600000');
  expect(() => buildQemuArgs({ ...SAMPLE_LAUNCH, tscKhz: undefined })).toThrow('TSC frequency');
  expect(() => buildQemuArgs({ ...SAMPLE_LAUNCH, vmlinux: undefined })).toThrow("appliance's vmlinux");
  const kvm = buildQemuArgs({ ...SAMPLE_LAUNCH, accel: 'kvm', tscKhz: undefined });
  expect(after(kvm, '-append')[0]).not.toContain('tsc_early_khz');
});

test('pc boots the compressed kernel with virtio-pci devices (as VMs started before microvm run)', () => {
  const args = buildQemuArgs({ ...SAMPLE_LAUNCH, machine: 'pc', portForwards: { 22: 2222 } });
  expect(after(args, '-machine')).toEqual(['pc']);
  expect(after(args, '-kernel')).toEqual([SAMPLE_LAUNCH.vmlinuz]);
  expect(virtio(args)).toEqual([
    'virtio-blk-pci,drive=root',
    'virtio-blk-pci,drive=data',
    'virtio-net-pci,netdev=net0',
  ]);
  expect(after(args, '-append')[0]).not.toContain('tsc_early_khz');
});

test("the host's TSC frequency comes from /proc/cpuinfo only where that figure is the TSC's", () => {
  const cpuinfo = (flags: string) => `processor\t: 0\ncpu MHz\t\t: 2596.124\nflags\t\t: fpu tsc ${flags}\n`;
  expect(tscKhzOf(cpuinfo('constant_tsc nonstop_tsc tsc_known_freq'))).toBe(2_596_124);
  // APERF/MPERF: "cpu MHz" is the current clock, not the TSC's.
  expect(tscKhzOf(cpuinfo('constant_tsc aperfmperf'))).toBeUndefined();
  expect(tscKhzOf(cpuinfo('nonstop_tsc'))).toBeUndefined();
  expect(tscKhzOf('flags : constant_tsc\n')).toBeUndefined();
});

test('VSP_TSC_KHZ is a frequency in kHz, checked at worker start', () => {
  const env = { VSP_HOST: 'a', VSP_REPOSITORY_URL: 'http://127.0.0.1:1', VSP_REPOSITORY_TOKEN: 'abcdefghij' };
  expect(loadHostConfig(env).tscKhz).toBeUndefined();
  expect(loadHostConfig({ ...env, VSP_TSC_KHZ: '2596124' }).tscKhz).toBe(2_596_124);
  expect(() => loadHostConfig({ ...env, VSP_TSC_KHZ: '2.6GHz' })).toThrow(/VSP_TSC_KHZ/);
  expect(() => loadHostConfig({ ...env, VSP_TSC_KHZ: '12' })).toThrow(/VSP_TSC_KHZ/);
});
