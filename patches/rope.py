"""Rotary embeddings whose frequencies depend on the sequence a process sees.

Transformers' ``dynamic`` (NTK) and ``longrope`` rotary types choose their frequencies from
``max(position_ids) + 1`` inside the rotary module (``dynamic_rope_update``). Under context
parallelism each rank holds a different subset of positions, so ranks can pick different
frequencies from each other and from a single process (with the contiguous layout rank 0 sees
only the first chunk). Static types (``default``, ``linear``, ``llama3``, ``yarn``, ...) depend on
each position alone and are exact. Refused rather than patched: fixing it would mean replacing
the rotary module's forward.
"""

from __future__ import annotations

LENGTH_DEPENDENT = ("dynamic", "longrope")
LIMITATION = "rope_type 'dynamic' and 'longrope' are refused (their frequencies depend on the positions each rank sees)"


def rope_types(config) -> set[str]:
    """Every ``rope_type`` in ``config.rope_parameters`` (flat, or one dict per layer type)."""
    params = getattr(config, "rope_parameters", None) or {}
    if not isinstance(params, dict):
        return set()
    if "rope_type" in params:
        return {params["rope_type"]}
    return {p["rope_type"] for p in params.values() if isinstance(p, dict) and "rope_type" in p}


def check(config) -> None:
    bad = sorted(rope_types(config) & set(LENGTH_DEPENDENT))
    if bad:
        raise NotImplementedError(
            f"hf_striped: rope_type {bad[0]!r} ({getattr(config, 'model_type', '?')}) chooses its rotary "
            "frequencies from the largest position id each process sees, so under context parallelism "
            "ranks would rotate differently from each other and from one process. Use a checkpoint with a "
            "static rope_type, or run without hf_striped.context_parallel."
        )
