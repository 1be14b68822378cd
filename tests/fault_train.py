"""scripts/train.py with a stop in the middle of a checkpoint save, for tests/test_kill_during_save.py.

Launched instead of scripts/train.py (same arguments). With ``HF_STRIPED_TEST_PAUSE_AT=<phase>:<step>``
the main process, on reaching ``<phase>`` for the checkpoint folder of step ``<step>``, writes the
file ``HF_STRIPED_TEST_PAUSE_MARKER`` and sleeps until the test SIGKILLs every process. Phases:

- ``weights``: ``model.safetensors`` of the save half written (the file truncated to half its size);
- ``state``: every other file written, ``trainer_state.json`` not yet;
- ``rename``: the temporary folder complete, just before its rename into place;
- ``prune``: pruning the older checkpoint ``<step>``: renamed to ``.step-<step>.del`` and its
  ``model.safetensors`` already deleted, the rest not yet.
"""

from __future__ import annotations

import os
import runpy
import sys
import time
from pathlib import Path

from hf_striped.training import checkpoint

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


def install(phase: str, step: int) -> None:
    write_weights, write_json, rename, remove_tree = (
        checkpoint._write_weights, checkpoint._write_json, checkpoint._rename, checkpoint._remove_tree,
    )

    def weights(model, path):
        write_weights(model, path)
        if phase == "weights" and _step_of(path.parent) == step:
            size = path.stat().st_size
            os.truncate(path, size // 2)
            _pause(f"{path} truncated from {size} to {size // 2} bytes")

    def json_file(path, data):
        if phase == "state" and path.name == checkpoint.STATE_FILE and _step_of(path.parent) == step:
            _pause(f"before writing {path}")
        write_json(path, data)

    def ren(src, dst):
        if phase == "rename" and src.name.endswith(".tmp") and _step_of(src) == step:
            _pause(f"before renaming {src} to {dst}")
        rename(src, dst)

    def rmtree(path):
        if phase == "prune" and path.name.endswith(".del") and _step_of(path) == step and path.exists():
            (path / checkpoint.MODEL_FILE).unlink()
            _pause(f"half-way through deleting {path}")
        remove_tree(path)

    checkpoint._write_weights, checkpoint._write_json = weights, json_file
    checkpoint._rename, checkpoint._remove_tree = ren, rmtree


if __name__ == "__main__":
    phase, step = os.environ["HF_STRIPED_TEST_PAUSE_AT"].split(":")
    if int(os.environ.get("RANK", "0")) == 0:
        install(phase, int(step))
    sys.argv = [str(TRAIN), *sys.argv[1:]]
    runpy.run_path(str(TRAIN), run_name="__main__")
