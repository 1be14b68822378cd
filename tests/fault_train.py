"""scripts/train.py with a stop in the middle of a checkpoint save, for tests/test_kill_during_save.py.

Launched instead of scripts/train.py (same arguments): runs train.py's ``main`` with checkpoint
file operations (``hf_striped.training.checkpoint.CheckpointIO``) that stop at one point. With
``HF_STRIPED_TEST_PAUSE_AT=<phase>:<step>`` the main process, on reaching ``<phase>`` for the
checkpoint folder of step ``<step>``, writes the file ``HF_STRIPED_TEST_PAUSE_MARKER`` and sleeps
until the test SIGKILLs every process. Phases:

- ``weights``: ``model.safetensors`` of the save half written (the file truncated to half its size);
- ``state``: every other file written, ``trainer_state.json`` not yet;
- ``rename``: the temporary folder complete, just before its rename into place;
- ``prune``: pruning the older checkpoint ``<step>``: renamed to ``.step-<step>.del`` and its
  ``model.safetensors`` already deleted, the rest not yet.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

from hf_striped.training.checkpoint import MODEL_FILE, STATE_FILE, CheckpointIO

TRAIN = Path(__file__).resolve().parents[1] / "scripts" / "train.py"


def _step_of(path: Path) -> int | None:
    """The step of a checkpoint folder, whatever its hidden prefix and suffix."""
    name = path.name.lstrip(".").split(".")[0]
    return int(name[len("step-"):]) if name.startswith("step-") else None


def _pause(what: str) -> None:
    Path(os.environ["HF_STRIPED_TEST_PAUSE_MARKER"]).write_text(what)
    print(f"[fault] paused: {what}", flush=True)
    while True:
        time.sleep(60)


def pausing_io(phase: str, step: int) -> CheckpointIO:
    """The real checkpoint file operations, except that the one of ``phase`` for the checkpoint
    folder of ``step`` pauses this process (see the module docstring)."""
    real = CheckpointIO()

    def write_weights(model, path):
        real.write_weights(model, path)
        if phase == "weights" and _step_of(path.parent) == step:
            size = path.stat().st_size
            os.truncate(path, size // 2)
            _pause(f"{path} truncated from {size} to {size // 2} bytes")

    def write_json(path, data):
        if phase == "state" and path.name == STATE_FILE and _step_of(path.parent) == step:
            _pause(f"before writing {path}")
        real.write_json(path, data)

    def rename(src, dst):
        if phase == "rename" and src.name.endswith(".tmp") and _step_of(src) == step:
            _pause(f"before renaming {src} to {dst}")
        real.rename(src, dst)

    def remove_tree(path):
        if phase == "prune" and path.name.endswith(".del") and _step_of(path) == step and path.exists():
            (path / MODEL_FILE).unlink()
            _pause(f"half-way through deleting {path}")
        real.remove_tree(path)

    return CheckpointIO(write_weights=write_weights, write_json=write_json, write_optimizer=real.write_optimizer,
                        rename=rename, remove_tree=remove_tree)


def _train_main():
    """scripts/train.py's ``main`` (scripts/ is not a package: loaded from its file)."""
    spec = importlib.util.spec_from_file_location("train", TRAIN)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # registered before it runs, as an import would (dataclasses look it up)
    spec.loader.exec_module(module)
    return module.main


if __name__ == "__main__":
    phase, step = os.environ["HF_STRIPED_TEST_PAUSE_AT"].split(":")
    io = pausing_io(phase, int(step)) if int(os.environ.get("RANK", "0")) == 0 else None
    sys.exit(_train_main()(sys.argv[1:], checkpoint_io=io))
