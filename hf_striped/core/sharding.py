"""Split full-length tensors into this rank's part and put parts back in natural order."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .guards import all_gather, all_reduce
from .documents import check_cu_seqlens, places_documents, shard_placed, unshard_placed
from .layout import check_layout, shard_local, unshard_local
from .options import resolve_timeout
from .ring import group_rank_size


class _AllGather(torch.autograd.Function):
    """All-gather along a new leading dim, hand-written so its gradient is known to be exact
    (tested against one process: gradients through ``torch.distributed.nn.functional.all_gather``
    came back wrong for some GQA-shaped tensors on gloo): the gradient of our part is the sum,
    over ranks, of what each rank's copy of the result sent back to it."""

    @staticmethod
    def forward(ctx, x, group, timeout):
        parts = all_gather(x, group, what="hf_striped.unshard's all-gather", timeout=timeout)
        ctx.group, ctx.rank, ctx.timeout = group, dist.get_rank(group), timeout
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        all_reduce(grad, ctx.group, what="the gradient of hf_striped.unshard's all-gather", timeout=ctx.timeout)
        return grad[ctx.rank], None, None


def shard(x: torch.Tensor, *, dim: int, group: dist.ProcessGroup | None = None, layout: str = "striped",
          cu_seqlens=None) -> torch.Tensor:
    """This rank's part of the full-length tensor ``x`` along ``dim``.

    For ``"striped"`` and ``"contiguous"`` the result is a view of ``x``. The length along
    ``dim`` must be a multiple of P (2P for ``"zigzag"``); otherwise a ``ValueError`` says what
    length to pad to. ``cu_seqlens``: the boundaries of the packed documents of the row (see
    :func:`hf_striped.ring_attention`); with them ``"striped"`` places short documents whole on
    one rank, and the result is a copy.
    """
    rank, world = group_rank_size(group)
    bounds = _bounds(cu_seqlens, x.shape[dim % x.dim()])
    if places_documents(layout, world, bounds):
        return shard_placed(x, dim % x.dim(), layout, rank, world, bounds)
    return shard_local(x, dim, layout, rank, world)


def unshard(x: torch.Tensor, *, dim: int, group: dist.ProcessGroup | None = None, layout: str = "striped",
            timeout: float | None = None, cu_seqlens=None) -> torch.Tensor:
    """The full tensor in natural order, on every rank, from each rank's part ``x``.

    Differentiable: the gradient flowing into the result on every rank is summed back onto
    the parts it came from. ``timeout``: seconds to wait for the peers (as in
    :class:`hf_striped.RingOptions`) before raising ``RingCommError``. ``cu_seqlens``: as
    given to :func:`shard`.
    """
    check_layout(layout)
    rank, world = group_rank_size(group)
    if world == 1:
        return x
    dim = dim % x.dim()
    bounds = _bounds(cu_seqlens, x.shape[dim] * world)
    parts = list(_AllGather.apply(x, group, resolve_timeout(timeout)).unbind(0))
    if places_documents(layout, world, bounds):
        return unshard_placed(parts, dim, layout, bounds)
    return unshard_local(parts, dim, layout)


def _bounds(cu_seqlens, n: int) -> tuple[int, ...] | None:
    return None if cu_seqlens is None else check_cu_seqlens(cu_seqlens, n)
