#!/usr/bin/env bash
# Run examples/job.toml on a running Ray cluster through Ray Jobs:
#
#   RAY_DASHBOARD=http://HEAD:8265 OUT=/shared/runs/job bash examples/submit_to_cluster.sh
#
# What this needs:
# - Here: `pip install "ray[default]"` (the job CLI talks to the head node's dashboard, port 8265),
#   the same Ray version as the cluster.
# - The cluster: started with the dashboard (`ray start --head` with ray[default] installed), and
#   modelyard with its dependencies installed on every node (`pip install -e .` of this checkout).
#   --working-dir . ships this checkout to the job (files in .gitignore are left out), so the
#   driver runs this code; `python -m modelyard.cli run ...` works there even where the `modelyard`
#   command is not on PATH.
# - Paths every node can read: the job runs in a temporary copy of the working dir, so a relative
#   output_dir would land in that copy on the head node. OUT (absolute, on shared storage) overrides
#   the job's output_dir; make the job's inputs and model paths absolute shared paths or Hub ids
#   too (the relative ../photos in job.toml only works for images small enough to travel inside
#   the working dir).
# - A cluster with token authentication: RAY_AUTH_TOKEN (or ~/.ray/auth_token) set here as for any
#   Ray client.
# The job's output streams here; Ctrl-C stops following it, not the job (`ray job stop ID` does).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to an absolute output directory on storage shared by the cluster nodes}"
ray job submit --address "${RAY_DASHBOARD:-http://127.0.0.1:8265}" --working-dir . -- \
    modelyard run examples/job.toml --out "$OUT"
