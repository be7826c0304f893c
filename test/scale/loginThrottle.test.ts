import { Pool } from 'pg';
import { AccessDenied } from '../../repository/accounts/auth';
import { LoginRateLimited, LoginThrottle, PgThrottleStore } from '../../repository/accounts/loginThrottle';
import { migratePg } from '../../repository/store/pgMetadata';
import { startPostgres, type TestDatabase } from '../support/postgres';

/**
 * The throttle's shared store on a real PostgreSQL: two LoginThrottles on two pools stand for two
 * repository servers (the end-to-end case, through the protocols, is in scaleout.test.ts).
 */

const LIMITS = { maxFailuresPerAddress: 3, maxFailuresPerAccount: 50, windowMs: 60_000, lockoutMs: 1000 };

describe('PgThrottleStore', () => {
  let db: TestDatabase;
  const pools: Pool[] = [];
  let now = 1_000_000;
  const server = (): LoginThrottle => {
    const pool = new Pool({ connectionString: db.url, max: 4 });
    pools.push(pool);
    return new LoginThrottle(LIMITS, new PgThrottleStore(pool), () => now);
  };
  const denied = (): never => {
    throw new AccessDenied(401, 'wrong name or password');
  };
  const outcome = (p: Promise<unknown>): Promise<unknown> =>
    p.then(
      (v) => v,
      (e: unknown) => e,
    );

  beforeAll(async () => {
    db = await startPostgres();
    const pool = new Pool({ connectionString: db.url });
    await migratePg(pool);
    await pool.end();
  });

  afterAll(async () => {
    await Promise.all(pools.map((p) => p.end()));
    await db?.stop();
  });

  test('failures on one server lock the address out on another, with the doubling lockout', async () => {
    const [a, b] = [server(), server()];
    const from = { address: '10.0.0.1', account: 'alice' };
    for (let i = 0; i < 3; i++) expect(await outcome(a.guard(from, denied))).toBeInstanceOf(AccessDenied);
    const limited = await outcome(b.guard({ address: '10.0.0.1', account: 'bob' }, () => 'ok'));
    expect(limited).toBeInstanceOf(LoginRateLimited);
    expect((limited as Error).message).toMatch(/too many failed logins from 10\.0\.0\.1; try again in 1 s/);
    expect(await b.guard({ address: '10.0.0.2', account: 'alice' }, () => 'ok')).toBe('ok');
    // The 4th failure, on the other server once the first lockout is over, locks for 2 s: both see it.
    now += 1000;
    await outcome(b.guard(from, denied));
    const store = new PgThrottleStore(pools[0]);
    expect(await store.lockouts(['address 10.0.0.1', 'account alice'], now)).toEqual(
      new Map([['address 10.0.0.1', now + 2000]]),
    );
    now += 2000;
    expect(await a.guard(from, () => 'ok')).toBe('ok');
  });

  test('concurrent failures on several servers are all counted', async () => {
    const servers = [server(), server(), server()];
    now += 10 * LIMITS.windowMs;
    await Promise.all(
      Array.from({ length: 30 }, (_, i) =>
        outcome(servers[i % 3].guard({ address: `10.1.0.${i}`, account: 'carol' }, denied)),
      ),
    );
    const store = new PgThrottleStore(pools[0]);
    // 30 failures plus this one: had any update been lost, fewer would be kept.
    expect(await store.addFailure('account carol', now, now - LIMITS.windowMs)).toBe(31);
  });

  test('a success clears the account everywhere; stale rows are swept', async () => {
    const [a, b] = [server(), server()];
    now += 10 * LIMITS.windowMs;
    await outcome(a.guard({ address: '10.2.0.1', account: 'dave' }, denied));
    await b.guard({ address: '10.2.0.2', account: 'dave' }, () => 'ok');
    const rows = async (): Promise<string[]> =>
      (await pools[0].query<{ key: string }>('SELECT key FROM login_throttle ORDER BY key')).rows.map(
        (r) => r.key,
      );
    expect(await rows()).not.toContain('account dave');
    expect(await rows()).toContain('address 10.2.0.1');
    // A failure a window later sweeps every row with nothing left in the window (a fresh store sweeps
    // on its first failure).
    now += LIMITS.windowMs + 1;
    await new PgThrottleStore(pools[0]).addFailure('address 10.9.9.9', now, now - LIMITS.windowMs);
    expect(await rows()).toEqual(['address 10.9.9.9']);
  });
});
