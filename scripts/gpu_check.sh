#!/usr/bin/env bash
# One prepared GPU check (a few minutes): the CUDA-marked tests (PyTorch's CUDA flash /
# memory-efficient / cuDNN kernels, and flash-attn if installed, alone and through the ring, with
# packed documents too;
# bf16, head_dim 64 and 128), then the schedule benchmark on the CUDA kernels. Writes the
# hardware description, the test log and the benchmark rows under $OUT.
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
(cd tests && timeout 540 pytest -m cuda -q -rA -s test_kernels.py test_ring_exactness.py test_documents.py 2>&1) | tee "$OUT/pytest_cuda.txt"
tests_rc=${PIPESTATUS[0]}
# Schedule benchmark with the CUDA kernels: bf16, head_dim 128, 32 heads / 8 KV heads,
# P = 8 virtual ranks, 4k / 16k / 64k tokens per rank, forward and forward + backward. Rows (with
# the GPU named in the hardware column) go to $OUT/schedule_cuda.csv; plot them with
# python scripts/plot_benchmarks.py --results <folder holding schedule.csv> --heatmap 8 16384
python -m pip install -q matplotlib >/dev/null 2>&1 || true
timeout 420 python scripts/bench_schedule.py --device cuda --dtype bfloat16 --heads 32 --kv-heads 8 \
  --head-dim 128 --P 8 --tokens 4096 16384 65536 --repeats 3 --distinct --no-check \
  --out "$OUT/schedule_cuda.csv" 2>&1 | tee "$OUT/bench_schedule_cuda.txt"
bench_rc=${PIPESTATUS[0]}
exit $(( tests_rc || bench_rc ))
