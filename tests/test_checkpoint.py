"""Checkpoint folder logic of hf_striped.checkpoint: atomic replacement, pruning that never
touches a checkpoint ahead of the one written, and clean-up of saves that never finished.
(The real save/resume through Accelerate is tested end to end in test_train_script.py.)"""

from __future__ import annotations

import json

import pytest

from hf_striped.checkpoint import (
    STATE_FILE,
    complete_checkpoints,
    latest_checkpoint,
    remove_incomplete,
    save_checkpoint,
)


class OneProcess:
    """The part of ``accelerate.Accelerator`` that save_checkpoint uses, for one process."""

    is_main_process = True

    def wait_for_everyone(self):
        pass

    def save_state(self, path, safe_serialization=True):
        from pathlib import Path

        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "model.safetensors").write_text("weights")


def names(root):
    return [p.name for p in complete_checkpoints(root)]


def test_keep_prunes_older_checkpoints_only(tmp_path):
    acc = OneProcess()
    for step in (2, 4, 6):
        save_checkpoint(acc, tmp_path, step, {"losses": []}, keep=2)
    assert names(tmp_path) == ["step-00000004", "step-00000006"]
    save_checkpoint(acc, tmp_path, 3, {"losses": []}, keep=1)  # behind the others: prunes nothing ahead
    assert names(tmp_path) == ["step-00000003", "step-00000004", "step-00000006"]
    assert latest_checkpoint(tmp_path).name == "step-00000006"
    assert json.loads((tmp_path / "step-00000006" / STATE_FILE).read_text())["step"] == 6


def test_resaving_a_step_replaces_it_whole(tmp_path):
    acc = OneProcess()
    save_checkpoint(acc, tmp_path, 2, {"run": "a"})
    save_checkpoint(acc, tmp_path, 2, {"run": "b"})
    assert names(tmp_path) == ["step-00000002"]
    assert json.loads((tmp_path / "step-00000002" / STATE_FILE).read_text())["run"] == "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000002"]  # no temporary left behind


def test_incomplete_saves_are_not_checkpoints_and_get_removed(tmp_path):
    (tmp_path / ".step-00000008.tmp").mkdir()
    (tmp_path / ".step-00000008.tmp" / "model.safetensors").write_text("half")
    (tmp_path / "step-00000009").mkdir()  # no trainer_state.json: never completed
    assert latest_checkpoint(tmp_path) is None
    assert [p.name for p in remove_incomplete(tmp_path)] == [".step-00000008.tmp"]
    assert not (tmp_path / ".step-00000008.tmp").exists()


def test_keep_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="keep must be >= 1"):
        save_checkpoint(OneProcess(), tmp_path, 1, {}, keep=0)
