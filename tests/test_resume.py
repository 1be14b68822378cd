"""hf_striped.training.resume: which checkpoint a run resumes from, the refusals (checkpoints ahead
of the start, changed data arguments or data-parallel size) and warnings (changed schedule), and
the per-step log cut back to the resumed step by an atomic rewrite. (scripts/train.py runs them
under `accelerate launch` in test_train_script.py and test_kill_during_save.py.)"""

from __future__ import annotations

import json
import os

import pytest

from hf_striped.training import resume
from hf_striped.training.checkpoint import STATE_FILE
from hf_striped.training.resume import (
    ResumeError,
    check_no_checkpoints_ahead,
    check_resume_compatible,
    choose_checkpoint,
    log_step,
    truncate_log,
)

ARGS = dict(seq_len=64, no_pack=False, batch_size=1, grad_accum=1, data=["a.jsonl"], seed=0, model="m",
            lr=5e-5, warmup_steps=2, steps=6, weight_decay=0.0, output_dir="out")


def fake_checkpoint(root, step, complete=True):
    """A checkpoint folder as the resume logic sees it: complete once it has its state file."""
    path = root / f"step-{step:08d}"
    path.mkdir(parents=True)
    if complete:
        (path / STATE_FILE).write_text(json.dumps({"step": step}))
    return path


def saved(dp_size=1, **changes):
    return {"step": 4, "args": {**ARGS, **changes}, "dp_size": dp_size}


# -- which checkpoint ------------------------------------------------------------------------------

def test_choose_checkpoint(tmp_path):
    assert choose_checkpoint(tmp_path / "missing", "auto") is None
    fake_checkpoint(tmp_path, 2)
    newest = fake_checkpoint(tmp_path, 4)
    fake_checkpoint(tmp_path, 6, complete=False)  # a save that never finished is not a candidate
    assert choose_checkpoint(tmp_path, "auto") == newest
    assert choose_checkpoint(tmp_path, "never") is None
    assert choose_checkpoint(tmp_path, str(tmp_path / "step-00000002")) == tmp_path / "step-00000002"


def test_checkpoints_ahead_of_the_start_are_refused(tmp_path):
    for step in (2, 4, 6):
        fake_checkpoint(tmp_path, step)
    fake_checkpoint(tmp_path, 8, complete=False)
    check_no_checkpoints_ahead(tmp_path, 6)  # resuming from the newest: nothing ahead
    check_no_checkpoints_ahead(tmp_path / "missing", 0)
    with pytest.raises(ResumeError) as err:
        check_no_checkpoints_ahead(tmp_path, 2)
    msg = str(err.value)
    print(msg)
    assert "ahead of where this run starts (step 2): step-00000004, step-00000006." in msg
    assert "step-00000008" not in msg and "step-00000002" not in msg
    assert "new --output-dir" in msg and "--resume auto" in msg  # says how to fix it


# -- compatibility of the arguments ----------------------------------------------------------------

def test_same_arguments_resume_silently(tmp_path):
    assert check_resume_compatible(tmp_path / "step-00000004", saved(), ARGS, dp_size=1) == []


def test_changed_data_parallel_size_is_refused(tmp_path):
    with pytest.raises(ResumeError) as err:
        check_resume_compatible(tmp_path / "step-00000004", saved(dp_size=1), ARGS, dp_size=2)
    msg = str(err.value)
    print(msg)
    assert msg.startswith(f"{tmp_path / 'step-00000004'} was written with different dp_size (1);")
    assert "dp_size = processes / --cp-size" in msg
    assert "Use the same arguments, --resume never, or a new --output-dir." in msg


def test_every_changed_data_argument_is_named_with_its_saved_value(tmp_path):
    with pytest.raises(ResumeError, match=r"different --seq-len, --no-pack, --data \(32, True, \['b.jsonl'\]\);"):
        check_resume_compatible(tmp_path / "step-00000004", saved(seq_len=32, no_pack=True, data=["b.jsonl"]), ARGS, 1)


@pytest.mark.parametrize("name", ["batch_size", "grad_accum", "seed", "model"])
def test_each_data_argument_is_checked(tmp_path, name):
    flag = "--" + name.replace("_", "-")
    with pytest.raises(ResumeError, match=f"different {flag} "):
        check_resume_compatible(tmp_path / "step-00000004", saved(**{name: "other"}), ARGS, 1)


def test_changed_schedule_is_allowed_with_a_warning(tmp_path):
    warnings = check_resume_compatible(tmp_path / "step-00000004", saved(lr=1e-3, steps=12), ARGS, 1)
    print(warnings)
    assert len(warnings) == 2
    assert warnings[0].startswith("--lr was 0.001 when step-00000004 was saved;")
    assert warnings[1].startswith("--steps was 12 when step-00000004 was saved;")
    assert all("changes the schedule from here on" in w for w in warnings)


def test_what_an_older_checkpoint_did_not_record_is_not_compared(tmp_path):
    old = {"step": 4, "args": {"seq_len": 64}}  # no dp_size, no other arguments
    assert check_resume_compatible(tmp_path / "step-00000004", old, ARGS, dp_size=3) == []
    assert check_resume_compatible(tmp_path / "step-00000004", {"step": 4}, ARGS, dp_size=3) == []
    assert issubclass(ResumeError, ValueError)


# -- the per-step log ------------------------------------------------------------------------------

def rows(*steps):
    return "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in steps)


def test_log_step():
    assert log_step('{"step": 7, "loss": 1.5}') == 7
    assert log_step('{"loss": 1.5}') == 0
    assert log_step('{"step": 7, "lo') > 10**15  # a torn line: after every step
    assert log_step("[1, 2]") > 10**15


def test_truncation_keeps_exactly_the_steps_up_to_the_resumed_one(tmp_path):
    log = tmp_path / "log.jsonl"
    # a killed run: steps 1..6 logged, the last line torn; resumed from the checkpoint of step 4
    log.write_text(rows(1, 2, 3, 4, 5, 6) + '{"step": 7, "lo')
    assert truncate_log(log, 4) == 3
    assert [log_step(r) for r in log.read_text().splitlines()] == [1, 2, 3, 4]
    assert log.read_text() == rows(1, 2, 3, 4)  # the kept rows unchanged, one per line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.jsonl"]  # no temporary left
    assert truncate_log(log, 0) == 4 and log.read_text() == ""


def test_truncation_without_redone_steps_leaves_the_file_alone(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text(rows(1, 2) + "\n")
    inode = os.stat(log).st_ino
    assert truncate_log(log, 2) == 0
    assert log.read_text() == rows(1, 2) + "\n" and os.stat(log).st_ino == inode  # not rewritten
    assert truncate_log(tmp_path / "missing.jsonl", 3) == 0
    assert not (tmp_path / "missing.jsonl").exists()


def test_truncation_is_atomic(tmp_path, monkeypatch):
    log = tmp_path / "log.jsonl"
    log.write_text(rows(1, 2, 3))
    inode = os.stat(log).st_ino
    truncate_log(log, 2)
    assert os.stat(log).st_ino != inode  # a new file renamed over the log, not a rewrite in place

    log.write_text(rows(1, 2, 3))
    before = log.read_bytes()

    def killed(src, dst):  # the process dies just before the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(resume.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        truncate_log(log, 1)
    assert log.read_bytes() == before  # the old log, whole
