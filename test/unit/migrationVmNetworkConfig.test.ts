import { loadHostConfig } from '../../config/workerConfig';
import { chooseVmNic, vmNicOf, type VmNetworkOptions } from '../../drivers/qemu/vmNetwork';

/**
 * The VM network of a host worker's configuration (VSP_VM_NETWORK) and the choice of a VM's address:
 * pure checks, no root needed. The address probe is a real command (`sh`) standing in for arping.
 */
const BASE_ENV = {
  VSP_HOST: 'a',
  VSP_REPOSITORY_URL: 'http://127.0.0.1:1',
  VSP_REPOSITORY_TOKEN: 'abcdefghij',
};
const NET: VmNetworkOptions = { bridge: 'br0', subnet: '10.77.0' };

function configError(vmNetwork: string): string {
  try {
    loadHostConfig({ ...BASE_ENV, VSP_VM_NETWORK: vmNetwork });
  } catch (err) {
    return (err as Error).message;
  }
  throw new Error(`VSP_VM_NETWORK=${vmNetwork} was accepted`);
}

test('VSP_VM_NETWORK is parsed from JSON and optional', () => {
  expect(loadHostConfig(BASE_ENV).vmNetwork).toBeUndefined();
  const c = loadHostConfig({
    ...BASE_ENV,
    VSP_VM_NETWORK: '{"bridge":"br0","subnet":"10.77.0","lastHost":200}',
  });
  expect(c.vmNetwork).toEqual({ bridge: 'br0', subnet: '10.77.0', lastHost: 200 });
});

test('a bad VSP_VM_NETWORK names the variable and what is wrong', () => {
  expect(configError('not json')).toBe(
    'invalid configuration: VSP_VM_NETWORK (vmNetwork): a JSON object {bridge, subnet[, firstHost, lastHost]}',
  );
  expect(configError('{"bridge":"br0","subnet":"10.77"}')).toMatch(
    /VSP_VM_NETWORK \(vmNetwork\): subnet is the first three octets of the \/24, like 10\.77\.0/,
  );
  expect(configError('{"bridge":"br0","subnet":"10.77.256"}')).toMatch(/subnet is the first three octets/);
  expect(configError('{"bridge":"a-much-too-long-bridge","subnet":"10.77.0"}')).toMatch(
    /bridge must be a link name/,
  );
  expect(configError('{"bridge":"br0","subnet":"10.77.0","firstHost":0}')).toMatch(/lie within 1\.\.254/);
  expect(configError('{"bridge":"br0","subnet":"10.77.0","firstHost":200,"lastHost":150}')).toMatch(
    /firstHost must not exceed lastHost/,
  );
  expect(configError('{"bridge":"br0","subnet":"10.77.0","gateway":"10.77.0.1"}')).toMatch(/gateway/);
});

/** Runs `sh -c 'exit 1'` (arping's "it answered") for the addresses in `answering`, else `exit 0`. */
function probeAnswering(answering: string[], probed: string[]) {
  return (_cmd: string, args: string[]) => {
    const ip = args[args.length - 1];
    probed.push(ip);
    return { cmd: 'sh', args: ['-c', answering.includes(ip) ? 'exit 1' : 'exit 0'] };
  };
}

test('a VM gets its hashed address when nothing holds it', async () => {
  const probed: string[] = [];
  const nic = await chooseVmNic('vm-1', NET, probeAnswering([], probed), new Map());
  expect(nic).toEqual(vmNicOf('vm-1', NET));
  expect(probed).toEqual([nic.address.split('/')[0]]);
});

test('an address held on the segment or by a VM of the store is skipped, keeping the MAC and tap', async () => {
  const hashed = vmNicOf('vm-1', NET);
  const second = vmNicOf('vm-1', NET, 1);
  const third = vmNicOf('vm-1', NET, 2);
  const probed: string[] = [];
  const nic = await chooseVmNic(
    'vm-1',
    NET,
    probeAnswering([second.address.split('/')[0]], probed),
    new Map([[hashed.address, 'vm-other']]),
  );
  expect(nic).toEqual({ ...hashed, address: third.address });
  // The store's own VMs are known without a probe.
  expect(probed).toEqual([second.address.split('/')[0], third.address.split('/')[0]]);
});

test('no free address is a clear error naming what holds each one', async () => {
  const small: VmNetworkOptions = { ...NET, firstHost: 10, lastHost: 11 };
  const err = await chooseVmNic(
    'vm-1',
    small,
    probeAnswering(['10.77.0.10', '10.77.0.11'], []),
    new Map(),
  ).then(
    () => undefined,
    (e: unknown) => (e as Error).message,
  );
  expect(err).toMatch(
    /^VM vm-1: no free address on the VM network 10\.77\.0\.0\/24 among its first 2 choices: 10\.77\.0\.1[01] \(held by a machine on the segment\), 10\.77\.0\.1[01] \(held by a machine on the segment\)$/,
  );
});

test('a probe that cannot run is an error, not a free address', async () => {
  const broken = () => ({ cmd: 'sh', args: ['-c', 'exit 2'] });
  await expect(chooseVmNic('vm-1', NET, broken, new Map())).rejects.toThrow(
    /cannot check whether 10\.77\.0\.\d+ is free/,
  );
});
