"""Rank functions for tests/test_generation.py (run by the gloo pool of tests/dist_pool.py)."""

from __future__ import annotations

import torch
import torch.distributed as dist

import hf_striped
from models import load


def generate_cp(rank, world, path, prompt, kwargs, *, seed=0, dtype=torch.float32, want_cache=False):
    """``model.generate`` inside a context over the whole world; returns the sequences, the
    per-step scores (with ``output_scores``) and this rank's cache bytes."""
    model = load(path, hf_striped.ATTN_IMPLEMENTATION, dtype).eval()
    torch.manual_seed(seed)
    cache = hf_striped.StripedCache(model.config, group=dist.group.WORLD)
    with torch.no_grad(), hf_striped.context_parallel(dist.group.WORLD):
        out = model.generate(input_ids=prompt, cache=cache, return_dict_in_generate=True, output_logits=True,
                             **kwargs)
    logits = torch.stack(out.logits, dim=1) if out.logits else None
    return dict(sequences=out.sequences, logits=logits, cache_bytes=cache.memory_bytes(),
                local_tokens=cache.layers[0].local_length(), length=cache.length)
