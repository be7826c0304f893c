import http from 'node:http';

/**
 * The service-uptime probe of the migration tests: one GET at a time on a fresh connection, a new one
 * every POLL_INTERVAL_MS, each given REQUEST_TIMEOUT_MS; the acceptance bar is >= 10 requests per second
 * with a 3-second client timeout and none lost.
 */
export const POLL_INTERVAL_MS = 50;
export const REQUEST_TIMEOUT_MS = 3000;

export interface Poll {
  at: number;
  ok: boolean;
  ms: number;
  error?: string;
}

/** One GET on a fresh connection, within REQUEST_TIMEOUT_MS; resolves with the body of a 200. */
export function get(url: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const req = http.get(url, { agent: false, timeout: REQUEST_TIMEOUT_MS }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (c: string) => (body += c));
      res.on('end', () =>
        res.statusCode === 200 ? resolve(body) : reject(new Error(`HTTP ${res.statusCode}`)),
      );
      res.on('error', reject);
    });
    req.on('timeout', () => req.destroy(new Error(`no answer in ${REQUEST_TIMEOUT_MS} ms`)));
    req.on('error', reject);
  });
}

/** Waits until `url` answers 200 (a booting VM), then returns the body. */
export async function awaitAnswer(url: string, timeoutMs: number): Promise<string> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const body = await get(url).catch(() => undefined);
    if (body !== undefined) return body;
    if (Date.now() > deadline) throw new Error(`the service never answered at ${url}`);
    await new Promise((r) => setTimeout(r, 500));
  }
}

/** Polls `url` every POLL_INTERVAL_MS (one request at a time) until stopped. */
export function startPolling(url: string): { stop: () => Promise<Poll[]> } {
  const polls: Poll[] = [];
  let running = true;
  const loop = (async () => {
    while (running) {
      const at = Date.now();
      try {
        await get(url);
        polls.push({ at, ok: true, ms: Date.now() - at });
      } catch (err) {
        polls.push({ at, ok: false, ms: Date.now() - at, error: String(err) });
      }
      await new Promise((r) => setTimeout(r, Math.max(0, POLL_INTERVAL_MS - (Date.now() - at))));
    }
  })();
  return {
    stop: async () => {
      running = false;
      await loop;
      return polls;
    },
  };
}

/** Rate, failures and the longest gap between answers of a polling run, for the test's log line. */
export function summarizePolls(polls: Poll[]): {
  requests: number;
  failed: Poll[];
  perSecond: number;
  maxGapMs: number;
  slowestMs: number;
} {
  const ok = polls.filter((p) => p.ok);
  const spanSec = (polls[polls.length - 1].at - polls[0].at) / 1000;
  let maxGapMs = 0;
  for (let i = 1; i < ok.length; i++)
    maxGapMs = Math.max(maxGapMs, ok[i].at + ok[i].ms - (ok[i - 1].at + ok[i - 1].ms));
  return {
    requests: polls.length,
    failed: polls.filter((p) => !p.ok),
    perSecond: polls.length / spanSec,
    maxGapMs,
    slowestMs: Math.max(...ok.map((p) => p.ms)),
  };
}
