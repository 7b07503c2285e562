#!/usr/bin/env bash
# Run examples/job.toml on a running Ray cluster through Ray Jobs:
#
#   RAY_DASHBOARD=http://HEAD:8265 OUT=/shared/runs/job bash examples/submit_to_cluster.sh
#
# What this needs:
# - Here: `pip install -e ".[cluster]"` (ray[default]: the job CLI talks to the head node's
#   dashboard, port 8265), the same Ray version as the cluster.
# - The cluster: modelyard installed on every node the same way, token authentication on: on the
#   head `ray get-auth-token --generate` (writes ~/.ray/auth_token; copy it to every node and here),
#   then `RAY_AUTH_MODE=token ray start --head --dashboard-host 0.0.0.0`.
#   --working-dir . ships this checkout to the job (files in .gitignore are left out), so the
#   driver runs this code; `python -m modelyard.cli run ...` works there even where the `modelyard`
#   command is not on PATH.
# - Paths every node can read: the job runs in a temporary copy of the working dir, so a relative
#   output_dir would land in that copy on the head node. OUT (absolute, on shared storage) overrides
#   the job's output_dir; make the job's inputs and model paths absolute shared paths or Hub ids
#   too (the relative ../photos in job.toml only works for images small enough to travel inside
#   the working dir).
# - The cluster's token here: ~/.ray/auth_token (or RAY_AUTH_TOKEN), with RAY_AUTH_MODE=token.
# The job's output streams here; Ctrl-C stops following it, not the job (`ray job stop ID` does).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to an absolute output directory on storage shared by the cluster nodes}"
RAY_AUTH_MODE=token ray job submit --address "${RAY_DASHBOARD:-http://127.0.0.1:8265}" --working-dir . -- \
    modelyard run examples/job.toml --out "$OUT"
