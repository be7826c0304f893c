/**
 * The `vsp` package: what `import … from 'vsp'` (or `require('vsp')`) gives. Owners use TaskClient
 * (tasks, through the repository, with an owner token) and RepositoryClient (files); operators and
 * services use VspClient over a Temporal connection. `vsp/tasks` and `vsp/files` load one client alone
 * (neither loads Temporal's client).
 */
export {
  TaskClient,
  TaskClientError,
  type OwnerTaskSpec,
  type SubmittedTask,
  type TaskClientOptions,
  type TaskDetails,
  type TaskSummary,
  type TaskView,
  type WhoAmI,
} from './taskClient';
export { TASK_PHASES, type TaskListFilter } from './taskFilter';
export { taskFailureMessage, VspClient } from './vspClient';
export {
  RepositoryClient,
  RepositoryError,
  ResumableUploadError,
  type FileInfo,
  type ImageEntry,
  type RepositoryErrorKind,
  type ResumableUploadOptions,
  type TransferOptions,
} from '../repository/client';
export { TaskSpecError, type TaskSpecInput } from '../spec/taskSpec';
export type {
  MigrateRequest,
  ResizeRequest,
  TaskPhase,
  TaskResult,
  TaskStatus,
} from '../workflows/definitions';
