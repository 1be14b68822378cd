"""PyTorch's fused flash-attention ops for the CPU.

``aten._scaled_dot_product_flash_attention_for_cpu`` returns the log-sum-exp, accepts GQA-shaped
K/V, float64/32/16 and bfloat16, any head_dim, and skips fully masked tiles when causal.
"""

from __future__ import annotations

import torch

from .base import gqa_groups

_FWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


class TorchCPUKernel:
    name = "torch_cpu"

    def unsupported_reason(self, q, k, v):
        if q.device.type != "cpu":
            return f"tensors are on {q.device.type}, this kernel runs on the CPU"
        if q.dtype not in _DTYPES:
            return f"dtype {q.dtype} is not one of {_DTYPES}"
        gqa_groups(q, k)
        return None

    def forward(self, q, k, v, causal, scale):
        # The op takes [b, h, s, d]; transposed views of our bshd tensors are accepted as is.
        out, lse = _FWD(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, causal, scale=scale)
        return out.transpose(1, 2), lse

    def backward(self, dout, q, k, v, out, lse, causal, scale):
        dq, dk, dv = _BWD(
            dout.transpose(1, 2),
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            out.transpose(1, 2),
            lse.contiguous(),
            0.0,
            causal,
            scale=scale,
        )
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
