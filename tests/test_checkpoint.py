"""Checkpoint folder logic of hf_striped.training.checkpoint: a save/load round trip restores model,
optimizer, scheduler and RNG exactly; atomic replacement; pruning that never touches a checkpoint
ahead of the one written; clean-up of saves and prunes that never finished. (The real save/resume
under `accelerate launch` is tested end to end in test_train_script.py and test_kill_during_save.py.)"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import get_scheduler

from hf_striped.training.checkpoint import (
    STATE_FILE,
    CheckpointIO,
    complete_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    remove_incomplete,
    save_checkpoint,
)


class OneProcess:
    """The part of ``accelerate.Accelerator`` that save/load_checkpoint use, for one process."""

    is_main_process = True
    process_index = 0
    device = torch.device("cpu")

    def wait_for_everyone(self):
        pass

    def unwrap_model(self, model):
        return model


def trained(seed=0):
    """A tiny model with tied weights, its AdamW after two steps, and a cosine scheduler."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Embedding(11, 4), torch.nn.Linear(4, 11))
    model[1].weight = model[0].weight  # tied, like tied input/output embeddings
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = get_scheduler("cosine", opt, num_warmup_steps=1, num_training_steps=5)
    for _ in range(2):
        model(torch.arange(5)).square().mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return dict(model=model, optimizer=opt, scheduler=sched)


def save(root, step, state, keep=None):
    return save_checkpoint(OneProcess(), root, step, state, keep=keep, **trained())


def names(root):
    return [p.name for p in complete_checkpoints(root)]


def test_round_trip_restores_everything_exactly(tmp_path):
    objs = trained()
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = save_checkpoint(OneProcess(), tmp_path, 2, {"losses": [1.5]}, **objs)
    expect = (random.random(), np.random.rand(), torch.rand(3))  # what the RNGs give after the save
    print(sorted(p.name for p in path.iterdir()))
    assert sorted(p.name for p in path.iterdir()) == [
        "model.safetensors", "optimizer.pt", "rng_state_0.json", "scheduler.json", STATE_FILE,
    ]
    fresh = trained(seed=7)
    assert not torch.equal(fresh["model"][0].weight, objs["model"][0].weight)
    state = load_checkpoint(OneProcess(), path, **fresh)
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert state == {"losses": [1.5], "step": 2}
    assert got[:2] == expect[:2] and torch.equal(got[2], expect[2])
    assert fresh["model"][1].weight is fresh["model"][0].weight  # still tied after loading
    for a, b in zip(fresh["model"].parameters(), objs["model"].parameters()):
        assert torch.equal(a, b)
    sa, sb = fresh["optimizer"].state_dict(), objs["optimizer"].state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for k in sb["state"]:
        for name, v in sb["state"][k].items():
            assert torch.equal(sa["state"][k][name], v), name
    assert fresh["scheduler"].state_dict() == objs["scheduler"].state_dict()
    assert fresh["scheduler"].get_last_lr() == objs["scheduler"].get_last_lr()


def test_keep_prunes_older_checkpoints_only(tmp_path):
    for step in (2, 4, 6):
        save(tmp_path, step, {"losses": []}, keep=2)
    assert names(tmp_path) == ["step-00000004", "step-00000006"]
    save(tmp_path, 3, {"losses": []}, keep=1)  # behind the others: prunes nothing ahead
    assert names(tmp_path) == ["step-00000003", "step-00000004", "step-00000006"]
    assert latest_checkpoint(tmp_path).name == "step-00000006"
    assert json.loads((tmp_path / "step-00000006" / STATE_FILE).read_text())["step"] == 6
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no .del left behind


def test_resaving_a_step_replaces_it_whole(tmp_path):
    save(tmp_path, 2, {"run": "a"})
    save(tmp_path, 2, {"run": "b"})
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


def test_kill_between_the_renames_of_a_resave_keeps_the_step(tmp_path):
    save(tmp_path, 2, {"run": "a"})
    save(tmp_path, 4, {"run": "a"})
    # a re-save of step 4 killed after moving the old one aside, before renaming the new one in
    (tmp_path / "step-00000004").rename(tmp_path / ".step-00000004.old")
    save(tmp_path, 2, {"run": "b"})  # (a .tmp of the new save, also left behind)
    (tmp_path / "step-00000002").rename(tmp_path / ".step-00000004.tmp")
    assert names(tmp_path) == []
    removed = remove_incomplete(tmp_path)
    print("removed:", [p.name for p in removed], "left:", sorted(p.name for p in tmp_path.iterdir()))
    assert [p.name for p in removed] == [".step-00000004.tmp"]
    assert names(tmp_path) == ["step-00000004"]
    assert json.loads((tmp_path / "step-00000004" / STATE_FILE).read_text()) == {"run": "a", "step": 4}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000004"]


def test_an_old_copy_whose_replacement_landed_is_deleted(tmp_path):
    save(tmp_path, 4, {"run": "b"})
    save(tmp_path, 2, {"run": "a"})
    (tmp_path / "step-00000002").rename(tmp_path / ".step-00000004.old")  # killed before the final rmtree
    assert [p.name for p in remove_incomplete(tmp_path)] == [".step-00000004.old"]
    assert json.loads((tmp_path / "step-00000004" / STATE_FILE).read_text())["run"] == "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000004"]


def test_a_half_pruned_checkpoint_is_never_complete(tmp_path):
    save(tmp_path, 2, {})
    save(tmp_path, 4, {})
    # pruning renames first, then deletes: a kill mid-deletion leaves only a hidden .del folder
    half = tmp_path / ".step-00000002.del"
    (tmp_path / "step-00000002").rename(half)
    (half / "model.safetensors").unlink()
    assert (half / STATE_FILE).is_file()  # still has its state file, yet:
    assert names(tmp_path) == ["step-00000004"]
    assert [p.name for p in remove_incomplete(tmp_path)] == [".step-00000002.del"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000004"]


def test_every_file_operation_goes_through_the_io_hooks(tmp_path):
    """Each field of CheckpointIO is called for its files and folders, in the order that makes a
    save atomic; a hook that fails leaves the previous checkpoint the newest complete one."""
    real, calls = CheckpointIO(), []

    def logged(name):
        def op(*args):
            calls.append((name, *(a.name for a in args if isinstance(a, Path))))
            return getattr(real, name)(*args)
        return op

    io = CheckpointIO(**{f.name: logged(f.name) for f in dataclasses.fields(CheckpointIO)})
    save(tmp_path, 2, {})
    save_checkpoint(OneProcess(), tmp_path, 4, {}, keep=1, io=io, **trained())
    print(calls)
    assert calls == [
        ("remove_tree", ".step-00000004.tmp"),
        ("write_json", "rng_state_0.json"), ("write_weights", "model.safetensors"),
        ("write_optimizer", "optimizer.pt"), ("write_json", "scheduler.json"),
        ("write_json", STATE_FILE), ("rename", ".step-00000004.tmp", "step-00000004"),
        ("remove_tree", ".step-00000002.del"), ("rename", "step-00000002", ".step-00000002.del"),
        ("remove_tree", ".step-00000002.del"),
    ]

    def full_disk(state, path):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(OneProcess(), tmp_path, 6, {}, io=dataclasses.replace(io, write_optimizer=full_disk), **trained())
    assert names(tmp_path) == ["step-00000004"]
    calls.clear()
    assert [p.name for p in remove_incomplete(tmp_path, io=io)] == [".step-00000006.tmp"]
    assert calls == [("remove_tree", ".step-00000006.tmp")]


def test_keep_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="keep must be >= 1"):
        save(tmp_path, 1, {}, keep=0)


def test_a_save_failing_on_the_main_process_fails_every_rank_at_once(dist_pool, tmp_path):
    """A full disk on the main process: the other ranks raise too, at once (not after the process
    group's timeout in a barrier), and the previous checkpoint is still the newest complete one."""
    import fault_workers

    res = dist_pool(2).run(fault_workers.save_fails_on_main, str(tmp_path))
    for rank, (raised, msg, seconds) in enumerate(res):
        print(f"rank {rank}: {raised} after {seconds:.2f} s: {msg}")
        assert seconds < 10
    assert res[0][0] == "OSError" and "No space left on device" in res[0][1]
    assert res[1][0] == "RuntimeError" and "writing checkpoint step-00000002 failed on process 0" in res[1][1]
    assert "previous complete checkpoint is intact" in res[1][1]
    assert names(tmp_path) == ["step-00000001"]
    remove_incomplete(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001"]
