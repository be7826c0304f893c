import { Writable } from 'node:stream';
import pino from 'pino';
import { LOGGER_OPTIONS } from '../../logging/logger';

/** Secrets never reach a log line, whatever field a careless log call puts them in. */
test('tokens, capabilities, passwords and Authorization headers are redacted', () => {
  const lines: string[] = [];
  const sink = new Writable({
    write(chunk: Buffer, _enc, done) {
      lines.push(chunk.toString());
      done();
    },
  });
  const log = pino({ ...LOGGER_OPTIONS, level: 'info' }, sink);
  const secret = 'vsp_s3cr3t-value-that-must-not-leak';
  const capability = 'vspcap_e30.c2ln';
  log.info(
    {
      token: secret,
      capability,
      password: 'hunter2-hunter2',
      headers: { authorization: `Bearer ${secret}` },
      req: { headers: { authorization: `Bearer ${capability}`, host: 'repo' } },
      config: { repositoryToken: secret, repositoryUrl: 'http://repo' },
      taskId: 'kept',
    },
    'request',
  );
  const text = lines.join('');
  expect(text).not.toContain(secret);
  expect(text).not.toContain(capability);
  expect(text).not.toContain('hunter2');
  // What is not a secret stays.
  expect(JSON.parse(text)).toMatchObject({
    taskId: 'kept',
    req: { headers: { host: 'repo', authorization: '[redacted]' } },
    config: { repositoryUrl: 'http://repo' },
  });
});
