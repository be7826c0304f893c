import type { TaskSpec } from '../spec/taskSpec';
import type { PlacementRequest, Resources, SchedulerConfig } from './model';

/** What a task holds while it lives: its vCPUs and memory, its output room and the per-task disk. */
export function resourcesOf(spec: TaskSpec, config: Pick<SchedulerConfig, 'taskDiskMiB'>): Resources {
  return { vcpus: spec.vcpus, memoryMiB: spec.memoryMiB, diskMiB: spec.outputRoomMiB + config.taskDiskMiB };
}

/** A task's request to the scheduler, from its spec. */
export function placementRequest(
  taskId: string,
  spec: TaskSpec,
  config: Pick<SchedulerConfig, 'taskDiskMiB'>,
  exclude: string[],
): PlacementRequest {
  return {
    taskId,
    owner: spec.owner,
    resources: resourcesOf(spec, config),
    ...(spec.driver ? { driver: spec.driver } : {}),
    ...(spec.host ? { host: spec.host } : {}),
    labels: spec.labels,
    priority: spec.priority,
    image: spec.image,
    exclude,
    ...(spec.ports.length > 0 ? { service: true } : {}),
  };
}
