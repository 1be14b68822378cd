"""Block kernels: one attention block with its log-sum-exp, forward and backward.

``select_kernel(backend, q, k, v)`` picks the implementation. ``"auto"`` takes the first
kernel of the device's chain that accepts the inputs (with a one-time warning when it had to
pass over a faster one). A backend named explicitly is a request, not a hint: if it cannot take
the inputs it raises (``TypeError`` for the dtype, ``ValueError`` for the device, head_dim or a
missing package) with the reason and what to change, instead of silently running another kernel.
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


def _dtype_refusal(reason: str) -> bool:
    """Whether ``reason`` refuses the inputs' dtype (kernels start such reasons with "dtype ")."""
    return reason.startswith("dtype ")


def _accepted_dtypes(name: str, q, k, v) -> list[str]:
    """The floating dtypes kernel ``name`` would take for inputs shaped and placed like these
    (probed on one-token slices, so this costs nothing worth mentioning; error path only)."""
    out = []
    for dt in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        small = [t[:, :1].to(dt) for t in (q, k, v)]
        try:
            if KERNELS[name].unsupported_reason(*small) is None:
                out.append(str(dt))
        except ValueError:  # a shape refusal: not a dtype question
            pass
    return out


def _auto_pick(q, k, v) -> tuple[str | None, list[str]]:
    """What ``backend="auto"`` would pick for these inputs, and each refusal before it."""
    device = q.device.type
    rejected = []
    for name in (n for n in _chain(device) if _available(n, device)):
        reason = KERNELS[name].unsupported_reason(q, k, v)
        if reason is None:
            return name, rejected
        rejected.append(f"{name} rejected the inputs ({reason})")
    return None, rejected


def select_kernel(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> BlockKernel:
    """Return the kernel to use for these inputs (see module docstring).

    Raises ``TypeError`` when the named backend (or, for ``"auto"``, every kernel) cannot take
    the inputs' dtype and ``ValueError`` for any other refusal (device, head_dim, package
    missing); both messages say what to change."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        reason = KERNELS[backend].unsupported_reason(q, k, v)
        if reason is None:
            return KERNELS[backend]
        auto, _ = _auto_pick(q, k, v)
        use_auto = f"use backend='auto', which would pick {auto!r} here" if auto is not None else ""
        if _dtype_refusal(reason):
            dtypes = _accepted_dtypes(backend, q, k, v)
            fix = " or ".join(filter(None, [f"cast q/k/v to one of {', '.join(dtypes)}" if dtypes else "", use_auto]))
            raise TypeError(f"hf_striped: backend {backend!r} cannot run these inputs ({reason}): {fix}")
        use_auto = f"or {use_auto}" if use_auto else "or move the tensors to a device one of them runs on"
        raise ValueError(
            f"hf_striped: backend {backend!r} cannot run these inputs ({reason}): choose a backend that "
            f"runs on {q.device.type} with head_dim {q.shape[-1]} (hf_striped.kernels.BACKENDS), {use_auto}"
        )
    name, rejected = _auto_pick(q, k, v)
    if name is None:
        dtypes = sorted({d for n in _chain(q.device.type) if _available(n, q.device.type)
                         for d in _accepted_dtypes(n, q, k, v)})
        raise TypeError(
            f"hf_striped: no attention kernel can run {q.dtype} inputs on {q.device.type} ("
            + "; ".join(rejected) + f"): cast q/k/v to one of {', '.join(dtypes)} (the model's dtype= when loading)"
        )
    if rejected:
        _warn_once(
            ("auto", name, tuple(rejected)),
            f"hf_striped: falling back to the {name!r} attention kernel: " + "; ".join(rejected),
        )
    return KERNELS[name]


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
