export { TaskLifecycle } from './taskLifecycle';
