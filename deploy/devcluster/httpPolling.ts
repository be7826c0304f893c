import http from 'node:http';

/**
 * Service-uptime probing of a VM's HTTP service, shared by the migration tests and the Figure 5
 * benchmark: requests on fresh connections (so a reply proves the service answers now, not that a kept
 * connection survived), each with a deadline for the whole exchange.
 */

export interface Reply {
  sentAt: number;
  doneAt: number;
  ok: boolean;
  error?: string;
}

/** One GET on a fresh connection; resolves with the body of a 200, rejects on anything else or after timeoutMs. */
export function httpGet(url: string, timeoutMs: number): Promise<string> {
  return new Promise((resolve, reject) => {
    const req = http.get(url, { agent: false }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (c: string) => (body += c));
      res.on('end', () =>
        res.statusCode === 200 ? resolve(body) : reject(new Error(`HTTP ${res.statusCode}`)),
      );
      res.on('error', reject);
    });
    const timer = setTimeout(() => req.destroy(new Error(`no answer in ${timeoutMs} ms`)), timeoutMs);
    req.on('close', () => clearTimeout(timer));
    req.on('error', reject);
  });
}

export interface PollingOptions {
  /** Concurrent loops, each one request at a time, started evenly spread over one interval. */
  clients?: number;
  intervalMs: number;
  timeoutMs: number;
  /** A reply with another body counts as a failure. */
  expectBody?: string;
}

export interface Poller {
  /** Resolves once `n` more requests have completed (answered or failed): a window counted in requests. */
  answers: (n: number) => Promise<void>;
  /** Stops polling; resolves with every request's outcome, in order of completion. */
  stop: () => Promise<Reply[]>;
}

/** Polls `url` until stopped. */
export function startPolling(url: string, o: PollingOptions): Poller {
  const replies: Reply[] = [];
  const waiters: { count: number; resolve: () => void }[] = [];
  const record = (r: Reply) => {
    replies.push(r);
    for (const w of waiters.filter((w) => replies.length >= w.count)) {
      waiters.splice(waiters.indexOf(w), 1);
      w.resolve();
    }
  };
  const clients = o.clients ?? 1;
  let running = true;
  const loop = async (offsetMs: number) => {
    await new Promise((r) => setTimeout(r, offsetMs));
    while (running) {
      const sentAt = Date.now();
      try {
        const got = await httpGet(url, o.timeoutMs);
        if (o.expectBody !== undefined && got !== o.expectBody)
          throw new Error(`unexpected reply ${JSON.stringify(got.slice(0, 80))}`);
        record({ sentAt, doneAt: Date.now(), ok: true });
      } catch (err) {
        record({ sentAt, doneAt: Date.now(), ok: false, error: String(err) });
      }
      await new Promise((r) => setTimeout(r, Math.max(0, o.intervalMs - (Date.now() - sentAt))));
    }
  };
  const loops = Array.from({ length: clients }, (_, i) => loop((i * o.intervalMs) / clients));
  return {
    answers: (n) => new Promise((resolve) => waiters.push({ count: replies.length + n, resolve })),
    stop: async () => {
      running = false;
      await Promise.all(loops);
      return replies.sort((x, y) => x.doneAt - y.doneAt);
    },
  };
}
