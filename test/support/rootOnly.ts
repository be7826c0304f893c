/**
 * Set up before each system-tier file (test/tiers.js): the tier needs root (network namespaces, taps,
 * NFS, QEMU's and the tasks' unprivileged accounts). Without root every test skips and says why,
 * instead of failing on the first namespace it cannot make; its setup and teardown hooks do not run.
 */
if (process.getuid?.() !== 0) {
  const reason = 'skipped: the system tier needs root (namespaces, taps, NFS, unprivileged accounts)';
  const original = test;
  const skip = (name: string, fn?: jest.ProvidesCallback, timeout?: number) =>
    original.skip(`${name} (${reason})`, fn, timeout);
  const g = globalThis as Record<string, unknown>;
  g.test = g.it = Object.assign(skip, { skip, only: skip, each: original.each, todo: original.todo });
  for (const hook of ['beforeAll', 'afterAll', 'beforeEach', 'afterEach']) g[hook] = () => undefined;
}

export {};
