"""Packed documents: a padding-free row of several documents, where each rank holds which of its
tokens (the *placement*), and which part of every (query rank, key source) block is visible.

A packed row of N tokens holds documents ``[cu[i], cu[i + 1])`` (``cu_seqlens``, the same on every
rank); a query attends causally to the keys of its own document only.

**Runs.** Whatever the layout, each rank's tokens, in local order, are a few *runs*: ``length``
tokens of one document at global positions ``first, first + stride, ...`` (stride P for a striped
document, 1 for a contiguous piece), stored at local indices ``local, local + 1, ...``. Queries of
a run ``(a, t)`` on rank r see keys of a run ``(b, t)`` of the same document on rank s when
``b + t*j <= a + t*i``, i.e. ``i - j >= lo`` with ``lo = ceil((b - a) / t)``: the band rule of
sliding windows (``hf_striped.core.layout``) with no upper edge. So a (rank, source) block is
block-diagonal over documents, and each document's part is a *lower* shape, cut by
:func:`lower_calls` into at most three fused-kernel calls::

        keys ->                           lo = 1 (striped, source > rank):
      . . . . .                           row 0 sees nothing, then a causal
      x . . . .      causal square        square shifted one row down (its
      x x . . .      (rows 1..5)          last row sees every key); rows
      x x x . .                           past it see every key too (one
      x x x x .                           full call)
      x x x x x
      x x x x x      full row

An empty part is skipped, and a window (``window`` tokens, Transformers' convention) adds an
upper edge ``hi = floor((window - 1 - (a - b)) / t)``, handled as for sliding windows.

**Placements.** The plain layouts keep their token positions and split their runs at document
boundaries. The ``striped`` layout with documents places them (:func:`document_placement`): some
documents are split, each cut head and tail over q evenly spaced ranks ``a, a + P/q, ...`` (q a
divisor of P): 2q contiguous chunks, the i-th of those ranks holding chunks i and 2q - 1 - i, so
each has the same share of its causal work and, unlike striping it, a diagonal only once, which
matters on kernels that skip masked keys in whole tiles. q is as small as keeps a rank's share of
the document under a target: every rank a document is split over pays a per-row and per-key cost
at each ring step it sees it, so fewer ranks mean fewer, larger calls; evenly spaced ranks see
each other at the same ring steps, so its work stays aligned across ranks step by step. The
other documents are placed whole on one rank, largest work first onto the least loaded rank (its
split work counted); those that fit nowhere whole fill the remaining room (contiguous pieces on
neighbouring ranks, or head and tail over those ranks). A whole document sees only itself, so
its call may run at any ring step, on the rank's own K/V (:attr:`Placement.run_steps`,
:func:`deferred_blocks`): each goes to the step it lengthens least, filling the room the split
documents leave (a ring step lasts as long as its slowest rank).

Which documents to split, and the target, are decided by building the placement for each
candidate (every document longer than a rank's share, plus the k largest others, k <= 3P; targets
:data:`_SPLIT_TARGETS`) and keeping the one whose modelled critical path is shortest: per ring
step the slowest rank's calls, each costing a fixed part, a part per query row and per key, and
its scores (causal calls rounded to the CPU op's key tiles), summed over steps; the best few
candidates are also rebalanced (moves and swaps of one or two documents between the most loaded
rank and another) and compared again. Each rank keeps its split tokens first, so only the local
prefix ``[0, travel)`` is ever seen by another rank: ring messages carry only it, and whole
documents need no ring step at all. Every rank holds exactly N / P tokens; no document is padded.
"""

from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass

import torch

from .layout import Block, _band, check_layout, split_multiple


@dataclass(frozen=True)
class Run:
    """``length`` tokens of document ``doc`` at global positions ``first + stride * i``, stored
    at local indices ``local + i`` of their rank."""

    local: int
    length: int
    first: int
    stride: int
    doc: int


@dataclass(frozen=True)
class Placement:
    """Which global tokens each of ``world_size`` ranks holds, ``c`` each, as runs per rank.
    Only local tokens ``[0, travel)`` are ever attended to from another rank."""

    world_size: int
    c: int
    runs: tuple[tuple[Run, ...], ...]
    travel: int
    run_steps: tuple[tuple[int, ...], ...] = ()
    """Per rank and run, the ring step at which the run's own (diagonal) calls are computed, on
    the local K/V; empty: all at step 0. Only whole documents' runs (which see nothing but
    themselves) are ever later: they fill the steps where the split documents leave room."""

    def __hash__(self) -> int:
        # computed once: placements key the block caches looked up at every ring step of every layer
        cached = self.__dict__.get("_hash")
        if cached is None:
            cached = hash((self.world_size, self.c, self.runs, self.travel, self.run_steps))
            object.__setattr__(self, "_hash", cached)
        return cached

    def indices(self, rank: int, device=None) -> torch.Tensor:
        """Global positions of ``rank``'s local tokens, in local order (LongTensor ``[c]``)."""
        parts = [torch.arange(r.length, device=device) * r.stride + r.first for r in self.runs[rank]]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)

    def document_positions(self, rank: int, bounds: tuple[int, ...], device=None) -> torch.Tensor:
        """Each of ``rank``'s local tokens' position inside its document (what a packed row's
        ``position_ids`` hold there), for the document ``bounds`` this placement was made for."""
        g = self.indices(rank, device)
        starts = torch.tensor(bounds[:-1], device=device)
        return g - starts[torch.searchsorted(starts, g, right=True) - 1]

    def order(self, device=None) -> torch.Tensor:
        """All ranks' :meth:`indices`, in rank order: the permutation a gather of every rank's
        part applies to the natural order (its inverse puts the gather back in order)."""
        return torch.cat([self.indices(r, device) for r in range(self.world_size)])


def check_cu_seqlens(cu_seqlens, n: int) -> tuple[int, ...]:
    """The document boundaries ``cu_seqlens`` (an integer 1-d tensor or sequence) of a packed row
    of ``n`` tokens, validated, as a tuple of ints. Raises ``ValueError`` saying what to fix."""
    if torch.is_tensor(cu_seqlens):
        if cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point() or cu_seqlens.is_complex():
            raise ValueError(
                f"cu_seqlens must be a 1-d integer tensor [0, l1, l1 + l2, ..., N] of the packed row's document "
                f"boundaries; got a {cu_seqlens.dim()}-d {cu_seqlens.dtype} tensor"
            )
        bounds = tuple(int(x) for x in cu_seqlens.tolist())
    else:
        bounds = tuple(int(x) for x in cu_seqlens)
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != n:
        got = f"{list(bounds[:3])}...{list(bounds[-2:])}" if len(bounds) > 5 else str(list(bounds))
        raise ValueError(
            f"cu_seqlens must run from 0 to the packed row's length {n} (padding included: pad the row and add the "
            f"padding as its own last document); got {got}"
        )
    bad = next((i for i in range(1, len(bounds)) if bounds[i] <= bounds[i - 1]), None)
    if bad is not None:
        raise ValueError(
            f"cu_seqlens must strictly increase (every document has at least one token); entries {bad - 1} and "
            f"{bad} are {bounds[bad - 1]} and {bounds[bad]}"
        )
    return bounds


def _split_at_docs(local: int, length: int, first: int, stride: int, bounds: tuple[int, ...]) -> list[Run]:
    """The run ``first + stride * i`` (``i < length``, at ``local``) cut where documents change."""
    out, i = [], 0
    while i < length:
        g = first + stride * i
        d = _doc_of(bounds, g)
        end = bounds[d + 1]  # first global position of the next document
        take = min(length - i, -(-(end - g) // stride))
        out.append(Run(local + i, take, g, stride, d))
        i += take
    return out


def _doc_of(bounds: tuple[int, ...], g: int) -> int:
    return bisect.bisect_right(bounds, g) - 1


@functools.lru_cache(maxsize=16)
def plain_placement(layout: str, world_size: int, n: int, bounds: tuple[int, ...] | None) -> Placement:
    """The ``layout``'s own token positions (``hf_striped.core.layout``), its runs cut at the
    document ``bounds`` (``None``: one document)."""
    from .layout import _runs

    check_layout(layout)
    bounds = bounds or (0, n)
    c = n // world_size
    runs = tuple(
        tuple(r for ls, le, a, t in _runs(layout, rank, world_size, c) for r in _split_at_docs(ls, le - ls, a, t, bounds))
        for rank in range(world_size)
    )
    return Placement(world_size, c, runs, c)


def _work(length: int) -> int:
    """Causal attention work of a document, in scores."""
    return length * (length + 1) // 2


CALL_SCORES = 9000
"""What one kernel call costs beyond its scores, in scores (PyTorch's CPU flash op with the
ring's merge and gradient accumulation), with :data:`ROW_SCORES`, :data:`KEY_SCORES` and
:data:`CAUSAL_TILE`: the placement's cost model, fitted by ``scripts/fit_packed_cost.py`` (one
call's ``forward_step`` + ``backward_step`` into received partial sums, as the ring makes them,
over a grid of full and causal shapes; one thread, rms error about 6%, on an Intel Xeon at
about 29 ns per score). The per-row and per-key costs are memory traffic and vary by host."""
ROW_SCORES = 75
"""What each query row of a call costs beyond its scores (merging its output, adding its dq)."""
KEY_SCORES = 40
"""What each key of a call costs beyond its scores (adding its dk and dv)."""
CAUSAL_TILE = 512
"""Keys per tile the CPU op's causal mode skips whole: a causal call of L tokens costs about
``L * (L + min(L, CAUSAL_TILE)) / 2`` scores (shorter calls compute their masked part too)."""


def _call_cost(m: int, n: int, causal: bool) -> float:
    """Modelled cost of one kernel call of ``m`` queries and ``n`` keys, in scores."""
    scores = m * (m + min(m, CAUSAL_TILE)) / 2 if causal else m * n
    return CALL_SCORES + ROW_SCORES * m + KEY_SCORES * n + scores


def _calls_cost(calls: list[Block]) -> float:
    return sum(_call_cost(b.q.stop - b.q.start, b.k.stop - b.k.start, b.causal) for b in calls)


def _whole_cost(length: int) -> float:
    """Modelled cost of a document attended to whole, in one causal call."""
    return _call_cost(length, length, True)


def _split_step_cost(length: int, world_size: int) -> float:
    """Rough modelled cost, per rank and ring step, of a document split in 2P chunks (head-tail):
    about half of an (L / P)^2 block in one call (used only to rank candidates cheaply)."""
    share = length / world_size
    return CALL_SCORES + (ROW_SCORES + KEY_SCORES) * 0.75 * share + share * share / 2


def _head_tail_steps(sizes: list[int]) -> list[list[float]]:
    """Modelled cost ``[rank][step]`` of the calls :func:`placement_blocks` makes for one document
    cut head and tail over the ranks, rank r holding ``sizes[r]`` of its tokens (head the larger
    half; at ring step s rank r sees source (r - s) mod P). A rank's head and tail see the head
    of a source before it (one call), its tail sees a later source's head and tail (one call);
    on the diagonal, two causal squares and a full call, or one causal call if cheaper."""
    P = len(sizes)
    head = [-(-x // 2) for x in sizes]
    out = [[0.0] * P for _ in range(P)]
    for r in range(P):
        h, t = head[r], sizes[r] - head[r]
        if h:
            apart = _call_cost(h, h, True) + (_call_cost(t, h, False) + _call_cost(t, t, True) if t else 0.0)
            out[r][0] = min(apart, _call_cost(h + t, h + t, True)) if t else apart
        for s in range(1, P):
            q = (r - s) % P
            if q < r and head[q] and sizes[r]:
                out[r][s] = _call_cost(sizes[r], head[q], False)
            elif q > r and t and sizes[q]:
                out[r][s] = _call_cost(t, sizes[q], False)
    return out


def _contiguous_steps(sizes: list[int]) -> list[list[float]]:
    """As :func:`_head_tail_steps`, for a document laid in rank order as contiguous pieces: a
    rank's piece sees every earlier rank's piece whole, and its own causally."""
    P = len(sizes)
    out = [[0.0] * P for _ in range(P)]
    for r in range(P):
        if sizes[r]:
            out[r][0] = _call_cost(sizes[r], sizes[r], True)
            for q in range(r):
                if sizes[q]:
                    out[r][r - q] = _call_cost(sizes[r], sizes[q], False)
    return out


_PLACEMENT_BUDGET = 6000
"""Documents packed in all (bounds the candidates :func:`document_placement` builds: every one of
up to 3P + 1 for rows of up to a few hundred documents, at least two for rows of thousands)."""


def _split_candidates(lengths: list[int], costs: list[float], P: int, c: int) -> list[list[int]]:
    """The sets of documents to split that :func:`document_placement` builds and compares: those
    longer than a rank's share plus the ``k`` largest others, for every ``k <= 3P`` (for long rows
    only the ``k`` a rough model ranks best: whole documents spread evenly, but no rank less than
    the largest of them, plus P steps of every split document's per-step part)."""
    order = sorted(range(len(lengths)), key=lambda d: (-lengths[d], d))
    forced = [d for d in order if lengths[d] > c]
    rest = [d for d in order if lengths[d] <= c]
    top = min(len(rest), 3 * P)
    keep = max(2, min(top + 1, _PLACEMENT_BUDGET // max(1, len(lengths))))
    if keep < top + 1:
        per_step = sum(_split_step_cost(lengths[d], P) for d in forced)
        whole = sum(costs[d] for d in rest)
        rough = []
        for k in range(top + 1):
            largest = costs[rest[k]] if k < len(rest) else 0.0
            rough.append((max(whole / P, largest) + P * per_step, k))
            if k < len(rest):
                per_step += _split_step_cost(lengths[rest[k]], P)
                whole -= costs[rest[k]]
        ks = sorted(k for _, k in sorted(rough)[:keep])
    else:
        ks = list(range(top + 1))
    return [forced + rest[:k] for k in ks]


def _place_head_tail(d: int, first: int, sizes: list[int], runs, used: list[int]) -> None:
    """Document ``d`` (global start ``first``) cut into 2P contiguous chunks, rank r holding
    chunks r and 2P - 1 - r, ``sizes[r]`` tokens in all (head the larger half), stored at the end
    of its local tokens: head, then tail."""
    P = len(runs)
    chunk = [0] * (2 * P)
    for r in range(P):
        chunk[r], chunk[2 * P - 1 - r] = -(-sizes[r] // 2), sizes[r] // 2
    start = first
    for i, size in enumerate(chunk):
        r = i if i < P else 2 * P - 1 - i
        if size:
            runs[r].append(Run(used[r], size, start, 1, d))
            used[r] += size
        start += size


def document_placement(world_size: int, n: int, bounds: tuple[int, ...]) -> Placement:
    """The ``striped`` layout's placement of packed documents (module docstring): for every
    candidate set of documents to split (:func:`_split_candidates`) and every target of
    :data:`_SPLIT_TARGETS`, those are split head and tail over evenly spaced ranks
    (:func:`_split_part`), the others go whole onto one rank balanced by work, and what fits
    nowhere whole fills the remaining room (contiguously, or head and tail over the ranks it
    covers); whole documents get the ring steps they lengthen least (:func:`_schedule_whole`),
    and the placement whose modelled critical path (sum over ring steps of the slowest rank's
    modelled calls) is shortest wins. Every candidate is packed largest first; the
    :data:`_REFINED` best are then rebalanced (:func:`_rebalance`) and compared again."""
    P, c = world_size, n // world_size
    lengths = [bounds[i + 1] - bounds[i] for i in range(len(bounds) - 1)]
    costs = [_whole_cost(length) for length in lengths]
    budget = sum(costs) / P  # a rank's share of the row's modelled work
    tried = []  # (modelled path, candidate index, split part, packing, placement)
    for i, (split, target) in enumerate((s, budget * x) for s in _split_candidates(lengths, costs, P, c)
                                        for x in _SPLIT_TARGETS):
        split_part = _split_part(split, lengths, costs, P, c, target)
        if split_part is None:
            continue
        packed = _pack_whole(lengths, costs, set(split), [c - x for x in split_part[1]], P,
                             [sum(row) for row in split_part[2]])
        cost, recipe = _place_rest(packed, split_part, lengths)
        tried.append((cost, i, split_part, packed, recipe))
    tried.sort(key=lambda t: t[:2])
    best_cost, best = tried[0][0], tried[0][4]
    for _, _, split_part, (whole, load, free, spill), _ in tried[:_REFINED]:
        whole, load, free = [list(x) for x in whole], list(load), list(free)
        _rebalance(whole, load, free, lengths, costs)  # moves within the room: the same spill
        cost, recipe = _place_rest((whole, load, free, spill), split_part, lengths)
        if cost < best_cost:
            best_cost, best = cost, recipe
    return _build(best, lengths, bounds, P, c)


_REFINED = 3
"""Candidate placements :func:`document_placement` rebalances (the best after packing)."""
_SPLIT_TARGETS = (0.0, 1.0, 0.5)
"""Per-rank work a split document aims at, as fractions of a rank's share of the row: a document
is split over as few neighbouring ranks as give each at most that much (:func:`_split_part`);
0: over every rank."""


def _split_part(split: list[int], lengths, costs, P: int, c: int, target: float):
    """Documents ``split`` cut head and tail over ``q`` ranks each, ``q`` the smallest divisor of
    P (at least 2) that gives each rank at most ``target`` of modelled work (0: all P ranks), the
    ranks ``a, a + P/q, a + 2P/q, ...``. Fewer ranks mean fewer, larger calls: each rank pays a
    per-row merge and per-key gradient cost at every step it sees the document, about the same
    whatever ``q``, so the row's total falls with ``q``. Evenly spaced ranks see each other at
    the same ring steps (multiples of P/q), so the document's work stays aligned from rank to
    rank, step by step, as the ring's steps (each as long as its slowest rank) want; the steps
    between are left to the whole documents (:func:`_schedule_whole`). Largest first, each goes
    to the coset whose modelled load is least and that has room. Returns (each document's
    tokens per rank, tokens per rank, modelled cost ``[rank][step]``), or ``None`` when a
    document finds no room (the earlier ones, on few ranks, filled those it needs)."""
    used, load = [0] * P, [0.0] * P
    split_path = [[0.0] * P for _ in range(P)]  # [rank][step]
    sizes_of = {}
    divisors = [q for q in range(2, P + 1) if P % q == 0]
    for d in sorted(split, key=lambda d: (-costs[d], d)):
        need = -(-int(costs[d]) // max(1, int(target))) if target else P
        best = None
        for q in [q for q in divisors if q >= need][:1] + ([P] if need < P else []):
            stride, most = P // q, 2 * -(-lengths[d] // (2 * q))  # no rank gets more than `most`
            for a in range(stride):
                ranks = range(a, P, stride)
                if q < P and any(used[r] + most > c for r in ranks):
                    continue
                table = _subset_steps(lengths[d], P, a, q)
                worst = max(load[r] + table[P][r] for r in ranks)
                if best is None or worst < best[0]:
                    best = (worst, ranks, table)
            if best is not None:
                sizes = _subset_sizes(lengths[d], list(best[1]), used, P)
                if any(used[r] + sizes[r] > c for r in best[1]):  # only at q = P, checked exactly here
                    best = None
                else:
                    break
        if best is None:  # earlier documents split over few ranks filled those it needs
            return None
        table = best[2]
        sizes_of[d] = sizes
        for r in range(P):
            used[r] += sizes[r]
            load[r] += table[P][r]
            for st in range(P):
                split_path[r][st] += table[r][st]
    return sizes_of, used, split_path


@functools.lru_cache(maxsize=4096)
def _subset_steps(length: int, world_size: int, first: int, q: int) -> tuple[tuple[float, ...], ...]:
    """:func:`_head_tail_steps` of a document of ``length`` tokens split over the ``q`` ranks
    ``first, first + P/q, ...`` (uneven tokens priced as if no rank held any yet: a token or two
    per rank, so one table serves every candidate), with each rank's total as row ``P``."""
    ranks = list(range(first, world_size, world_size // q))
    table = _head_tail_steps(_subset_sizes(length, ranks, [0] * world_size, world_size))
    return (*map(tuple, table), tuple(map(sum, table)))


def _subset_sizes(length: int, ranks: list[int], used: list[int], P: int) -> list[int]:
    """Each rank's share of a document cut head and tail over ``ranks`` (0 elsewhere): equal,
    the tokens an uneven cut leaves over going to those holding the fewest tokens so far."""
    q = len(ranks)
    base, extra = divmod(length, 2 * q)
    sizes = [0] * P
    for r in ranks:
        sizes[r] = 2 * base
    for _ in range(2):  # at most two extra tokens per rank, one per chunk
        for r in sorted(ranks, key=lambda r: (used[r] + sizes[r], r))[:extra]:
            sizes[r] += 1
            extra -= 1
    return sizes


def _place_rest(packed, split_part, lengths) -> tuple[float, tuple]:
    """The modelled critical path of one candidate, and what :func:`_build` needs to lay it
    out: its split documents (``split_part``: each one's tokens per rank, token counts and
    modelled cost per rank and step), the whole documents (``packed``: per rank, with their load
    and the room left), and the documents that fit nowhere whole filled into the room left,
    contiguously or head and tail, whichever the model prefers; the whole documents' calls are
    then given ring steps (:func:`_schedule_whole`)."""
    sizes_of, used0, split_path = split_part
    whole, load, free, spill = packed
    P = len(used0)
    costs = [[_whole_cost(lengths[d]) for d in whole[r]] for r in range(P)]
    pieces = _spill_sizes(spill, lengths, list(free), P)
    best = None
    for head_tail in (False, True) if spill else (False,):
        steps = _head_tail_steps if head_tail else _contiguous_steps
        fixed = [list(row) for row in split_path]
        for table in (steps(x) for x in pieces):
            for r in range(P):
                for s in range(P):
                    fixed[r][s] += table[r][s]
        ring = any(used0) or any(sum(x) for x in pieces)
        cost, when = _schedule_whole(fixed, costs, ring=ring)
        if best is None or cost < best[0]:
            best = (cost, (sizes_of, whole, spill, pieces, head_tail, when))
    return best


def _build(recipe, lengths, bounds, P: int, c: int) -> Placement:
    """The :class:`Placement` :func:`_place_rest` priced: split documents first on every rank (by
    document), then the spilled ones, then the whole ones with their ring steps."""
    sizes_of, whole, spill, pieces, head_tail, when = recipe
    runs: list[list[Run]] = [[] for _ in range(P)]
    used = [0] * P
    for d in sorted(sizes_of):
        _place_head_tail(d, bounds[d], sizes_of[d], runs, used)
    for d, sizes in zip(spill, pieces):
        if head_tail:
            _place_head_tail(d, bounds[d], sizes, runs, used)
            continue
        g = bounds[d]
        for r in range(P):
            if sizes[r]:
                runs[r].append(Run(used[r], sizes[r], g, 1, d))
                used[r] += sizes[r]
                g += sizes[r]
    travel = max(used)
    run_steps = [[0] * len(runs[r]) for r in range(P)]
    for r in range(P):
        for d, step in zip(whole[r], when[r]):
            runs[r].append(Run(used[r], lengths[d], bounds[d], 1, d))
            run_steps[r].append(step)
            used[r] += lengths[d]
    later = tuple(map(tuple, run_steps)) if any(map(any, run_steps)) else ()
    return Placement(P, c, tuple(tuple(x) for x in runs), travel, later)


def _schedule_whole(fixed: list[list[float]], costs: list[list[float]], ring: bool):
    """Give each whole document's call a ring step: it needs no other rank's K/V, so any step
    will do, and the step lasts as long as its slowest rank. ``fixed[r][s]``: the modelled work
    rank r has at step s anyway (split and spilled documents); ``costs[r]``: its whole documents'.
    Largest first (over all ranks), each goes to the step it raises least, else the one where its
    rank has least. Without a ring (``ring=False``: no rank sees another's tokens) there is one
    step. Returns (modelled critical path: the steps' maxima summed, each document's step)."""
    P = len(fixed)
    if not ring:
        return max(fixed[r][0] + sum(costs[r]) for r in range(P)), [[0] * len(x) for x in costs]
    height = [list(row) for row in fixed]
    level = [max(height[r][s] for r in range(P)) for s in range(P)]
    when = [[0] * len(x) for x in costs]
    for w, r, i in sorted(((w, r, i) for r in range(P) for i, w in enumerate(costs[r])), reverse=True):
        s = min(range(P), key=lambda s: (max(level[s], height[r][s] + w) - level[s], height[r][s], s))
        height[r][s] += w
        level[s] = max(level[s], height[r][s])
        when[r][i] = s
    return sum(level), when


def _pack_whole(lengths: list[int], costs: list[float], striped: set[int], free: list[int], P: int,
                load: list[float]):
    """Largest first onto the least loaded rank with room (``free``, updated), each rank's
    modelled load starting from ``load`` (its split documents'): returns the documents each rank
    holds whole, each rank's modelled load, the room left, and the documents that fit on no rank
    (to be spilled), in order."""
    load = list(load)
    whole: list[list[int]] = [[] for _ in range(P)]
    spill = []
    for d in sorted((d for d in range(len(lengths)) if d not in striped), key=lambda d: (-lengths[d], d)):
        length = lengths[d]
        fits = (r for r in range(P) if free[r] >= length)
        r = min(fits, key=lambda r: (load[r], -free[r], r), default=None)
        if r is None:
            spill.append(d)
            continue
        whole[r].append(d)
        load[r] += costs[d]
        free[r] -= length
    return whole, load, free, sorted(spill)


def _rebalance(whole: list[list[int]], load: list[float], free: list[int], lengths: list[int],
               costs: list[float]) -> None:
    """Lower the most loaded rank's whole-document work by moving one or two of its documents to
    another rank, or swapping them for one or two smaller ones there, while the room allows and it
    helps (the room left stays what the spilled documents fill, so token counts stay exact).
    Bounded: a few rounds over the largest documents of the top rank and the smallest of the
    others (pairs among the first :data:`_PAIR_WIDTH` of each)."""
    P = len(load)
    for _ in range(4 * P):
        top = max(range(P), key=load.__getitem__)
        mine = _groups(sorted(whole[top], key=costs.__getitem__, reverse=True), costs, lengths)[1:]
        best = None  # (new max of the two ranks, documents given, other rank, documents taken back)
        for r in range(P):
            if r == top:
                continue
            theirs = _groups(sorted(whole[r], key=costs.__getitem__), costs, lengths)
            for give, wd, ld in mine:
                for take, we, le in theirs:
                    if we >= wd or free[r] + le < ld or free[top] + ld < le:
                        continue
                    after = max(load[top] - wd + we, load[r] + wd - we)
                    if after < load[top] - 1e-9 and (best is None or after < best[0]):
                        best = (after, give, r, take)
        if best is None:
            return
        _, give, r, take = best
        for d in give:
            _move(whole, load, free, lengths, costs, d, top, r)
        for e in take:
            _move(whole, load, free, lengths, costs, e, r, top)


def _groups(docs: list[int], costs, lengths) -> list[tuple[tuple[int, ...], float, int]]:
    """Nothing, each of the first :data:`_REBALANCE_WIDTH` documents, and each pair of the first
    :data:`_PAIR_WIDTH`, with their cost and tokens."""
    out = [((), 0.0, 0)] + [((d,), costs[d], lengths[d]) for d in docs[:_REBALANCE_WIDTH]]
    head = docs[:_PAIR_WIDTH]
    for i, d in enumerate(head):
        out += [((d, e), costs[d] + costs[e], lengths[d] + lengths[e]) for e in head[i + 1:]]
    return out


_REBALANCE_WIDTH = 16
"""Documents per rank :func:`_rebalance` considers (bounds its work on rows of thousands)."""
_PAIR_WIDTH = 6
"""Documents per rank whose pairs :func:`_rebalance` considers."""


def _move(whole, load, free, lengths, costs, d: int, src: int, dst: int) -> None:
    whole[src].remove(d)
    whole[dst].append(d)
    load[src] -= costs[d]
    load[dst] += costs[d]
    free[src] += lengths[d]
    free[dst] -= lengths[d]


def _spill_sizes(spill: list[int], lengths, free: list[int], P: int) -> list[list[int]]:
    """Each document that fits on no rank whole, laid into the ranks' remaining room (``free``,
    used up) in rank order, a document continuing on the next rank with room: its tokens per
    rank (:func:`_build` lays them as contiguous pieces, or head and tail over those ranks)."""
    rank, out = 0, []
    for d in spill:
        left, sizes = lengths[d], [0] * P
        while left:
            while free[rank] == 0:
                rank += 1
            take = min(left, free[rank])
            sizes[rank] = take
            free[rank] -= take
            left -= take
        out.append(sizes)
    return out


@functools.lru_cache(maxsize=16)
def placement(layout: str, world_size: int, n: int, bounds: tuple[int, ...] | None) -> Placement:
    """Where each rank's tokens of a row of ``n`` tokens with document ``bounds`` lie (``None``:
    no documents). Only ``striped`` with documents places them differently from the layout."""
    m = split_multiple(layout, world_size)
    if n % m:
        raise ValueError(
            f"a packed row of {n} tokens cannot be split by the {layout!r} layout over {world_size} ranks: pad it "
            f"to {-(-n // m) * m} tokens (the padding forms its own last document: pad ids, label -100)"
        )
    if places_documents(layout, world_size, bounds):
        return document_placement(world_size, n, bounds)
    return plain_placement(layout, world_size, n, bounds)


def places_documents(layout: str, world_size: int, bounds: tuple[int, ...] | None) -> bool:
    """Whether the layout puts a packed row's tokens elsewhere than without documents."""
    return layout == "striped" and bounds is not None and len(bounds) > 2 and world_size > 1


def shard_placed(x: torch.Tensor, dim: int, layout: str, rank: int, world_size: int,
                 bounds: tuple[int, ...]) -> torch.Tensor:
    """``rank``'s part of ``x`` (length N along ``dim``) under the document placement."""
    pl = placement(layout, world_size, x.shape[dim], bounds)
    return x.index_select(dim, pl.indices(rank, x.device))


def unshard_placed(parts: list[torch.Tensor], dim: int, layout: str, bounds: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`shard_placed`: every rank's part (in rank order) back in natural order."""
    cat = torch.cat(parts, dim=dim)
    pl = placement(layout, len(parts), cat.shape[dim], bounds)
    order = pl.order(cat.device)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return cat.index_select(dim, inverse)


def lower_calls(q0: int, k0: int, m: int, n: int, lo: int) -> list[Block]:
    """Kernel calls for rows ``[q0, q0 + m)`` against keys ``[k0, k0 + n)`` where row i sees key
    j iff ``j <= i - lo`` (call-local indices): a full call for keys every seeing row sees, a
    causal square (as far as its keys reach: a document's own diagonal is one causal call), and a
    full call for the rows past it, which see every key; empty ones are left out."""
    start = min(m, max(0, lo))  # rows before it see nothing
    every = min(m, max(start, n + lo))  # rows from here on see every key past the causal square
    left = max(0, -lo)  # keys every row from `start` on sees
    calls = []
    if every > start:
        if left:
            calls.append(Block(slice(q0 + start, q0 + every), slice(k0, k0 + min(left, n)), False))
        if left < n:
            size = every - start
            calls.append(Block(slice(q0 + start, q0 + every), slice(k0 + left, k0 + left + size), True))
    if m > every:
        calls.append(Block(slice(q0 + every, q0 + m), slice(k0, k0 + n), False))
    return calls


def placement_blocks(pl: Placement, rank: int, source: int, causal: bool, window: int | None = None) -> list[Block]:
    """Kernel calls that compute the visible part of the (``rank``, ``source``) block of placement
    ``pl`` at its ring step, ``(rank - source) mod P`` (the diagonal leaves out the whole documents
    computed at a later step, :func:`deferred_blocks`): every pair of runs of one document (module
    docstring), with two full calls that share their queries (keys) and have adjacent keys
    (queries) made one; on the diagonal a document's runs that lie one after another in local and
    global order may be one causal call instead, where the cost model says that is cheaper."""
    queries = pl.runs[rank]
    if rank == source and pl.run_steps:
        queries = [run for run, step in zip(queries, pl.run_steps[rank]) if step == 0]
    return _pair_calls(queries, pl.runs[source], rank == source, causal, window)


def deferred_blocks(pl: Placement, rank: int, step: int, causal: bool, window: int | None = None) -> list[Block]:
    """The calls ``rank`` makes at ring ``step`` (>= 1) on its *own* K/V: the whole documents
    :attr:`Placement.run_steps` puts there (each sees only itself)."""
    if not pl.run_steps or step == 0:
        return []
    runs = [run for run, s in zip(pl.runs[rank], pl.run_steps[rank]) if s == step]
    return _pair_calls(runs, runs, True, causal, window)


def visible_blocks(pl: Placement, rank: int, source: int, causal: bool, window: int | None = None) -> list[Block]:
    """Every call of the (``rank``, ``source``) block, whatever step computes it: what
    :func:`placement_blocks` makes, plus on the diagonal the deferred whole documents'."""
    calls = placement_blocks(pl, rank, source, causal, window)
    if rank == source:
        for step in range(1, pl.world_size):
            calls += deferred_blocks(pl, rank, step, causal, window)
    return calls


def _pair_calls(queries, key_runs, diagonal: bool, causal: bool, window: int | None) -> list[Block]:
    """The calls of query runs ``queries`` against key runs ``key_runs`` (see
    :func:`placement_blocks`; ``diagonal``: both are one rank's own)."""
    keys: dict[int, list[Run]] = {}
    for kr in key_runs:
        keys.setdefault(kr.doc, []).append(kr)
    whole = _diagonal_calls(queries) if diagonal and causal and window is None else {}
    merged = set(whole)
    calls: list[Block] = []
    for qr in queries:
        if qr.doc in merged:
            calls.extend(whole.pop(qr.doc, ()))  # the document's one call, at its first run
            continue
        for kr in keys.get(qr.doc, ()):
            if not causal:
                q, k = slice(qr.local, qr.local + qr.length), slice(kr.local, kr.local + kr.length)
                _add(calls, Block(q, k, False))
                continue
            t, delta = qr.stride, qr.first - kr.first
            lo = -(delta // t)  # ceil(-delta / t)
            hi = None if window is None else (window - 1 - delta) // t
            if hi is None or hi >= qr.length - 1:  # the window cuts nothing: i - j <= m - 1 always
                for b in lower_calls(qr.local, kr.local, qr.length, kr.length, lo):
                    _add(calls, b)
            else:
                calls.extend(_band(qr.local, kr.local, qr.length, kr.length, lo, hi))
    return calls


def _add(calls: list[Block], b: Block) -> None:
    """Append full call ``b``, or widen the last call to cover it when both are full calls with
    the same queries and adjacent keys, or the same keys and adjacent queries (one document's
    calls only: other documents' runs never share a query or key slice with them)."""
    last = calls[-1] if calls else None
    if last is not None and not b.causal and not last.causal and b.band is None and last.band is None:
        if last.q == b.q and last.k.stop == b.k.start:
            calls[-1] = Block(last.q, slice(last.k.start, b.k.stop), False)
            return
        if last.k == b.k and last.q.stop == b.q.start:
            calls[-1] = Block(slice(last.q.start, b.q.stop), last.k, False)
            return
    calls.append(b)


def _diagonal_calls(runs) -> dict[int, list[Block]]:
    """For the diagonal block (a rank's own keys, causal, no window): the documents with more
    than one run here whose runs follow each other in local and in global order, for which one
    causal call over them costs less than their pairwise calls (cost model). Those documents'
    calls: the single causal call."""
    by_doc: dict[int, list[Run]] = {}
    for r in runs:
        by_doc.setdefault(r.doc, []).append(r)
    out = {}
    for d, rs in by_doc.items():
        if len(rs) < 2 or any(
            b.local != a.local + a.length or b.first <= a.first + a.stride * (a.length - 1)
            for a, b in zip(rs, rs[1:])
        ):
            continue
        size = rs[-1].local + rs[-1].length - rs[0].local
        pairwise = []
        for qr in rs:
            for kr in rs:
                lo = -((qr.first - kr.first) // qr.stride)
                pairwise += lower_calls(qr.local, kr.local, qr.length, kr.length, lo)
        if _call_cost(size, size, True) < _calls_cost(pairwise):
            span = slice(rs[0].local, rs[0].local + size)
            out[d] = [Block(span, span, True)]
    return out
