import type { ChildProcess } from 'node:child_process';
import { randomInt } from 'node:crypto';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { CAPABILITY_KEY_FILE } from '../repository/accounts/capabilities';
import type { BackendSettings } from '../repository/store/backend';
import { startBalancer, type Balancer, type BalancerRoute } from '../deploy/balancer/balancer';
import { freePort } from '../deploy/devcluster/ports';
import { createLogger } from '../logging/logger';
import { startServerProcess, stopServerProcess } from './repository';

/**
 * N repository server processes behind the TCP balancer (deploy/balancer/), for the scale-out test and
 * benchmark. Server i listens on 127.0.0.(2+i), the balancer on 127.0.0.1: an FTPS passive port must be
 * the same number on both (the server announces its own port, at the balancer's address), so each server
 * gets a passive range of its own and the balancer forwards that range to it alone. All servers share
 * the SSH host key and the FTPS certificate (a client must not see them change from one connection to
 * the next) and the service token.
 */

export interface FleetOptions {
  servers: number;
  /** Holds each server's data dir (`server<i>`) and the shared key and certificate. */
  workDir: string;
  serviceToken: string;
  /** The backend's settings (VSP_REPOSITORY_*), and anything else server i needs. */
  env?: (index: number) => NodeJS.ProcessEnv;
  /** FTPS passive ports per server (default 20). */
  pasvPorts?: number;
}

export interface FleetServer {
  index: number;
  /** Its own HTTP address, bypassing the balancer. */
  url: string;
  host: string;
  ports: { http: number; sftp: number; ftps: number };
  /** SIGKILL: no clean shutdown, as a crash; resolves once the process is gone. */
  kill(): Promise<void>;
  /** Starts it again on the same ports and data dir. */
  restart(): Promise<void>;
  pid(): number | undefined;
}

export interface Fleet {
  /** The balancer's HTTP address. */
  url: string;
  sftpPort: number;
  ftpsPort: number;
  /** The FTPS certificate every server presents (PEM), for clients to trust. */
  ftpsCert: Buffer;
  servers: FleetServer[];
  balancer: Balancer;
  close(): Promise<void>;
}

const MAX_SERVERS = 200;

export async function startFleet(opts: FleetOptions): Promise<Fleet> {
  const { servers: n, workDir, serviceToken } = opts;
  if (!Number.isInteger(n) || n < 1 || n > MAX_SERVERS)
    throw new Error(`a fleet has 1-${MAX_SERVERS} servers, not ${n}`);
  const pasvPorts = opts.pasvPorts ?? 20;
  const shared = {
    VSP_REPO_SFTP_HOST_KEY: path.join(workDir, 'ssh_host_ed25519_key'),
    VSP_REPO_FTPS_CERT: path.join(workDir, 'ftps_cert.pem'),
    VSP_REPO_FTPS_KEY: path.join(workDir, 'ftps_key.pem'),
    VSP_REPO_FTPS_PASV_ADDRESS: '127.0.0.1',
  };
  const children = new Map<number, ChildProcess>();
  let balancer: Balancer | undefined;
  try {
    const plan = await Promise.all(
      Array.from({ length: n }, async (_, index) => {
        const host = `127.0.0.${2 + index}`;
        return {
          index,
          host,
          dataDir: path.join(workDir, `server${index}`),
          ports: { http: await freePort(host), sftp: await freePort(host), ftps: await freePort(host) },
        };
      }),
    );
    const routesFor = (pasvBase: number): BalancerRoute[] => {
      const to = (port: keyof (typeof plan)[0]['ports']): BalancerRoute => ({
        listen: { host: '127.0.0.1', port: 0 },
        backends: plan.map((s) => ({ host: s.host, port: s.ports[port] })),
      });
      const pasv = plan.flatMap((s) =>
        Array.from({ length: pasvPorts }, (_, k) => {
          const port = pasvBase + s.index * pasvPorts + k;
          return { listen: { host: '127.0.0.1', port }, backends: [{ host: s.host, port }] };
        }),
      );
      return [to('http'), to('sftp'), to('ftps'), ...pasv];
    };
    // A random passive block, drawn again if another process holds one of its ports.
    let pasvBase = 0;
    for (let attempt = 0; !balancer; attempt++) {
      pasvBase = randomInt(20_000, 60_000 - n * pasvPorts);
      try {
        balancer = await startBalancer(routesFor(pasvBase), createLogger('balancer'));
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'EADDRINUSE' || attempt >= 10) throw err;
      }
    }
    const envOf = (s: (typeof plan)[0]): NodeJS.ProcessEnv => {
      const min = pasvBase + s.index * pasvPorts;
      return {
        ...shared,
        VSP_REPO_LISTEN: `${s.host}:${s.ports.http}`,
        VSP_REPO_SFTP_LISTEN: `${s.host}:${s.ports.sftp}`,
        VSP_REPO_FTPS_LISTEN: `${s.host}:${s.ports.ftps}`,
        VSP_REPO_FTPS_PASV_PORTS: `${min}-${min + pasvPorts - 1}`,
        ...opts.env?.(s.index),
      };
    };
    const start = async (s: (typeof plan)[0]): Promise<string> => {
      await fs.mkdir(s.dataDir, { recursive: true });
      const { child, url } = await startServerProcess(s.dataDir, serviceToken, envOf(s));
      children.set(s.index, child);
      return url;
    };
    // The first server makes the shared host key, certificate and capability key; the others then read
    // them (the capability key from their own data dirs: a copy).
    const urls = [await start(plan[0])];
    for (const s of plan.slice(1)) {
      await fs.mkdir(s.dataDir, { recursive: true });
      await fs.copyFile(
        path.join(plan[0].dataDir, CAPABILITY_KEY_FILE),
        path.join(s.dataDir, CAPABILITY_KEY_FILE),
      );
    }
    urls.push(...(await Promise.all(plan.slice(1).map(start))));
    const servers = plan.map((s): FleetServer => ({
      index: s.index,
      url: urls[s.index],
      host: s.host,
      ports: s.ports,
      pid: () => children.get(s.index)?.pid,
      kill: async () => {
        const child = children.get(s.index);
        if (!child || child.exitCode !== null || child.signalCode !== null) return;
        const exited = new Promise((resolve) => child.once('exit', resolve));
        child.kill('SIGKILL');
        await exited;
      },
      restart: async () => {
        await start(s);
      },
    }));
    const b = balancer;
    return {
      url: `http://127.0.0.1:${b.ports[0]}`,
      sftpPort: b.ports[1],
      ftpsPort: b.ports[2],
      ftpsCert: await fs.readFile(shared.VSP_REPO_FTPS_CERT),
      servers,
      balancer: b,
      close: async () => {
        await Promise.all([...children.values()].map(stopServerProcess));
        await b.close();
      },
    };
  } catch (err) {
    await Promise.all([...children.values()].map(stopServerProcess));
    await balancer?.close();
    throw err;
  }
}

/** The servers' environment for a backend (repository/store/backend.ts reads it). */
export function backendEnv(settings: BackendSettings): NodeJS.ProcessEnv {
  if (settings.kind === 'local') return { VSP_REPOSITORY_BACKEND: 'local' };
  return {
    VSP_REPOSITORY_BACKEND: 'cluster',
    VSP_REPOSITORY_PG_URL: settings.pgUrl,
    VSP_REPOSITORY_S3_ENDPOINT: settings.s3.endpoint,
    VSP_REPOSITORY_S3_BUCKET: settings.s3.bucket,
    VSP_REPOSITORY_S3_ACCESS_KEY: settings.s3.accessKey,
    VSP_REPOSITORY_S3_SECRET_KEY: settings.s3.secretKey,
    VSP_REPOSITORY_S3_REGION: settings.s3.region,
  };
}
