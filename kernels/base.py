"""The block-kernel contract shared by every backend.

A kernel computes attention for one (query block, key/value block) pair and returns the
row log-sum-exp that the ring needs to merge blocks exactly. All tensors use the
``[batch, seq, heads, head_dim]`` ("bshd") layout of the public API; K/V may have fewer
heads than Q (grouped-query attention) and every kernel accepts that shape.
"""

from __future__ import annotations

from typing import Protocol

import torch


class BlockKernel(Protocol):
    """One attention block with its log-sum-exp, forward and backward."""

    name: str

    def unsupported_reason(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
        """Why this kernel cannot take these inputs (``None`` when it can). A refusal of the
        inputs' dtype starts with ``"dtype "`` (``select_kernel`` then raises ``TypeError``)."""

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``out`` ``[b, sq, h, d]`` (in ``q.dtype``, or float32 for kernels that compute
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
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Partial gradients of one block given the *final* ``out``/``lse`` of each query row
        (``out`` may arrive in float32 when the kernel sets ``backward_in_float32``).

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
