export { TaskLifecycle } from './taskLifecycle';
export { HostLiveness } from './hostLiveness';
export { RebalanceTick, Scheduler } from './scheduler';
