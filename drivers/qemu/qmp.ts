import net from 'node:net';

/**
 * How long one QMP exchange may take. QEMU answers from its main loop, which a loaded 2-core host running
 * TCG guests (or an incoming VM activating its NFS disks) can stall for seconds: generous, yet bounded.
 */
export const QMP_TIMEOUT_MS = 15_000;

type QmpReply = { return?: unknown; error?: { class: string; desc: string }; event?: string; id?: number };

/**
 * A minimal QMP client over the VM's unix socket: one command at a time, replies matched by id,
 * asynchronous events skipped. Every operation is time-bounded so a wedged QEMU cannot hang a worker.
 */
export class QmpClient {
  private buffer = '';
  private nextId = 1;
  private waiters = new Map<number, (r: QmpReply) => void>();
  private failure: Error | undefined;

  private constructor(private readonly socket: net.Socket) {
    socket.setEncoding('utf8');
    socket.on('data', (chunk: string) => this.onData(chunk));
    const fail = (err: Error) => {
      this.failure = err;
      for (const w of this.waiters.values()) w({ error: { class: 'Disconnected', desc: err.message } });
      this.waiters.clear();
    };
    socket.on('error', fail);
    socket.on('close', () => fail(new Error('QMP connection closed')));
  }

  /** Connects, reads the greeting and negotiates capabilities. */
  static async connect(socketPath: string, timeoutMs = QMP_TIMEOUT_MS): Promise<QmpClient> {
    const socket = await new Promise<net.Socket>((resolve, reject) => {
      const s = net.createConnection(socketPath);
      const timer = setTimeout(() => {
        s.destroy();
        reject(new Error(`QMP ${socketPath}: no connection within ${timeoutMs} ms`));
      }, timeoutMs);
      s.once('connect', () => {
        clearTimeout(timer);
        resolve(s);
      });
      s.once('error', (err) => {
        clearTimeout(timer);
        reject(new Error(`QMP ${socketPath}: ${err.message}`, { cause: err }));
      });
    });
    const client = new QmpClient(socket);
    try {
      await client.greeting(timeoutMs);
      await client.execute('qmp_capabilities', undefined, timeoutMs);
      return client;
    } catch (err) {
      client.close();
      throw err;
    }
  }

  private greetingWaiter: ((r: QmpReply) => void) | undefined;

  private greeting(timeoutMs: number): Promise<void> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`QMP: no greeting within ${timeoutMs} ms`)), timeoutMs);
      this.greetingWaiter = () => {
        clearTimeout(timer);
        resolve();
      };
    });
  }

  private onData(chunk: string): void {
    this.buffer += chunk;
    let nl: number;
    while ((nl = this.buffer.indexOf('\n')) >= 0) {
      const line = this.buffer.slice(0, nl).trim();
      this.buffer = this.buffer.slice(nl + 1);
      if (!line) continue;
      let msg: QmpReply & { QMP?: unknown };
      try {
        msg = JSON.parse(line) as QmpReply & { QMP?: unknown };
      } catch {
        continue;
      }
      if (msg.QMP !== undefined) {
        this.greetingWaiter?.(msg);
        this.greetingWaiter = undefined;
      } else if (msg.id !== undefined) {
        this.waiters.get(msg.id)?.(msg);
        this.waiters.delete(msg.id);
      }
    }
  }

  /** Runs one command; rejects with QEMU's error description. */
  execute<T = unknown>(
    command: string,
    args?: Record<string, unknown>,
    timeoutMs = QMP_TIMEOUT_MS,
  ): Promise<T> {
    if (this.failure) return Promise.reject(this.failure);
    const id = this.nextId++;
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiters.delete(id);
        reject(new Error(`QMP ${command}: no reply within ${timeoutMs} ms`));
      }, timeoutMs);
      this.waiters.set(id, (r) => {
        clearTimeout(timer);
        if (r.error) reject(new Error(`QMP ${command}: ${r.error.class}: ${r.error.desc}`));
        else resolve(r.return as T);
      });
      this.socket.write(
        JSON.stringify({ execute: command, ...(args ? { arguments: args } : {}), id }) + '\n',
      );
    });
  }

  close(): void {
    this.socket.destroy();
  }
}

/** Connects, runs one command, disconnects. */
export async function qmpCommand<T = unknown>(
  socketPath: string,
  command: string,
  args?: Record<string, unknown>,
  timeoutMs = QMP_TIMEOUT_MS,
): Promise<T> {
  const client = await QmpClient.connect(socketPath, timeoutMs);
  try {
    return await client.execute<T>(command, args, timeoutMs);
  } finally {
    client.close();
  }
}
