import { AccessDenied } from './auth';

/**
 * Login rate limiting shared by HTTP, SFTP and FTPS (one instance for all three, so a guesser gets
 * no more tries by switching protocol). Failed logins are counted per remote address and per account
 * over a sliding window; at the limit the address or account is locked out, and every further
 * failure within the window doubles the lockout (exponential backoff, capped). While locked out, a
 * login is refused before any password is checked, which also spares the argon2 work.
 */

export interface LoginThrottleOptions {
  /** Failures from one address within `windowMs` that lock the address out. */
  maxFailuresPerAddress: number;
  /**
   * Failures for one account within `windowMs` that lock the account out. Higher than per address,
   * so one noisy address cannot easily lock an owner out, yet a guesser spread over many addresses
   * is still slowed down.
   */
  maxFailuresPerAccount: number;
  windowMs: number;
  /** The first lockout; each further failure while over the limit doubles it, up to `maxLockoutMs`. */
  lockoutMs: number;
  maxLockoutMs: number;
}

export const DEFAULT_LOGIN_THROTTLE: LoginThrottleOptions = {
  maxFailuresPerAddress: 10,
  maxFailuresPerAccount: 20,
  windowMs: 10 * 60_000,
  lockoutMs: 30_000,
  maxLockoutMs: 30 * 60_000,
};

/** Who is trying to log in: an address always, an account when the protocol names one. */
export interface LoginAttempt {
  address: string | undefined;
  account?: string;
}

/** A login refused without being checked, because of earlier failures. */
export class LoginRateLimited extends Error {
  constructor(
    message: string,
    readonly retryAfterSeconds: number,
  ) {
    super(message);
    this.name = 'LoginRateLimited';
  }
}

/** Account names are client input: only this much of one is kept as a key. */
const MAX_ACCOUNT_KEY = 128;

/**
 * The key an address is counted under: IPv4-mapped IPv6 as IPv4, other IPv6 by its /64 (one host
 * usually holds a whole /64, so counting single addresses would let it rotate freely).
 */
export function addressKey(address: string): string {
  const mapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(address);
  if (mapped) return mapped[1];
  if (!address.includes(':')) return address;
  const [head, tail = ''] = address.toLowerCase().split('::');
  const left = head === '' ? [] : head.split(':');
  const right = tail === '' ? [] : tail.split(':');
  const groups = [...left, ...Array<string>(Math.max(0, 8 - left.length - right.length)).fill('0'), ...right];
  return `${groups.slice(0, 4).join(':')}::/64`;
}

/**
 * Where failures and lockouts live. One store shared by every repository server (PostgreSQL on the
 * `cluster` backend) makes a lockout earned on one server hold on all of them at once; `local` keeps
 * them in memory, one process being the whole repository. Keys are opaque strings.
 */
export interface ThrottleStore {
  /** The keys among `keys` locked out after `now`, with the end of each lockout (ms since the epoch). */
  lockouts(keys: string[], now: number): Promise<Map<string, number>>;
  /**
   * Records a failure for `key` at `now`, forgetting failures at or before `since`, and returns how
   * many remain (this one included). Atomic per key: concurrent failures are all counted.
   */
  addFailure(key: string, now: number, since: number): Promise<number>;
  /** Locks `key` out until `until`, unless it already is for longer. */
  lockUntil(key: string, until: number): Promise<void>;
  /** Forgets `key`'s failures and lockout. */
  clear(key: string): Promise<void>;
}

/**
 * Failures beyond this many per key are not kept: the lockout's doubling stops long before (2^30), and
 * it bounds what one key may hold.
 */
const MAX_FAILURES_KEPT = 64;

interface FailureRecord {
  /** Times of the failures still inside the window, oldest first. */
  failures: number[];
  lockedUntil: number;
}

/** Beyond this many tracked addresses and accounts, stale ones are swept (and the oldest dropped). */
const MAX_TRACKED = 50_000;

/** One process's failures and lockouts: the `local` backend's store. */
export class MemoryThrottleStore implements ThrottleStore {
  private readonly records = new Map<string, FailureRecord>();

  lockouts(keys: string[], now: number): Promise<Map<string, number>> {
    const out = new Map<string, number>();
    for (const key of keys) {
      const until = this.records.get(key)?.lockedUntil ?? 0;
      if (until > now) out.set(key, until);
    }
    return Promise.resolve(out);
  }

  addFailure(key: string, now: number, since: number): Promise<number> {
    const r = this.records.get(key) ?? { failures: [], lockedUntil: 0 };
    this.records.delete(key); // re-inserted last: the map stays ordered by last failure
    r.failures = [...r.failures.filter((t) => t > since), now].slice(-MAX_FAILURES_KEPT);
    this.records.set(key, r);
    if (this.records.size > MAX_TRACKED) this.sweep(now, since);
    return Promise.resolve(r.failures.length);
  }

  lockUntil(key: string, until: number): Promise<void> {
    const r = this.records.get(key);
    if (r) r.lockedUntil = Math.max(r.lockedUntil, until);
    return Promise.resolve();
  }

  clear(key: string): Promise<void> {
    this.records.delete(key);
    return Promise.resolve();
  }

  /** Drops records with no failure after `since` and no lockout; then the oldest, down to the cap. */
  private sweep(now: number, since: number): void {
    for (const [key, r] of this.records) {
      if (r.lockedUntil <= now && (r.failures.at(-1) ?? 0) <= since) this.records.delete(key);
    }
    for (const key of this.records.keys()) {
      if (this.records.size <= MAX_TRACKED) break;
      this.records.delete(key);
    }
  }
}

/** What PgThrottleStore needs of a PostgreSQL client: a pg.Pool fits. */
export interface SqlQueryable {
  query(text: string, values?: unknown[]): Promise<{ rows: Record<string, unknown>[] }>;
}

/** Stale rows are swept at most this often per process (from the failure path, so idle servers do no work). */
const PG_SWEEP_INTERVAL_MS = 60_000;

/**
 * Failures and lockouts in PostgreSQL (table `login_throttle`, a step of store/pgMetadata.ts's
 * migrations), shared by every server of a `cluster` repository. Each call is
 * one statement: the upsert's row lock serialises concurrent failures for a key across servers.
 */
export class PgThrottleStore implements ThrottleStore {
  private lastSweep = 0;

  constructor(private readonly db: SqlQueryable) {}

  async lockouts(keys: string[], now: number): Promise<Map<string, number>> {
    const { rows } = await this.db.query(
      'SELECT key, locked_until FROM login_throttle WHERE key = ANY($1::text[]) AND locked_until > $2',
      [keys, now],
    );
    return new Map(rows.map((r) => [String(r.key), Number(r.locked_until)]));
  }

  async addFailure(key: string, now: number, since: number): Promise<number> {
    const { rows } = await this.db.query(
      `INSERT INTO login_throttle AS t (key, failures) VALUES ($1, ARRAY[$2::bigint])
       ON CONFLICT (key) DO UPDATE SET failures = ARRAY(
         SELECT f FROM (
           SELECT f FROM unnest(t.failures || $2::bigint) AS f WHERE f > $3 ORDER BY f DESC LIMIT $4
         ) AS kept ORDER BY f)
       RETURNING cardinality(failures) AS n`,
      [key, now, since, MAX_FAILURES_KEPT],
    );
    if (now - this.lastSweep > PG_SWEEP_INTERVAL_MS) {
      this.lastSweep = now;
      // The newest failure is the array's last; a row with none after `since` and no lockout is stale.
      await this.db.query(
        'DELETE FROM login_throttle WHERE locked_until <= $1 AND failures[cardinality(failures)] <= $2',
        [now, since],
      );
    }
    return Number(rows[0].n);
  }

  async lockUntil(key: string, until: number): Promise<void> {
    await this.db.query(
      'UPDATE login_throttle SET locked_until = GREATEST(locked_until, $2) WHERE key = $1',
      [key, until],
    );
  }

  async clear(key: string): Promise<void> {
    await this.db.query('DELETE FROM login_throttle WHERE key = $1', [key]);
  }
}

export class LoginThrottle {
  private readonly opts: LoginThrottleOptions;

  constructor(
    opts: Partial<LoginThrottleOptions> = {},
    private readonly store: ThrottleStore = new MemoryThrottleStore(),
    private readonly now: () => number = Date.now,
  ) {
    this.opts = { ...DEFAULT_LOGIN_THROTTLE, ...opts };
    for (const [name, v] of Object.entries(this.opts)) {
      if (!Number.isSafeInteger(v) || v <= 0)
        throw new Error(`login throttle ${name} must be a positive whole number, not ${String(v)}`);
    }
  }

  /**
   * Runs `login` for `who` unless the address or account is locked out (LoginRateLimited). An
   * AccessDenied(401) from it counts as a failure for both; a success clears the account's failures
   * (not the address's: a guesser holding one valid login must not be able to reset its count).
   */
  async guard<T>(who: LoginAttempt, login: () => T | Promise<T>): Promise<T> {
    await this.check(who);
    let out: T;
    try {
      out = await login();
    } catch (err) {
      if (err instanceof AccessDenied && err.status === 401) await this.failed(who);
      throw err;
    }
    if (who.account !== undefined) await this.store.clear(accountKey(who.account));
    return out;
  }

  /** Throws LoginRateLimited if the address or account is locked out now. */
  async check(who: LoginAttempt): Promise<void> {
    const now = this.now();
    const keys = this.keysOf(who);
    const locked = await this.store.lockouts(
      keys.map(([key]) => key),
      now,
    );
    for (const [key, what] of keys) {
      const until = locked.get(key);
      if (until !== undefined) {
        const seconds = Math.ceil((until - now) / 1000);
        throw new LoginRateLimited(
          `rate-limited: too many failed logins ${what}; try again in ${seconds} s`,
          seconds,
        );
      }
    }
  }

  async failed(who: LoginAttempt): Promise<void> {
    const now = this.now();
    const { windowMs, lockoutMs, maxLockoutMs } = this.opts;
    for (const [key, , limit] of this.keysOf(who)) {
      const over = (await this.store.addFailure(key, now, now - windowMs)) - limit;
      if (over >= 0)
        await this.store.lockUntil(key, now + Math.min(maxLockoutMs, lockoutMs * 2 ** Math.min(over, 30)));
    }
  }

  private keysOf(who: LoginAttempt): [key: string, what: string, limit: number][] {
    const keys: [string, string, number][] = [];
    if (who.address !== undefined) {
      const a = addressKey(who.address);
      keys.push([`address ${a}`, `from ${a}`, this.opts.maxFailuresPerAddress]);
    }
    if (who.account !== undefined)
      keys.push([
        accountKey(who.account),
        `for ${who.account.slice(0, MAX_ACCOUNT_KEY)}`,
        this.opts.maxFailuresPerAccount,
      ]);
    return keys;
  }
}

function accountKey(account: string): string {
  return `account ${account.slice(0, MAX_ACCOUNT_KEY)}`;
}
