"""The block-kernel contract shared by every backend.

A kernel computes attention for one (query block, key/value block) pair and returns the
row log-sum-exp that the ring needs to merge blocks exactly. All tensors use the
``[batch, seq, heads, head_dim]`` ("bshd") layout of the public API; K/V may have fewer
heads than Q (grouped-query attention) and every kernel accepts that shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True, kw_only=True)
class KernelCapabilities:
    """What a block kernel can compute beyond plain causal/full blocks. ``select_kernel``'s
    fallback chain routes each block to the first kernel that can."""

    band: bool = False
    """Sliding-window band masks: ``forward(..., band=(lo, hi))`` (query i sees key j iff
    ``lo <= i - j <= hi``)."""
    softcap: bool = False
    """Logit soft-capping: ``forward(..., softcap=cap)`` scores ``cap * tanh(s / cap)``."""
    document_mask: bool = False
    """Per-document (block-diagonal) masks of packed rows."""
    float32_backward: bool = False
    """Half-precision inputs are computed in float32, so backward wants the ring's unrounded
    float32 output (its row sums ``rowsum(dO * O)`` then match the forward)."""
    causal_split: int = 0
    """Split causal blocks into full pieces plus diagonal causal pieces at least this long
    (0: no split); see ``hf_striped.core.layout.blocks``."""


class BlockKernel(Protocol):
    """One attention block with its log-sum-exp, forward and backward.

    Kernels hold no state between calls, except what :meth:`for_call` hands out: the object
    that runs one ring call's blocks (a kernel whose backward needs bookkeeping from its
    forward keeps it there, never on the shared instance in ``KERNELS``)."""

    name: str
    capabilities: KernelCapabilities

    def for_call(self) -> BlockKernel:
        """The object that runs the blocks of one ring call (``self`` for stateless kernels)."""

    def unsupported_reason(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
        """Why this kernel cannot take these inputs (``None`` when it can). A refusal of the
        inputs' dtype starts with ``"dtype "`` (``select_kernel`` then raises ``TypeError``)."""

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float, **features
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``features``: ``band=`` / ``softcap=``, passed only to kernels whose
        :class:`KernelCapabilities` declare them. Return ``out`` ``[b, sq, h, d]`` (in ``q.dtype``, or float32 for kernels that compute
        half-precision inputs in float32) and ``lse`` ``[b, h, sq]`` in float32 (float64 for
        float64 inputs). ``causal`` aligns the mask top-left (query i sees keys
        ``<= i``); callers only use it with ``sq == sk``."""

    def backward(
        self,
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        causal: bool,
        scale: float,
        **features,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Partial gradients of one block given the *final* ``out``/``lse`` of each query row
        (``out`` arrives in float32 when the kernel declares ``float32_backward``).

        Returns ``dq`` shaped like ``q`` and ``dk``/``dv`` shaped like ``k``/``v`` (GQA groups
        already summed), in the input dtype or float32."""


def gqa_groups(q: torch.Tensor, k: torch.Tensor) -> int:
    """Query heads per K/V head, validating the GQA shape relation."""
    hq, hk = q.shape[2], k.shape[2]
    if hk == 0 or hq % hk:
        raise ValueError(
            f"query heads ({hq}) must be a multiple of key/value heads ({hk}) for grouped-query attention"
        )
    return hq // hk


def expand_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``[b, s, hk, d]`` -> ``[b, s, hk * groups, d]`` with each K/V head repeated ``groups`` times
    (the head order Transformers' ``repeat_kv`` uses)."""
    if groups == 1:
        return x
    b, s, hk, d = x.shape
    return x[:, :, :, None, :].expand(b, s, hk, groups, d).reshape(b, s, hk * groups, d)


def reduce_kv_grad(dx: torch.Tensor, groups: int) -> torch.Tensor:
    """Inverse of :func:`expand_kv` for gradients: sum the ``groups`` query heads of each K/V head."""
    if groups == 1:
        return dx
    b, s, h, d = dx.shape
    return dx.reshape(b, s, h // groups, groups, d).sum(dim=3)
