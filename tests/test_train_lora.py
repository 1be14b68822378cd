"""scripts/train.py --lora on chat data, under a real `accelerate launch` (2 gloo processes):

- a LoRA run under CP 2 gives the losses and gradient norms of one process, and in a gloo pool
  every adapter gradient of a packed step equals one process's (docs/design.md section 9);
- its checkpoints hold only the adapter, and a run resumed from one repeats the uninterrupted
  losses bit for bit;
- the final folder is a PEFT adapter folder (``PeftModel.from_pretrained``) with hf-striped's
  model card, and ``--merge-lora``'s merged model gives the adapter model's logits;
- conversations are masked to their assistant turns (content + ``<|im_end|>``), checked against
  Transformers' own ``{% generation %}`` masks, and packed whole as separate documents;
- bad input fails with errors that say what to fix;
- the real SmolLM2-135M-Instruct trains a LoRA adapter on the generated chats under CP 2.

The exactness runs use a tiny random Llama with SmolLM2's tokenizer (and chat template).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hf_striped
from hf_striped.tools import textdata
from hf_striped.tools.textdata import ChatFormatError, assistant_spans, chat_tokens, check_messages
from hf_striped.training.data import StripingCollator
from models import LORA_TARGETS, lora_model, save_tiny_llama
from train_workers import lora_step_case

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "scripts" / "train.py"
CONFIG = ROOT / "scripts" / "accelerate" / "cpu.yaml"
STEPS = 4
CONVERSATION = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "What is 2 plus 3?"},
    {"role": "assistant", "content": "2 plus 3 is 5."},
    {"role": "user", "content": "And what is that times 4?"},
    {"role": "assistant", "content": " 5 times 4 is 20.\n"},  # leading space, trailing newline: both trained
]
USER = {"role": "user", "content": "hi"}


def _env(**extra):
    """The launched processes import the hf_striped these tests import (a worktree on PYTHONPATH
    included), with one thread each."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", **extra)
    env["PYTHONPATH"] = str(Path(hf_striped.__file__).resolve().parents[1])
    return env


def train_cmd(model, out, cp_size=2, extra=()):
    args = [str(TRAIN), "--model", str(model), "--chat-demo", "--seq-len", "128", "--steps", str(STEPS),
            "--lr", "1e-3", "--save-every", "2", "--output-dir", str(out), "--no-progress",
            "--cp-size", str(cp_size), "--lora", "--merge-lora", *extra]
    if cp_size == 1:
        return [sys.executable, *args]
    exe = Path(sys.executable).with_name("accelerate")
    return [str(exe), "launch", "--config_file", str(CONFIG), "--main_process_port", "0", "--num_processes",
            str(cp_size), *args]


def run(cmd, **env):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env(**env), cwd="/")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def losses_of(out: Path) -> list[float]:
    return json.loads((out / "final" / "training_log.json").read_text())["losses"]


def grad_norms_of(out: Path) -> list[float]:
    return [json.loads(line)["grad_norm"] for line in (out / "log.jsonl").read_text().splitlines()]


def adapter_of(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def train_module():
    """scripts/train.py as a module (its functions, in this process)."""
    if "train_script" not in sys.modules:
        spec = importlib.util.spec_from_file_location("train_script", TRAIN)
        module = sys.modules["train_script"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
        spec.loader.exec_module(module)
    return sys.modules["train_script"]


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama with SmolLM2's vocabulary, tied embeddings and tokenizer."""
    d = tmp_path_factory.mktemp("tiny-chat")
    save_tiny_llama(d, vocab_size=len(tokenizer), tie_word_embeddings=True, pad_token_id=2, bos_token_id=1,
                    eos_token_id=2)
    tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def cp2_run(tmp_path_factory, chat_model_dir):
    out = tmp_path_factory.mktemp("lora") / "cp2"
    return out, run(train_cmd(chat_model_dir, out))


@pytest.fixture(scope="module")
def one_run(tmp_path_factory, chat_model_dir):
    out = tmp_path_factory.mktemp("lora") / "one"
    return out, run(train_cmd(chat_model_dir, out, cp_size=1))


# -- exactness -------------------------------------------------------------------------------------

def test_lora_cp2_matches_one_process(cp2_run, one_run):
    (cp, proc), (one, _) = cp2_run, one_run
    assert "LoRA rank 8, alpha 16 on q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj" in proc.stdout
    assert "whole conversations, up to 128 tokens" in proc.stdout
    l_cp, l_one = losses_of(cp), losses_of(one)
    g_cp, g_one = grad_norms_of(cp), grad_norms_of(one)
    print("losses cp2:", l_cp, "\n       one:", l_one, "\ngrad norms cp2:", g_cp, "\n           one:", g_one)
    assert len(l_cp) == len(l_one) == STEPS and len(g_cp) == STEPS
    for a, b in zip(l_cp, l_one):
        assert abs(a - b) <= 1e-5 * abs(b)
    for a, b in zip(g_cp, g_one):
        assert abs(a - b) <= 1e-4 * abs(b)
    w_cp, w_one = adapter_of(cp / "final"), adapter_of(one / "final")
    assert all(float(w.abs().max()) > 1e-4 for k, w in w_cp.items() if "lora_B" in k)  # PEFT starts B at 0
    assert set(w_cp) == set(w_one) and len(w_cp) == 2 * len(LORA_TARGETS) * 2  # A and B, 7 kinds, 2 layers
    worst = max(float((w_cp[k] - w_one[k]).abs().max() / w_one[k].abs().max()) for k in w_one)
    print(f"final adapter weights, CP 2 vs one process: worst relative difference {worst:.1e}")
    assert worst <= 1e-3


def test_lora_adapter_gradients_equal_one_process(dist_pool, tiny_llama_dir):
    """A packed step of documents with masked prompts, one split over both ranks: loss and every
    adapter gradient under CP 2 (gloo, DDP) against each document run alone on one process."""
    import random

    rng = random.Random(3)
    rows = []
    for n in (5, 60, 17, 33, 2, 41):
        ids = [rng.randrange(3, 128) for _ in range(n)]
        k = n // 3
        rows.append({"input_ids": ids, "labels": [-100] * k + ids[k:]})
    result = dist_pool(2).run(lora_step_case, tiny_llama_dir, rows, 2)[0]
    model = lora_model(tiny_llama_dir, "sdpa")
    model.train()
    total, count = 0.0, 0
    for row in rows:
        logits = model(input_ids=torch.tensor([row["input_ids"]]), use_cache=False).logits[:, :-1].float()
        labels = torch.tensor(row["labels"][1:])
        total = total + torch.nn.functional.cross_entropy(logits[0], labels, ignore_index=-100,
                                                          reduction="sum")
        count += int(labels.ne(-100).sum())
    loss = total / count
    loss.backward()
    loss = float(loss.detach())
    ref = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert set(result["grads"]) == set(ref) and len(ref) == 28
    rel_loss = abs(result["loss"] - loss) / loss
    worst = max((float((result["grads"][k] - g).abs().max() / g.abs().max()), k) for k, g in ref.items())
    print(f"LoRA CP 2: loss {result['loss']:.7f} vs {loss:.7f} (rel {rel_loss:.1e}); worst adapter "
          f"grad rel err {worst[0]:.1e} ({worst[1]})")
    assert result["num_items"] == count
    assert rel_loss <= 1e-5 and worst[0] <= 1e-4
    assert all(float(g.abs().max()) > 0 for g in ref.values())  # A and B both train


# -- checkpoints and resume -----------------------------------------------------------------------

def test_lora_checkpoints_hold_only_the_adapter(cp2_run):
    from safetensors.torch import load_file

    out, _ = cp2_run
    steps = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert steps == ["step-00000002", "step-00000004"]
    ckpt = out / "checkpoints" / "step-00000002"
    weights = load_file(str(ckpt / "model.safetensors"))
    assert len(weights) == 28, sorted(weights)[:4]
    assert all(".lora_A." in k or ".lora_B." in k for k in weights), sorted(weights)[:4]
    optimizer = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert len(optimizer["state"]) == 28  # AdamW moments of the adapter only
    size = (ckpt / "model.safetensors").stat().st_size
    print(f"checkpoint weights: {size} bytes, {sum(t.numel() for t in weights.values())} adapter parameters")
    assert size < 200_000  # the tiny model itself (3 M parameters) is 12 MB


def test_lora_resume_repeats_the_uninterrupted_losses(cp2_run, tmp_path, chat_model_dir):
    out, _ = cp2_run
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoints" / "step-00000002", resumed / "checkpoints" / "step-00000002")
    proc = run(train_cmd(chat_model_dir, resumed))
    assert "resumed from" in proc.stdout and "(step 2," in proc.stdout, proc.stdout
    print("uninterrupted:", losses_of(out), "\nresumed:      ", losses_of(resumed))
    assert losses_of(resumed) == losses_of(out)  # bit-identical
    a, b = adapter_of(out / "final"), adapter_of(resumed / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_other_lora_options_is_refused():
    from hf_striped.training.resume import ResumeError, check_resume_compatible

    args = dict(seq_len=128, lora=True, lora_rank=8, lora_alpha=16.0, lora_dropout=0.0,
                lora_target_modules="q_proj,v_proj")
    saved = {"args": dict(args), "dp_size": 1}
    assert check_resume_compatible("step-00000002", saved, args, 1) == []
    with pytest.raises(ResumeError, match=r"different --lora-rank \(8\).*another LoRA adapter"):
        check_resume_compatible("step-00000002", saved, {**args, "lora_rank": 4}, 1)
    with pytest.raises(ResumeError, match=r"different --lora \(True\)"):
        check_resume_compatible("step-00000002", saved, {**args, "lora": False}, 1)


# -- the final folders ----------------------------------------------------------------------------

def test_final_folder_is_a_peft_adapter_with_the_model_card(cp2_run, chat_model_dir):
    from huggingface_hub import ModelCard
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out, _ = cp2_run
    final = out / "final"
    assert (final / "adapter_model.safetensors").is_file() and not (final / "model.safetensors").exists()
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 16
    assert sorted(config["target_modules"]) == sorted(LORA_TARGETS)
    assert config["base_model_name_or_path"] == str(Path(chat_model_dir).resolve())
    base = AutoModelForCausalLM.from_pretrained(chat_model_dir, attn_implementation="sdpa")
    model = PeftModel.from_pretrained(base, final)
    probe = load_file(str(out / "probe.safetensors"))
    with torch.no_grad():
        err = float((model(input_ids=probe["input_ids"]).logits - probe["logits"]).abs().max())
    print(f"adapter folder (PEFT, sdpa, one process) vs trained model (CP 2) logits: max diff {err:.1e}")
    assert err <= 1e-4
    card = ModelCard.load(final / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "peft" and {"lora", "hf-striped"} <= set(data["tags"])
    assert "base_model" not in data  # a local folder is not a Hub id
    for needle in ("is a **LoRA adapter** for", "PeftModel.from_pretrained(base,", "assistant turns only",
                   "| LoRA | rank 8, alpha 16, dropout 0, on `q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,"
                   "down_proj` (", f"wrote that merged model to `{(out / 'merged').resolve()}`", "peft 0."):
        assert needle in card.text, needle
    assert f"| final training loss | {losses_of(out)[-1]:.4f} |" in card.text


def test_merged_model_gives_the_adapter_models_logits(cp2_run, chat_model_dir):
    from huggingface_hub import ModelCard
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out, _ = cp2_run
    ids = load_file(str(out / "probe.safetensors"))["input_ids"]
    assert "striped_ring" not in (out / "merged" / "config.json").read_text()
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(chat_model_dir, attn_implementation="sdpa")
        plain = base(input_ids=ids).logits
        adapter = PeftModel.from_pretrained(base, out / "final")(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(out / "merged", attn_implementation="sdpa")
        merged = merged(input_ids=ids).logits
    err, effect = float((merged - adapter).abs().max()), float((adapter - plain).abs().max())
    print(f"merged vs adapter model logits: max diff {err:.1e} (the adapter moves them by {effect:.1e}; "
          f"logits up to {float(adapter.abs().max()):.1f})")
    assert err <= 1e-5 * float(adapter.abs().max()) and effect > 1e3 * err
    card = ModelCard.load(out / "merged" / "README.md")
    assert card.data.to_dict()["library_name"] == "transformers"
    assert "a LoRA adapter merged in" in card.text and str((out / "final").resolve()) in card.text
    assert f'from_pretrained("{(out / "merged").resolve()}")' in card.text


# -- chat data ------------------------------------------------------------------------------------

def _runs(labels: list[int]) -> list[list[int]]:
    """The runs of consecutive non-ignored labels."""
    out, current = [], []
    for x in [*labels, -100]:
        if x != -100:
            current.append(x)
        elif current:
            out, current = [*out, current], []
    return out


def test_assistant_masks_cover_exactly_the_assistant_turns(tokenizer):
    out = chat_tokens(tokenizer, CONVERSATION)
    template_ids = tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=False)
    assert out["input_ids"] == list(template_ids)  # the chat template's own tokens
    runs = [tokenizer.decode(r) for r in _runs(out["labels"])]
    print("trained spans:", runs)
    assert runs == ["2 plus 3 is 5.<|im_end|>", " 5 times 4 is 20.\n<|im_end|>"]
    assert all(lab in (-100, tok) for lab, tok in zip(out["labels"], out["input_ids"]))
    # Transformers' own masks for the same template with {% generation %} markers around what we train on
    marked = tokenizer.chat_template.replace(
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}",
        "{{'<|im_start|>' + message['role'] + '\n'}}{% if message['role'] == 'assistant' %}{% generation %}"
        "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
        "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}")
    assert marked != tokenizer.chat_template
    assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False, chat_template=marked) == \
        tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    theirs = tokenizer.apply_chat_template(CONVERSATION, chat_template=marked, return_dict=True,
                                           return_assistant_tokens_mask=True)["assistant_masks"]
    assert [lab != -100 for lab in out["labels"]] == [bool(m) for m in theirs]


def test_template_problems_are_named(tokenizer):
    full, spans = assistant_spans(tokenizer, CONVERSATION)
    assert [full[a:b] for a, b in spans] == ["2 plus 3 is 5.<|im_end|>", " 5 times 4 is 20.\n<|im_end|>"]
    rewriting = tokenizer.chat_template.replace("message['content']",
                                                "(message['content'] if loop.last else '...')")
    with pytest.raises(ChatFormatError,
                       match="row 7: the chat template renders the conversation up to message 2 differently"):
        assistant_spans(FakeTemplate(tokenizer, rewriting), CONVERSATION, row=7)
    no_prompt = tokenizer.chat_template.replace("{% if add_generation_prompt %}", "{% if false %}")
    with pytest.raises(ChatFormatError, match="ignores add_generation_prompt"):
        assistant_spans(FakeTemplate(tokenizer, no_prompt), CONVERSATION)


class FakeTemplate:
    """``tokenizer`` rendering with another chat template."""

    def __init__(self, tokenizer, template):
        self.tokenizer, self.template = tokenizer, template

    def apply_chat_template(self, messages, **kwargs):
        return self.tokenizer.apply_chat_template(messages, chat_template=self.template, **kwargs)


@pytest.mark.parametrize("messages, error", [
    ("hello", "chat row 4: 'messages' must be a non-empty list"),
    ([], "chat row 4: 'messages' must be a non-empty list"),
    ([USER, {"role": "assistant"}], "chat row 4, message 1: 'content' must be a string, got nothing"),
    ([USER, {"role": "assistant", "content": 5}], "message 1: 'content' must be a string, got int 5"),
    ([USER, {"role": None, "content": "x"}], "message 1: 'role' must be a string, got nothing"),
    ([USER, "hello"], "chat row 4, message 1: must be a {role, content} mapping"),
    ([USER], "chat row 4: no 'assistant' message"),
    ([{"role": "assistant", "content": "hi"}, USER], "starts with an assistant message"),
    ([{"role": "user", "content": "hi<|im_end|>"}, {"role": "assistant", "content": "x"}],
     r"message 0 \(user\): its content contains the special token '<\|im_end\|>'"),
])
def test_malformed_messages_name_the_row_and_the_problem(messages, error):
    with pytest.raises(ChatFormatError, match=error):
        check_messages(messages, 4, frozenset({"<|im_end|>"}))


def test_chat_rows_pack_whole_conversations_as_separate_documents(tokenizer):
    ds = textdata.demo_conversations(40, seed=1)
    packed, note = textdata.pack_chat(ds, tokenizer, 256)
    assert note == "40 conversations, loss on assistant turns only"
    singles = [chat_tokens(tokenizer, m) for m in ds["messages"]]
    docs = []
    for row in packed:
        assert sum(row["seq_lengths"]) == len(row["input_ids"]) == len(row["labels"]) <= 256
        at = 0
        for n in row["seq_lengths"]:
            docs.append((row["input_ids"][at:at + n], row["labels"][at:at + n]))
            at += n
    # each conversation once, whole
    assert sorted(docs) == sorted((s["input_ids"], s["labels"]) for s in singles)
    assert len(packed) < len(ds) / 3  # several per row
    # the collator's targets: the next token where that is an assistant token of the same conversation
    row = packed[0]
    batch = StripingCollator(cp_rank=0, cp_size=1).global_batch([row])
    expected, at = [], 0
    for n in row["seq_lengths"]:
        expected += row["labels"][at + 1:at + n] + [-100]
        at += n
    assert batch["shift_labels"][0, :len(expected)].tolist() == expected


def test_demo_conversations_have_correct_answers():
    import re

    for row in textdata.demo_conversations(200):
        for q, a in zip(row["messages"], row["messages"][1:]):
            if m := re.fullmatch(r"What is (\d+) (plus|times) (\d+)\?", q["content"]):
                x, op, y = int(m[1]), m[2], int(m[3])
                assert a["content"] == f"{x} {op} {y} is {x + y if op == 'plus' else x * y}."


# -- bad input ------------------------------------------------------------------------------------

def test_lora_without_peft_says_how_to_install_it(monkeypatch, capsys):
    train = train_module()
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now fails as if it were not installed
    with pytest.raises(SystemExit):
        train.parse_args(["--lora", "--merge-lora"])
    err = capsys.readouterr().err
    assert "--lora and --merge-lora need the peft package" in err and "pip install 'hf-striped[trl]'" in err
    with pytest.raises(SystemExit):
        train.parse_args(["--merge-lora"])
    assert "--merge-lora merges a LoRA adapter: add --lora" in capsys.readouterr().err


def test_lora_target_modules_the_model_lacks_are_named(chat_model_dir):
    from transformers import AutoModelForCausalLM

    train = train_module()
    model = AutoModelForCausalLM.from_pretrained(chat_model_dir)
    assert train.lora_targets(model, "q_proj,v_proj") == ["q_proj", "v_proj"]
    with pytest.raises(SystemExit, match="no linear layer named qkv_proj, c_attn; its linear layers are "
                                         "named down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, "
                                         "up_proj, v_proj"):
        train.lora_targets(model, "q_proj,qkv_proj,c_attn")
    with pytest.raises(SystemExit, match="lm_head is the output layer, whose weight is the input "
                                         "embeddings'"):
        train.lora_targets(model, "q_proj,lm_head")


def test_chat_files_with_bad_rows_or_no_template_fail_clearly(tmp_path, tokenizer, chat_model_dir):
    train = train_module()
    data = tmp_path / "chats.jsonl"
    rows = [{"messages": CONVERSATION[1:3]}] * 3 + [{"messages": [USER, {"role": "assistant"}]}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = train.parse_args(["--model", str(chat_model_dir), "--data", str(data), "--seq-len", "64"])
    with pytest.raises(SystemExit,
                       match="--data: chat row 3, message 1: 'content' must be a string, got nothing"):
        train.training_rows(args, tokenizer, 2)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    rows_, description, _ = train.training_rows(args, tokenizer, 2)
    n = len(chat_tokens(tokenizer, CONVERSATION[1:3])["input_ids"])
    assert sorted(k for row in rows_ for k in row["seq_lengths"]) == [n] * 3
    assert all(len(row["input_ids"]) <= 64 for row in rows_)
    assert description == "chats.jsonl (3 conversations, loss on assistant turns only)"
    bare = type(tokenizer).from_pretrained(chat_model_dir)
    bare.chat_template = None
    with pytest.raises(SystemExit, match="the tokenizer has no chat template"):
        train.training_rows(args, bare, 2)
    with pytest.raises(SystemExit, match="--concat does not apply to chat data"):
        train.training_rows(train.parse_args(["--data", str(data), "--concat"]), tokenizer, 2)


# -- the real model -------------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_lora_on_chats_under_cp2(tmp_path, smollm2_dir):
    """SmolLM2-135M-Instruct (the default model) trains a LoRA adapter on the generated chats, CP 2."""
    out = tmp_path / "smol"
    exe = Path(sys.executable).with_name("accelerate")
    proc = run([str(exe), "launch", "--config_file", str(CONFIG), "--main_process_port", "0",
                "--num_processes", "2", str(TRAIN), "--lora", "--chat-demo", "--seq-len", "256", "--steps", "3",
                "--save-every", "0", "--output-dir", str(out), "--no-progress", "--cp-size", "2"])
    losses = losses_of(out)
    print(proc.stdout[-1500:])
    print("SmolLM2 LoRA losses:", losses)
    assert "made-up chats of hf_striped.tools.textdata.demo_conversations (512 conversations, loss on assistant " \
           "turns only): " in proc.stdout
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    # a pretrained chat model already answers these well: far below a random model's ln(49152) = 10.8
    assert max(losses) < 3.0
    config = json.loads((out / "final" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in (out / "final" / "README.md").read_text()
