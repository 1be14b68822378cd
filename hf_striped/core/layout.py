"""How a full-length sequence is split over the P ranks of a context-parallel group, and which
part of each (query rank, key/value source rank) block is visible under causal attention.

Notation (docs/design.md section 2): sequence length N = P * c, rank r holds c tokens.

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
    if length < m:
        raise ValueError(
            f"a sequence of {length} tokens is shorter than the {layout!r} layout needs over {world_size} ranks, "
            f"so some rank would get no tokens: pad the sequence to {m} tokens (pad token ids, label -100) "
            "before sharding, or build batches with hf_striped.StripingCollator / ContextParallel.collator(), "
            "which pads short rows itself."
        )
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
    dimension (a view, no copy: pieces tile the local sequence, ``count * period == c``).

    ``band = (lo, hi)`` (sliding windows) replaces the causal/full mask: query i of the call
    sees key j of the call iff ``lo <= i - j <= hi``. Only band-capable kernels take it."""

    q: slice
    k: slice
    causal: bool
    count: int = 1
    period: int = 0
    band: tuple[int, int] | None = None

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


def _runs(layout: str, rank: int, world_size: int, c: int) -> list[tuple[int, int, int, int]]:
    """``(local start, local stop, first global index, stride)`` of the arithmetic runs of
    global positions that ``rank`` holds (one run; two for zigzag)."""
    if layout == "striped":
        return [(0, c, rank, world_size)]
    if layout == "contiguous":
        return [(0, c, rank * c, 1)]
    h = c // 2
    return [(0, h, rank * h, 1), (h, c, (2 * world_size - 1 - rank) * h, 1)]


BAND_ROWS = 128
"""Rows per call when a band is cut into row chunks (bounds the reference kernel's work at
about ``c * BAND_ROWS`` scores per block)."""


def _call(q0: int, k0: int, m: int, n: int, lo: int, hi: int) -> list[Block]:
    """One call for rows ``[q0, q0 + m)`` against keys ``[k0, k0 + n)`` where row i sees key j
    iff ``lo <= i - j <= hi`` (call-local): trimmed to the rows and keys it touches, then a full
    call, a causal call, or (otherwise) a band call; nothing if empty."""
    lo, hi = max(lo, -(n - 1)), min(hi, m - 1)
    if lo > hi:
        return []
    r0, r1 = max(lo, 0), min(hi + n - 1, m - 1) + 1
    c0, c1 = max(-hi, 0), min(m - 1 - lo, n - 1) + 1
    m, n, lo, hi = r1 - r0, c1 - c0, lo - r0 + c0, hi - r0 + c0
    q, k = slice(q0 + r0, q0 + r1), slice(k0 + c0, k0 + c1)
    if lo <= -(n - 1) and hi >= m - 1:
        return [Block(q, k, False)]
    if m == n and lo == 0 and hi >= m - 1:
        return [Block(q, k, True)]
    return [Block(q, k, False, band=(lo, hi))]


def _band(q0: int, k0: int, m: int, n: int, lo: int, hi: int) -> list[Block]:
    """:func:`_call`'s set as calls of at most :data:`BAND_ROWS` rows. A band narrower than
    that is one band call per row chunk. A wider one has each row chunk ``[i0, i1)`` cut where
    its keys change kind: keys ``[i0 - hi, i1 - 1 - hi)`` form a triangle (a band call),
    ``[i1 - 1 - hi, i0 - lo]`` are seen by every row of the chunk (a full call, on the fused
    kernel) and ``(i0 - lo, i1 - 1 - lo]`` form a strictly causal triangle (a causal call once
    trimmed); only the first triangle needs a band-capable kernel. (Measured on the CPU at 1k
    tokens per rank: fewer, larger calls win for narrow bands, the fused kernel for wide ones.)"""
    calls = []
    narrow = hi - lo + 1 < BAND_ROWS
    for i0 in range(0, m, BAND_ROWS):
        i1 = min(i0 + BAND_ROWS, m)
        if narrow:
            calls += _call(q0 + i0, k0, i1 - i0, n, lo - i0, hi - i0)
            continue
        cuts = sorted({min(max(x, 0), n) for x in (i0 - hi, i1 - 1 - hi, i0 - lo + 1, i1 - lo)})
        for c0, c1 in zip(cuts, cuts[1:]):
            calls += _call(q0 + i0, k0 + c0, i1 - i0, c1 - c0, lo - i0 + c0, hi - i0 + c0)
    return calls


def _windowed(layout: str, rank: int, source: int, world_size: int, c: int, window: int, split: int) -> list[Block]:
    """:func:`blocks` for causal attention within a sliding window of ``window`` tokens (query at
    global position g sees keys at g - window < g' <= g, Transformers' convention).

    For a run of queries (global ``a + t*i``) against a run of keys (``b + t*j``), the visible
    set is a band of local diagonals ``lo <= i - j <= hi`` with ``lo = ceil((b - a) / t)``
    and ``hi = floor((window - 1 - (a - b)) / t)``. An empty band is skipped (no kernel call
    for a block wholly outside the window), a plain or strictly causal one over the whole local
    sequence is exactly what the causal path computes; any other is cut by :func:`_band`."""
    calls = []
    for qs, qe, a, t in _runs(layout, rank, world_size, c):
        for ks, ke, b, _ in _runs(layout, source, world_size, c):
            m, n, delta = qe - qs, ke - ks, a - b
            if not m or not n:
                continue
            lo = -(delta // t)  # == ceil(-delta / t)
            hi = (window - 1 - delta) // t
            if m == n == c and lo in (0, 1) and hi >= c - 1:
                calls.extend(_causal(c, lo == 1, split))
            else:
                calls.extend(_band(qs, ks, m, n, lo, hi))
    return calls


def blocks(
    layout: str, rank: int, source: int, world_size: int, c: int, causal: bool, *, split: int = 0,
    window: int | None = None,
) -> list[Block]:
    """Kernel calls that compute exactly the visible part of the (rank, source) block.

    Queries on ``rank`` see keys from ``source`` per the global causal rule
    ``key_global <= query_global``; the returned sub-blocks cover exactly that set, each
    visible score once. ``split`` > 0 splits every causal block into non-causal pieces plus
    diagonal causal pieces at least ``split`` long (see :func:`_causal`); kernels name theirs
    in ``causal_split``. It changes which calls compute the scores, never the set.
    ``window``: causal attention within a sliding window of that many tokens (see
    :func:`_windowed`); ``None`` or a window of at least the sequence length is plain causal.
    """
    if c == 0:
        return []
    if not causal:
        if window is not None:
            raise ValueError("a sliding window needs causal attention")
        return [Block(_ALL, _ALL, False)]
    if window is not None and window < c * world_size:
        if window < 1:
            raise ValueError(f"window must be at least 1 token, got {window}")
        check_layout(layout)
        return _windowed(layout, rank, source, world_size, c, window, split)
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
    layout: str, rank: int, source: int, world_size: int, c: int, causal: bool, *, split: int = 0,
    window: int | None = None,
) -> torch.Tensor:
    """Dense ``[c, c]`` boolean visibility that :func:`blocks` computes (for tests and docs)."""
    mask = torch.zeros(c, c, dtype=torch.bool)
    for b in blocks(layout, rank, source, world_size, c, causal, split=split, window=window):
        for qs, ks in b.pieces(c):
            sub = mask[qs, ks]
            vis = torch.ones_like(sub)
            if b.band is not None:
                d = torch.arange(sub.shape[0])[:, None] - torch.arange(sub.shape[1])[None, :]
                vis = (d >= b.band[0]) & (d <= b.band[1])
            mask[qs, ks] = vis.tril() if b.causal else vis
    return mask
