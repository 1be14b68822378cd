"""scripts/generate.py under a real `accelerate launch` (2 gloo processes) with SmolLM2: the
continuation it prints equals one process's greedy ``generate()`` with sdpa, it reports the
per-rank KV-cache bytes, and bad input fails clearly on every rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
GENERATE = ROOT / "scripts" / "generate.py"
CONFIG = ROOT / "scripts" / "accelerate" / "cpu.yaml"
PROMPT = "Name three colours of the rainbow."
NEW = 10


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)
    return env


def launch(*args, nproc=2, stdin=None):
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--config_file", str(CONFIG), "--main_process_port", "0", "--num_processes",
           str(nproc), str(GENERATE), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=_env(), cwd="/", input=stdin)


def continuation(stdout: str) -> str:
    start, end = "----- continuation -----\n", "\n----- end -----"
    assert start in stdout and end in stdout, stdout
    return stdout.split(start, 1)[1].split(end, 1)[0]


@pytest.fixture(scope="module")
def cp_run(tmp_path_factory, smollm2_dir):
    out = tmp_path_factory.mktemp("generate") / "out.json"
    # the prompt on standard input (read by rank 0), wrapped in the chat template
    proc = launch("--model", smollm2_dir, "--prompt-file", "-", "--chat", "--max-new-tokens", NEW, "--json", out,
                  stdin=PROMPT + "\n")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def test_cp2_prints_one_process_greedy_continuation(cp_run, smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    proc, result = cp_run
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT + "\n"}], add_generation_prompt=True,
                                        tokenize=True, return_dict=True)["input_ids"]
    assert result["prompt_ids"] == list(ids)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, attn_implementation="sdpa", dtype=torch.float32).eval()
    prompt = torch.tensor([list(ids)])
    with torch.no_grad():
        ref = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW,
                             do_sample=False, temperature=None, top_p=None, top_k=None,
                             pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                             else tokenizer.eos_token_id)
    ref_new = ref[0, prompt.shape[1]:].tolist()
    print("CP 2:", result["new_ids"], "\none process:", ref_new)
    assert result["new_ids"] == ref_new
    assert continuation(proc.stdout) == tokenizer.decode(ref_new, skip_special_tokens=True)
    assert "[generate] prefill: " in proc.stdout and "tokens/s" in proc.stdout
    assert "prefill (layers)" in proc.stderr  # rank 0's progress bar


def test_memory_line_reports_each_rank_and_one_process(cp_run):
    proc, result = cp_run
    line = next(x for x in proc.stdout.splitlines() if x.startswith("[generate] KV cache:"))
    assert "rank 0 " in line and "rank 1 " in line and "one process would hold" in line, line
    n = result["prompt_tokens"] + len(result["new_ids"]) - 1  # the last new token is never fed back
    assert result["cache_length"] == n and sum(result["cache_tokens"]) == n
    assert abs(result["cache_tokens"][0] - result["cache_tokens"][1]) <= 1  # round-robin: shards within a token
    assert max(result["cache_bytes"]) / sum(result["cache_bytes"]) <= 0.5 + 1 / n


def test_cp_size_that_does_not_divide_the_world_fails_clearly(smollm2_dir):
    proc = launch("--model", smollm2_dir, "--prompt", "hi", "--cp-size", 3)
    assert proc.returncode != 0
    assert "[generate] error: --cp-size 3 does not divide the number of processes (2)" in proc.stdout + proc.stderr


def test_empty_and_missing_prompt_files_fail_clearly(tmp_path, smollm2_dir):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    proc = launch("--model", smollm2_dir, "--prompt-file", empty)
    assert proc.returncode != 0
    assert f"[generate] error: the prompt ({empty}) is empty" in proc.stdout + proc.stderr
    proc = launch("--model", smollm2_dir, "--prompt-file", tmp_path / "nope.txt", nproc=1)
    assert proc.returncode != 0
    assert "no such file" in proc.stdout + proc.stderr
