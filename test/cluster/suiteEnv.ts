import { clusterConfig } from '../../deploy/vmcluster/config';

/** What the cluster tier's global setup tells the tests (env reaches them, as in test/support/testRun.ts). */

/** The inventory file with `cluster` filled in. */
export const CLUSTER_INVENTORY_ENV = 'VSP_CLUSTER_INVENTORY';
/** This machine's address on the cluster network. */
export const GATEWAY = clusterConfig().gateway;
