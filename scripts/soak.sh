#!/usr/bin/env bash
# The soak: sets everything up on a fresh machine, then trains CP = 2 under random kills, stalls
# and resumes and checks the loss trajectory against an uninterrupted run (scripts/soak.py).
# Extra arguments go to scripts/soak.py, e.g.  bash scripts/soak.sh --faults 40 --steps 120
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
exec python scripts/soak.py "$@"
