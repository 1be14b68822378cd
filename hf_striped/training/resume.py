"""Resuming a training run from its checkpoints: which checkpoint, whether the run may resume from
it, and the per-step log made consistent with it.

A checkpoint records the run's arguments and the number of data-parallel replicas (``dp_size``)
in its trainer state (see ``hf_striped.training.checkpoint``). Arguments that fix what the saved
data position means (sequence length, packing, batch size, gradient accumulation, data, seed,
model, data-parallel size) must not change across a resume: the run would silently continue on
other data. Arguments of the optimizer and schedule may change; the caller is told so it can warn.

The per-step log (``log.jsonl``: one JSON object with a ``"step"`` per line) of a killed run has
rows of steps after the checkpoint it resumes from; those steps are redone, so their rows are
dropped first (``truncate_log``), by an atomic rewrite.

Nothing here needs Transformers or a process group: these functions read files and compare
plain values.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .checkpoint import checkpoint_step, complete_checkpoints, latest_checkpoint

# Arguments that fix what a checkpoint's data position (batches seen) means; "dp_size" is the
# number of data-parallel replicas (processes / CP size), not a command-line argument.
DATA_ARGS = ("seq_len", "no_pack", "concat", "batch_size", "grad_accum", "data", "chat_demo", "seed", "model",
             "dp_size")
# Arguments that fix which parameters train (a LoRA adapter's shape and scaling): a checkpoint of
# an adapter holds only its weights, which mean nothing to another adapter or to a full model.
MODEL_ARGS = ("lora", "lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules")
# Arguments of the optimizer and LR schedule: a resume may change them (the restored optimizer and
# scheduler keep their state, so a new value changes the schedule from the checkpoint on).
SCHEDULE_ARGS = ("lr", "warmup_steps", "steps", "weight_decay")


class ResumeError(ValueError):
    """A run cannot resume from (or start next to) the checkpoints it found; the message says
    which arguments or folders to change."""


def choose_checkpoint(root: str | Path, resume: str) -> Path | None:
    """The checkpoint a run resumes from: ``resume`` is ``"never"`` (None: start from step 0),
    ``"auto"`` (the newest complete checkpoint under ``root``, or None if there is none) or the
    path of a checkpoint folder."""
    if resume == "never":
        return None
    if resume == "auto":
        return latest_checkpoint(root)
    return Path(resume)


def check_no_checkpoints_ahead(root: str | Path, start: int) -> None:
    """Raise ``ResumeError`` if ``root`` holds complete checkpoints of steps after ``start`` (the
    step this run starts from). Those belong to another run (or to this one, resumed from an
    older checkpoint); continuing would mix the two runs, and pruning would delete the other's."""
    root = Path(root)
    ahead = [p.name for p in complete_checkpoints(root) if checkpoint_step(p) > start]
    if ahead:
        raise ResumeError(
            f"{root} holds checkpoints ahead of where this run starts (step {start}): {', '.join(ahead)}. "
            "Use a new --output-dir, --resume auto to continue that run, or delete them."
        )


def _flag(name: str) -> str:
    """The command-line spelling of an argument (``seq_len`` -> ``--seq-len``); ``dp_size`` is none."""
    return name if name == "dp_size" else "--" + name.replace("_", "-")


def check_resume_compatible(
    checkpoint: str | Path, saved_state: Mapping[str, Any], args: Mapping[str, Any], dp_size: int
) -> list[str]:
    """Compare the arguments a checkpoint was written with to this run's; return warnings.

    ``saved_state``: the checkpoint's trainer state (its ``"args"`` and ``"dp_size"``; a key it
    lacks is not compared, and a missing ``"dp_size"`` counts as unchanged). ``args``: this run's
    arguments by name (``vars(namespace)``); ``dp_size``: this run's data-parallel replicas.

    Raises ``ResumeError`` naming every changed argument of ``DATA_ARGS`` or ``MODEL_ARGS`` and its
    saved value.
    Returns one message per changed argument of ``SCHEDULE_ARGS`` (allowed, but the caller
    should say that the schedule changes from here on).
    """
    checkpoint = Path(checkpoint)
    saved = {**saved_state.get("args", {}), "dp_size": saved_state.get("dp_size", dp_size)}
    now = {**args, "dp_size": dp_size}
    for names, why in ((DATA_ARGS, "its data position would not mean the same thing (dp_size = processes / "
                                    "--cp-size)"),
                       (MODEL_ARGS, "its weights belong to another set of trained parameters (another LoRA "
                                    "adapter, or the full model)")):
        changed = [k for k in names if k in saved and saved[k] != now.get(k)]
        if changed:
            raise ResumeError(
                f"{checkpoint} was written with different {', '.join(_flag(k) for k in changed)} "
                f"({', '.join(f'{saved[k]!r}' for k in changed)}); {why}. Use the same arguments, --resume "
                "never, or a new --output-dir."
            )
    return [
        f"{_flag(k)} was {saved[k]!r} when {checkpoint.name} was saved; the restored optimizer and scheduler "
        "keep their state, so the new value changes the schedule from here on"
        for k in SCHEDULE_ARGS
        if k in saved and saved[k] != now.get(k)
    ]


def log_step(line: str) -> int:
    """The ``"step"`` of one log line (0 if it has none). A line that is not a JSON object (the
    torn last line of a killed run) counts as a step after any other, so truncation drops it."""
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 1 << 62


def truncate_log(path: str | Path, last_step: int) -> int:
    """Drop the rows of steps after ``last_step`` (and torn rows) from the per-step log ``path``;
    return how many rows were dropped (0 if ``path`` does not exist).

    Rows of steps ``<= last_step`` are kept, in their order. The file is rewritten only if a row
    is dropped, and then atomically (a temporary file renamed over it): a process killed during
    the rewrite leaves the old log, never part of it.
    """
    path = Path(path)
    if not path.exists():
        return 0
    rows = [r for r in path.read_text().splitlines() if r.strip()]
    kept = [r for r in rows if log_step(r) <= last_step]
    if len(kept) != len(rows):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(r + "\n" for r in kept))
        os.replace(tmp, path)
    return len(rows) - len(kept)
