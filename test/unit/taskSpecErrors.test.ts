import { parseTaskSpec, TaskSpecError } from '../../spec/taskSpec';

/** What a refused spec says: one `<field>: <reason>` per problem, in words a user can act on. */
function issuesOf(input: unknown): string[] {
  try {
    parseTaskSpec(input);
  } catch (err) {
    if (err instanceof TaskSpecError) return err.issues;
    throw err;
  }
  throw new Error('the spec was accepted');
}

test('a misspelt field is named, with the field it most likely meant', () => {
  expect(issuesOf({ owner: 'alice', comand: 'true' })).toEqual([
    'command: required',
    'comand: unknown field (did you mean "command"?)',
  ]);
  expect(issuesOf({ owner: 'alice', command: 'true', Inputz: [], zzzzzz: 1 })).toEqual([
    'Inputz: unknown field (did you mean "inputs"?)',
    'zzzzzz: unknown field',
  ]);
});

test('a bad value names its field and the reason', () => {
  const [vcpus] = issuesOf({ owner: 'alice', command: 'true', vcpus: 0 });
  expect(vcpus).toMatch(/^vcpus: .*>=1/);
  expect(issuesOf({ owner: 'alice', command: 'true', inputs: ['a', 'a'] })).toEqual([
    'inputs.1: duplicate of inputs[0] ("a")',
  ]);
});
