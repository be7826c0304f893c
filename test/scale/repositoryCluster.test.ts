import { useClusterBackend } from '../support/repositoryBackends';

// The repository suite (HTTP: files, accounts, quotas, tokens) on the `cluster` backend: PostgreSQL + S3.
const done = useClusterBackend();
require('../integration/repository.test');
done();
