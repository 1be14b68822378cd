"""PyTorch's fused flash-attention ops for the CPU.

``aten._scaled_dot_product_flash_attention_for_cpu`` returns the log-sum-exp, accepts GQA-shaped
K/V, float64/32/16 and bfloat16, any head_dim, and skips fully masked tiles when causal.

bfloat16/float16 inputs are computed in float32 (results stay float32 until the ring's final
rounding). PyTorch 2.13's half-precision CPU kernels round probabilities and gradient partial
sums to the input dtype: on one causal 512-token bfloat16 block (4 heads, head_dim 64) the
backward's dV error against float64 was 4.9e-2, 2.5x that of plain bfloat16 PyTorch math
(2.0e-2), largest on the first keys, which every query attends to; that breaks the exactness
rule (docs/design.md section 9) before any ring is involved. In float32 the same block's dV error is
2.6e-4, and the only bfloat16 error left is the final rounding. The price is float32 speed:
about 1.7x the bfloat16 kernel's time on this AVX-512 CPU.
"""

from __future__ import annotations

import torch

from .base import KernelCapabilities, gqa_groups

_FWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
_HALF = (torch.bfloat16, torch.float16)


def _compute(*xs):
    """Cast half-precision inputs to float32 (see the module docstring); others pass through."""
    return [x.float() if x.dtype in _HALF else x for x in xs]


class TorchCPUKernel:
    name = "torch_cpu"
    # float32_backward: half precision is computed in float32 (module docstring), so the ring
    # saves its unrounded float32 output for backward.
    # causal_split 0: causal blocks are not split (hf_striped.core.layout.blocks). Measured with
    # scripts/bench_schedule.py: this op's causal mode skips whole 512-key tiles only (about 256
    # wasted keys per row, a 2k block costs 0.62 of a full one), but its calls shorter than 768
    # queries use 64-row tiles and compute partly masked tiles in full, so diagonal pieces of
    # 128-512 tokens plus the extra merges cost as much or more (0.67-0.75 at 2k tokens).
    capabilities = KernelCapabilities(float32_backward=True, causal_split=0)

    def for_call(self) -> TorchCPUKernel:
        return self

    def unsupported_reason(self, q, k, v):
        if q.device.type != "cpu":
            return f"tensors are on {q.device.type}, this kernel runs on the CPU"
        if q.dtype not in _DTYPES:
            return f"dtype {q.dtype} is not one of {_DTYPES}"
        gqa_groups(q, k)
        return None

    def forward(self, q, k, v, causal, scale):
        q, k, v = _compute(q, k, v)
        # The op takes [b, h, s, d]; transposed views of our bshd tensors are accepted as is.
        out, lse = _FWD(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, causal, scale=scale)
        return out.transpose(1, 2), lse

    def backward(self, dout, q, k, v, out, lse, causal, scale):
        dout, q, k, v = _compute(dout, q, k, v)
        dq, dk, dv = _BWD(
            dout.transpose(1, 2),
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            out.to(q.dtype).transpose(1, 2),
            lse.contiguous(),
            0.0,
            causal,
            scale=scale,
        )
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
