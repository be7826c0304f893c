import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import os from 'node:os';
import net from 'node:net';
import path from 'node:path';

import { Client, Connection } from '@temporalio/client';
import { defineSearchAttributeKey, SearchAttributeType } from '@temporalio/common';

import { freePort } from '../../deploy/devcluster/ports';
import { liveGroupMembers, readProc } from '../../deploy/devcluster/procTable';
import { listManaged, spawnManaged, stopAll } from '../../deploy/devcluster/processes';
import { startTemporalDevServer, VSP_SEARCH_ATTRIBUTES } from '../../deploy/devcluster/temporal';
import { repoRoot, resolveTemporalCli } from '../../deploy/devcluster/tools';
import { temporalAddress } from '../support/temporalEnv';
import { testLogDir } from '../support/testRun';

const logFile = (name: string) => path.join(testLogDir(), 'devcluster', `${name}.log`);

/** A process is gone when /proc has no live entry for it (a zombie awaiting its reaper counts as gone). */
const isAlive = (pid: number) => {
  const p = readProc(pid);
  return p !== undefined && p.state !== 'Z';
};

async function customSearchAttributes(address: string): Promise<Record<string, unknown>> {
  const connection = await Connection.connect({ address });
  try {
    const res = await connection.operatorService.listSearchAttributes({ namespace: 'default' });
    return res.customAttributes ?? {};
  } finally {
    await connection.close();
  }
}

afterAll(async () => {
  await stopAll();
});

describe('resolveTemporalCli', () => {
  const saved = { TEMPORAL_CLI: process.env.TEMPORAL_CLI, PATH: process.env.PATH };
  afterEach(() => {
    for (const [k, v] of Object.entries(saved)) {
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
    }
  });

  test('finds the repository root from its own location', () => {
    expect(existsSync(path.join(repoRoot(), 'package.json'))).toBe(true);
    expect(repoRoot()).toBe(path.resolve(__dirname, '..', '..'));
  });

  test('prefers $TEMPORAL_CLI and rejects one that is not executable', () => {
    process.env.TEMPORAL_CLI = '/bin/true';
    expect(resolveTemporalCli()).toBe('/bin/true');
    process.env.TEMPORAL_CLI = '/nonexistent/temporal';
    expect(() => resolveTemporalCli()).toThrow(
      'TEMPORAL_CLI=/nonexistent/temporal is not an executable file',
    );
  });

  test('without $TEMPORAL_CLI or PATH, uses the CLI that setup installed under .vsp/tools', () => {
    delete process.env.TEMPORAL_CLI;
    process.env.PATH = '/nonexistent';
    expect(resolveTemporalCli()).toMatch(/\/temporal$/);
    expect(resolveTemporalCli().startsWith(path.join(repoRoot(), '.vsp', 'tools'))).toBe(true);
  });
});

describe('Temporal dev server', () => {
  test('starts in memory on a free port with the VSP search attributes, serves clients, and stops fully', async () => {
    const server = await startTemporalDevServer({ headless: true, logFile: logFile('temporal') });
    try {
      expect(server.address).toMatch(/^127\.0\.0\.1:\d+$/);
      expect(server.address).not.toBe(temporalAddress());
      expect(server.uiUrl).toBeUndefined();
      const attrs = await customSearchAttributes(server.address);
      expect(Object.keys(attrs)).toEqual(expect.arrayContaining([...VSP_SEARCH_ATTRIBUTES]));

      const connection = await Connection.connect({ address: server.address });
      try {
        const client = new Client({ connection, namespace: server.namespace });
        const ns = await client.workflowService.describeNamespace({ namespace: 'default' });
        expect(ns.namespaceInfo?.name).toBe('default');
      } finally {
        await connection.close();
      }
    } finally {
      await server.stop();
    }
    expect(isAlive(server.pid)).toBe(false);
    expect(liveGroupMembers(server.pid)).toEqual([]);
    expect(listManaged()).toEqual([]);
  });

  test('serves the web UI when not headless', async () => {
    const uiPort = await freePort();
    const server = await startTemporalDevServer({ uiPort, logFile: logFile('temporal-ui') });
    try {
      expect(server.uiUrl).toBe(`http://127.0.0.1:${uiPort}`);
      // The UI comes up shortly after the front end; poll briefly for it.
      let status = 0;
      for (let i = 0; i < 50 && status !== 200; i++) {
        status = await fetch(server.uiUrl as string).then(
          (r) => r.status,
          () => 0,
        );
        if (status !== 200) await new Promise((r) => setTimeout(r, 200));
      }
      expect(status).toBe(200);
    } finally {
      await server.stop();
    }
  });

  test('with a dbFile, workflows and their search attributes survive a restart', async () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'vsp-temporal-db-'));
    const dbFile = path.join(dir, 'temporal.db');
    const owner = defineSearchAttributeKey('VspOwner', SearchAttributeType.KEYWORD);
    const workflowId = `persist-${Date.now()}`;
    try {
      // No worker polls this queue: the workflow just stays open, which is all persistence needs.
      const first = await startTemporalDevServer({
        headless: true,
        dbFile,
        logFile: logFile('temporal-db-1'),
      });
      try {
        const connection = await Connection.connect({ address: first.address });
        try {
          await new Client({ connection }).workflow.start('vspNoSuchWorkflow', {
            taskQueue: 'vsp-test-unpolled',
            workflowId,
            typedSearchAttributes: [{ key: owner, value: 'alice' }],
          });
        } finally {
          await connection.close();
        }
      } finally {
        await first.stop();
      }
      const second = await startTemporalDevServer({
        headless: true,
        dbFile,
        logFile: logFile('temporal-db-2'),
      });
      try {
        const connection = await Connection.connect({ address: second.address });
        try {
          const desc = await new Client({ connection }).workflow.getHandle(workflowId).describe();
          expect(desc.status.name).toBe('RUNNING');
          expect(desc.typedSearchAttributes.get(owner)).toBe('alice');
        } finally {
          await connection.close();
        }
      } finally {
        await second.stop();
      }
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test("the suite's shared server (global setup) has the search attributes", async () => {
    const attrs = await customSearchAttributes(temporalAddress());
    expect(Object.keys(attrs)).toEqual(expect.arrayContaining([...VSP_SEARCH_ATTRIBUTES]));
  });

  test('rejects an invalid port', async () => {
    await expect(startTemporalDevServer({ port: 70000, logFile: logFile('bad') })).rejects.toThrow(
      /port must be/,
    );
  });
});

describe('spawnManaged', () => {
  test('waits for a port to accept connections', async () => {
    const port = await freePort();
    const script = `setTimeout(() => require('net').createServer().listen(${port}, '127.0.0.1'), 300)`;
    const proc = await spawnManaged('port-server', process.execPath, ['-e', script], {
      logFile: logFile('port-server'),
      readyWhen: { port: { host: '127.0.0.1', port } },
      readyTimeoutMs: 10_000,
    });
    try {
      const open = await new Promise<boolean>((resolve) => {
        const s = net.connect({ host: '127.0.0.1', port });
        s.once('connect', () => (s.destroy(), resolve(true)));
        s.once('error', () => resolve(false));
      });
      expect(open).toBe(true);
    } finally {
      await proc.stop();
    }
    expect(await proc.exited).toBeNull(); // ended by SIGTERM
  });

  test('waits for a log line', async () => {
    const proc = await spawnManaged(
      'log-line',
      'sh',
      ['-c', 'sleep 0.3; echo service READY now; exec sleep 60'],
      {
        logFile: logFile('log-line'),
        readyWhen: { logLine: /service READY/ },
        readyTimeoutMs: 10_000,
      },
    );
    try {
      expect(readFileSync(proc.logFile, 'utf8')).toContain('service READY now');
      expect(isAlive(proc.pid)).toBe(true);
    } finally {
      await proc.stop();
    }
    expect(isAlive(proc.pid)).toBe(false);
  });

  test('a readiness timeout throws with the log tail and leaves no process', async () => {
    const file = logFile('never-ready');
    const started = spawnManaged('never-ready', 'sh', ['-c', 'echo warming-up-marker-42; exec sleep 60'], {
      logFile: file,
      readyWhen: { logLine: /this never appears/ },
      readyTimeoutMs: 500,
    });
    await expect(started).rejects.toThrow(/never-ready not ready after 500 ms[\s\S]*warming-up-marker-42/);
    expect(listManaged()).toEqual([]);
  });

  test('a process that exits before it is ready fails fast with its log', async () => {
    const started = spawnManaged('crashes', 'sh', ['-c', 'echo bad config >&2; exit 3'], {
      logFile: logFile('crashes'),
      readyWhen: { logLine: /ready/ },
      readyTimeoutMs: 30_000,
    });
    await expect(started).rejects.toThrow(/crashes exited \(code 3\) before it was ready[\s\S]*bad config/);
  });

  test('an unknown command fails with a clear error', async () => {
    await expect(
      spawnManaged('missing', '/nonexistent/cmd', [], {
        logFile: logFile('missing'),
        readyWhen: { logLine: /x/ },
      }),
    ).rejects.toThrow(/missing: could not start \/nonexistent\/cmd/);
  });

  test('stop() ends the whole process group: a grandchild leaves nothing behind', async () => {
    // The leader starts a child shell that starts a grandchild sleep; both print their pids.
    const script = 'sh -c \'sleep 300 & echo "grandchild $!"; wait\' & echo "child $!"; wait';
    const proc = await spawnManaged('tree', 'sh', ['-c', script], {
      logFile: logFile('tree'),
      readyWhen: { logLine: /grandchild \d+[\s\S]*child \d+|child \d+[\s\S]*grandchild \d+/ },
      readyTimeoutMs: 10_000,
    });
    const log = readFileSync(proc.logFile, 'utf8');
    const child = Number(/^child (\d+)/m.exec(log)?.[1]);
    const grandchild = Number(/^grandchild (\d+)/m.exec(log)?.[1]);
    expect([proc.pid, child, grandchild].every(isAlive)).toBe(true);
    await proc.stop();
    expect([proc.pid, child, grandchild].filter(isAlive)).toEqual([]);
    expect(liveGroupMembers(proc.pid)).toEqual([]);
  });

  test('stop() escalates to SIGKILL when SIGTERM is ignored', async () => {
    const proc = await spawnManaged(
      'stubborn',
      'sh',
      ['-c', "trap '' TERM; echo up; while true; do sleep 0.1; done"],
      {
        logFile: logFile('stubborn'),
        readyWhen: { logLine: /up/ },
        readyTimeoutMs: 10_000,
      },
    );
    await proc.stop('SIGTERM', 300);
    expect(isAlive(proc.pid)).toBe(false);
    expect(liveGroupMembers(proc.pid)).toEqual([]);
  });

  test('stopAll() stops every managed process and keeps the logs', async () => {
    const procs = await Promise.all(
      ['a', 'b'].map((n) =>
        spawnManaged(`all-${n}`, 'sh', ['-c', 'echo go; exec sleep 60'], {
          logFile: logFile(`all-${n}`),
          readyWhen: { logLine: /go/ },
        }),
      ),
    );
    expect(listManaged().map((p) => p.name)).toEqual(expect.arrayContaining(['all-a', 'all-b']));
    await stopAll();
    expect(listManaged()).toEqual([]);
    expect(procs.filter((p) => isAlive(p.pid))).toEqual([]);
    expect(procs.every((p) => existsSync(p.logFile))).toBe(true);
  });
});
