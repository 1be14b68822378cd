"""StripedTrainer under a real `accelerate launch` (CP = 2) logs the same train and eval losses
as the stock transformers.Trainer on one process (sdpa, a plain right-padding collator)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from test_train_script import CONFIG, _accelerate, _env

CASE = Path(__file__).with_name("trainer_case.py")


def _run(cmd):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env(), cwd="/")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.parametrize(
    "world, plain_batch, flatten",
    [
        (2, 2, False),  # CP 2: both ranks see the same 2-row batches the one process sees
        (4, 4, False),  # 2 data-parallel replicas x CP 2, 2 rows each: one process with 4-row batches
        (2, 2, True),  # padding-free: DataCollatorWithFlattening rows, documents kept apart under CP 2
    ],
)
def test_striped_trainer_matches_the_stock_trainer(tmp_path, tiny_llama_dir, world, plain_batch, flatten):
    plain, cp = tmp_path / "plain", tmp_path / "cp"
    rows = ["--eval-rows", "7"] + (["--flatten"] if flatten else [])  # a last eval batch of one row
    _run([sys.executable, str(CASE), str(tiny_llama_dir), str(plain), "--plain", "--train-batch", str(plain_batch), *rows])
    _run([*_accelerate(), "--num_processes", str(world), str(CASE), str(tiny_llama_dir), str(cp), "--cp-size", "2", *rows])
    ref, got = (json.loads((d / "result.json").read_text()) for d in (plain, cp))
    print("one process:", ref, f"\n{world // 2} x CP 2:    ", got)
    assert len(got["train_losses"]) == len(ref["train_losses"]) == 4
    for a, b in zip(got["train_losses"], ref["train_losses"]):
        assert a == pytest.approx(b, rel=1e-5)
    if flatten:  # the stock Trainer weighs padding-free eval batches its own way: compare with the plain computation
        assert got["eval_loss"] == pytest.approx(got["documents_eval_loss"], rel=1e-5)
    else:
        assert got["eval_loss"] == pytest.approx(ref["eval_loss"], rel=1e-5)
    assert CONFIG.is_file()


def test_trainer_refuses_a_model_without_striped_ring(dist_pool):
    results = dist_pool(2).run(_sdpa_model_with_cp)
    assert all("attn_implementation='striped_ring'" in r for r in results), results


def _sdpa_model_with_cp(rank, world):
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    from transformers import LlamaForCausalLM

    from hf_striped.training.trainer import StripedTrainer, StripedTrainingArguments
    from models import tiny_llama_config

    model = LlamaForCausalLM(tiny_llama_config())  # sdpa by default
    args = StripedTrainingArguments(output_dir="/tmp/unused", cp_size=2, use_cpu=True, report_to=[])
    try:
        StripedTrainer(model=model, args=args)
    except ValueError as exc:
        return str(exc)
    return "no error"
