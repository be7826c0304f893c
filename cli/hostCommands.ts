import type { Command } from 'commander';
import { SchedulerClient } from '../client/schedulerClient';
import { connectClient } from '../config/temporal';
import { VspClient } from '../client/vspClient';
import { planBalance, type BalanceMove } from '../scheduler/balance';
import {
  emptySchedulerState,
  MiB,
  type HostSummary,
  type Resources,
  type SchedulerState,
} from '../scheduler/model';
import { drainUpdate, undrainUpdate, type SchedulerSnapshot } from '../workflows/scheduling/definitions';
import { parseDuration } from '../client/taskFilter';
import { commandGroup } from './adminCommands';

/**
 * Operators' host commands, through Temporal (TEMPORAL_ADDRESS, ...): the scheduler's view of every host
 * (capacity, what it granted, what is free, state, tasks), host maintenance (drain, undrain) and
 * rebalancing by live migration (`vsp cluster balance`).
 */
export function registerHostCommands(
  program: Command,
  table: (header: string[], rows: string[][]) => string,
): void {
  const print = (human: string, data: unknown): void => {
    process.stdout.write(program.opts().json ? `${JSON.stringify(data)}\n` : `${human}\n`);
  };
  const scheduler = async () => new SchedulerClient(await connectClient());
  const host = commandGroup(
    program,
    'host',
    "the cluster's hosts as the scheduler sees them (operators, Temporal)",
  );

  host
    .command('list')
    .description('every host: state, capacity / allocated / free (vCPUs, memory MiB, disk MiB), tasks')
    .action(async () => {
      const state = await (await scheduler()).state({ fresh: true });
      const rows = state.hosts.map((h) => [
        h.host,
        h.state,
        triple(h.capacity),
        triple(h.allocated),
        triple(h.free),
        String(h.tasks.length),
      ]);
      print(
        `${table(['HOST', 'STATE', 'CAPACITY cpu/mem/disk', 'ALLOCATED', 'FREE', 'TASKS'], rows)}\n` +
          `${state.queue.length} task(s) queued; policy ${state.config.policy}, overcommit cpu ${state.config.cpuOvercommit} ` +
          `memory ${state.config.memoryOvercommit}${rebalancing(state)}`,
        state,
      );
    });

  host
    .command('show <host>')
    .description('one host: its inventory, what the scheduler granted there, and its tasks')
    .action(async (name: string) => {
      const state = await (await scheduler()).state({ fresh: true });
      const h = state.hosts.find((x) => x.host === name);
      if (!h)
        throw new Error(
          `host ${name} is not in the cluster (hosts: ${state.hosts.map((x) => x.host).join(', ')})`,
        );
      print(describeHost(h), h);
    });

  host
    .command('drain <host>')
    .description(
      'no new placements on the host; its VM tasks live-migrate away, process tasks run to their end (or the deadline)',
    )
    .option('--deadline <duration>', 'cancel the tasks that could not leave after this long (e.g. 30m, 2h)')
    .option('--max-parallel <n>', 'migrations at once', (v) => Number(v), 2)
    .action(async (name: string, opts: { deadline?: string; maxParallel: number }) => {
      if (!Number.isInteger(opts.maxParallel) || opts.maxParallel < 1)
        throw new Error('--max-parallel must be a whole number of at least 1');
      const order = await (
        await scheduler()
      ).update(drainUpdate, {
        host: name,
        maxParallel: opts.maxParallel,
        ...(opts.deadline ? { deadlineSec: parseDuration(opts.deadline) } : {}),
      });
      print(`host ${name} is draining${order.deadline ? ` (deadline ${order.deadline})` : ''}`, order);
    });

  commandGroup(program, 'cluster', 'the cluster as a whole (operators)')
    .command('balance')
    .description(
      "live-migrate VM tasks, one at a time, while a move improves the cluster's score (spread: evenness; pack: hosts in use)",
    )
    .option('--dry-run', 'only print the planned moves and their expected gain')
    .option('--threshold <gain>', 'smallest score gain worth a move (spread)', Number, 0.05)
    .option('--max-moves <n>', 'at most this many moves', Number, 10)
    .action(async (opts: { dryRun?: boolean; threshold: number; maxMoves: number }) => {
      if (!(opts.threshold >= 0)) throw new Error('--threshold must be a number of at least 0');
      if (!Number.isInteger(opts.maxMoves) || opts.maxMoves < 0)
        throw new Error('--max-moves must be a whole number of at least 0');
      const client = await scheduler();
      const plan = () => client.state({ fresh: true }).then((snap) => planBalance(stateOf(snap), opts));
      const show = (m: BalanceMove) => `${m.taskId}: ${m.from} -> ${m.to} (gain ${m.gain})`;
      if (opts.dryRun) {
        const moves = await plan();
        return print(moves.map(show).join('\n') || 'balanced: no move improves the score', moves);
      }
      // One move at a time, planned again after each on the cluster as it then is.
      const vsp = new VspClient(client.temporal);
      const done: BalanceMove[] = [];
      while (done.length < opts.maxMoves) {
        const [next] = await plan();
        if (!next) break;
        await vsp.migrate(next.taskId, { host: next.to });
        done.push(next);
        if (!program.opts().json) process.stdout.write(`moved ${show(next)}\n`);
      }
      print(
        `${done.length} move(s); ${done.length < opts.maxMoves ? 'balanced' : 'stopped at --max-moves'}`,
        done,
      );
    });

  host
    .command('undrain <host>')
    .description('the host takes new placements again')
    .action(async (name: string) => {
      await (await scheduler()).update(undrainUpdate, { host: name });
      print(`host ${name} takes new placements`, { host: name });
    });
}

/** The scheduler's state as the pure decisions take it, from its snapshot. */
function stateOf(snap: SchedulerSnapshot): SchedulerState {
  return {
    ...emptySchedulerState(snap.config),
    views: Object.fromEntries(
      snap.hosts.map((h) => [
        h.host,
        {
          host: h.host,
          live: h.state !== 'down',
          reason: h.reason,
          ...(h.inventory ? { inventory: h.inventory } : {}),
        },
      ]),
    ),
    drains: Object.fromEntries(snap.hosts.flatMap((h) => (h.drain ? [[h.host, h.drain]] : []))),
    reservations: Object.fromEntries(snap.reservations.map((r) => [r.taskId, r])),
  };
}

/** The rebalancing line's tail: its period and what its rounds did, or that it is off. */
function rebalancing(s: SchedulerSnapshot): string {
  const cfg = s.config.rebalance;
  if (!cfg?.everySec) return '; rebalancing off';
  const b = s.balance;
  const done = b
    ? `${b.rounds} round(s), ${b.moved} move(s), ${b.failed} failed, ${Object.keys(b.inFlight).length} under way${b.balanced ? ', balanced' : ''}`
    : 'no round yet';
  return `\nrebalancing every ${cfg.everySec} s (threshold ${cfg.threshold}, ${cfg.maxInFlight} at once): ${done}`;
}

function triple(r: Resources | undefined): string {
  return r ? `${r.vcpus}/${r.memoryMiB}/${r.diskMiB}` : '-';
}

function describeHost(h: HostSummary): string {
  const inv = h.inventory;
  const lines = [
    `host ${h.host}: ${h.state} (${h.reason})`,
    `  capacity   ${triple(h.capacity)}  (vCPUs/memory MiB/disk MiB, after overcommit)`,
    `  allocated  ${triple(h.allocated)}`,
    `  free       ${triple(h.free)}`,
  ];
  if (inv)
    lines.push(
      `  physical   ${inv.vcpus} vCPUs, ${inv.memoryMiB} MiB; store ${Math.floor(inv.storeFreeBytes / MiB)} of ${Math.floor(inv.storeTotalBytes / MiB)} MiB free`,
      `  drivers    ${inv.drivers.join(', ')}${inv.accelerator ? ` (${inv.accelerator})` : ''}; default ${inv.defaultDriver ?? 'none'}`,
      `  labels     ${
        Object.entries(inv.labels)
          .map(([k, v]) => `${k}=${v}`)
          .join(', ') || '-'
      }`,
      `  images     ${inv.cachedImages.map((i) => `${i.sha256.slice(0, 12)}${i.names.length ? ` (${i.names.join(', ')})` : ''}`).join(', ') || '-'}`,
      `  reported   ${inv.reportedAt}; worker up since ${inv.workerStartedAt}`,
    );
  if (h.drain)
    lines.push(
      `  drain      since ${h.drain.since}, max ${h.drain.maxParallel} at once${h.drain.deadline ? `, deadline ${h.drain.deadline}` : ''}`,
    );
  lines.push(`  tasks      ${h.tasks.join(', ') || '-'}`);
  // Disks of tasks that run elsewhere: the host cannot be switched off while it holds them.
  if (h.storedTasks?.length) lines.push(`  disks of   ${h.storedTasks.join(', ')} (running elsewhere)`);
  return lines.join('\n');
}
