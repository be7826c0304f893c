/** The unit tier alone: no global setup, so no servers (`npm run test:unit`). */
const tiers = require('./test/tiers');

module.exports = { testTimeout: 30000, projects: [tiers.unit] };
