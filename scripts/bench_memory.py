"""Memory benchmark: what context parallelism buys. A tiny Llama takes one training step
(forward + backward) with striped ring attention over P real processes (gloo on CPU), and every
rank records the peak of tensor bytes allocated during the step and alive at once (counted per
storage under a ``TorchDispatchMode``; parameters, allocated before the step, are excluded).

1. ``peak_bytes`` against P at a fixed total length: per-rank activation memory should fall
   as 1/P (``peak_x_P_over_P1`` stays near 1).
2. ``max_tokens_under_cap``: the longest sequence (doubling tokens per rank) whose step stays
   under a fixed per-rank memory cap, for each P: it should grow about P-fold.

    python scripts/bench_memory.py                  # P = 1, 2, 4: about a minute on 2 CPU cores
    python scripts/bench_memory.py --P 1 2 4 8 --seq-len 8192 --cap-mib 64

Rows go to ``benchmarks/results/memory.csv``.
"""

from __future__ import annotations

import argparse
import datetime
import os

import torch
import torch.distributed as dist

from hf_striped.core.guards import all_reduce, barrier

from bench_common import RESULTS, Recorder, add_llama_args, llama_config, shape_str, spawn_ranks


def _step_peak(model, n, group, layout, vocab) -> int:
    import hf_striped
    from hf_striped.tools.memory import LiveBytes

    g = torch.Generator().manual_seed(n)
    ids = torch.randint(3, vocab, (1, n), generator=g)
    pos = torch.arange(n).expand(1, -1)
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    lids, lpos, llab = (hf_striped.shard(t, dim=1, group=group, layout=layout) for t in (ids, pos, labels))
    model.zero_grad(set_to_none=True)
    with LiveBytes() as mem, hf_striped.context_parallel(group, layout=layout):
        logits = model(input_ids=lids, position_ids=lpos, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), llab.flatten(), ignore_index=-100,
                                                 reduction="sum")
        loss.backward()
        del logits, loss
    return mem.peak


def _worker(rank, world, port, args, queue):
    import hf_striped  # noqa: F401 - registers attn_implementation="striped_ring"
    from transformers import LlamaForCausalLM

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    group = dist.group.WORLD
    torch.manual_seed(0)
    cfg = llama_config(args, max(args.seq_len, args.max_tokens))
    cfg._attn_implementation = "striped_ring"
    model = LlamaForCausalLM(cfg).train()
    res = {"fixed": _step_peak(model, args.seq_len, group, args.layout, args.vocab), "cap": []}
    c = args.start_tokens
    cap = args.cap_mib * 2**20
    while world * c <= args.max_tokens:
        peak = torch.tensor([_step_peak(model, world * c, group, args.layout, args.vocab)], dtype=torch.float64)
        all_reduce(peak, what="the benchmark's peak memory", op="max")  # every rank takes the same decision
        res["cap"].append((world * c, int(peak)))
        if peak.item() > cap:
            break
        c *= 2
    queue.put((rank, res))
    barrier(what="the benchmark's end")
    dist.destroy_process_group()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--P", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--seq-len", type=int, default=4096, help="fixed global length for the memory-vs-P figure")
    ap.add_argument("--cap-mib", type=float, default=48.0, help="per-rank memory cap for the longest-sequence figure")
    ap.add_argument("--start-tokens", type=int, default=256, help="first tokens per rank tried under the cap")
    ap.add_argument("--max-tokens", type=int, default=16384, help="longest global length tried")
    ap.add_argument("--layout", default="striped")
    add_llama_args(ap, hidden=128, intermediate=256, layers=2, heads=2, kv_heads=1, vocab=256)
    ap.add_argument("--out", default=str(RESULTS / "memory.csv"))
    args = ap.parse_args(argv)
    rec = Recorder("memory", args.out)
    model = dict(layers=args.layers, hidden=args.hidden, h=args.heads, hk=args.kv_heads, vocab=args.vocab)
    print(f"# {rec.hardware} | {rec.versions}")
    base_peak = None
    for P in args.P:
        res = spawn_ranks(_worker, P, args)
        peak = max(r["fixed"] for r in res.values())
        base_peak = base_peak or (peak if P == 1 else None)
        s = shape_str(P=P, N=args.seq_len, c=args.seq_len // P, layout=args.layout, **model)
        rec.add(args.layout, s, "peak_bytes", peak)
        if base_peak:
            rec.add(args.layout, s, "peak_x_P_over_P1", peak * P / base_peak)
        trials = res[0]["cap"]
        fits = [n for n, b in trials if b <= args.cap_mib * 2**20]
        longest = max(fits) if fits else 0
        capped = bool(trials) and trials[-1][1] <= args.cap_mib * 2**20  # stopped by --max-tokens, not the cap
        rec.add(args.layout, shape_str(P=P, cap_mib=args.cap_mib, layout=args.layout, **model),
                "max_tokens_under_cap", longest)
        for n, b in trials:
            rec.add(args.layout, shape_str(P=P, N=n, c=n // P, layout=args.layout, **model), "peak_bytes_trial", b)
        print(f"P={P}: peak per rank at {args.seq_len} tokens {peak / 2**20:7.2f} MiB"
              + (f" (x P / P=1: {peak * P / base_peak:.2f})" if base_peak else "")
              + f"; longest under {args.cap_mib:g} MiB: {longest} tokens" + (" (search limit)" if capped else "")
              + "  trials " + ", ".join(f"{n}:{b / 2**20:.1f}" for n, b in trials), flush=True)
    print(f"# {len(rec.rows)} rows appended to {rec.write()}")


if __name__ == "__main__":
    main()
