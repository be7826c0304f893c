import { Worker } from 'node:worker_threads';

/**
 * SHA-256 of a byte stream computed on a worker thread, so that hashing (about 0.6 s of one core per GiB)
 * runs beside the main thread's socket and file work instead of after it: on the repository server for
 * every upload, on its clients for every download. One worker per process, started on first use; it
 * keeps the process alive only while a hash is unfinished. Each stream has its own hash there.
 *
 * Bytes are copied into a ring of shared memory of the stream's own (RING_BYTES), which the worker
 * hashes from in place and hands back by acknowledging: the caller's chunks may be reused at once, and
 * memory stays flat (no buffer per chunk for a garbage collector to find later). `update` waits while the
 * ring is full, so a slow worker slows the stream instead of growing memory.
 */

const RING_BYTES = 4 << 20;
/** Copied in pieces of at most this much, so the worker starts on a batch before all of it is copied. */
const PIECE_BYTES = RING_BYTES / 4;

/** The worker: one Hash and ring per stream id; acknowledges each piece so its room can be reused. */
const WORKER_SOURCE = `
const { parentPort } = require('node:worker_threads');
const { createHash } = require('node:crypto');
const streams = new Map();
parentPort.on('message', ({ id, op, ring, start, length }) => {
  if (op === 'open') {
    streams.set(id, { ring, hash: createHash('sha256') });
  } else if (op === 'update') {
    const s = streams.get(id);
    s.hash.update(new Uint8Array(s.ring, start, length));
    parentPort.postMessage({ id, op: 'ack', length });
  } else if (op === 'digest') {
    const s = streams.get(id);
    streams.delete(id);
    parentPort.postMessage({ id, op: 'digest', hex: s.hash.digest('hex') });
  } else if (op === 'drop') {
    streams.delete(id);
  }
});
`;

interface Reply {
  id: number;
  op: 'ack' | 'digest';
  length?: number;
  hex?: string;
}

interface StreamState {
  /** Bytes copied into the ring and not yet acknowledged by the worker. */
  inFlight: number;
  /** Resolved when the worker acknowledges a piece (a waiting `update`). */
  acked?: () => void;
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
    s.acked?.();
    s.digested?.reject(err);
  }
  streams.clear();
}

function theWorker(): Worker {
  if (worker) return worker;
  const w = new Worker(WORKER_SOURCE, { eval: true });
  w.on('message', ({ id, op, length, hex }: Reply) => {
    const s = streams.get(id);
    if (!s) return;
    if (op === 'ack') {
      s.inFlight -= length ?? 0;
      s.acked?.();
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
  private readonly ring = new SharedArrayBuffer(RING_BYTES);
  /** Where the next byte goes in the ring. */
  private head = 0;
  private done = false;

  constructor() {
    streams.set(this.id, this.state);
    this.worker.ref();
    this.worker.postMessage({ id: this.id, op: 'open', ring: this.ring });
  }

  /** Hashes `chunks` next, in order; waits while the ring has no room. */
  async update(chunks: readonly Buffer[]): Promise<void> {
    for (const chunk of chunks) {
      for (let at = 0; at < chunk.length;) {
        this.check();
        // A piece never wraps around the ring's end, and never exceeds what the worker has freed.
        const room = RING_BYTES - this.state.inFlight;
        const length = Math.min(chunk.length - at, PIECE_BYTES, RING_BYTES - this.head, room);
        if (length === 0) {
          await new Promise<void>((resolve) => (this.state.acked = resolve));
          this.state.acked = undefined;
          continue;
        }
        new Uint8Array(this.ring, this.head, length).set(chunk.subarray(at, at + length));
        this.worker.postMessage({ id: this.id, op: 'update', start: this.head, length });
        this.state.inFlight += length;
        this.head = (this.head + length) % RING_BYTES;
        at += length;
      }
    }
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
