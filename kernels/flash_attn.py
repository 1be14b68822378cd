"""The ``flash-attn`` package (CUDA, optional extra). This is the only module that imports it,
lazily, and it absorbs the signature changes of ``_flash_attn_forward``/``_flash_attn_backward``
across 2.x releases (``window_size`` tuple vs. ``window_size_left/right``, ``softcap``, the
return tuple shrinking from 8 to 4 items)."""

from __future__ import annotations

import functools
import inspect

import torch

from .base import KernelCapabilities, gqa_groups

_DTYPES = (torch.float16, torch.bfloat16)


@functools.cache
def _interface():
    """``(forward, backward, forward_params, backward_params)`` or the ImportError's text."""
    try:
        from flash_attn import flash_attn_interface as fai  # noqa: PLC0415 (lazy by design)
    except Exception as exc:  # ImportError, or a broken CUDA extension raising OSError/RuntimeError
        return f"flash-attn is not importable ({type(exc).__name__}: {exc})"
    fwd, bwd = fai._flash_attn_forward, fai._flash_attn_backward
    return fwd, bwd, _params(fwd), _params(bwd)


def _params(fn) -> set[str]:
    """Parameter names of a flash-attn internal. From 2.7 these are ``torch.library.custom_op``
    objects whose own signature is ``(*args, **kwargs)``; the wrapped function keeps the names."""
    return set(inspect.signature(getattr(fn, "_init_fn", fn)).parameters)


def flash_attn_importable() -> bool:
    return not isinstance(_interface(), str)


def _window_args(params: set[str]) -> dict:
    args = {}
    if "window_size_left" in params:
        args.update(window_size_left=-1, window_size_right=-1)
    elif "window_size" in params:
        args["window_size"] = (-1, -1)
    if "softcap" in params:
        args["softcap"] = 0.0
    if "alibi_slopes" in params:
        args["alibi_slopes"] = None
    return args


class FlashAttnKernel:
    name = "flash_attn"
    capabilities = KernelCapabilities()

    def for_call(self) -> FlashAttnKernel:
        return self

    def unsupported_reason(self, q, k, v):
        iface = _interface()
        if isinstance(iface, str):
            return iface
        if q.device.type != "cuda":
            return f"tensors are on {q.device.type}, flash-attn needs CUDA"
        if q.dtype not in _DTYPES:
            return f"dtype {q.dtype} is not one of {_DTYPES}"
        d = q.shape[-1]
        if d > 256 or d % 8:
            return f"head_dim {d} must be a multiple of 8 and at most 256"
        gqa_groups(q, k)
        return None

    def forward(self, q, k, v, causal, scale):
        fwd, _, params, _ = _interface()
        args = dict(q=q, k=k, v=v, dropout_p=0.0, softmax_scale=scale, causal=causal, return_softmax=False)
        args.update(_window_args(params))
        res = fwd(**{key: val for key, val in args.items() if key in params})
        # 2.6+: (out, lse, S_dmask, rng_state); older: (out, q, k, v, out_padded, lse, S_dmask, rng_state)
        out, lse = (res[0], res[1]) if len(res) == 4 else (res[0], res[5])
        return out, lse

    def backward(self, dout, q, k, v, out, lse, causal, scale):
        _, bwd, _, params = _interface()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        args = dict(
            dout=dout.contiguous(), q=q, k=k, v=v, out=out.to(q.dtype), softmax_lse=lse.contiguous(),
            dq=dq, dk=dk, dv=dv, dropout_p=0.0, softmax_scale=scale, causal=causal,
            deterministic=False, rng_state=None,
        )
        args.update(_window_args(params))
        bwd(**{key: val for key, val in args.items() if key in params})
        return dq, dk, dv
