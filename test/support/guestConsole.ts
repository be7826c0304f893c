import { promises as fs } from 'node:fs';

/**
 * Waits until a VM's console log shows `text` at the start of a line; fails at once when the guest
 * reported its end or an error first, and names what the console held.
 */
export async function untilConsoleLine(consoleLog: string, text: string, timeoutMs = 120_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const content = await fs.readFile(consoleLog, 'utf8').catch(() => '');
    if (content.split('\n').some((l) => l.startsWith(text))) return;
    if (/^VSP-(EXIT|ERROR)/m.test(content) || Date.now() > deadline)
      throw new Error(`the console never showed ${JSON.stringify(text)}:\n${content.slice(-3000)}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}
