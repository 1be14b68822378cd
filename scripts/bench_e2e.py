"""End-to-end training-step benchmark: a Llama-style model trained with context parallelism over
P real processes (gloo on CPU, NCCL on GPU), every layout in one run.

Each round runs one training step (forward, backward, gradient all-reduce over the CP group,
optimizer step) per layout, layouts rotating so none always goes first; figures are medians
over rounds after warm-up:

* ``step_s`` (slowest rank), ``tokens_per_s`` (global tokens / step_s), ``ratio_to_contiguous``;
* ``ring_wait_min_s`` / ``ring_wait_mean_s``: time ranks spent blocked in the ring's receive
  waits per step. The rank that waits least is on the critical path, so its wait is the ring
  transfer that compute did not hide (exposed communication); the mean adds the time ranks idle
  waiting for slower peers (load imbalance);
* ``grad_allreduce_s``: the data-parallel-style gradient all-reduce over the CP group;
* ``fwdbwd_cpu_max_s`` / ``fwdbwd_cpu_mean_s``: CPU time of each rank's forward + backward
  (its main thread), max and mean over ranks. On a machine whose cores are shared with other
  work, an idle rank hands its core to others and wall time mostly measures total work; the
  busiest rank's CPU time still shows the load balance (mean / max = 1 when balanced).

    python scripts/bench_e2e.py                      # 2 processes, 8192 tokens: about a minute on 2 CPU cores
    python scripts/bench_e2e.py --nproc 4 --seq-len 8192 --threads 1

Rows go to ``benchmarks/results/e2e.csv``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import time

import torch
import torch.distributed as dist

from hf_striped.core.guards import all_reduce, barrier

from bench_common import RESULTS, Recorder, add_llama_args, llama_config, median, shape_str, spawn_ranks


class _WaitTimer:
    """Accumulates the wall time the ring spends blocked on receives, through the ring's
    ``on_wait`` hook (``hf_striped.RingHooks``)."""

    def __init__(self):
        self.total = 0.0

    def add(self, seconds: float) -> None:
        self.total += seconds

    def take(self) -> float:
        t, self.total = self.total, 0.0
        return t


def _worker(rank, world, port, args, queue):
    import hf_striped
    from transformers import LlamaForCausalLM

    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world))
    device = "cuda" if args.device == "cuda" else "cpu"
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
    group = dist.group.WORLD
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.manual_seed(0)  # identical weights and tokens on every rank
    cfg = llama_config(args, args.seq_len)
    cfg._attn_implementation = "striped_ring"
    model = LlamaForCausalLM(cfg).to(device=device, dtype=getattr(torch, args.dtype)).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-5)
    n = args.seq_len
    ids = torch.randint(3, args.vocab, (args.batch, n), device=device)
    pos = torch.arange(n, device=device).expand(args.batch, -1)
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    waits = _WaitTimer()
    hooks = hf_striped.RingHooks(on_wait=waits.add)
    layouts = list(args.layouts)
    stats = {lay: {"step": [], "wait": [], "allreduce": [], "cpu": []} for lay in layouts}
    for rnd in range(args.warmup + args.steps):
        order = layouts[rnd % len(layouts):] + layouts[: rnd % len(layouts)]
        for lay in order:
            lids, lpos, llab = (hf_striped.shard(t, dim=1, group=group, layout=lay) for t in (ids, pos, labels))
            barrier(what="the benchmark's step start")
            sync()
            waits.take()
            c0 = time.thread_time()
            t0 = time.perf_counter()
            with hf_striped.context_parallel(group, options=hf_striped.RingOptions(layout=lay, backend=args.backend,
                                                                                   hooks=hooks)):
                logits = model(input_ids=lids, position_ids=lpos, use_cache=False).logits
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), llab.flatten(),
                                                         ignore_index=-100, reduction="sum") / (n - 1)
                loss.backward()
            sync()
            ring_wait = waits.take()
            cpu = time.thread_time() - c0
            t1 = time.perf_counter()
            for p in model.parameters():  # plain gradient sum over the CP group
                all_reduce(p.grad, what="the benchmark's gradient sum")
            sync()
            t2 = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            t3 = time.perf_counter()
            if rnd >= args.warmup:
                stats[lay]["step"].append(t3 - t0)
                stats[lay]["wait"].append(ring_wait)
                stats[lay]["allreduce"].append(t2 - t1)
                stats[lay]["cpu"].append(cpu)
            del logits, loss
    queue.put((rank, stats))
    barrier(what="the benchmark's end")
    dist.destroy_process_group()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nproc", type=int, default=2, help="context-parallel size P (processes)")
    ap.add_argument("--seq-len", type=int, default=8192, help="global tokens per sequence")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--layouts", nargs="+", default=["striped", "zigzag", "contiguous"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    add_llama_args(ap, hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2, vocab=512)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per process (0: cores / P)")
    ap.add_argument("--out", default=str(RESULTS / "e2e.csv"))
    args = ap.parse_args(argv)
    P = args.nproc
    per_rank = spawn_ranks(_worker, P, args)

    rec = Recorder("e2e", args.out, args.device)
    threads = args.threads or max(1, (os.cpu_count() or 1) // P)
    base = dict(P=P, N=args.seq_len, c=args.seq_len // P, b=args.batch, layers=args.layers, hidden=args.hidden,
                h=args.heads, hk=args.kv_heads, d=args.hidden // args.heads, dtype=args.dtype, threads=threads)
    step = {}
    print(f"# {rec.hardware} | {rec.versions}")
    print(f"# P={P} processes x {threads} thread(s), {args.seq_len} tokens, Llama {args.layers} layers x {args.hidden}")
    for lay in args.layouts:
        rounds = len(per_rank[0][lay]["step"])
        step_s = [max(per_rank[r][lay]["step"][i] for r in range(P)) for i in range(rounds)]
        wait_min = [min(per_rank[r][lay]["wait"][i] for r in range(P)) for i in range(rounds)]
        wait_mean = [sum(per_rank[r][lay]["wait"][i] for r in range(P)) / P for i in range(rounds)]
        allred = [max(per_rank[r][lay]["allreduce"][i] for r in range(P)) for i in range(rounds)]
        cpu_max = [max(per_rank[r][lay]["cpu"][i] for r in range(P)) for i in range(rounds)]
        cpu_mean = [sum(per_rank[r][lay]["cpu"][i] for r in range(P)) / P for i in range(rounds)]
        step[lay] = median(step_s)
        s = shape_str(**base)
        rec.add(lay, s, "step_s", step[lay])
        rec.add(lay, s, "tokens_per_s", args.batch * args.seq_len / step[lay])
        rec.add(lay, s, "ring_wait_min_s", median(wait_min))
        rec.add(lay, s, "ring_wait_mean_s", median(wait_mean))
        rec.add(lay, s, "grad_allreduce_s", median(allred))
        rec.add(lay, s, "fwdbwd_cpu_max_s", median(cpu_max))
        rec.add(lay, s, "fwdbwd_cpu_mean_s", median(cpu_mean))
    for lay in args.layouts:
        ratio = step["contiguous"] / step[lay] if "contiguous" in step else float("nan")
        rec.add(lay, shape_str(**base), "ratio_to_contiguous", ratio)
        get = {row["figure"]: float(row["value"]) for row in rec.rows if row["variant"] == lay}
        print(f"{lay:<11} step {step[lay]:7.3f} s  {get['tokens_per_s']:9.0f} tok/s  x contiguous {ratio:5.3f}  "
              f"ring wait min/mean {get['ring_wait_min_s']:.3f}/{get['ring_wait_mean_s']:.3f} s  "
              f"grad all-reduce {get['grad_allreduce_s']:.3f} s  fwd+bwd CPU max/mean over ranks "
              f"{get['fwdbwd_cpu_max_s']:.3f}/{get['fwdbwd_cpu_mean_s']:.3f} s")
    print(f"# {len(rec.rows)} rows appended to {rec.write()}")


if __name__ == "__main__":
    main()
