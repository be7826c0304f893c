export { TaskLifecycle } from './taskLifecycle';
export { HostLiveness } from './hostLiveness';
