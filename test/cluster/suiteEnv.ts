import { clusterConfig } from '../../deploy/vmcluster/config';

/** What the cluster tier's global setup tells the tests (env reaches them, as in test/support/testRun.ts). */

/** The inventory file with `cluster` filled in. */
export const CLUSTER_INVENTORY_ENV = 'VSP_CLUSTER_INVENTORY';
/** The run's log folder (Temporal, the repository, the control worker; where `deployed` marks a deploy). */
export const CLUSTER_RUN_DIR_ENV = 'VSP_CLUSTER_RUN_DIR';
/** The LocalCluster folder of the repository and the control worker (its `repository/` holds the owners). */
export const CLUSTER_VSP_DIR_ENV = 'VSP_CLUSTER_VSP_DIR';
/** This machine's address on the cluster network. */
export const GATEWAY = clusterConfig().gateway;
