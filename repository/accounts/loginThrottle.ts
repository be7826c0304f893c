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

interface FailureRecord {
  /** Times of the failures still inside the window, oldest first. */
  failures: number[];
  lockedUntil: number;
}

/** Beyond this many tracked addresses and accounts, stale ones are swept (and the oldest dropped). */
const MAX_TRACKED = 50_000;
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

export class LoginThrottle {
  private readonly opts: LoginThrottleOptions;
  private readonly records = new Map<string, FailureRecord>();

  constructor(
    opts: Partial<LoginThrottleOptions> = {},
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
    this.check(who);
    try {
      const out = await login();
      if (who.account !== undefined) this.records.delete(accountKey(who.account));
      return out;
    } catch (err) {
      if (err instanceof AccessDenied && err.status === 401) this.failed(who);
      throw err;
    }
  }

  /** Throws LoginRateLimited if the address or account is locked out now. */
  check(who: LoginAttempt): void {
    const now = this.now();
    for (const [key, what] of this.keysOf(who)) {
      const r = this.records.get(key);
      if (r && r.lockedUntil > now) {
        const seconds = Math.ceil((r.lockedUntil - now) / 1000);
        throw new LoginRateLimited(
          `rate-limited: too many failed logins ${what}; try again in ${seconds} s`,
          seconds,
        );
      }
    }
  }

  failed(who: LoginAttempt): void {
    const now = this.now();
    const { windowMs, lockoutMs, maxLockoutMs } = this.opts;
    for (const [key, , limit] of this.keysOf(who)) {
      const r = this.records.get(key) ?? { failures: [], lockedUntil: 0 };
      this.records.delete(key); // re-inserted last: the map stays ordered by last failure
      r.failures = r.failures.filter((t) => t > now - windowMs);
      r.failures.push(now);
      const over = r.failures.length - limit;
      if (over >= 0) r.lockedUntil = now + Math.min(maxLockoutMs, lockoutMs * 2 ** Math.min(over, 30));
      this.records.set(key, r);
    }
    if (this.records.size > MAX_TRACKED) this.sweep(now);
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

  /** Drops records with no failure in the window and no lockout; then the oldest, down to the cap. */
  private sweep(now: number): void {
    for (const [key, r] of this.records) {
      if (r.lockedUntil <= now && (r.failures.at(-1) ?? 0) <= now - this.opts.windowMs)
        this.records.delete(key);
    }
    for (const key of this.records.keys()) {
      if (this.records.size <= MAX_TRACKED) break;
      this.records.delete(key);
    }
  }
}

function accountKey(account: string): string {
  return `account ${account.slice(0, MAX_ACCOUNT_KEY)}`;
}
