import type { Pool } from 'pg';
import { migratePg, openPgPool } from '../../repository/store/pgMetadata';
import { PgLiveLogs } from '../../repository/tasks/pgLiveLogs';
import { liveLogStoreCases } from '../support/liveLogStoreCases';
import { startPostgres, type TestDatabase } from '../support/postgres';

/** Live logs on the cluster backend: the store's rules on PostgreSQL, and two servers sharing one log. */

let db: TestDatabase;
/** Two pools: two repository servers on one database. */
let a: Pool;
let b: Pool;
beforeAll(async () => {
  db = await startPostgres();
  a = openPgPool(db.url);
  b = openPgPool(db.url);
  await migratePg(a);
});
afterAll(async () => {
  await a?.end();
  await b?.end();
  await db?.stop();
});

liveLogStoreCases('postgres', async (maxBytes) => {
  await a.query('TRUNCATE live_logs CASCADE');
  return new PgLiveLogs(a, maxBytes);
});

describe('live logs shared by two servers', () => {
  it('keeps a retried append once whichever server takes it, and wakes a follower on the other', async () => {
    const onA = new PgLiveLogs(a);
    const onB = new PgLiveLogs(b);
    const cap = 'cap-shared1';
    // A host's append and its retry land on different servers at once: the bytes are stored once.
    const both = await Promise.all([onA, onB].map((s) => s.append('bob', cap, 0, Buffer.from('first\n'))));
    expect(both.map((r) => r.size)).toEqual([6, 6]);
    const stop = new AbortController();
    const woke = onB.waitForGrowth('bob', cap, 60_000, stop.signal).then(() => 'grew');
    await onA.append('bob', cap, 6, Buffer.from('second\n'));
    expect(await woke).toBe('grew');
    expect((await onB.read('bob', cap, 0)).toString()).toBe('first\nsecond\n');
    expect((await onB.read('bob', cap, 3, 5)).toString()).toBe('st\nse');
    expect(await onA.size('bob', cap)).toBe(13);
  });
});
