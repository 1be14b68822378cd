"""Training checkpoints that a crash cannot corrupt, and the resume that finds them.

A checkpoint is Accelerate's ``save_state`` folder (model weights as safetensors, optimizer,
registered schedulers, every rank's RNG states) plus ``trainer_state.json`` (step, data position,
loss history, arguments). It is written under a hidden temporary name and renamed into place only
when complete, so a process killed mid-save leaves the previous checkpoint as the newest complete
one. Multi-node runs need ``root`` on a filesystem every node sees.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^step-(\d+)$")


def complete_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (by step)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def save_checkpoint(accelerator, root: str | Path, step: int, state: dict, keep: int | None = None) -> Path:
    """Write checkpoint ``step-<step>`` under ``root`` on every rank (collective); return its path.

    ``state`` must be JSON-serialisable. ``keep``: delete older complete checkpoints beyond the
    newest ``keep``.
    """
    if keep is not None and keep < 1:
        raise ValueError(f"keep must be >= 1 (or None to keep every checkpoint), got {keep}")
    root = Path(root)
    final, tmp = root / f"step-{step:08d}", root / f".step-{step:08d}.tmp"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_json(tmp / STATE_FILE, {**state, "step": step})
        if final.exists():  # a re-save of this step: move the old one out of the way first
            trash = root / f".step-{step:08d}.old"
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)  # the checkpoint becomes visible complete, or not at all
        if keep is not None:  # prune older ones only: never a checkpoint ahead of this one
            older = [p for p in complete_checkpoints(root) if int(_NAME.match(p.name).group(1)) < step]
            for old in older[: max(0, len(older) - (keep - 1))]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def checkpoint_step(path: str | Path) -> int:
    m = _NAME.match(Path(path).name)
    if m is None:
        raise ValueError(f"{path} is not named like a checkpoint (step-<number>)")
    return int(m.group(1))


def remove_incomplete(root: str | Path) -> list[Path]:
    """Delete the temporary folders of saves that never finished (a kill mid-save); return them."""
    root = Path(root)
    stale = [p for p in root.glob(".step-*.tmp")] + [p for p in root.glob(".step-*.old")] if root.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def load_checkpoint(accelerator, path: str | Path) -> dict:
    """Restore model, optimizer, schedulers and RNG states from ``path``; return its state dict."""
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a complete hf_striped checkpoint (no {STATE_FILE})")
    accelerator.load_state(str(path))
    return json.loads((path / STATE_FILE).read_text())
