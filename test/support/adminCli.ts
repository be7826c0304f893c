import { Command } from 'commander';
import { registerAdminCommands } from '../../cli/adminCommands';

/** Runs a `vsp` admin command in-process against a repository data dir and returns what it printed. */
export async function runAdminCli(dataDir: string, ...args: string[]): Promise<string> {
  const program = new Command('vsp').option('--json').exitOverride();
  registerAdminCommands(program);
  let out = '';
  const spy = jest.spyOn(process.stdout, 'write').mockImplementation((chunk: string | Uint8Array) => {
    out += chunk.toString();
    return true;
  });
  try {
    await program.parseAsync([...args, '--data-dir', dataDir], { from: 'user' });
  } finally {
    spy.mockRestore();
  }
  return out;
}
