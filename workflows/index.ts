export { TaskLifecycle } from './taskLifecycle';
export { HostLiveness } from './hostLiveness';
export { Scheduler } from './scheduler';
