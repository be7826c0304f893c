import net, { type AddressInfo, type Socket } from 'node:net';
import type { Logger } from '../../logging/logger';
import { describeError } from '../../logging/logger';

/**
 * A small TCP balancer for the tests and the dev machine, in front of several repository servers (a
 * provider runs HAProxy or nginx instead: README "Many repository servers"). Each route listens on one
 * port and spreads connections round-robin over its backends; a backend that refuses a connection is
 * skipped for `downMs` and the connection tries the next one, so a killed server costs new clients
 * nothing. It forwards bytes only (TLS, SSH and FTP stay end to end); FTPS passive data connections
 * use routes of their own, one per passive port, each to the one server that announced it.
 */

export interface Endpoint {
  host: string;
  port: number;
}

export interface BalancerRoute {
  /** Port 0 picks an ephemeral port (see Balancer.ports). */
  listen: Endpoint;
  backends: Endpoint[];
}

export interface Balancer {
  /** The port each route listens on, in the routes' order. */
  ports: number[];
  /** Connections accepted per backend (`host:port`), for tests and benchmarks. */
  accepted: Map<string, number>;
  close(): Promise<void>;
}

/** A backend that refused a connection is not tried again for this long (unless all others are down). */
export const DEFAULT_DOWN_MS = 2_000;

const label = (e: Endpoint): string => `${e.host.includes(':') ? `[${e.host}]` : e.host}:${e.port}`;

/**
 * `host:port` or `host:min-max` (a range, as FTPS passive ports need), `[v6]` for IPv6 hosts. The
 * variable names what is parsed, for the error.
 */
export function parseEndpoints(value: string, what: string): Endpoint[] {
  const m = /^(?:\[([0-9a-fA-F:.]+)\]|([^:[\]]+)):(\d{1,5})(?:-(\d{1,5}))?$/.exec(value.trim());
  const min = m ? Number(m[3]) : NaN;
  const max = m?.[4] !== undefined ? Number(m[4]) : min;
  if (!m || max > 65535 || max < min || max - min > 1000)
    throw new Error(
      `${what} ${JSON.stringify(value)} must be host:port or host:min-max (at most 1000 ports), ports 0-65535`,
    );
  const host = m[1] ?? m[2];
  return Array.from({ length: max - min + 1 }, (_, i) => ({ host, port: min + i }));
}

/**
 * `LISTEN=BACKEND[,BACKEND...]`, e.g. `127.0.0.1:8420=127.0.0.1:8421,127.0.0.1:8422`; with a port range
 * on the left, one range of the same size on the right maps port to port (FTPS passive ports).
 */
export function parseRoute(value: string): BalancerRoute[] {
  const eq = value.indexOf('=');
  if (eq < 0) throw new Error(`route ${JSON.stringify(value)} must be LISTEN=BACKEND[,BACKEND...]`);
  const listens = parseEndpoints(value.slice(0, eq), 'route listen');
  const backends = value
    .slice(eq + 1)
    .split(',')
    .map((b) => parseEndpoints(b, 'route backend'));
  if (listens.length === 1) {
    if (backends.some((b) => b.length !== 1))
      throw new Error(`route ${JSON.stringify(value)}: a single listen port takes single backend ports`);
    return [{ listen: listens[0], backends: backends.map((b) => b[0]) }];
  }
  if (backends.length !== 1 || backends[0].length !== listens.length)
    throw new Error(
      `route ${JSON.stringify(value)}: a listen range maps to one backend range of the same size`,
    );
  return listens.map((listen, i) => ({ listen, backends: [backends[0][i]] }));
}

export async function startBalancer(
  routes: BalancerRoute[],
  log: Logger,
  opts: { downMs?: number } = {},
): Promise<Balancer> {
  if (routes.length === 0) throw new Error('the balancer needs at least one route');
  for (const r of routes)
    if (r.backends.length === 0) throw new Error(`route on ${label(r.listen)} has no backend`);
  const downMs = opts.downMs ?? DEFAULT_DOWN_MS;
  const downUntil = new Map<string, number>();
  const accepted = new Map<string, number>();
  const sockets = new Set<Socket>();
  const servers: net.Server[] = [];

  /** Connects to the route's backends from its round-robin position on, live ones first. */
  const connectBackend = async (route: BalancerRoute, start: number): Promise<Socket> => {
    const n = route.backends.length;
    const order = Array.from({ length: n }, (_, i) => route.backends[(start + i) % n]);
    const now = Date.now();
    const live = order.filter((b) => (downUntil.get(label(b)) ?? 0) <= now);
    let lastErr: unknown;
    for (const b of [...live, ...order.filter((o) => !live.includes(o))]) {
      try {
        const s = await new Promise<Socket>((resolve, reject) => {
          const s = net.connect({ host: b.host, port: b.port });
          s.once('connect', () => {
            s.off('error', reject);
            resolve(s);
          });
          s.once('error', reject);
        });
        if (downUntil.delete(label(b))) log.info({ backend: label(b) }, 'backend accepts connections again');
        accepted.set(label(b), (accepted.get(label(b)) ?? 0) + 1);
        return s;
      } catch (err) {
        lastErr = err;
        // Logged when it goes down, not for every connection it refuses while down.
        if (!downUntil.has(label(b)))
          log.warn({ backend: label(b), err: describeError(err) }, 'backend refuses connections: skipped');
        downUntil.set(label(b), Date.now() + downMs);
      }
    }
    throw new Error(`no backend of ${label(route.listen)} accepts connections`, { cause: lastErr });
  };

  const serve = (route: BalancerRoute): net.Server => {
    let next = 0;
    return net.createServer({ allowHalfOpen: true, pauseOnConnect: true }, (client) => {
      sockets.add(client);
      client.once('close', () => sockets.delete(client));
      client.on('error', () => client.destroy());
      const start = next;
      next = (next + 1) % route.backends.length;
      connectBackend(route, start).then(
        (backend) => {
          sockets.add(backend);
          backend.once('close', () => {
            sockets.delete(backend);
            client.destroy();
          });
          backend.on('error', () => backend.destroy());
          client.once('close', () => backend.destroy());
          client.pipe(backend);
          backend.pipe(client);
          client.resume();
        },
        (err: unknown) => {
          log.debug({ err: describeError(err) }, 'connection dropped');
          client.destroy();
        },
      );
    });
  };

  try {
    for (const route of routes) {
      const server = serve(route);
      servers.push(server);
      await new Promise<void>((resolve, reject) => {
        server.once('error', reject);
        server.listen(route.listen.port, route.listen.host, () => {
          server.off('error', reject);
          resolve();
        });
      });
    }
  } catch (err) {
    await Promise.all(servers.map((s) => new Promise((resolve) => s.close(resolve))));
    throw err;
  }
  const ports = servers.map((s) => (s.address() as AddressInfo).port);
  log.info(
    { routes: routes.map((r, i) => ({ port: ports[i], backends: r.backends.map(label) })) },
    'balancing',
  );
  let closing: Promise<void> | undefined;
  return {
    ports,
    accepted,
    close: () =>
      (closing ??= (async () => {
        const closed = servers.map((s) => new Promise((resolve) => s.close(resolve)));
        for (const s of sockets) s.destroy();
        await Promise.all(closed);
      })()),
  };
}
