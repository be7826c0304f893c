#!/usr/bin/env bash
# Builds the Go servers the scale tier runs (SeaweedFS's S3 server, the Temporal server and its SQL tool)
# from the Go module proxy, each once per version into a cache outside the repository; exits at once when
# both are there. `npm test` runs it in the background beside the unit, integration and system tiers;
# `npm run test:scale` runs it first.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash deploy/s3/build-seaweedfs.sh >/dev/null
bash deploy/temporal/build.sh
