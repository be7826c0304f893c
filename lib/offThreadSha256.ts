import { createHash } from 'node:crypto';
import { Worker } from 'node:worker_threads';

/**
 * SHA-256 on a worker thread, so that a stream's hashing runs beside its socket reads and file writes
 * instead of after them on the main thread (the hash took most of that thread's time in a 1 GiB upload
 * or download). One thread per process serves every stream, each by its own id; messages on one port
 * arrive in order, so each stream's bytes are hashed in the order given. The bytes travel in slots
 * that go back and forth (transferred, never copied), so neither side allocates per batch: buffers
 * left to the thread's garbage collector piled up by tens of MiB. Inline source: the same code runs
 * from dist/ and from the TypeScript sources under jest.
 */
const WORKER_SOURCE = `
const { parentPort } = require('node:worker_threads');
const { createHash } = require('node:crypto');
const hashes = new Map();
parentPort.on('message', (m) => {
  let h = hashes.get(m.id);
  if (m.op === 'update') {
    if (!h) hashes.set(m.id, (h = createHash('sha256')));
    h.update(new Uint8Array(m.slot, 0, m.length));
    parentPort.postMessage({ id: m.id, slot: m.slot }, [m.slot]);
  } else if (m.op === 'digest') {
    hashes.delete(m.id);
    parentPort.postMessage({ id: m.id, hex: (h ?? createHash('sha256')).digest('hex') });
  } else {
    hashes.delete(m.id);
  }
});
`;

type Reply = { id: number; hex?: string; slot?: ArrayBuffer };

/** Bytes per slot, and how many idle slots are kept for reuse (more are left to the collector). */
const SLOT_BYTES = 1 << 20;
const IDLE_SLOTS_KEPT = 16;
const idleSlots: ArrayBuffer[] = [];
type Waiter = { resolve: (hex: string | undefined) => void; reject: (err: Error) => void };

class HashThread {
  private readonly worker: Worker;
  /** Per stream, its requests not yet answered, oldest first. */
  private readonly waiting = new Map<number, Waiter[]>();
  private pending = 0;
  private failure: Error | undefined;

  constructor(private readonly onExit: () => void) {
    this.worker = new Worker(WORKER_SOURCE, {
      eval: true,
      // Its heap only ever holds the hashes and one batch: a small young generation keeps it light.
      resourceLimits: { maxYoungGenerationSizeMb: 2, maxOldGenerationSizeMb: 32 },
    });
    this.worker.unref();
    this.worker.on('message', (m: Reply) => {
      const queue = this.waiting.get(m.id);
      const w = queue?.shift();
      if (queue?.length === 0) this.waiting.delete(m.id);
      if (--this.pending === 0) this.worker.unref();
      if (m.slot && idleSlots.length < IDLE_SLOTS_KEPT) idleSlots.push(m.slot);
      w?.resolve(m.hex);
    });
    const fail = (err: Error): void => {
      this.failure ??= new Error(`the hashing thread stopped: ${err.message}`, { cause: err });
      for (const queue of this.waiting.values()) for (const w of queue) w.reject(this.failure);
      this.waiting.clear();
      this.onExit();
    };
    this.worker.on('error', fail);
    this.worker.on('exit', (code) => fail(new Error(`exit code ${code}`)));
  }

  request(id: number, op: 'update' | 'digest', slot?: ArrayBuffer, length = 0): Promise<string | undefined> {
    if (this.failure) return Promise.reject(this.failure);
    return new Promise((resolve, reject) => {
      const queue = this.waiting.get(id) ?? [];
      queue.push({ resolve, reject });
      this.waiting.set(id, queue);
      // Held while an answer is awaited: a process waiting only for a digest must not exit.
      if (this.pending++ === 0) this.worker.ref();
      this.worker.postMessage({ id, op, slot, length }, slot ? [slot] : []);
    });
  }

  drop(id: number): void {
    if (!this.failure) this.worker.postMessage({ id, op: 'drop' });
  }
}

let thread: HashThread | undefined;
let nextId = 0;

function hashThread(): HashThread {
  thread ??= new HashThread(() => (thread = undefined));
  return thread;
}

/**
 * Bytes a stream may have sent to the hashing thread and not yet seen hashed: enough that the two
 * threads rarely wait for each other (a wake-up per batch cost more than the hashing on a busy
 * machine), little enough to keep memory flat.
 */
const AHEAD_BYTES = 4 << 20;

/**
 * Streams up to this size are hashed here, at digest(): a round trip to the thread cost more than the
 * hashing (1000 small inputs staged in).
 */
const INLINE_BYTES = 256 << 10;

/**
 * One stream's SHA-256, computed on the hashing thread once it outgrows INLINE_BYTES: update() in
 * order, then digest() once.
 */
export class OffThreadSha256 {
  private readonly id = ++nextId;
  /** Taken on the first batch sent: a process that only ever hashes small streams never starts it. */
  private thread: HashThread | undefined;
  private finished = false;
  /** Copies of the first bytes, while the stream is within INLINE_BYTES. */
  private held: Buffer[] | undefined = [];
  private heldBytes = 0;
  /** Batches sent and not yet hashed, oldest first, with their sizes. */
  private readonly ahead: { bytes: number; hashed: Promise<unknown> }[] = [];
  private aheadBytes = 0;

  /**
   * Sends a copy of `chunks` to be hashed (the caller may reuse them at once); resolves at once unless
   * the thread is more than AHEAD_BYTES behind, then once it has caught up that far. A failure of the
   * thread rejects this or a later call, or digest().
   */
  async update(chunks: Buffer[]): Promise<void> {
    if (this.held) {
      let total = 0;
      for (const c of chunks) total += c.length;
      if (this.heldBytes + total <= INLINE_BYTES) {
        for (const c of chunks) this.held.push(Buffer.from(c));
        this.heldBytes += total;
        return;
      }
      chunks = [...this.held, ...chunks];
      this.held = undefined;
    }
    let slot: Uint8Array | undefined;
    let filled = 0;
    for (const chunk of chunks) {
      for (let from = 0; from < chunk.length;) {
        slot ??= new Uint8Array(idleSlots.pop() ?? new ArrayBuffer(SLOT_BYTES));
        const n = chunk.copy(slot, filled, from);
        from += n;
        filled += n;
        if (filled === SLOT_BYTES) {
          this.send(slot.buffer as ArrayBuffer, filled);
          slot = undefined;
          filled = 0;
        }
      }
    }
    if (slot) this.send(slot.buffer as ArrayBuffer, filled);
    while (this.aheadBytes > AHEAD_BYTES) {
      const oldest = this.ahead.shift()!;
      this.aheadBytes -= oldest.bytes;
      await oldest.hashed;
    }
  }

  private send(slot: ArrayBuffer, length: number): void {
    this.thread ??= hashThread();
    const hashed = this.thread.request(this.id, 'update', slot, length);
    hashed.catch(() => undefined);
    this.ahead.push({ bytes: length, hashed });
    this.aheadBytes += length;
  }

  async digest(): Promise<string> {
    this.finished = true;
    if (this.held) {
      const hash = createHash('sha256');
      for (const c of this.held) hash.update(c);
      return hash.digest('hex');
    }
    return (await this.thread!.request(this.id, 'digest')) as string;
  }

  /** Frees the thread's state of a stream that will not be digested (it failed). */
  dispose(): void {
    if (!this.finished) this.thread?.drop(this.id);
    this.finished = true;
  }
}
