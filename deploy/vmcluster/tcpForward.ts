import net from 'node:net';

/** A listening TCP forwarder; close() stops it and cuts the connections it carries. */
export interface TcpForward {
  address: string;
  close(): Promise<void>;
}

/**
 * Forwards `listen` (host:port) to `target` (host:port), one upstream connection per client. The tier
 * uses it to offer the Temporal dev server, which works only bound to loopback (its internal services dial
 * 127.0.0.1), to the dom0s on the cluster network.
 */
export async function forwardTcp(
  listen: { host: string; port: number },
  target: { host: string; port: number },
): Promise<TcpForward> {
  const sockets = new Set<net.Socket>();
  const server = net.createServer((client) => {
    const upstream = net.connect(target.port, target.host);
    for (const s of [client, upstream]) {
      sockets.add(s);
      s.once('close', () => sockets.delete(s));
      // Either side's end or error ends both.
      s.once('error', () => {
        client.destroy();
        upstream.destroy();
      });
    }
    client.pipe(upstream).pipe(client);
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', (err) =>
      reject(new Error(`cannot listen on ${listen.host}:${listen.port}: ${err.message}`, { cause: err })),
    );
    server.listen(listen.port, listen.host, resolve);
  });
  return {
    address: `${listen.host}:${listen.port}`,
    close: () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  };
}
