#!/usr/bin/env bash
# The test command: sets everything up on a fresh machine, then runs the whole suite (CPU).
# Extra arguments go to pytest, e.g.  bash scripts/test.sh -k exactness -s
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
# `pytest`, not `python -m pytest`: the latter puts the checkout on sys.path, where the
# source folder hf_striped/ would shadow the installed package.
exec pytest -q -ra --durations=10 "$@"
