import { LiveLogError, type LiveLogStore } from '../../repository/tasks/liveLogs';

/**
 * The rules every live-log store keeps (files on one server, PostgreSQL for many): one list of cases,
 * run by the unit tier on files and by the scale tier on PostgreSQL. `open` gives an empty store.
 */
export function liveLogStoreCases(name: string, open: (maxBytes?: number) => Promise<LiveLogStore>): void {
  describe(`live logs (${name})`, () => {
    const CAP = 'cap12345';
    const text = async (logs: LiveLogStore, offset = 0) => (await logs.read('alice', CAP, offset)).toString();

    it('a live log takes appends in order: a repeated one adds nothing, one past the end is refused with its size', async () => {
      const logs = await open();
      expect(await logs.append('alice', CAP, 0, Buffer.from('one\n'))).toEqual({ size: 4, full: false });
      // A retry of the same append (the host did not hear the reply), then one that overlaps the end.
      expect(await logs.append('alice', CAP, 0, Buffer.from('one\n'))).toEqual({ size: 4, full: false });
      expect(await logs.append('alice', CAP, 2, Buffer.from('e\ntwo\n'))).toEqual({ size: 8, full: false });
      // Without an offset: at the end (a host that takes the VM over after a migration).
      expect(await logs.append('alice', CAP, undefined, Buffer.from('three\n'))).toEqual({
        size: 14,
        full: false,
      });
      await expect(logs.append('alice', CAP, 20, Buffer.from('x'))).rejects.toMatchObject({
        status: 409,
        message: expect.stringContaining('has 14 bytes'),
      });
      expect(await text(logs)).toBe('one\ntwo\nthree\n');
      expect(await text(logs, 8)).toBe('three\n');
      expect(await logs.size('alice', CAP)).toBe(14);
      expect(await logs.size('alice', 'cap-never')).toBe(0);
      // Concurrent appends at the same offset: the file gets the bytes once.
      const both = await Promise.all(
        [0, 1].map(() => logs.append('alice', 'cap-race1', 0, Buffer.from('abc'))),
      );
      expect(both.map((r) => r.size)).toEqual([3, 3]);
      expect((await logs.read('alice', 'cap-race1', 0)).toString()).toBe('abc');
      // A capability id never becomes a path outside the folder.
      await expect(logs.append('alice', '../../etc', 0, Buffer.from('x'))).rejects.toBeInstanceOf(
        LiveLogError,
      );
    });

    it('a live log stops at its limit with a note, and says it is full', async () => {
      const logs = await open(200);
      expect(await logs.append('alice', CAP, 0, Buffer.alloc(50, 'a'))).toEqual({ size: 50, full: false });
      const r = await logs.append('alice', CAP, 50, Buffer.alloc(500, 'b'));
      expect(r.full).toBe(true);
      expect(r.size).toBe(200);
      expect(await text(logs)).toMatch(
        /^a{50}b+\n\[vsp: the live log stops at 200 bytes; task\.log keeps the whole output\]\n$/,
      );
      expect(await logs.append('alice', CAP, undefined, Buffer.from('more'))).toEqual({
        size: 200,
        full: true,
      });
    });

    it('a follower waiting on a log wakes when it grows, not only at its poll', async () => {
      const logs = await open();
      const stop = new AbortController();
      const woke = logs.waitForGrowth('alice', CAP, 60_000, stop.signal).then(() => 'grew');
      await logs.append('alice', CAP, 0, Buffer.from('line\n'));
      expect(await woke).toBe('grew');
      const aborted = logs.waitForGrowth('alice', CAP, 60_000, stop.signal).then(() => 'stopped');
      stop.abort();
      expect(await aborted).toBe('stopped');
    });
  });
}
