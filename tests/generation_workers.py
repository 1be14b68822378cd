"""Rank functions for tests/test_generation.py (run by the gloo pool of tests/dist_pool.py)."""

from __future__ import annotations

import torch
import torch.distributed as dist

import hf_striped
from models import load


def generate_cp(rank, world, path, prompt, kwargs, seed=0, dtype=torch.float32):
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
                local_tokens=cache.layers[0].local_length(), length=cache.length,
                layer_tokens=[layer.local_length() for layer in cache.layers])


def generate_each(rank, world, path, prompts, kwargs, *, timeout=60.0):
    """``generate_cp`` with a different prompt or settings per rank (``prompts[rank]``,
    ``kwargs[rank]``); returns ``("ok", sequences)`` or ``(exception type, message)``."""
    model = load(path, hf_striped.ATTN_IMPLEMENTATION).eval()
    try:
        with torch.no_grad(), hf_striped.context_parallel(dist.group.WORLD, timeout=timeout):
            out = model.generate(input_ids=prompts[rank], **kwargs[rank])
    except Exception as exc:  # noqa: BLE001 - reported to the test
        return type(exc).__name__, str(exc)
    return "ok", out


def generate_streamed(rank, world, path, prompt, kwargs):
    """Greedy generate with a streamer on rank 0 only; returns (sequences, streamed token ids)."""
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.tokens, self.ended = [], False

        def put(self, value):
            self.tokens.append(value.reshape(-1).tolist())

        def end(self):
            self.ended = True

    streamer = Collect() if rank == 0 else None
    model = load(path, hf_striped.ATTN_IMPLEMENTATION).eval()
    with torch.no_grad(), hf_striped.context_parallel(dist.group.WORLD):
        out = model.generate(input_ids=prompt, streamer=streamer, **kwargs)
    return out, (streamer.tokens, streamer.ended) if streamer else None


def decode_fault_worker(rank, world, port, victim, step, how, timeout, report_dir, path, prompt):
    """One process of a fresh gloo group: greedy generation where ``victim`` kills or stops
    itself when its first decoder layer runs decode step ``step``; reports what it raised."""
    import datetime
    import json
    import os
    import signal
    import time

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    model = load(path, hf_striped.ATTN_IMPLEMENTATION).eval()
    calls = []

    def fault(_module, args):
        calls.append(1)
        if rank == victim and len(calls) == step + 1:  # call 0 is the prefill
            os.kill(os.getpid(), signal.SIGKILL if how == "kill" else signal.SIGSTOP)

    model.model.layers[0].register_forward_pre_hook(fault)
    report = dict(raised=None)
    t0 = time.monotonic()
    try:
        with torch.no_grad(), hf_striped.context_parallel(dist.group.WORLD, timeout=timeout):
            model.generate(input_ids=prompt, max_new_tokens=step + 4, do_sample=False)
    except Exception as exc:  # noqa: BLE001 - reported to the test
        report = dict(raised=type(exc).__name__, message=str(exc))
    report["seconds"] = time.monotonic() - t0
    with open(os.path.join(report_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    os._exit(0)  # the process group cannot be torn down cleanly with a dead peer
