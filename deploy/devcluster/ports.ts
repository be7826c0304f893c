import net from 'node:net';

/**
 * A TCP port that is free on `host` right now (the kernel picks it). Another process could take it before
 * the caller binds it; the window is short and a failed bind shows in the server's log.
 */
export function freePort(host = '127.0.0.1'): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.unref();
    server.once('error', reject);
    server.listen({ host, port: 0 }, () => {
      const { port } = server.address() as net.AddressInfo;
      server.close(() => resolve(port));
    });
  });
}
