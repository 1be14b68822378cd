"""Generation benchmark: long prompts with a KV cache sharded over P processes against one process.

A small random Llama generates ``--new-tokens`` greedy tokens after random prompts of
``--prompt-lens`` tokens, two ways, alternating at every prompt length:

* ``one_process``: plain Transformers on one process (sdpa, a DynamicCache);
* ``striped_cp{P}``: ``model.generate()`` on P gloo processes inside
  ``hf_striped.context_parallel`` (striped prefill, decoding on a StripedCache).

Every process runs ``--threads`` CPU threads (default 1): one core stands for one device, so
``striped_cp2`` uses twice the compute of ``one_process``, as P GPUs would (and on a small shared
machine, OpenMP threads oversubscribing the cores distort timings far more than the work does).

Measured per prompt length: the prefill time (``generate()`` start to its first new token), the
median per-token decode latency (between consecutive new tokens), the KV-cache bytes each rank
holds (``StripedCache.memory_bytes()``; one process: its DynamicCache's keys and values), the
collectives per decoded token (calls of ``hf_striped.core.guards`` collectives between the first
and the last new token, counted in every benchmark process; expected: one all-gather per layer)
and whether the CP tokens equal one process's. Ratios to ``one_process`` are rows too.

    python scripts/bench_generate.py                 # 4k-32k-token prompts, P = 2, 3 repeats: about 1.5 minutes on 2 cores
    python scripts/bench_generate.py --P 2 4 --prompt-lens 8192
    python scripts/bench_generate.py --quick         # seconds: the smoke test

Rows go to ``benchmarks/results/generate.csv``.
"""

from __future__ import annotations

import argparse
import datetime
import time
from collections import Counter

import torch
import torch.distributed as dist

from bench_common import RESULTS, Recorder, add_llama_args, llama_config, median, shape_str, spawn_ranks

COUNTED = ("all_gather", "all_reduce", "agree", "barrier", "reduce_host")


def _count_collectives() -> Counter:
    """Wrap hf_striped's collective helpers (what the generation code calls) with a counter."""
    from hf_striped.core import guards

    counts: Counter = Counter()
    for name in COUNTED:
        fn = getattr(guards, name)

        def wrapped(*a, _fn=fn, _name=name, **k):
            counts[_name] += 1
            return _fn(*a, **k)

        setattr(guards, name, wrapped)
    return counts


class Stamps:
    """A streamer that timestamps every new token and snapshots the collective counts at the
    first and the last one (generate() hands it the prompt first)."""

    def __init__(self, counts: Counter):
        self.counts, self.times, self.snaps, self.seen_prompt = counts, [], [], False

    def put(self, value):
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        self.times.append(time.perf_counter())
        self.snaps.append(Counter(self.counts))

    def end(self):
        pass


def _kv_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers
               for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if t is not None)


def _generate(model, ids, new_tokens, counts, cache=None, group=None):
    """(new token ids, prefill s, per-token decode latencies, collectives between the first and last
    new token, cache bytes of this process)."""
    import hf_striped

    stamps = Stamps(counts)
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                  do_sample=False, streamer=stamps, return_dict_in_generate=True, pad_token_id=0)
    t0 = time.perf_counter()
    with torch.no_grad():
        if group is None:
            out = model.generate(**kwargs)
            nbytes = _kv_bytes(out.cache)
        else:
            with hf_striped.context_parallel(group):
                out = model.generate(cache=cache, **kwargs)
            nbytes = cache.memory_bytes()
    steps = [b - a for a, b in zip(stamps.times, stamps.times[1:])]
    coll = stamps.snaps[-1] - stamps.snaps[0]
    return out.sequences[0, ids.shape[1]:].tolist(), stamps.times[0] - t0, steps, dict(coll), nbytes


def _worker(rank, world, port, args, queue):
    import hf_striped
    from hf_striped.core import guards
    from transformers import LlamaForCausalLM

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=1800))
    counts = _count_collectives()
    groups = {P: (dist.group.WORLD if P == world else dist.new_group(list(range(P)))) for P in args.P}
    cfg = llama_config(args, max(args.prompt_lens) + args.new_tokens)
    torch.manual_seed(0)
    cfg._attn_implementation = "sdpa"
    one = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger-than-init weights: attention far from uniform, logits far from ties
        for p in one.parameters():
            p.mul_(3.0)
    cfg._attn_implementation = hf_striped.ATTN_IMPLEMENTATION
    cp = LlamaForCausalLM(cfg).eval()
    cp.load_state_dict(one.state_dict())
    for m in (one, cp):
        m.generation_config.eos_token_id = None  # always --new-tokens tokens

    def run_one(ids):
        if rank == 0:
            torch.set_num_threads(args.threads)
            res = _generate(one, ids, args.new_tokens, counts)
        guards.barrier(what="the one-process run", timeout=1800)
        return res if rank == 0 else None

    def run_cp(ids, P):
        res = None
        if rank < P:
            torch.set_num_threads(args.threads)
            cache = hf_striped.StripedCache(cp.config, group=groups[P])
            res = _generate(cp, ids, args.new_tokens, counts, cache=cache, group=groups[P])
        guards.barrier(what="the context-parallel run", timeout=1800)
        return res

    warm = torch.randint(3, args.vocab, (1, 64), generator=torch.Generator().manual_seed(1))
    run_one(warm)
    for P in args.P:
        run_cp(warm, P)
    results = []
    for i, n in enumerate(args.prompt_lens):
        ids = torch.randint(3, args.vocab, (1, n), generator=torch.Generator().manual_seed(n))
        for rep in range(args.repeats):
            order = [("one_process", None)] + [(f"striped_cp{P}", P) for P in args.P]
            if (i + rep) % 2:
                order.reverse()  # alternate which variant runs first
            for variant, P in order:
                res = run_one(ids) if P is None else run_cp(ids, P)
                if res is not None:
                    results.append(dict(variant=variant, P=P or 1, n=n, rep=rep, rank=rank,
                                        threads=torch.get_num_threads(), tokens=res[0], prefill_s=res[1],
                                        steps=res[2], coll=res[3], cache_bytes=res[4]))
                if rank == 0:
                    print(f"[bench_generate] {variant} prompt {n}: prefill {res[1]:.2f} s" if res else "", flush=True)
    queue.put((rank, results))
    guards.barrier(what="the benchmark's end", timeout=1800)
    dist.destroy_process_group()


def record(rows: list[dict], rec: Recorder, args) -> list[str]:
    """CSV rows (medians over repeats) and the printed table's lines."""
    layers = args.layers
    by = {}
    for r in rows:
        by.setdefault((r["variant"], r["n"]), []).append(r)
    lines = [f"{'variant':>14} {'prompt':>7} {'prefill s':>10} {'x one':>6} {'decode ms/tok':>14} {'x one':>6} "
             f"{'KV MiB/rank':>12} {'x one':>6} {'coll/tok':>9} {'match':>6}"]
    summary = {}
    for (variant, n), rs in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][0] != "one_process", kv[0][0])):
        P = rs[0]["P"]
        shape = shape_str(N=n, P=P, new=args.new_tokens, layers=layers, hidden=args.hidden, h=args.heads,
                          hk=args.kv_heads, vocab=args.vocab, threads=rs[0]["threads"])
        prefill = median([r["prefill_s"] for r in rs if r["rank"] == 0])
        decode = median([s for r in rs if r["rank"] == 0 for s in r["steps"]]) * 1000
        per_rank = {}
        for r in rs:
            per_rank.setdefault(r["rank"], r["cache_bytes"])
        kv = max(per_rank.values())
        steps = args.new_tokens - 1
        r0 = [r for r in rs if r["rank"] == 0][0]
        gathers = r0["coll"].get("all_gather", 0) / steps
        coll = sum(r0["coll"].values()) / steps
        d = dict(prefill_s=prefill, prefill_tokens_per_s=n / prefill, decode_ms_per_token=decode,
                 decode_tokens_per_s=1000 / decode, cache_bytes_per_rank_max=kv, cache_bytes_total=sum(per_rank.values()),
                 collectives_per_token=coll, all_gathers_per_token=gathers,
                 all_gathers_per_token_per_layer=gathers / layers, repeats=len([r for r in rs if r["rank"] == 0]))
        for rank, b in sorted(per_rank.items()):
            rec.add(variant, shape + f";rank={rank}", "cache_bytes", b)
        base = summary.get(("one_process", n))
        if base is not None and variant != "one_process":
            d["prefill_ratio_to_one_process"] = prefill / base["prefill_s"]
            d["decode_ratio_to_one_process"] = decode / base["decode_ms_per_token"]
            d["cache_ratio_to_one_process"] = kv / base["cache_bytes_per_rank_max"]
            d["tokens_match_one_process"] = float(r0["tokens"] == base["_tokens"])
        for fig, val in d.items():
            rec.add(variant, shape, fig, val)
        summary[(variant, n)] = dict(d, _tokens=r0["tokens"])
        one = variant == "one_process"
        lines.append(
            f"{variant:>14} {n:>7} {prefill:>10.2f} {'' if one else format(d['prefill_ratio_to_one_process'], '.2f'):>6} "
            f"{decode:>14.1f} {'' if one else format(d['decode_ratio_to_one_process'], '.2f'):>6} {kv / 2**20:>12.2f} "
            f"{'' if one else format(d['cache_ratio_to_one_process'], '.3f'):>6} {coll:>9.1f} "
            f"{'' if one else ('yes' if d['tokens_match_one_process'] else 'NO'):>6}")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--P", type=int, nargs="+", default=[2], help="context-parallel sizes (processes)")
    ap.add_argument("--prompt-lens", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    ap.add_argument("--new-tokens", type=int, default=16, help="greedy tokens generated after each prompt")
    ap.add_argument("--repeats", type=int, default=3, help="runs per prompt length and variant (medians)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads of every process")
    add_llama_args(ap, hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2, vocab=256)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (seconds): the smoke test")
    ap.add_argument("--out", default=str(RESULTS / "generate.csv"))
    args = ap.parse_args(argv)
    if args.quick:
        args.prompt_lens, args.new_tokens, args.repeats = [64, 129], 4, 1
        args.hidden, args.intermediate, args.layers, args.heads, args.kv_heads, args.vocab = 32, 64, 2, 2, 1, 64
    if min(args.P) < 2 or args.new_tokens < 2:
        ap.error("--P values must be >= 2 and --new-tokens >= 2")
    args.P = sorted(set(args.P))
    torch.set_num_threads(args.threads)  # what the hardware column reports: every process's threads
    t0 = time.perf_counter()
    res = spawn_ranks(_worker, max(args.P), args)
    rows = [r for rank in sorted(res) for r in res[rank]]
    rec = Recorder("generate", args.out)
    lines = record(rows, rec, args)
    path = rec.write()
    print("\n".join(lines))
    print(f"[bench_generate] {len(rec.rows)} rows -> {path} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
