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
