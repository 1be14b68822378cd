"""How a full-length sequence is split over the P ranks of a context-parallel group, and which
part of each (query rank, key/value source rank) block is visible under causal attention.

Notation (DESIGN.md section 3): sequence length N = P * c, rank r holds c tokens.

* ``striped``: rank r holds global tokens r, r + P, r + 2P, ... (local j is global j * P + r).
* ``contiguous``: rank r holds [r * c, (r + 1) * c) (the original Ring Attention).
* ``zigzag``: 2P chunks of c / 2; rank r holds chunks r and 2P - 1 - r (Megatron "head-tail").

This module is pure index arithmetic: no communication, no process groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch

Layout = Literal["striped", "contiguous", "zigzag"]
LAYOUTS: tuple[str, ...] = get_args(Layout)


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")


def split_multiple(layout: str, world_size: int) -> int:
    """The sequence length must be a multiple of this for ``layout`` to split it over the ranks."""
    check_layout(layout)
    return 2 * world_size if layout == "zigzag" else world_size


def check_length(length: int, layout: str, world_size: int) -> int:
    """Return tokens per rank, or raise a ``ValueError`` that says what length to pad to."""
    m = split_multiple(layout, world_size)
    if length % m:
        padded = -(-length // m) * m
        unit = "2 * P" if layout == "zigzag" else "P"
        raise ValueError(
            f"sequence length {length} cannot be split by the {layout!r} layout over {world_size} ranks: "
            f"it must be a multiple of {unit} = {m}. Pad the sequence to {padded} tokens "
            f"(pad token ids, label -100) before sharding."
        )
    return length // world_size


def global_indices(layout: str, rank: int, world_size: int, length: int, device=None) -> torch.Tensor:
    """Global positions (in natural order) of the tokens ``rank`` holds, as a LongTensor ``[c]``."""
    c = check_length(length, layout, world_size)
    if layout == "striped":
        return torch.arange(c, device=device) * world_size + rank
    if layout == "contiguous":
        return torch.arange(c, device=device) + rank * c
    h = c // 2
    head = torch.arange(h, device=device) + rank * h
    tail = torch.arange(h, device=device) + (2 * world_size - 1 - rank) * h
    return torch.cat([head, tail])


def shard_local(x: torch.Tensor, dim: int, layout: str, rank: int, world_size: int) -> torch.Tensor:
    """This rank's part of a full-length tensor (a view where the layout allows it)."""
    dim = dim % x.dim()
    n = x.shape[dim]
    c = check_length(n, layout, world_size)
    if world_size == 1:
        return x
    if layout == "striped":
        return x.unflatten(dim, (c, world_size)).select(dim + 1, rank)
    if layout == "contiguous":
        return x.narrow(dim, rank * c, c)
    h = c // 2
    return torch.cat([x.narrow(dim, rank * h, h), x.narrow(dim, (2 * world_size - 1 - rank) * h, h)], dim=dim)


def unshard_local(parts: list[torch.Tensor], dim: int, layout: str) -> torch.Tensor:
    """Inverse of :func:`shard_local`: put every rank's part (in rank order) back in natural order."""
    check_layout(layout)
    world_size = len(parts)
    if world_size == 1:
        return parts[0]
    dim = dim % parts[0].dim()
    if layout == "striped":
        return torch.stack(parts, dim=dim + 1).flatten(dim, dim + 1)
    if layout == "contiguous":
        return torch.cat(parts, dim=dim)
    heads = [p.chunk(2, dim=dim)[0] for p in parts]
    tails = [p.chunk(2, dim=dim)[1] for p in parts]
    return torch.cat(heads + tails[::-1], dim=dim)


@dataclass(frozen=True)
class Block:
    """One kernel call of a ring step: queries ``q`` of this rank against keys ``k`` of the
    source rank (local index slices), with a causal (top-left aligned) or full mask."""

    q: slice
    k: slice
    causal: bool


_ALL = slice(None)


def blocks(layout: str, rank: int, source: int, world_size: int, c: int, causal: bool) -> list[Block]:
    """Kernel calls that compute exactly the visible part of the (rank, source) block.

    Queries on ``rank`` see keys from ``source`` per the global causal rule
    ``key_global <= query_global``; the returned sub-blocks cover exactly that set.
    """
    if c == 0:
        return []
    if not causal:
        return [Block(_ALL, _ALL, False)]
    if source == rank:
        return [Block(_ALL, _ALL, True)]
    if layout == "striped":
        if source < rank:  # key j visible to query i iff j <= i: plain causal
            return [Block(_ALL, _ALL, True)]
        # source > rank: strictly causal (j < i). Shift one row: queries 1.. against keys ..-1.
        return [Block(slice(1, None), slice(None, -1), True)] if c > 1 else []
    if layout == "contiguous":
        return [Block(_ALL, _ALL, False)] if source < rank else []
    check_layout(layout)
    h = c // 2  # zigzag
    if source < rank:  # both query chunks see the source's head chunk, neither sees its tail
        return [Block(_ALL, slice(None, h), False)]
    return [Block(slice(h, None), _ALL, False)]  # only our tail chunk sees the source, fully


def block_mask(layout: str, rank: int, source: int, world_size: int, c: int, causal: bool) -> torch.Tensor:
    """Dense ``[c, c]`` boolean visibility that :func:`blocks` computes (for tests and docs)."""
    mask = torch.zeros(c, c, dtype=torch.bool)
    for b in blocks(layout, rank, source, world_size, c, causal):
        sub = mask[b.q, b.k]
        vis = torch.ones_like(sub)
        mask[b.q, b.k] = vis.tril() if b.causal else vis
    return mask
