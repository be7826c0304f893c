import {
  Client,
  type ConnectConfig,
  type OpenMode,
  type FileEntryWithStats,
  type SFTPWrapper,
  type Stats,
} from 'ssh2';

/** ssh2's SFTP client with promises, for tests against the repository's SFTP service. */
export class SftpTestClient {
  private constructor(
    readonly conn: Client,
    readonly sftp: SFTPWrapper,
    /** The host key the server presented (for persistence checks). */
    readonly hostKey: Buffer,
  ) {}

  static async connect(config: ConnectConfig): Promise<SftpTestClient> {
    const conn = new Client();
    // A connection lost later reports to the pending call's callback; without a listener its 'error'
    // event would also throw.
    conn.on('error', () => undefined);
    let hostKey: Buffer = Buffer.alloc(0);
    await new Promise<void>((resolve, reject) => {
      conn
        .once('ready', () => resolve())
        .once('error', reject)
        .once('close', () => reject(new Error('connection closed before it was ready')))
        .connect({
          host: '127.0.0.1',
          readyTimeout: 10_000,
          hostVerifier: (key: Buffer) => {
            hostKey = key;
            return true;
          },
          ...config,
        });
    });
    // ssh2 never answers an SFTP channel request on a connection that closes meanwhile.
    const sftp = await new Promise<SFTPWrapper>((resolve, reject) => {
      const lost = (): void => reject(new Error('connection closed before the SFTP session opened'));
      conn.once('close', lost);
      conn.sftp((err, s) => {
        conn.off('close', lost);
        if (err) reject(err);
        else resolve(s);
      });
    });
    return new SftpTestClient(conn, sftp, hostKey);
  }

  end(): void {
    this.conn.end();
  }

  /** Runs one SFTP call; a connection lost meanwhile fails it (ssh2 may never call back then). */
  private call<T>(fn: (cb: (err: Error | null | undefined, value?: T) => void) => void): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      const lost = (): void => reject(new Error('SFTP connection closed'));
      this.conn.once('close', lost);
      fn((err, value) => {
        this.conn.off('close', lost);
        if (err) reject(err);
        else resolve(value as T);
      });
    });
  }

  writeFile(p: string, data: Buffer | string): Promise<void> {
    return this.call((cb) => this.sftp.writeFile(p, data, (err) => cb(err)));
  }
  readFile(p: string): Promise<Buffer> {
    return this.call((cb) => this.sftp.readFile(p, (err, b) => cb(err, b)));
  }
  readdir(p: string): Promise<FileEntryWithStats[]> {
    return this.call((cb) => this.sftp.readdir(p, (err, l) => cb(err, l)));
  }
  stat(p: string): Promise<Stats> {
    return this.call((cb) => this.sftp.stat(p, (err, s) => cb(err, s)));
  }
  mkdir(p: string): Promise<void> {
    return this.call((cb) => this.sftp.mkdir(p, (err) => cb(err)));
  }
  rmdir(p: string): Promise<void> {
    return this.call((cb) => this.sftp.rmdir(p, (err) => cb(err)));
  }
  unlink(p: string): Promise<void> {
    return this.call((cb) => this.sftp.unlink(p, (err) => cb(err)));
  }
  rename(from: string, to: string): Promise<void> {
    return this.call((cb) => this.sftp.rename(from, to, (err) => cb(err)));
  }
  realpath(p: string): Promise<string> {
    return this.call((cb) => this.sftp.realpath(p, (err, r) => cb(err, r)));
  }
  symlink(target: string, link: string): Promise<void> {
    return this.call((cb) => this.sftp.symlink(target, link, (err) => cb(err)));
  }
  fastPut(local: string, remote: string): Promise<void> {
    return this.call((cb) => this.sftp.fastPut(local, remote, (err) => cb(err)));
  }
  open(p: string, flags: OpenMode): Promise<Buffer> {
    return this.call((cb) => this.sftp.open(p, flags, (err, h) => cb(err, h)));
  }
  write(h: Buffer, data: Buffer, position: number): Promise<void> {
    return this.call((cb) => this.sftp.write(h, data, 0, data.length, position, (err) => cb(err)));
  }
  close(h: Buffer): Promise<void> {
    return this.call((cb) => this.sftp.close(h, (err) => cb(err)));
  }
}

/** The SFTP status message of a refused request ('' if it was not refused). */
export async function refusal(p: Promise<unknown>): Promise<string> {
  try {
    await p;
    return '';
  } catch (err) {
    return (err as Error).message;
  }
}
