"""PyTorch's built-in CUDA attention ops (flash, memory-efficient, cuDNN), all returning the
log-sum-exp. GQA is handled by repeating K/V heads going in and summing their gradients coming
out, so the ring itself always rotates the un-repeated K/V."""

from __future__ import annotations

import torch

from .base import KernelCapabilities, expand_kv, gqa_groups, reduce_kv_grad

aten = torch.ops.aten


def _bhsd(*xs):
    return [x.transpose(1, 2) for x in xs]


def _cuda_reason(q):
    if q.device.type != "cuda":
        return f"tensors are on {q.device.type}, this kernel needs CUDA"
    return None


class _TorchCUDAKernel:
    """Shared GQA handling and log-sum-exp shape bookkeeping for the aten CUDA ops.

    The bookkeeping (see ``__init__``) is per ring call: :meth:`for_call` gives every call a
    fresh instance, so the shared instance in ``KERNELS`` never holds a call's state."""

    name = "torch_cuda"
    capabilities = KernelCapabilities()
    dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)
    max_head_dim = 256

    def __init__(self):
        # The ops may pad or reshape the lse they return, and return bookkeeping tensors
        # (cumulative lengths, RNG state) that their backward takes back. Remember them per
        # query length; with dropout 0 they are the same for every call of one shape.
        self._lse_shape: dict[int, tuple[int, ...]] = {}
        self._extras: dict[tuple, tuple] = {}

    def for_call(self) -> _TorchCUDAKernel:
        return type(self)()

    def unsupported_reason(self, q, k, v):
        reason = _cuda_reason(q)
        if reason:
            return reason
        if q.dtype not in self.dtypes:
            return f"dtype {q.dtype} is not one of {self.dtypes}"
        d = q.shape[-1]
        if d > self.max_head_dim or d % 8:
            return f"head_dim {d} must be a multiple of 8 and at most {self.max_head_dim}"
        gqa_groups(q, k)
        return None

    def _lse_out(self, lse, b, h, s):
        self._lse_shape[s] = tuple(lse.shape[2:])
        return lse.reshape(b, h, -1)[:, :, :s].float()

    def _lse_in(self, lse):
        b, h, s = lse.shape
        shape = self._lse_shape.get(s, (s,))
        n = 1
        for x in shape:
            n *= x
        if n != s:  # padded by the op (memory-efficient kernel pads to a multiple of 32)
            lse = torch.nn.functional.pad(lse, (0, n - s))
        return lse.reshape(b, h, *shape).contiguous()

    def forward(self, q, k, v, causal, scale):
        g = gqa_groups(q, k)
        qt, kt, vt = _bhsd(q, expand_kv(k, g), expand_kv(v, g))
        out, lse, extras = self._fwd(qt, kt, vt, causal, scale)
        b, s, h, _ = q.shape
        self._extras[(s, k.shape[1], causal)] = extras  # packed documents' calls share query lengths
        return out.transpose(1, 2), self._lse_out(lse, b, h, s)

    def backward(self, dout, q, k, v, out, lse, causal, scale):
        g = gqa_groups(q, k)
        args = _bhsd(dout, q, expand_kv(k, g), expand_kv(v, g), out.to(q.dtype))
        extras = self._extras.get((q.shape[1], k.shape[1], causal))
        if extras is None:
            raise RuntimeError(f"{self.name}: backward called for a query length forward never saw")
        dq, dk, dv = self._bwd(*args, self._lse_in(lse), extras, causal, scale)
        dq, dk, dv = _bhsd(dq, dk, dv)
        return dq, reduce_kv_grad(dk, g), reduce_kv_grad(dv, g)


class TorchFlashKernel(_TorchCUDAKernel):
    name = "torch_flash"

    def _fwd(self, q, k, v, causal, scale):
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, causal, False, scale=scale
        )
        return out, lse, (cum_q, cum_k, max_q, max_k, seed, offset)

    def _bwd(self, dout, q, k, v, out, lse, extras, causal, scale):
        cum_q, cum_k, max_q, max_k, seed, offset = extras
        return aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, causal, seed, offset, scale=scale
        )


class TorchEfficientKernel(_TorchCUDAKernel):
    name = "torch_efficient"
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    max_head_dim = 512

    def _fwd(self, q, k, v, causal, scale):
        out, lse, seed, offset = aten._scaled_dot_product_efficient_attention(
            q, k, v, None, True, 0.0, causal, scale=scale
        )
        return out, lse, (seed, offset)

    def _bwd(self, dout, q, k, v, out, lse, extras, causal, scale):
        seed, offset = extras
        dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
            dout, q, k, v, None, out, lse, seed, offset, 0.0, [True, True, True, False], causal, scale=scale
        )
        return dq, dk, dv


class TorchCuDNNKernel(_TorchCUDAKernel):
    name = "torch_cudnn"
    max_head_dim = 128

    def _fwd(self, q, k, v, causal, scale):
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, causal, False, scale=scale
        )
        return out, lse, (seed, offset, cum_q, cum_k, max_q, max_k)

    def _bwd(self, dout, q, k, v, out, lse, extras, causal, scale):
        seed, offset, cum_q, cum_k, max_q, max_k = extras
        return aten._scaled_dot_product_cudnn_attention_backward(
            dout, q, k, v, out, lse, seed, offset, None, cum_q, cum_k, max_q, max_k, 0.0, causal, scale=scale
        )
