"""Nothing lost: a CP = 2 training run under a real `accelerate launch`, SIGKILLed (every process)
in the middle of a checkpoint save, leaves the previous checkpoint complete and loadable, and a
plain rerun resumes from the newest complete checkpoint on the bit-identical loss trajectory.

The kill is deterministic: tests/fault_train.py runs scripts/train.py with the main process
stopped at one phase of one save (see its docstring); the test waits for its marker file, then
kills the whole process tree, like a node failure at that moment."""

from __future__ import annotations

import subprocess
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
import test_train_script
from test_train_script import ROOT, TRAIN, _env, kill_tree, losses_of, run, train_cmd

from hf_striped.training.checkpoint import MODEL_FILE, OPTIMIZER_FILE, STATE_FILE, complete_checkpoints

FAULT = ROOT / "tests" / "fault_train.py"
workdir = test_train_script.workdir  # the same data file, made once for this module

# phase:step to stop at, extra arguments, newest complete checkpoint after the kill, what is left over
CASES = {
    "mid-weight-write": ("weights:4", (), 2, ".step-00000004.tmp"),
    "before-state-file": ("state:4", (), 2, ".step-00000004.tmp"),
    "before-rename": ("rename:4", (), 2, ".step-00000004.tmp"),
    "mid-prune": ("prune:2", ("--keep-checkpoints", "1"), 4, ".step-00000002.del"),  # pruned by the save of step 4
}


@pytest.fixture(scope="module")
def reference(workdir, tiny_llama_dir):
    out = workdir / "uninterrupted"
    proc = run(train_cmd(tiny_llama_dir, workdir / "data.jsonl", out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return losses_of(out)


def kill_during_save(cmd, pause_at, marker, timeout=120):
    cmd = [str(FAULT) if c == str(TRAIN) else c for c in cmd]
    env = _env(HF_STRIPED_TEST_PAUSE_AT=pause_at, HF_STRIPED_TEST_PAUSE_MARKER=str(marker))
    log = marker.with_suffix(".log")
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd="/", start_new_session=True)
        deadline = time.monotonic() + timeout
        while not marker.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                kill_tree(proc.pid)
                pytest.fail(f"never paused at {pause_at}:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)
        killed = kill_tree(proc.pid)
        proc.wait(timeout=60)
    print(f"{pause_at}: {marker.read_text()}; SIGKILLed {killed} processes")
    assert killed >= 3  # launcher and both ranks
    assert proc.returncode != 0
    return log.read_text()


@pytest.mark.parametrize("case", list(CASES))
def test_kill_during_save_then_resume(case, reference, workdir, tiny_llama_dir, tmp_path):
    pause_at, extra, newest, leftover = CASES[case]
    out = tmp_path / "run"
    cmd = train_cmd(tiny_llama_dir, workdir / "data.jsonl", out, extra=extra)
    kill_during_save(cmd, pause_at, tmp_path / "paused")
    ckpts = out / "checkpoints"
    print("left on disk:", sorted(p.name for p in ckpts.iterdir()))
    assert not (out / "final").exists()
    assert (ckpts / leftover).is_dir()  # the interrupted operation's folder
    if case == "mid-weight-write":  # the half-written weights file is really on disk, and unreadable
        with pytest.raises(Exception):
            safe_open(str(ckpts / leftover / MODEL_FILE), "pt")
    if case in ("mid-weight-write", "before-state-file"):
        assert not (ckpts / leftover / STATE_FILE).exists()
    if case == "before-rename":  # complete, but under its temporary name: not a checkpoint yet
        assert (ckpts / leftover / STATE_FILE).exists()

    # the newest complete checkpoint is the one before the interrupted save (or the new one, once renamed)
    assert [p.name for p in complete_checkpoints(ckpts)][-1] == f"step-{newest:08d}"
    latest = ckpts / f"step-{newest:08d}"
    load_file(str(latest / MODEL_FILE))  # its files are whole
    torch.load(latest / OPTIMIZER_FILE, weights_only=True)

    resumed = run(cmd)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"removed {leftover}, left by a save that never finished" in resumed.stdout, resumed.stdout
    assert f"resumed from {latest} (step {newest}," in resumed.stdout, resumed.stdout
    assert not [p.name for p in ckpts.iterdir() if p.name.startswith(".")]
    print("uninterrupted:", reference, "\nresumed:     ", losses_of(out))
    assert losses_of(out) == reference  # bit-identical: same weights, optimizer, scheduler, data, RNG
