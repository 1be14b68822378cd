"""scripts/train.py under a real `accelerate launch` (2 gloo processes): losses equal one
process, a SIGKILLed run resumes on the identical loss trajectory, the final folder loads with
plain Transformers, its model card parses, and a failed upload leaves it intact."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hf_striped

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "scripts" / "train.py"
CONFIG = ROOT / "scripts" / "accelerate" / "cpu.yaml"
STEPS = 6


def _env(**extra):
    """One thread per process, and the launched scripts import the hf_striped these tests import
    (an installed package, or a checkout such as a git worktree put on PYTHONPATH), not whatever
    the interpreter would find first."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **extra)
    env["PYTHONPATH"] = str(Path(hf_striped.__file__).resolve().parents[1])
    return env


def _accelerate() -> list[str]:
    exe = Path(sys.executable).with_name("accelerate")
    return [str(exe), "launch", "--config_file", str(CONFIG), "--main_process_port", "0"]


def train_cmd(model, data, out, cp_size=2, extra=()):
    args = [str(TRAIN), "--model", str(model), "--data", str(data), "--seq-len", "64", "--steps", str(STEPS),
            "--save-every", "2", "--output-dir", str(out), "--no-progress", "--cp-size", str(cp_size), *extra]
    if cp_size == 1:
        return [sys.executable, *args]
    return [*_accelerate(), "--num_processes", str(cp_size), *args]


def run(cmd, **env):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env(**env), cwd="/")
    return proc


def kill_tree(pid: int) -> int:
    """SIGKILL ``pid`` and all its descendants (torchrun starts its workers in their own sessions,
    so killing the launcher's process group alone leaves them running). Returns how many died."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    todo, tree = [pid], []
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(tree)


def losses_of(out: Path) -> list[float]:
    return json.loads((out / "final" / "training_log.json").read_text())["losses"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_llama_dir):
    d = tmp_path_factory.mktemp("train")
    rng = random.Random(0)
    with open(d / "data.jsonl", "w") as f:
        for _ in range(30):
            f.write(json.dumps({"input_ids": [rng.randrange(3, 128) for _ in range(rng.randint(50, 200))]}) + "\n")
    return d


@pytest.fixture(scope="module")
def cp_run(workdir, tiny_llama_dir):
    """An uninterrupted CP = 2 run that also tries (and, offline, fails) to push to the Hub."""
    out = workdir / "cp2"
    proc = run(train_cmd(tiny_llama_dir, workdir / "data.jsonl", out, extra=("--push-to-hub", "someone/tiny-striped")),
               HF_HUB_OFFLINE="1", HF_TOKEN="hf_secret_token_must_not_leak")
    return out, proc


def test_accelerate_launch_cp2_matches_one_process(cp_run, workdir, tiny_llama_dir):
    out, proc = cp_run
    assert "[train] step 6/6" in proc.stdout, proc.stdout + proc.stderr
    assert "packed documents kept apart" in proc.stdout  # the default: documents never attend to each other
    single = run(train_cmd(tiny_llama_dir, workdir / "data.jsonl", workdir / "single", cp_size=1))
    assert single.returncode == 0, single.stderr
    cp, one = losses_of(out), losses_of(workdir / "single")
    print("cp2:", cp, "\none:", one)
    assert len(cp) == len(one) == STEPS
    for a, b in zip(cp, one):
        assert abs(a - b) <= 1e-5 * abs(b)


def test_failed_push_is_clear_and_keeps_the_folder(cp_run):
    out, proc = cp_run
    assert proc.returncode != 0, proc.stderr[-2000:]  # the script exits 3; the launcher reports 1
    assert "could not upload" in proc.stderr and "local folder is intact" in proc.stderr
    assert "hf_secret_token_must_not_leak" not in proc.stdout + proc.stderr
    assert (out / "final" / "model.safetensors").is_file() and (out / "final" / "README.md").is_file()


def test_final_folder_loads_with_plain_transformers(cp_run):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out, _ = cp_run
    config = json.loads((out / "final" / "config.json").read_text())
    assert "striped_ring" not in json.dumps(config)  # loads without hf_striped installed
    model = AutoModelForCausalLM.from_pretrained(out / "final", attn_implementation="sdpa")
    probe = load_file(str(out / "probe.safetensors"))
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"]).logits
    err = float((logits - probe["logits"]).abs().max())
    print(f"saved folder (sdpa, one process) vs trained model (CP 2) logits: max diff {err:.1e}")
    assert err <= 1e-4


def test_model_card_metadata_parses(cp_run):
    from huggingface_hub import ModelCard

    out, _ = cp_run
    card = ModelCard.load(out / "final" / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and "hf-striped" in data["tags"]
    assert data["pipeline_tag"] == "text-generation"
    assert "base_model" not in data  # a local folder is not a Hub id
    for needle in ("64 tokens", "| context-parallel size | 2 (layout `striped`) |", "import hf_striped", "torch 2."):
        assert needle in card.text, needle
    assert f"| final training loss | {losses_of(out)[-1]:.4f} |" in card.text


def test_sigkill_mid_training_resumes_on_the_same_trajectory(cp_run, workdir, tiny_llama_dir):
    out = workdir / "killed"
    cmd = train_cmd(tiny_llama_dir, workdir / "data.jsonl", out)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), cwd="/", start_new_session=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("[train] step 5/"):  # checkpoint 4 is complete; kill every process mid-run
            assert kill_tree(proc.pid) >= 3  # launcher and both ranks
            break
    proc.wait(timeout=60)
    assert proc.returncode != 0, "".join(seen)
    assert not (out / "final").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step-"))[-1] == "step-00000004"
    resumed = run(cmd)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "(step 4," in resumed.stdout, resumed.stdout
    print("uninterrupted:", losses_of(cp_run[0]), "\nresumed:     ", losses_of(out))
    assert losses_of(out) == losses_of(cp_run[0])  # bit-identical: same weights, optimizer, data, RNG


def test_cp_size_that_does_not_divide_the_world_fails_clearly(workdir, tiny_llama_dir):
    cmd = train_cmd(tiny_llama_dir, workdir / "data.jsonl", workdir / "bad")
    proc = run([*cmd[: cmd.index("--cp-size")], "--cp-size", "3"])  # 2 processes, CP 3
    assert proc.returncode != 0
    assert "cp_size=3 does not divide the world size 2" in proc.stdout + proc.stderr


def test_sequence_longer_than_the_model_positions_fails_clearly(workdir, tiny_llama_dir):
    proc = run([sys.executable, str(TRAIN), "--model", str(tiny_llama_dir), "--data", str(workdir / "data.jsonl"),
                "--seq-len", "1024", "--cp-size", "1", "--output-dir", str(workdir / "long")])
    assert proc.returncode != 0
    assert "exceeds the model's max_position_embeddings 512" in proc.stderr


def test_bf16_training_runs_close_to_fp32(cp_run, workdir, tiny_llama_dir):
    out = workdir / "bf16"
    proc = run(train_cmd(tiny_llama_dir, workdir / "data.jsonl", out, extra=("--precision", "bf16", "--grad-accum", "2")))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    bf16 = losses_of(out)
    fp32 = json.loads((cp_run[0] / "final" / "training_log.json").read_text())["losses"]
    print("bf16 (grad-accum 2):", bf16)
    assert len(bf16) == STEPS and all(math.isfinite(x) for x in bf16)
    # different data per step (2 micro-batches) and bf16 autocast: only the scale must agree
    assert abs(sum(bf16) / STEPS - sum(fp32) / STEPS) < 0.5


def test_resume_with_different_data_arguments_is_refused(cp_run, workdir, tiny_llama_dir):
    out, _ = cp_run  # has complete checkpoints written with --seq-len 64
    cmd = train_cmd(tiny_llama_dir, workdir / "data.jsonl", out, cp_size=1)
    proc = run([*cmd[: cmd.index("--seq-len")], "--seq-len", "32", *cmd[cmd.index("--seq-len") + 2:]])
    assert proc.returncode != 0
    assert "different --seq-len (64)" in proc.stderr and "--resume never" in proc.stderr


def test_a_fresh_run_into_a_folder_with_newer_checkpoints_is_refused(cp_run, workdir, tiny_llama_dir):
    out, _ = cp_run  # holds step-4 and step-6 of a finished run
    proc = run([*train_cmd(tiny_llama_dir, workdir / "data.jsonl", out, cp_size=1), "--resume", "never"])
    assert proc.returncode != 0
    assert "ahead of where this run starts (step 0): step-00000004, step-00000006" in proc.stderr


def test_resume_with_a_different_data_parallel_size_is_refused(cp_run, workdir, tiny_llama_dir):
    out, _ = cp_run  # written by 2 processes with CP 2: one data-parallel replica
    cmd = train_cmd(tiny_llama_dir, workdir / "data.jsonl", out)  # 2 processes ...
    proc = run([*cmd[: cmd.index("--cp-size")], "--cp-size", "1"])  # ... as 2 replicas of CP 1
    assert proc.returncode != 0
    assert "different dp_size (1)" in proc.stdout + proc.stderr
