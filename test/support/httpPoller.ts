import {
  httpGet,
  startPolling as startHttpPolling,
  type Poller,
  type Reply,
} from '../../deploy/devcluster/httpPolling';

/**
 * The service-uptime probe of the migration tests: one GET at a time on a fresh connection, a new one
 * every POLL_INTERVAL_MS, each given REQUEST_TIMEOUT_MS; the acceptance bar is >= 10 requests per second
 * with a 3-second client timeout and none lost.
 */
export const POLL_INTERVAL_MS = 50;
export const REQUEST_TIMEOUT_MS = 3000;

/** One GET within REQUEST_TIMEOUT_MS; resolves with the body of a 200. */
export const get = (url: string): Promise<string> => httpGet(url, REQUEST_TIMEOUT_MS);

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
export const startPolling = (url: string): Poller =>
  startHttpPolling(url, { intervalMs: POLL_INTERVAL_MS, timeoutMs: REQUEST_TIMEOUT_MS });

/** Rate, failures and the longest gap between answers of a polling run, for the test's log line. */
export function summarizePolls(polls: Reply[]): {
  requests: number;
  failed: Reply[];
  perSecond: number;
  maxGapMs: number;
  slowestMs: number;
} {
  const ok = polls.filter((p) => p.ok);
  const spanSec = (polls[polls.length - 1].sentAt - polls[0].sentAt) / 1000;
  let maxGapMs = 0;
  for (let i = 1; i < ok.length; i++) maxGapMs = Math.max(maxGapMs, ok[i].doneAt - ok[i - 1].doneAt);
  return {
    requests: polls.length,
    failed: polls.filter((p) => !p.ok),
    perSecond: polls.length / spanSec,
    maxGapMs,
    slowestMs: Math.max(...ok.map((p) => p.doneAt - p.sentAt)),
  };
}
