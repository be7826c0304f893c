import { chromium, type Browser } from 'playwright-core';

/** Debian's chromium (deploy/setup.sh installs it); playwright-core ships no browser of its own. */
export const CHROMIUM_PATH = process.env.VSP_CHROMIUM ?? '/usr/bin/chromium';

/**
 * Headless Chromium for page tests: no sandbox (tests run as root), no GPU, no /dev/shm (small in
 * containers), no background traffic (the machine reaches no network but the package registries).
 * The caller closes it; the suite's teardown fails on a chromium left running.
 */
export function launchChromium(): Promise<Browser> {
  return chromium.launch({
    executablePath: CHROMIUM_PATH,
    args: [
      '--headless=new',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-dev-shm-usage',
      '--disable-background-networking',
    ],
  });
}
