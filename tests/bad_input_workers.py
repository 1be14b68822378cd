"""Functions run on every rank of a gloo pool by tests/test_bad_input.py (module-level so they
pickle). Each returns ``(exception type name, message)`` or ``None``, so a test can check that
every rank raised, and the pool stays healthy for the next test."""

from __future__ import annotations

import torch
import torch.distributed as dist

import hf_striped
from hf_striped.training.parallel import ContextParallel


def _caught(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the test checks the type
        return type(exc).__name__, str(exc)
    return None


def cp_size_case(rank, world, cp_size):
    return _caught(lambda: ContextParallel(cp_size))


def different_batches_case(rank, world):
    """Both ranks of one CP group collate a different global batch."""
    cp = ContextParallel(world)
    rows = [{"input_ids": list(range(3, 3 + 10 + rank))}]
    batch = cp.collator(pad_token_id=0)(rows)
    return _caught(lambda: cp.check_batch(batch))


def missing_position_ids_case(rank, world, model_dir):
    """The model's forward inside context_parallel without position_ids."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="striped_ring")
    ids = hf_striped.shard(torch.arange(3, 3 + 8 * world)[None], dim=1, group=dist.group.WORLD)

    def run():
        with torch.no_grad(), hf_striped.context_parallel(dist.group.WORLD):
            model(input_ids=ids, use_cache=False)

    return _caught(run)


def packed_case(rank, world, model_dir, what):
    """A tiny Llama on one packed row inside context_parallel, with one kind of bad input:
    ``"positions"`` (rank 1's positions restart elsewhere than rank 0's say), ``"too_long"`` (a
    document longer than max_position_embeddings), ``"cu_order"`` / ``"cu_cover"`` (boundaries that
    do not increase / do not cover the row, given to every rank), ``"cu_differ"`` (ranks given
    different boundaries)."""
    import time

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="striped_ring")
    group = dist.group.WORLD
    n = 16 * world
    lengths = [5, 11, n - 16] if what != "too_long" else [n - 2, 2]
    if what == "too_long":
        model.config.max_position_embeddings = n - 4
    cu = torch.tensor([0, lengths[0], lengths[0] + lengths[1], n], dtype=torch.int32)
    pos = torch.cat([torch.arange(x) for x in lengths])[None]
    kwargs = {}
    if what == "cu_order":
        kwargs["cu_seq_lens_q"] = torch.tensor([0, 9, 5, n], dtype=torch.int32)
    elif what == "cu_cover":
        kwargs["cu_seq_lens_q"] = torch.tensor([0, 5, n - 1], dtype=torch.int32)
    elif what == "cu_differ":
        kwargs["cu_seq_lens_q"] = cu if rank == 0 else torch.tensor([0, 6, 16, n], dtype=torch.int32)
    local = hf_striped.shard(pos, dim=1, group=group)
    if what == "positions" and rank == 1:
        local = local.clone()
        local[0, 3] = 0  # a restart rank 0's positions know nothing of
    ids = hf_striped.shard(torch.arange(3, 3 + n)[None] % 100, dim=1, group=group)
    t0 = time.monotonic()
    with hf_striped.context_parallel(group, timeout=60):
        got = _caught(lambda: model(input_ids=ids, position_ids=local, use_cache=False, **kwargs))
    return got, time.monotonic() - t0
