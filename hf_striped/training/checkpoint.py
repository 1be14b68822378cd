"""Training checkpoints that a crash cannot corrupt, and the resume that finds them.

A checkpoint ``step-<N>/`` holds, in our own format (no pickle):

- ``model.safetensors``: the unwrapped model's weights (``safetensors.torch.save_model``, which
  stores tied weights once), written by the main process; with ``trainable_only`` (LoRA: the base
  model stays frozen and is loaded again from its folder) only the parameters that train;
- ``optimizer.pt``: ``optimizer.state_dict()``, read back with ``torch.load(weights_only=True)``
  (tensors, numbers, strings and containers only: a file that would run code is refused);
- ``scheduler.json``: the LR scheduler's ``state_dict()`` as JSON;
- ``rng_state_<rank>.json``: every rank's Python, NumPy, torch CPU (and CUDA) RNG states, written and
  restored by that rank;
- ``trainer_state.json``: step, data position, loss history, arguments; written last.

Everything is written under the hidden name ``.step-<N>.tmp``, each file and the folder are
fsynced, and the folder is renamed into place only when complete, so a process killed at any
moment of a save leaves the previous checkpoint as the newest complete one. Pruning renames a
checkpoint to ``.step-<N>.del`` before deleting it, so a half-deleted folder never looks complete.
Multi-node runs need ``root`` on a filesystem every node sees.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

STATE_FILE = "trainer_state.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.json"
_NAME = re.compile(r"^step-(\d+)$")


def _rng_file(rank: int) -> str:
    return f"rng_state_{rank}.json"


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


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file or a folder) to disk: a rename is durable only after its contents."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=1, sort_keys=True)
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _write_weights(weights: torch.nn.Module | dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file, save_model

    if isinstance(weights, torch.nn.Module):
        save_model(weights, str(path))
    else:
        save_file({name: t.detach().contiguous() for name, t in weights.items()}, str(path))
    _fsync(path)


def trainable_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters of ``model`` that train (``requires_grad``), by name: all a checkpoint of a
    run with a frozen base model (LoRA) needs, since the base is loaded again from its folder."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _write_optimizer(state: dict, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def _rename(src: Path, dst: Path) -> None:
    os.replace(src, dst)


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


@dataclass(frozen=True)
class CheckpointIO:
    """The file operations of a checkpoint save, prune and clean-up, each one replaceable.

    Every field defaults to the real operation; ``save_checkpoint`` and ``remove_incomplete`` take
    an instance as ``io=``. Replacing a field (``dataclasses.replace(CheckpointIO(), rename=...)``)
    lets a caller observe or interrupt a save at an exact point, e.g. a test that stops a real
    training process half-way through writing the weights. A replacement should do the real
    operation too (call the default) unless it means to fail.

    Fields:
        write_weights: ``(weights, path)``: the unwrapped model (or, with ``trainable_only``, a dict of its
            trainable parameters by name) as safetensors, fsynced.
        write_json: ``(path, data)``: a JSON file, fsynced (RNG states, scheduler, trainer state).
        write_optimizer: ``(state_dict, path)``: the optimizer state with ``torch.save``, fsynced.
        rename: ``(src, dst)``: an atomic rename (``os.replace``) of a file or folder.
        remove_tree: ``(path)``: delete a folder and everything in it; a missing one is no error.
    """

    write_weights: Callable[[torch.nn.Module | dict[str, torch.Tensor], Path], None] = _write_weights
    write_json: Callable[[Path, Any], None] = _write_json
    write_optimizer: Callable[[dict, Path], None] = _write_optimizer
    rename: Callable[[Path, Path], None] = _rename
    remove_tree: Callable[[Path], None] = _remove_tree


def _delete(path: Path, io: CheckpointIO) -> None:
    """Delete a checkpoint folder: first rename it to a hidden ``.del`` name (atomic), so a kill
    mid-deletion never leaves a half-deleted folder under a complete checkpoint's name."""
    trash = path.with_name(f".{path.name}.del")
    io.remove_tree(trash)
    io.rename(path, trash)
    io.remove_tree(trash)


def _rng_state() -> dict:
    np_state = np.random.get_state()
    out = {
        "python": _to_json(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        out["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return out


def _set_rng_state(saved: dict) -> None:
    random.setstate(_to_tuple(saved["python"]))
    kind, keys, pos, has_gauss, gauss = saved["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(torch.tensor(saved["torch"], dtype=torch.uint8))
    if "cuda" in saved and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in saved["cuda"]])


def _to_json(x):
    return [_to_json(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, list) else x


def save_checkpoint(
    accelerator, root: str | Path, step: int, state: dict, *, model, optimizer, scheduler=None, keep: int | None = None,
    io: CheckpointIO | None = None, trainable_only: bool = False,
) -> Path:
    """Write checkpoint ``step-<step>`` under ``root`` on every rank (collective); return its path.

    ``model`` and ``optimizer`` as returned by ``accelerator.prepare``; ``scheduler``: any object
    with a JSON-serialisable ``state_dict()`` (``torch.optim.lr_scheduler.LambdaLR`` with plain
    functions or ``functools.partial``). ``state`` must be JSON-serialisable. ``keep``: delete older
    complete checkpoints beyond the newest ``keep``. ``io``: the file operations to use (default:
    the real ones, see ``CheckpointIO``). ``trainable_only``: write only the parameters that train
    (:func:`trainable_weights`; load with the same flag).
    """
    if keep is not None and keep < 1:
        raise ValueError(f"keep must be >= 1 (or None to keep every checkpoint), got {keep}")
    io = io or CheckpointIO()
    root = Path(root)
    final, tmp = root / f"step-{step:08d}", root / f".step-{step:08d}.tmp"
    main = accelerator.is_main_process

    def prepare():
        if main:
            root.mkdir(parents=True, exist_ok=True)
            io.remove_tree(tmp)
            tmp.mkdir()

    def write_files():
        io.write_json(tmp / _rng_file(accelerator.process_index), _rng_state())  # every rank its own
        if main:
            unwrapped = accelerator.unwrap_model(model)
            io.write_weights(trainable_weights(unwrapped) if trainable_only else unwrapped, tmp / MODEL_FILE)
            io.write_optimizer(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
            if scheduler is not None:
                io.write_json(tmp / SCHEDULER_FILE, scheduler.state_dict())

    def publish():
        if main:
            io.write_json(tmp / STATE_FILE, {**state, "step": step})  # last: marks the folder complete
            _publish(tmp, final, io)
            if keep is not None:
                _prune(root, step, keep, io)

    # Each phase ends where every rank agrees it went well (instead of a bare barrier), so a
    # failure on one rank (a full disk on the main process) fails every rank at once rather than
    # leaving the others waiting in a barrier until the process group's timeout.
    for phase, work in (("preparing", prepare), ("writing", write_files), ("publishing", publish)):
        try:
            work()
            error = None
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the peers know
            error = exc
        _agree(accelerator, error, f"{phase} checkpoint {final.name}")
    return final


def _publish(tmp: Path, final: Path, io: CheckpointIO) -> None:
    """Rename the complete folder ``tmp`` to ``final``: the checkpoint becomes visible complete, or
    not at all. A checkpoint already at ``final`` (a re-save of its step) is moved aside first, to
    ``.step-N.old``, and deleted once the new one is in place."""
    root = final.parent
    _fsync(tmp)
    if final.exists():
        old = root / f".{final.name}.old"
        io.remove_tree(old)
        io.rename(final, old)  # a kill here: remove_incomplete() puts the old one back
        io.rename(tmp, final)
        _fsync(root)
        io.remove_tree(old)
    else:
        io.rename(tmp, final)
        _fsync(root)


def _prune(root: Path, step: int, keep: int, io: CheckpointIO) -> None:
    """Delete complete checkpoints older than ``step`` beyond the newest ``keep - 1`` of them (the
    one of ``step`` is the ``keep``-th); never a checkpoint ahead of ``step``."""
    older = [p for p in complete_checkpoints(root) if checkpoint_step(p) < step]
    for p in older[: max(0, len(older) - (keep - 1))]:
        _delete(p, io)


def _agree(accelerator, error: BaseException | None, what: str) -> None:
    """A barrier that also carries failure: every rank raises if any rank's ``error`` is set."""
    from ..core.guards import agree

    def peer_failed(rank: int) -> RuntimeError:
        return RuntimeError(
            f"{what} failed on process {rank} (its error says why); this process stops too. The previous complete "
            "checkpoint is intact: fix the cause and rerun with --resume auto"
        )

    agree(None, {}, what=f"hf_striped's agreement that {what} succeeded", error=error, peer_error=peer_failed)


def checkpoint_step(path: str | Path) -> int:
    m = _NAME.match(Path(path).name)
    if m is None:
        raise ValueError(f"{path} is not named like a checkpoint (step-<number>)")
    return int(m.group(1))


def remove_incomplete(root: str | Path, io: CheckpointIO | None = None) -> list[Path]:
    """Clean up after saves and prunes that never finished (a kill mid-save); return what was deleted.

    Deletes ``.step-N.tmp`` (an unfinished save) and ``.step-N.del`` (an unfinished prune). A
    ``.step-N.old`` is a complete checkpoint moved aside by a re-save of step N: it is renamed back
    to ``step-N`` if the kill came before the new one took its place, else deleted. Call it on one
    process, before choosing the checkpoint to resume from. ``io``: the file operations to use
    (default: the real ones, see ``CheckpointIO``).
    """
    io = io or CheckpointIO()
    root = Path(root)
    if not root.is_dir():
        return []
    removed = []
    for p in sorted(root.glob(".step-*.old")):
        final = root / p.name[1:-len(".old")]
        if not final.exists() and (p / STATE_FILE).is_file():
            io.rename(p, final)
            _fsync(root)
        else:
            removed.append(p)
    removed += sorted(root.glob(".step-*.tmp")) + sorted(root.glob(".step-*.del"))
    for p in removed:
        io.remove_tree(p)
    return removed


def read_state(path: str | Path) -> dict:
    """The trainer state of checkpoint ``path`` (step, data position, arguments), without loading
    anything else: what a resume checks before it restores the weights."""
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a complete hf_striped checkpoint (no {STATE_FILE})")
    return json.loads((path / STATE_FILE).read_text())


def _load_trainable(model: torch.nn.Module, file: Path, device: str) -> None:
    """Copy a ``trainable_only`` checkpoint's tensors into ``model``'s trainable parameters; refuse
    a file whose names or shapes are not exactly those parameters (another adapter, or a full model)."""
    from safetensors.torch import load_file

    saved, params = load_file(str(file), device=device), trainable_weights(model)
    missing, unexpected = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
    wrong = sorted(k for k in set(params) & set(saved) if saved[k].shape != params[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(
            f"{file} does not hold exactly the weights this run trains (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}, other shapes {wrong[:3]}): it was written with other --lora options (or "
            "without --lora). Resume with the options it was written with, --resume never, or a new "
            "--output-dir"
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])


def load_checkpoint(accelerator, path: str | Path, *, model, optimizer, scheduler=None,
                    trainable_only: bool = False) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG states from ``path`` (on every rank);
    return its trainer state. Nothing is unpickled: a tampered ``optimizer.pt`` raises
    ``pickle.UnpicklingError`` instead of running code. ``trainable_only``: the checkpoint holds only
    the trainable parameters (see :func:`save_checkpoint`); the others keep their values."""
    from safetensors.torch import load_model

    path = Path(path)
    state = read_state(path)
    missing = [f for f in (MODEL_FILE, OPTIMIZER_FILE) if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{path} has no {', '.join(missing)}: not a checkpoint of this hf_striped version (older ones were "
            "Accelerate save_state folders); resume with --resume never or a new --output-dir"
        )
    device = "cpu" if accelerator.device.type == "cpu" else str(accelerator.device)  # neither reader takes "cpu:0"
    if trainable_only:
        _load_trainable(accelerator.unwrap_model(model), path / MODEL_FILE, device)
    else:
        load_model(accelerator.unwrap_model(model), str(path / MODEL_FILE), strict=True, device=device)
    # onto the CPU first: load_state_dict moves each state to its parameter's device (a
    # scalar `step` then stays on the CPU, as Adam wants it)
    optimizer.load_state_dict(torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True))
    if scheduler is not None:
        scheduler.load_state_dict(json.loads((path / SCHEDULER_FILE).read_text()))
    rng = path / _rng_file(accelerator.process_index)
    if rng.is_file():
        _set_rng_state(json.loads(rng.read_text()))
    else:  # more processes than when saved: this rank keeps its seeded RNG
        warnings.warn(f"{path} has no {rng.name}: process {accelerator.process_index} keeps its current RNG state", stacklevel=2)
    return state
