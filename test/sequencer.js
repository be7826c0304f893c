/**
 * Jest's default order (slowest known first), except for the cluster tier, which runs in a fixed order:
 * the deploy test first (it makes the run's first deploy, which later files reuse instead of deploying
 * again), the dom0 checks, the lifecycle, and last the faults, whose power cut reboots a host.
 */
const Sequencer = require('@jest/test-sequencer').default;

const CLUSTER_ORDER = ['deploy', 'vmCluster', 'lifecycle', 'faults'];
const clusterRank = (test) => {
  const m = /\/test\/cluster\/(\w+)\.test\.ts$/.exec(test.path);
  if (!m) return -1;
  const i = CLUSTER_ORDER.indexOf(m[1]);
  return i < 0 ? CLUSTER_ORDER.length : i;
};

class TierSequencer extends Sequencer {
  sort(tests) {
    const sorted = super.sort(tests);
    const cluster = sorted.filter((t) => clusterRank(t) >= 0);
    if (cluster.length === 0) return sorted;
    cluster.sort((a, b) => clusterRank(a) - clusterRank(b));
    return [...sorted.filter((t) => clusterRank(t) < 0), ...cluster];
  }
}

module.exports = TierSequencer;
