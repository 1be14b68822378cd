#!/usr/bin/env bash
# A quick check: sets everything up on a fresh machine, then runs the demo (SmolLM2-135M with
# striped ring attention on 2 CPU processes, checked against one process).
# Extra arguments go to scripts/demo.py, e.g.  bash scripts/demo.sh --seq-len 2048 --nproc 4
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
exec python scripts/demo.py "$@"
