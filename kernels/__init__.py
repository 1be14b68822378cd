"""Block kernels: one attention block with its log-sum-exp, forward and backward.

``select_kernel(backend, q, k, v)`` picks the implementation. ``"auto"`` takes the first
kernel of the device's chain that accepts the inputs; a named backend that cannot take them
(wrong device, dtype or head_dim, package missing) falls back along the same chain with a
one-time warning instead of crashing.
"""

from __future__ import annotations

import warnings

import torch

from .base import BlockKernel, expand_kv, gqa_groups, reduce_kv_grad
from .flash_attn import FlashAttnKernel, flash_attn_importable
from .reference import ReferenceKernel, plain_attention
from .torch_cpu import TorchCPUKernel
from .torch_cuda import TorchCuDNNKernel, TorchEfficientKernel, TorchFlashKernel

KERNELS: dict[str, BlockKernel] = {
    k.name: k
    for k in (
        FlashAttnKernel(),
        TorchFlashKernel(),
        TorchEfficientKernel(),
        TorchCuDNNKernel(),
        TorchCPUKernel(),
        ReferenceKernel(),
    )
}
BACKENDS = ("auto", *KERNELS)
_CHAINS = {
    "cuda": ("flash_attn", "torch_flash", "torch_efficient", "torch_cudnn", "reference"),
    "cpu": ("torch_cpu", "reference"),
}
_warned: set[tuple[str, str]] = set()


def _chain(device_type: str) -> tuple[str, ...]:
    return _CHAINS.get(device_type, ("reference",))


def _available(name: str, device_type: str) -> bool:
    """Whether the kernel exists for this device at all (package importable, right device)."""
    if name == "flash_attn":
        return device_type == "cuda" and flash_attn_importable()
    return name in _chain(device_type)


def _warn_once(key: tuple, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def select_kernel(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> BlockKernel:
    """Return the kernel to use for these inputs (see module docstring)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    device = q.device.type
    if backend != "auto":
        reason = KERNELS[backend].unsupported_reason(q, k, v)
        if reason is None:
            return KERNELS[backend]
        chain = [n for n in _chain(device) if n != backend and _available(n, device)]
        fallback = next(n for n in chain if KERNELS[n].unsupported_reason(q, k, v) is None)
        _warn_once(
            (backend, fallback, reason),
            f"hf_striped: backend {backend!r} cannot run these inputs ({reason}); falling back to {fallback!r}",
        )
        return KERNELS[fallback]
    rejected = []
    for name in (n for n in _chain(device) if _available(n, device)):
        reason = KERNELS[name].unsupported_reason(q, k, v)
        if reason is None:
            if rejected:
                _warn_once(
                    ("auto", name, tuple(rejected)),
                    f"hf_striped: falling back to the {name!r} attention kernel: " + "; ".join(rejected),
                )
            return KERNELS[name]
        rejected.append(f"{name} rejected the inputs ({reason})")
    raise AssertionError("the reference kernel accepts every input")  # pragma: no cover


__all__ = [
    "BACKENDS",
    "KERNELS",
    "BlockKernel",
    "expand_kv",
    "gqa_groups",
    "plain_attention",
    "reduce_kv_grad",
    "select_kernel",
]
