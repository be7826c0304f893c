/** Names shared by the workflow, workers and clients (no Node APIs: workflow code imports this). */
export const CONTROL_TASK_QUEUE = 'vsp';

export function hostTaskQueue(host: string): string {
  return `vsp-host-${host}`;
}

export const HOST_NAME = /^[a-z0-9][a-z0-9-]{0,62}$/;

/** The per-host liveness workflow (workflows/hostLiveness.ts), one per host, started by its worker. */
export function hostLivenessWorkflowId(host: string): string {
  return `vsp-host-liveness-${host}`;
}

/** The cluster's scheduler (workflows/scheduler.ts): one per Temporal namespace. */
export const SCHEDULER_WORKFLOW_ID = 'vsp-scheduler';

/** Custom search attributes, registered on the dev server by deploy/devcluster/temporal.ts. */
export const SEARCH_ATTRIBUTES = {
  owner: 'VspOwner',
  host: 'VspHost',
  storageHost: 'VspStorageHost',
  phase: 'VspPhase',
  driver: 'VspDriver',
  /** The task's last progress report (0-100, in steps; 100 once completed): an Int, the others Keyword. */
  progress: 'VspProgress',
} as const;

/** Each search attribute's Temporal type, as it is registered (`--search-attribute <name>=<type>`). */
export const SEARCH_ATTRIBUTE_TYPES: Record<
  (typeof SEARCH_ATTRIBUTES)[keyof typeof SEARCH_ATTRIBUTES],
  'Keyword' | 'Int'
> = {
  VspOwner: 'Keyword',
  VspHost: 'Keyword',
  VspStorageHost: 'Keyword',
  VspPhase: 'Keyword',
  VspDriver: 'Keyword',
  VspProgress: 'Int',
};
