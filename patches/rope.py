"""Rotary embeddings whose frequencies depend on the sequence a process sees.

Transformers' ``dynamic`` (NTK) and ``longrope`` rotary types pick their frequencies from
``max(position_ids) + 1`` inside the rotary module (``dynamic_rope_update``), i.e. from the
positions *this process* holds.

* ``dynamic`` rescales continuously with that length, so ranks (which hold different maxima)
  would rotate differently from each other and from one process: refused.
* ``longrope`` only switches between two factor sets at ``original_max_position_embeddings``.
  Each rank decides from its own largest position; that is exact whenever every rank reaches
  the same decision as the full sequence. Under the striped layout every rank holds one of the
  last P positions, so they disagree only when the sequence ends within P tokens past the
  threshold; the contiguous and zigzag layouts put the first chunk on rank 0, which then
  disagrees whenever the sequence crosses the threshold. Checked on every forward (all ranks
  reach the same verdict from the same arithmetic, so none is left waiting in the ring).

Static types (``default``, ``linear``, ``llama3``, ``yarn``, ...) depend on each position alone
and are exact.
"""

from __future__ import annotations

import torch

from hf_striped.core.layout import global_indices

LIMITATION = (
    "rope_type 'dynamic' is refused; 'longrope' is refused for a forward in which some rank would pick "
    "other factors than the full sequence (striped: only within P tokens past the switch)"
)


def _rope_entries(config) -> list[dict]:
    params = getattr(config, "rope_parameters", None) or {}
    if not isinstance(params, dict):
        return []
    if "rope_type" in params:
        return [params]
    return [p for p in params.values() if isinstance(p, dict) and "rope_type" in p]


def rope_types(config) -> set[str]:
    """Every ``rope_type`` in ``config.rope_parameters`` (flat, or one dict per layer type)."""
    return {p["rope_type"] for p in _rope_entries(config)}


def longrope_switches(config) -> list[int]:
    """``original_max_position_embeddings`` of every longrope entry (where its factors switch)."""
    out = []
    for p in _rope_entries(config):
        if p["rope_type"] == "longrope":
            limit = p.get("original_max_position_embeddings") or getattr(config, "original_max_position_embeddings", None)
            if limit is None:
                limit = getattr(config, "max_position_embeddings")
            out.append(int(limit))
    return out


def check(config) -> None:
    """Config-level check (first forward under a CP context)."""
    if "dynamic" in rope_types(config):
        raise NotImplementedError(
            f"hf_striped: rope_type 'dynamic' ({getattr(config, 'model_type', '?')}) rescales its rotary "
            "frequencies with the largest position id each process sees, so under context parallelism "
            "ranks would rotate differently from each other and from one process. Use a checkpoint with a "
            "static rope_type, or run without hf_striped.context_parallel."
        )


def check_forward(config, position_ids: torch.Tensor, *, layout: str, rank: int, world_size: int, seq_local: int,
                  documents=None) -> None:
    """Per-forward check for ``longrope``: every rank's factor choice (from its own largest
    position) must equal the full sequence's. ``position_ids`` must already have passed
    ``ContextParallelState.check_positions`` (one unbroken global run per row, same base on every
    rank, or the packed ``documents`` it found), so every rank computes the same verdict."""
    switches = longrope_switches(config)
    if not switches:
        return
    n = seq_local * world_size
    if documents is not None:  # positions restart per document: each rank's largest is known
        pl = documents.placement(layout, world_size, n)
        rank_lengths = [int(pl.document_positions(r, documents.bounds).max()) + 1 for r in range(world_size)]
        full_length = max(b - a for a, b in zip(documents.bounds, documents.bounds[1:]))
    else:
        pos = position_ids.reshape(-1, position_ids.shape[-1]).long()
        base = int((pos - global_indices(layout, rank, world_size, n, pos.device)).max())
        rank_lengths = [base + int(global_indices(layout, r, world_size, n).max()) + 1 for r in range(world_size)]
        full_length = base + n
    for switch in switches:
        long_wanted = full_length > switch
        wrong = [r for r, length in enumerate(rank_lengths) if (length > switch) != long_wanted]
        if wrong:
            raise NotImplementedError(
                f"hf_striped: rope_type 'longrope' switches factors at {switch} positions. This sequence ends at "
                f"position {full_length} (one process would use the {'long' if long_wanted else 'short'} factors), "
                f"but with the {layout!r} layout over {world_size} ranks, rank(s) {wrong} hold no position past "
                f"the switch and would use the other set. Use the 'striped' layout, or a sequence length not "
                f"within {world_size} tokens past the switch."
            )
