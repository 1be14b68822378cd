"""Block kernels: one attention block with its log-sum-exp, forward and backward.

``select_kernel(backend, q, k, v)`` returns a :class:`KernelChain`: the kernel that runs the
blocks (for ``"auto"`` the first kernel of the device's chain that accepts the inputs, with a
one-time warning when it had to pass over a faster one), followed by the kernels after it on that
chain that accept the inputs too. A block needing a feature the first kernel does not declare in
its :class:`KernelCapabilities` (a sliding-window band, soft-capping) goes to the first kernel of
the chain that does. A backend named explicitly is a request, not a hint: if it cannot take
the inputs it raises (``TypeError`` for the dtype, ``ValueError`` for the device, head_dim or a
missing package) with the reason and what to change, instead of silently running another kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import BlockKernel, KernelCapabilities, expand_kv, gqa_groups, reduce_kv_grad
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


def _chain(device_type: str) -> tuple[str, ...]:
    return _CHAINS.get(device_type, ("reference",))


def _available(name: str, device_type: str) -> bool:
    """Whether the kernel exists for this device at all (package importable, right device)."""
    if name == "flash_attn":
        return device_type == "cuda" and flash_attn_importable()
    return name in _chain(device_type)


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


@dataclass(frozen=True)
class KernelChain:
    """The kernels one ring call runs its blocks on: ``kernels[0]`` for every block it can
    compute, the first later one that declares the feature for the others. Built by
    :func:`select_kernel`; its kernels are that call's own (``BlockKernel.for_call``)."""

    kernels: tuple[BlockKernel, ...]

    @property
    def name(self) -> str:
        return self.kernels[0].name

    @property
    def capabilities(self) -> KernelCapabilities:
        return self.kernels[0].capabilities

    def first_with(self, feature: str) -> BlockKernel | None:
        """The first kernel declaring ``feature`` (a :class:`KernelCapabilities` field), or ``None``."""
        return next((k for k in self.kernels if getattr(k.capabilities, feature)), None)

    def starting_with(self, feature: str) -> KernelChain:
        """The chain from its first kernel declaring ``feature`` on (for calls where every block
        needs it); ``ValueError`` if none does."""
        for i, k in enumerate(self.kernels):
            if getattr(k.capabilities, feature):
                return KernelChain(self.kernels[i:])
        raise ValueError(f"no kernel of {[k.name for k in self.kernels]} can compute {feature}")

    def for_block(self, band) -> BlockKernel:
        """The kernel for one call: the first kernel, unless the call is a band (``band`` not
        ``None``) it cannot mask; then the first kernel that can."""
        if band is None or self.kernels[0].capabilities.band:
            return self.kernels[0]
        return self.first_with("band")


def _chain_from(name: str, q, k, v) -> KernelChain:
    """``name``'s kernel, then every later kernel of the device's chain that takes the inputs
    (the reference kernel always does when ``name``'s does: it runs every dtype and device)."""
    device = q.device.type
    order = _chain(device)
    later = order[order.index(name) + 1:] if name in order else ("reference",) if name != "reference" else ()
    rest = [n for n in later if _available(n, device) and KERNELS[n].unsupported_reason(q, k, v) is None]
    return KernelChain(tuple(KERNELS[n].for_call() for n in (name, *rest)))


def select_kernel(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> KernelChain:
    """Return the kernel chain for these inputs (see module docstring).

    Raises ``TypeError`` when the named backend (or, for ``"auto"``, every kernel) cannot take
    the inputs' dtype and ``ValueError`` for any other refusal (device, head_dim, package
    missing); both messages say what to change."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        reason = KERNELS[backend].unsupported_reason(q, k, v)
        if reason is None:
            return _chain_from(backend, q, k, v)
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
        # imported here: a checkout's kernels/ folder may also be imported as a top-level package
        # (Transformers probes for the Hub's `kernels`), where there is no parent package
        from ..log import warn_once

        warn_once(f"hf_striped: falling back to the {name!r} attention kernel: " + "; ".join(rejected), stacklevel=3)
    return _chain_from(name, q, k, v)


__all__ = [
    "BACKENDS",
    "KERNELS",
    "BlockKernel",
    "KernelCapabilities",
    "KernelChain",
    "expand_kv",
    "gqa_groups",
    "plain_attention",
    "reduce_kv_grad",
    "select_kernel",
]
