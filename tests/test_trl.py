"""hf_striped.trl: TRL's SFTTrainer (and PEFT LoRA through it) under context parallelism.

* losses, entropy, token accuracy, token counts, eval metrics and every trainable gradient of
  StripedSFTTrainer under CP 2 (2 gloo processes) and 2 data-parallel replicas x CP 2 (4) equal
  TRL's stock SFTTrainer on one process (sdpa) on the same global batches: prompt-completion data
  with completion-only loss, packed; conversations with assistant-only loss, padded, LoRA;
  plain text padding-free, LoRA (tolerances of docs/design.md section 9: loss 1e-5 relative,
  gradients 1e-4 of the largest);
* the real SmolLM2-135M-Instruct, chat data, LoRA, under a real `accelerate launch` (CP 2): a sane
  decreasing loss, an adapter folder that loads with plain PEFT, and a merge that keeps the logits;
* options that cannot be exact under CP are refused at construction with the fix;
* ``import hf_striped`` never imports TRL.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("peft")

import trl_workers as W  # noqa: E402
from test_train_script import _accelerate  # noqa: E402

SMOKE = Path(__file__).with_name("trl_smoke.py")
DPCP_CASES = ["completion_packed", "assistant_padded_lora"]


def _env(**extra) -> dict:
    """Offline, without telemetry; PYTHONPATH kept, so launched processes import the hf_striped this
    session imports (as the gloo pools, which inherit sys.path, do)."""
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
                HF_HUB_DISABLE_TELEMETRY="1", **extra)


# -- exactness against the stock SFTTrainer ---------------------------------------------------


def _overlapped(pool, names, out_dir, sdpa_refusal, batch, tmp_path_factory):
    """Run ``names`` under CP in ``pool`` while this process runs the one-process references with
    ``batch``-row batches (the pool's ranks wait on each other's ring steps; the references fill
    those gaps). Returns (CP results, references)."""
    with ThreadPoolExecutor(1) as ex:
        cp = ex.submit(pool.run, W.pool_cases, names, out_dir, sdpa_refusal)
        refs = {name: W.run_case(name, str(tmp_path_factory.mktemp(f"trl-one-{name}")), cp_size=1,
                                 batch=batch) for name in names}
        return cp.result()[0], refs


@pytest.fixture(scope="module")
def cp_runs(dist_pool, tmp_path_factory):
    """Every case once under CP 2 (one pool task), plus the refusal of an sdpa model, and the
    stock trainer's runs with the same 2-row batches."""
    d = tmp_path_factory.mktemp("trl-cp2")
    return _overlapped(dist_pool(2), list(W.CASES), str(d), True, 2, tmp_path_factory)


@pytest.fixture(scope="module")
def dpcp_runs(dist_pool, tmp_path_factory):
    """2 replicas of 2 rows each; the stock trainer with 4-row batches."""
    d = tmp_path_factory.mktemp("trl-dp2cp2")
    return _overlapped(dist_pool(4), DPCP_CASES, str(d), False, 4, tmp_path_factory)


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def _compare(name: str, ref: dict, got: dict) -> None:
    print("one process:", ref["logs"], ref["eval"], "\nCP:         ", got["logs"], got["eval"])
    kind, _, lora = W.CASES[name]
    lora = lora is not None
    assert len(ref["logs"]) == len(got["logs"]) == 2
    if kind != "text":  # completion-only / assistant-only masks: some targets kept, some masked
        assert 0.1 < ref["masked"] < 0.9, ref["masked"]
    if ref["documents"] is not None:  # packed: rows of several documents
        assert ref["documents"] > ref["train_rows"], (ref["documents"], ref["train_rows"])
    for a, b in zip(got["logs"], ref["logs"]):
        assert math.isfinite(b["loss"]) and b["loss"] > 0
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["entropy"] == pytest.approx(b["entropy"], rel=1e-5)
        # a ratio of counts: equal unless fp32 noise flips an argmax tie (none here)
        assert a["mean_token_accuracy"] == pytest.approx(b["mean_token_accuracy"], abs=1e-6)
        assert a["num_tokens"] == b["num_tokens"]  # real tokens, not the padding the striping adds
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)  # the gradients' 1e-4
    for key in ("eval_loss", "eval_entropy"):
        assert got["eval"][key] == pytest.approx(ref["eval"][key], rel=1e-5), key
    accuracy = ref["eval"]["eval_mean_token_accuracy"]
    assert got["eval"]["eval_mean_token_accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert got["eval"]["eval_num_tokens"] == ref["eval"]["eval_num_tokens"]
    assert got["peft"] == ref["peft"] == lora
    assert len(got["grads"]) == len(ref["grads"]) == 2
    for step, (g, r) in enumerate(zip(got["grads"], ref["grads"]), 1):
        assert g.keys() == r.keys() and r
        if lora:
            assert all("lora_" in n for n in r), sorted(r)[:4]  # only the adapter trains
        worst = max(_max_err(g[n], r[n]) / float(r[n].abs().max()) for n in r if r[n].abs().max() > 0)
        print(f"step {step}: {len(r)} trainable tensors, worst gradient error {worst:.1e} of the largest")
        for n in r:  # docs/design.md section 9: max|g_cp - g_one| <= 1e-4 max|g_one| per parameter
            assert _max_err(g[n], r[n]) <= 1e-4 * float(r[n].abs().max()), (step, n)
        # LoRA's B starts at 0, so A's gradient is 0 at step 1; every tensor moves afterwards
        assert sum(float(r[n].abs().max()) > 0 for n in r) >= (len(r) // 2 if step == 1 else len(r))


@pytest.mark.parametrize("name", list(W.CASES))
def test_cp2_matches_the_stock_sft_trainer(name, cp_runs):
    got, refs = cp_runs
    _compare(name, refs[name], got[name])


@pytest.mark.parametrize("name", DPCP_CASES)
def test_dp2_x_cp2_matches_the_stock_sft_trainer(name, dpcp_runs):
    got, refs = dpcp_runs
    assert refs[name]["train_rows"] % 4 == 0  # no replica's last batch is evened out with repeated rows
    _compare(name, refs[name], got[name])


def test_cp_refuses_a_model_without_striped_ring(cp_runs):
    message = cp_runs[0]["refusal"]
    assert "attn_implementation='striped_ring'" in message and "model_init_kwargs" in message, message


# -- SmolLM2, LoRA, real accelerate launch ----------------------------------------------------


def test_smollm2_chat_lora_under_accelerate_launch(tmp_path):
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "smoke"
    cmd = [*_accelerate(), "--num_processes", "2", str(SMOKE), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=_env(), cwd="/")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    losses = result["losses"]
    print("SmolLM2 LoRA, CP 2, packed chats:", result)
    assert len(losses) == 2 and all(math.isfinite(x) and 0 < x < 10 for x in losses)
    assert losses[1] < losses[0]  # the same packed row again, after one LoRA step on it
    assert result["packed_rows"] == 1 and result["num_tokens"] > 0

    adapter = out / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert sorted(config["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert keys and all("lora_A" in k or "lora_B" in k for k in keys)  # the adapter only, no base weights
        assert max(float(f.get_tensor(k).abs().max()) for k in keys if "lora_B" in k) > 0  # trained

    tokenizer = AutoTokenizer.from_pretrained(result["base"])
    chat = [{"role": "user", "content": "What do bees make?"}]
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(result["base"], attn_implementation="sdpa",
                                                dtype=torch.float32)
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        model = PeftModel.from_pretrained(base, adapter)  # plain PEFT, no hf_striped
        tuned = model(input_ids=ids).logits
        merged = model.merge_and_unload()
        merged_logits = merged(input_ids=ids).logits
    moved, merge_err = _max_err(tuned, plain), _max_err(merged_logits, tuned)
    print(f"adapter moves the logits by {moved:.2e}; merged vs adapter {merge_err:.1e} (max |logit| "
          f"{float(tuned.abs().max()):.1f})")
    assert moved > 1e-2
    assert type(merged).__name__ == "LlamaForCausalLM"
    # W + BA folded into one fp32 matrix reorders the sums: fp32 rounding of 30 layers, far below
    # what the adapter changed
    assert merge_err <= 1e-4 * float(tuned.abs().max())


# -- refusals -----------------------------------------------------------------------------------


def _config(tmp_path, **kw):
    from hf_striped.trl import StripedSFTConfig

    return StripedSFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, **kw)


@pytest.mark.parametrize("option, value, fix", [
    ("label_smoothing_factor", 0.1, "label_smoothing_factor=0.0"),
    ("neftune_noise_alpha", 5.0, "neftune_noise_alpha=None"),
    ("router_aux_loss_coef", 0.01, "router_aux_loss_coef=0.0"),
    ("use_liger_kernel", True, "use_liger_kernel=False"),
    ("activation_offloading", True, "activation_offloading=False"),
    ("train_sampling_strategy", "batch_rebalance", "train_sampling_strategy='random'"),
])
def test_config_refuses_what_cannot_be_exact(tmp_path, option, value, fix):
    with pytest.raises(ValueError, match="context parallelism") as err:
        _config(tmp_path, cp_size=2, **{option: value})
    assert f"{option}={value!r}" in str(err.value) and fix in str(err.value), str(err.value)
    assert _config(tmp_path, cp_size=1, **{option: value}).cp_size == 1  # fine without CP


def test_config_validates_like_striped_training_arguments(tmp_path):
    cfg = _config(tmp_path, cp_size=2, cp_layout="zigzag", cp_timeout=12)
    assert cfg.cp_options.layout == "zigzag" and cfg.cp_options.timeout == 12
    assert cfg.gradient_checkpointing  # SFTConfig's own defaults are kept
    with pytest.raises(ValueError, match="layout"):
        _config(tmp_path, cp_layout="diag")
    with pytest.raises(ValueError, match="average_tokens_across_devices=True"):
        _config(tmp_path, cp_size=2, average_tokens_across_devices=False)


def _trainer(tmp_path, model=None, **kw):
    import hf_striped
    from datasets import Dataset

    from hf_striped.trl import StripedSFTTrainer

    tokenizer = W.chat_tokenizer()
    model = model if model is not None else W.tiny_model(tokenizer, hf_striped.ATTN_IMPLEMENTATION)
    return StripedSFTTrainer(model=model, args=_config(tmp_path, cp_size=2), processing_class=tokenizer,
                             train_dataset=Dataset.from_list(W.rows("text", 2, 0)), **kw)


@pytest.mark.parametrize("option, fix", [
    ("compute_loss_func", "override compute_loss"),
    ("compute_metrics", "one-process run"),
    ("preprocess_logits_for_metrics", "Drop it"),
])
def test_trainer_refuses_logit_hooks(tmp_path, option, fix):
    with pytest.raises(ValueError, match=option) as err:
        _trainer(tmp_path, **{option: lambda *a, **k: None})
    assert fix in str(err.value)


def test_trainer_refuses_prompt_learning_and_alora(tmp_path):
    import hf_striped
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model

    for cfg in (PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
                PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)):
        with pytest.raises(ValueError, match="prompt-learning PEFT adapter") as err:
            _trainer(tmp_path, peft_config=cfg)
        assert "LoraConfig" in str(err.value)
    # a PEFT model built beforehand is checked after TRL's own set-up
    model = get_peft_model(W.tiny_model(W.chat_tokenizer(), hf_striped.ATTN_IMPLEMENTATION),
                           PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with pytest.raises(ValueError, match="prompt-learning PEFT adapter"):
        _trainer(tmp_path, model=model)
    with pytest.raises(ValueError, match="aLoRA") as err:
        _trainer(tmp_path, peft_config=LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"],
                                                  alora_invocation_tokens=[5, 6]))
    assert "alora_invocation_tokens=None" in str(err.value)


def test_trainer_refuses_a_moe_router_loss_by_default(tmp_path):
    import hf_striped
    from transformers import MixtralConfig, MixtralForCausalLM

    tokenizer = W.chat_tokenizer()
    config = MixtralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=32,
                           num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                           num_local_experts=2, num_experts_per_tok=1, pad_token_id=tokenizer.pad_token_id)
    model = MixtralForCausalLM._from_config(config, attn_implementation=hf_striped.ATTN_IMPLEMENTATION)
    with pytest.raises(ValueError, match="MoE router auxiliary loss") as err:
        _trainer(tmp_path, model=model)  # router_aux_loss_coef unset: the config's default is on
    assert "router_aux_loss_coef=0.0" in str(err.value)


def test_import_hf_striped_does_not_import_trl():
    code = ("import sys, hf_striped; hf_striped.StripedTrainingArguments; "
            "import hf_striped.training.trainer; print([m for m in ('trl', 'peft') if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=_env(), cwd="/")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "trl" not in proc.stdout, proc.stdout
