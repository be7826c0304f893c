import { useClusterBackend } from '../support/repositoryBackends';

// The repository suite (HTTP: files, accounts, quotas, tokens) on the `cluster` backend: PostgreSQL + S3.
const done = useClusterBackend();
// Required, not imported: it must load after the settings above (imports are hoisted above them).
// eslint-disable-next-line @typescript-eslint/no-require-imports
require('../integration/repository.test');
done();
