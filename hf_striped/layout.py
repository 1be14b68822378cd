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
    source rank (local index slices), with a causal (top-left aligned) or full mask.

    ``count > 1`` makes it a *batched* call of ``count`` equal pieces: piece ``i`` is ``q`` and
    ``k`` both shifted by ``i * period`` rows; the schedule folds the pieces into the batch
    dimension (a view, no copy: pieces tile the local sequence, ``count * period == c``)."""

    q: slice
    k: slice
    causal: bool
    count: int = 1
    period: int = 0

    def pieces(self, c: int) -> list[tuple[slice, slice]]:
        """The ``(q, k)`` slices of every piece, as plain slices of ``range(c)``."""
        if self.count == 1:
            return [(self.q, self.k)]
        out = []
        for i in range(self.count):
            q0, q1, _ = self.q.indices(c)
            k0, k1, _ = self.k.indices(c)
            o = i * self.period
            out.append((slice(q0 + o, q1 + o), slice(k0 + o, k1 + o)))
        return out


_ALL = slice(None)


def _causal(c: int, strict: bool, split: int) -> list[Block]:
    """A causal (``j <= i``) or strictly causal (``j < i``) ``c x c`` block as kernel calls.

    With ``split`` = 0 (or a block too small to split) it is one causal call (strict: one row
    shifted, ``q[1:]`` against ``k[:-1]``). Otherwise it is halved recursively while the halves
    stay at least ``split`` long: at each level the lower-left quarter of every diagonal square
    is one *non-causal* piece (all those pieces are one batched call), and the diagonal squares
    that remain, ``L`` long each (``split <= L < 2 * split``), are one batched causal call. A
    kernel whose causal mode computes partly masked tiles in full (PyTorch's CPU flash op: kv
    tiles of 512) then wastes at most the upper half of ``L x L`` squares instead of a band
    of its tile's width along the whole diagonal (see ``scripts/bench_schedule.py``)."""
    calls = []
    n = c
    if split > 0:
        while n % 2 == 0 and n // 2 >= split:
            n //= 2  # level: squares of 2n split; rows [n, 2n) see keys [0, n) fully
            calls.append(Block(slice(n, 2 * n), slice(0, n), False, c // (2 * n), 2 * n))
    count, period = c // n, n
    if strict:
        if n > 1:
            calls.append(Block(slice(1, n), slice(0, n - 1), True, count, period))
    else:
        calls.append(Block(slice(0, n), slice(0, n), True, count, period))
    # a single piece is written with open slices (the unsplit form callers and tests know)
    return [
        Block(_open(b.q, c), _open(b.k, c), b.causal) if b.count == 1 else b for b in calls
    ]


def _open(s: slice, c: int) -> slice:
    start = None if s.start in (0, None) else s.start
    stop = None if s.stop in (c, None) else (s.stop - c if s.stop == c - 1 else s.stop)
    return slice(start, stop)


def blocks(
    layout: str, rank: int, source: int, world_size: int, c: int, causal: bool, *, split: int = 0
) -> list[Block]:
    """Kernel calls that compute exactly the visible part of the (rank, source) block.

    Queries on ``rank`` see keys from ``source`` per the global causal rule
    ``key_global <= query_global``; the returned sub-blocks cover exactly that set, each
    visible score once. ``split`` > 0 splits every causal block into non-causal pieces plus
    diagonal causal pieces at least ``split`` long (see :func:`_causal`); kernels name theirs
    in ``causal_split``. It changes which calls compute the scores, never the set.
    """
    if c == 0:
        return []
    if not causal:
        return [Block(_ALL, _ALL, False)]
    if source == rank:
        return _causal(c, False, split)
    if layout == "striped":
        # source < rank: key j visible to query i iff j <= i (plain causal);
        # source > rank: strictly causal (j < i), query 0 sees nothing.
        return _causal(c, source > rank, split)
    if layout == "contiguous":
        return [Block(_ALL, _ALL, False)] if source < rank else []
    check_layout(layout)
    h = c // 2  # zigzag
    if source < rank:  # both query chunks see the source's head chunk, neither sees its tail
        return [Block(_ALL, slice(None, h), False)]
    return [Block(slice(h, None), _ALL, False)]  # only our tail chunk sees the source, fully


def block_mask(
    layout: str, rank: int, source: int, world_size: int, c: int, causal: bool, *, split: int = 0
) -> torch.Tensor:
    """Dense ``[c, c]`` boolean visibility that :func:`blocks` computes (for tests and docs)."""
    mask = torch.zeros(c, c, dtype=torch.bool)
    for b in blocks(layout, rank, source, world_size, c, causal, split=split):
        for qs, ks in b.pieces(c):
            sub = mask[qs, ks]
            vis = torch.ones_like(sub)
            mask[qs, ks] = vis.tril() if b.causal else vis
    return mask
