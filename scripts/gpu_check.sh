#!/usr/bin/env bash
# One prepared GPU check (a few minutes): the CUDA-marked tests (PyTorch's CUDA flash /
# memory-efficient / cuDNN kernels, and flash-attn if installed, alone and through the ring;
# bf16, head_dim 64 and 128). Writes the hardware description and the test log under $OUT.
# Expects torch, transformers and accelerate already installed on the GPU machine.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu_check}
mkdir -p "$OUT"
python -m pip install -q --no-deps . >/dev/null 2>&1 || python -m pip install --no-deps .
python -m pip install -q pytest hypothesis >/dev/null 2>&1 || true
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
  python -c "import flash_attn; print('flash_attn', flash_attn.__version__)" 2>/dev/null || echo "flash_attn not installed"
} > "$OUT/hardware.txt" 2>&1
cat "$OUT/hardware.txt"
cd tests
timeout 540 pytest -m cuda -q -rA -s test_kernels.py test_ring_exactness.py 2>&1 | tee "$OUT/pytest_cuda.txt"
exit "${PIPESTATUS[0]}"
