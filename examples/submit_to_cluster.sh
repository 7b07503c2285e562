#!/usr/bin/env bash
# Run examples/job.toml on an existing Ray cluster through Ray Jobs.
#   RAY_DASHBOARD=http://HEAD:8265 bash examples/submit_to_cluster.sh
# The cluster's nodes need modelyard installed (or add `--runtime-env-json '{"pip": ["modelyard"]}'`),
# and the model checkpoints and images readable where the actors and the driver run (a shared
# filesystem, or Hub ids with the Hugging Face cache on shared storage).
set -euo pipefail
cd "$(dirname "$0")/.."
ray job submit --address "${RAY_DASHBOARD:-http://127.0.0.1:8265}" --working-dir . -- \
    modelyard run examples/job.toml
