"""What a forward's ``position_ids`` say, checked across the CP group: one unbroken run of global
positions per row, or a packed row of documents (positions restarting at 0 per document).

Each rank holds only its shard of the positions, so nothing is decided from one rank alone:

* ``cu_seq_lens_q`` given (Transformers' ``FlashAttentionKwargs``, as ``DataCollatorWithFlattening``
  and hf_striped's collator make them): the global document boundaries. Every rank checks that its
  positions are what those documents put there (under the layout's document placement) and the
  ranks agree on a checksum of the boundaries: one agreement, no gather.
* not given: the layout's own token positions. A rank sees whether its positions are one run
  (``base + global index``); the agreement tells every rank whether any rank saw a restart. If
  one did, the row is packed: the positions are gathered (one more collective, ``N`` integers),
  and every rank reads the same boundaries from the same global positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.documents import check_cu_seqlens, placement, plain_placement
from ..core.guards import Verdict, agree, all_gather
from ..core.layout import global_indices, unshard_local
from ..core.ring import bounds_checksum

_SUMMARY = ("positions: broken run", "positions: base checksum", "positions: base square sum",
            "positions: max base", "positions: min base")
_HOW = "Build them with hf_striped.shard(torch.arange(N).expand(batch, -1), dim=1, group=group, layout=layout)"
_NOT_PASSED = "either they were not passed (the model then numbers local tokens 0..c-1), or they were sharded with another layout"


def _neither(layout: str) -> str:
    return (f"position_ids inside hf_striped.context_parallel must be each rank's shard, in the {layout!r} layout, of "
            "one unbroken run of global positions per row (base + 0, 1, ..., N - 1) or, for one packed row of "
            f"documents, of positions restarting at 0 per document. Got positions that are neither: {_NOT_PASSED}. "
            f"{_HOW}; for a packed row, shard DataCollatorWithFlattening's position_ids the same way.")


@dataclass(frozen=True)
class Documents:
    """The packed documents of a forward: global boundaries, and whether the tokens lie where
    the layout's document placement puts them (``placed``) or at the layout's own positions."""

    bounds: tuple[int, ...]
    placed: bool

    def placement(self, layout: str, world_size: int, n: int):
        return placement(layout, world_size, n, self.bounds) if self.placed else \
            plain_placement(layout, world_size, n, self.bounds)


@dataclass
class PositionCheck:
    """One forward's check on one rank: ``pos`` ``[rows, c]`` (1 or ``batch`` rows)."""

    layout: str
    rank: int
    world_size: int
    group: object
    timeout: float

    def fields(self, pos: torch.Tensor | None, batch: int, c: int, bounds: tuple[int, ...] | None) -> dict[str, int]:
        """The integers this rank contributes (nothing here raises: a rank that raised alone
        would leave its peers waiting in the agreement). ``pos`` is ``None`` for a wrong shape."""
        given = bounds is not None
        out = {"positions: wrong shape": int(pos is None), "documents given": int(given),
               "positions: document boundaries": bounds_checksum(bounds)}
        if pos is None:
            return {**out, "positions: differ from the documents": 0, **dict.fromkeys(_SUMMARY, 0)}
        if given:
            pl = placement(self.layout, self.world_size, c * self.world_size, bounds)
            expected = pl.document_positions(self.rank, bounds, pos.device)
            wrong = int(pos.shape[0] != 1 or not torch.equal(pos[0].long(), expected))
            return {**out, "positions: differ from the documents": wrong, **dict.fromkeys(_SUMMARY, 0)}
        offset = pos.expand(batch, -1).long() - global_indices(self.layout, self.rank, self.world_size,
                                                               c * self.world_size, pos.device)
        base = offset[:, 0]
        rows = torch.arange(1, batch + 1, device=base.device)
        # Bases must match row for row on every rank: compare checksums of them (computed where
        # the positions live; only these numbers travel).
        summary = torch.stack([(offset != base[:, None]).any().long(), (base * rows).sum(), (base * base).sum(),
                               base.max(), base.min()]).tolist()
        return {**out, "positions: differ from the documents": 0, **dict(zip(_SUMMARY, summary))}

    def judge(self, verdict: Verdict, position_ids, pos, batch: int, c: int,
              bounds: tuple[int, ...] | None) -> Documents | None:
        """The forward's documents (``None``: one unbroken run per row), or the error every rank
        raises alike."""
        if verdict.hi["positions: wrong shape"]:
            raise ValueError(
                f"position_ids must be [batch or 1, tokens on this rank]; got {tuple(position_ids.shape)} on this rank "
                f"(batch {batch}, {c} tokens) or a wrong shape on another rank of the CP group. {_HOW}."
            )
        if not (verdict.same("documents given") and verdict.same("positions: document boundaries")):
            raise ValueError(
                "the ranks of the CP group were given different document boundaries (cu_seq_lens_q), or some were "
                "given none: pass every rank the same global boundaries of the packed row (the collator of "
                "hf_striped.ContextParallel does)"
            )
        if bounds is not None:
            if verdict.hi["positions: differ from the documents"]:
                raise ValueError(
                    "position_ids do not match the documents of cu_seq_lens_q: inside hf_striped.context_parallel "
                    "a packed row (batch 1) needs every rank's shard, sharded with the same cu_seqlens "
                    "(hf_striped.shard(x, dim=1, group=group, layout=layout, cu_seqlens=cu)), of positions that "
                    "restart at 0 at every document boundary"
                )
            return Documents(bounds, placed=True)
        if not verdict.hi[_SUMMARY[0]]:
            if any(not verdict.same(f) for f in _SUMMARY[1:]):
                raise ValueError(_neither(self.layout))
            return None
        return Documents(self._gathered_bounds(pos, batch, c), placed=False)

    def _gathered_bounds(self, pos: torch.Tensor, batch: int, c: int) -> tuple[int, ...]:
        """Boundaries read from every rank's positions (one all-gather; same result everywhere)."""
        if batch != 1:
            raise ValueError(
                f"position_ids restart inside the rows of a batch of {batch}: {_NOT_PASSED}, or the rows hold packed "
                "documents, which must be one row (the padding-free format: DataCollatorWithFlattening makes it). "
                f"{_HOW}."
            )
        parts = all_gather(pos[0].long(), self.group, timeout=self.timeout,
                           what="hf_striped's gather of a packed row's position_ids (to find its documents)")
        parts = [p.cpu() for p in parts]
        if all(torch.equal(p, torch.arange(c)) for p in parts):
            # what a model does when given no positions; a row of P documents of exactly c tokens
            # each, one per rank, looks the same: such a row must come with cu_seq_lens_q
            raise ValueError(_neither(self.layout) + " (A packed row of one document per rank must come with "
                             "cu_seq_lens_q.)")
        full = unshard_local(parts, 0, self.layout)
        starts = (full == 0).nonzero().flatten().tolist()
        prev = torch.cat([full[:1] - 1, full[:-1]])
        if not starts or starts[0] != 0 or not bool(((full == prev + 1) | (full == 0)).all()):
            raise ValueError(_neither(self.layout))
        return check_cu_seqlens(starts + [full.numel()], full.numel())


def local_positions(position_ids: torch.Tensor, batch: int, c: int, layout: str, rank: int,
                    world_size: int) -> torch.Tensor | None:
    """``position_ids`` as ``[rows, c]`` (1 or ``batch`` rows), or ``None`` when its shape is wrong
    for the layout (e.g. an odd token count, which zigzag cannot hold)."""
    pos = position_ids.reshape(-1, position_ids.shape[-1])
    if pos.shape[-1] != c or pos.shape[0] not in (1, batch):
        return None
    try:
        global_indices(layout, rank, world_size, c * world_size, pos.device)
    except ValueError:
        return None
    return pos


def run_check(check: PositionCheck, position_ids: torch.Tensor, batch: int, c: int, cu_seqlens, *,
              fields: dict[str, int], error: BaseException | None, peer_error, judge) -> Documents | None:
    """The whole per-forward check (module docstring): one agreement carrying ``fields``,
    ``error`` and ``peer_error`` too (see ``hf_striped.core.guards.agree``); ``judge(verdict)``
    sees the verdict first."""
    bounds = None
    if cu_seqlens is not None:
        try:
            bounds = check_cu_seqlens(cu_seqlens, c * check.world_size)
        except ValueError as exc:
            error = error or exc
    pos = local_positions(position_ids, batch, c, check.layout, check.rank, check.world_size)
    mine = check.fields(pos, batch, c, bounds)
    verdict = agree(check.group, {**fields, **mine}, timeout=check.timeout, error=error, peer_error=peer_error,
                    what="hf_striped's position_ids check (the first collective of every forward inside "
                         "context_parallel)")
    if judge is not None:
        judge(verdict)
    return check.judge(verdict, position_ids, pos, batch, c, bounds)
