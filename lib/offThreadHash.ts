import { Worker } from 'node:worker_threads';

/**
 * SHA-256 of a byte stream computed on a worker thread, so that hashing (about 0.6 s of one core per GiB)
 * runs beside the main thread's socket and file work instead of after it: on the repository server for
 * every upload, on its clients for every download. One worker per process, started on first use; it
 * keeps the process alive only while a hash is unfinished. Each stream has its own hash there.
 *
 * Bytes are copied into a fresh buffer and transferred, never shared: the caller's chunks may be reused.
 * At most MAX_IN_FLIGHT bytes of a stream wait for the worker; `update` resolves once the backlog is
 * below that, so a slow worker slows the stream instead of growing memory.
 */

const MAX_IN_FLIGHT = 8 << 20;

/** The worker: one Hash per stream id; acknowledges each batch so the sender can bound its backlog. */
const WORKER_SOURCE = `
const { parentPort } = require('node:worker_threads');
const { createHash } = require('node:crypto');
const hashes = new Map();
parentPort.on('message', ({ id, op, data }) => {
  if (op === 'update') {
    let h = hashes.get(id);
    if (!h) hashes.set(id, (h = createHash('sha256')));
    h.update(data);
    parentPort.postMessage({ id, op: 'ack', bytes: data.length });
  } else if (op === 'digest') {
    const h = hashes.get(id) ?? createHash('sha256');
    hashes.delete(id);
    parentPort.postMessage({ id, op: 'digest', hex: h.digest('hex') });
  } else if (op === 'drop') {
    hashes.delete(id);
  }
});
`;

interface Reply {
  id: number;
  op: 'ack' | 'digest';
  bytes?: number;
  hex?: string;
}

interface StreamState {
  inFlight: number;
  /** Resolved when the backlog drops below the bound (a waiting `update`). */
  drained?: () => void;
  digested?: { resolve: (hex: string) => void; reject: (err: Error) => void };
  failed?: Error;
}

let worker: Worker | undefined;
let nextId = 1;
const streams = new Map<number, StreamState>();

/** Forgets a stream; an idle worker no longer keeps the process alive. */
function forget(id: number): void {
  streams.delete(id);
  if (streams.size === 0) worker?.unref();
}

function fail(err: Error): void {
  worker = undefined;
  for (const s of streams.values()) {
    s.failed = err;
    s.drained?.();
    s.digested?.reject(err);
  }
  streams.clear();
}

function theWorker(): Worker {
  if (worker) return worker;
  const w = new Worker(WORKER_SOURCE, { eval: true });
  w.on('message', ({ id, op, bytes, hex }: Reply) => {
    const s = streams.get(id);
    if (!s) return;
    if (op === 'ack') {
      s.inFlight -= bytes ?? 0;
      if (s.inFlight <= MAX_IN_FLIGHT) s.drained?.();
    } else {
      forget(id);
      s.digested?.resolve(hex ?? '');
    }
  });
  w.on('error', (err) => fail(new Error('the hashing worker thread failed', { cause: err })));
  w.on('exit', (code) => {
    if (worker === w) fail(new Error(`the hashing worker thread exited with ${code}`));
  });
  worker = w;
  return w;
}

export class OffThreadSha256 {
  private readonly id = nextId++;
  private readonly state: StreamState = { inFlight: 0 };
  private readonly worker = theWorker();
  private done = false;

  constructor() {
    streams.set(this.id, this.state);
    this.worker.ref();
  }

  /** Hashes `chunks` next, in order; waits while too many bytes are still queued for the worker. */
  async update(chunks: readonly Buffer[]): Promise<void> {
    this.check();
    const total = chunks.reduce((n, c) => n + c.length, 0);
    if (total === 0) return;
    // A fresh ArrayBuffer of our own, so transferring it detaches nothing the caller holds.
    const data = new Uint8Array(total);
    let at = 0;
    for (const c of chunks) {
      data.set(c, at);
      at += c.length;
    }
    this.state.inFlight += total;
    this.worker.postMessage({ id: this.id, op: 'update', data }, [data.buffer]);
    while (this.state.inFlight > MAX_IN_FLIGHT && !this.state.failed)
      await new Promise<void>((resolve) => (this.state.drained = resolve));
    this.state.drained = undefined;
    this.check();
  }

  /** The hex digest of everything passed to `update`; ends this hash. */
  digest(): Promise<string> {
    this.check();
    this.done = true;
    return new Promise((resolve, reject) => {
      this.state.digested = { resolve, reject };
      this.worker.postMessage({ id: this.id, op: 'digest' });
    });
  }

  /** Forgets a hash that will not be finished (the stream failed). */
  dispose(): void {
    if (this.done) return;
    this.done = true;
    forget(this.id);
    if (!this.state.failed) this.worker.postMessage({ id: this.id, op: 'drop' });
  }

  private check(): void {
    if (this.state.failed) throw this.state.failed;
    if (this.done) throw new Error('this hash is already finished');
  }
}
