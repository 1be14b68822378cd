"""Security guarantees of SECURITY.md: no pickle in our code paths, checkpoints that cannot run code
when loaded, model cards that treat user text as data, tokens that are never logged, and a
training script that refuses pickled model weights."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hf_striped.training.checkpoint import OPTIMIZER_FILE, load_checkpoint, save_checkpoint
from test_checkpoint import OneProcess  # the one-process stand-in for accelerate.Accelerator

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("hf_striped", "kernels", "patches", "scripts")
UNSAFE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _dotted(node, aliases: dict[str, str]) -> str | None:
    """``a.b.c`` of a Name/Attribute chain, with import aliases resolved (``th`` -> ``torch``)."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(aliases.get(node.id, node.id))
    return ".".join(reversed(parts))


def problems(source: str) -> list[str]:
    """What a source file does that SECURITY.md promises our code never does."""
    found = []
    tree = ast.parse(source)
    aliases = {}  # local name -> module it stands for ("th" -> "torch")
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases.update({a.asname: a.name for a in node.names if a.asname})
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"line {node.lineno}: imports {m}" for m in mods if m.split(".")[0] in UNSAFE_MODULES]
            if isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.serialization") and any(
                    a.name == "load" for a in node.names):
                found.append(f"line {node.lineno}: from {node.module} import load (calls can't be checked)")
        if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
            if not (isinstance(node.value, ast.Constant) and node.value.value is False):
                found.append(f"line {node.value.lineno}: trust_remote_code not False")
        if not isinstance(node, ast.Call):
            continue
        f, kw = node.func, {k.arg: k.value for k in node.keywords}
        if isinstance(f, ast.Name) and f.id in ("eval", "exec", "__import__"):
            found.append(f"line {node.lineno}: {f.id}()")
        if isinstance(f, ast.Attribute):
            owner = _dotted(f.value, aliases)
            if f.attr == "load" and owner in ("torch", "torch.serialization"):
                w = kw.get("weights_only")
                if not (isinstance(w, ast.Constant) and w.value is True):
                    found.append(f"line {node.lineno}: torch.load without weights_only=True")
            if f.attr == "load" and owner == "yaml":
                found.append(f"line {node.lineno}: yaml.load (use yaml.safe_load)")
            if f.attr == "load" and owner in ("np", "numpy") and "allow_pickle" in kw:
                found.append(f"line {node.lineno}: numpy.load(allow_pickle=...)")
    return found


def test_the_scan_catches_each_violation():
    bad = textwrap.dedent("""
        import pickle
        import dill.settings
        from cloudpickle import dumps
        from torch import load
        import torch, yaml, numpy as np
        torch.load("x")
        torch.load("x", weights_only=False)
        import torch as th
        th.load("x")
        torch.serialization.load("x")
        from torch.serialization import load
        m = AutoModel.from_pretrained("x", trust_remote_code=True)
        eval("1")
        exec("x = 1")
        yaml.load(s)
        np.load("x", allow_pickle=True)
    """)
    found = problems(bad)
    print("\n".join(found))
    assert sorted(int(f.split(":")[0].split()[1]) for f in found) == [2, 3, 4, 5, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17]  # each bad line
    ok = 'import torch\ntorch.load("x", weights_only=True, map_location="cpu")\nf(trust_remote_code=False)\nmodel.eval()\n'
    assert problems(ok) == []


def test_our_sources_never_unpickle_or_run_text():
    files = sorted(p for d in SOURCES for p in (ROOT / d).rglob("*.py"))
    assert len(files) > 20 and ROOT / "hf_striped" / "training" / "checkpoint.py" in files
    found = {str(p.relative_to(ROOT)): problems(p.read_text()) for p in files}
    found = {k: v for k, v in found.items() if v}
    print(f"scanned {len(files)} files; problems: {found}")
    assert found == {}
    loads = sum(p.read_text().count("torch.load(") for p in files)
    assert loads >= 1  # the optimizer state (checked above to pass weights_only=True)


def tiny_training(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, get_scheduler

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = get_scheduler("cosine", opt, num_warmup_steps=1, num_training_steps=4)
    model(input_ids=torch.arange(3, 20)[None], labels=torch.arange(3, 20)[None]).loss.backward()
    opt.step(), sched.step()
    return dict(model=model, optimizer=opt, scheduler=sched)


def test_checkpoints_hold_safetensors_and_json_only(tmp_path, tiny_llama_dir):
    path = save_checkpoint(OneProcess(), tmp_path, 1, {"losses": [1.0]}, **tiny_training(tiny_llama_dir))
    files = sorted(p.name for p in path.rglob("*"))
    print(files)
    assert all(f.endswith((".safetensors", ".json")) or f == OPTIMIZER_FILE for f in files)
    assert "model.safetensors" in files and OPTIMIZER_FILE in files
    # the one non-safetensors file loads with torch's restricted (no-code) unpickler
    torch.load(path / OPTIMIZER_FILE, weights_only=True)


class Payload:
    """Unpickling this calls ``open(marker, "w")``: a stand-in for arbitrary code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_tampered_optimizer_file_is_refused_without_running_code(tmp_path, tiny_llama_dir):
    import pickle

    objs = tiny_training(tiny_llama_dir)
    path = save_checkpoint(OneProcess(), tmp_path, 1, {}, **objs)
    marker = tmp_path / "pwned"
    evil = {"state": {}, "param_groups": [Payload(marker)]}
    torch.save(evil, path / OPTIMIZER_FILE)  # a valid torch file, as an attacker would write it
    with pytest.raises(pickle.UnpicklingError) as err:
        load_checkpoint(OneProcess(), path, **objs)
    print("refused:", str(err.value).splitlines()[0])
    assert not marker.exists()
    torch.load(path / OPTIMIZER_FILE, weights_only=False)  # the payload is live: full unpickling runs it
    assert marker.exists()


EVIL = ["{{ 7*7 }}", "{% for x in range(3) %}x{% endfor %}", "\n---\nlicense: evil\n---\n", "{{ card_data }}"]


def test_model_card_renders_user_values_as_data(tmp_path):
    from huggingface_hub import ModelCard

    from hf_striped.tools.model_card import TAGS, render_card

    info = dict(model_name="m" + EVIL[2], seq_len=64, cp_size=2, layout="striped", dp_size=1, data=" ".join(EVIL),
                steps=3, batch_size=1, grad_accum=1, learning_rate=1e-3, scheduler=EVIL[0], precision="fp32",
                final_loss="1.0", tokens="10", hardware=EVIL[1], versions="v", date="d", repo_or_path=EVIL[3])
    card = render_card(info, base_model="some/" + EVIL[0], license=None)
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    meta = loaded.data.to_dict()
    print(meta)
    assert meta == {"library_name": "transformers", "pipeline_tag": "text-generation", "tags": TAGS, "model_name": info["model_name"]}
    for s in EVIL:
        assert s.strip() in loaded.text, s
    assert "49" not in loaded.text and "xxx" not in loaded.text


PUSH = """
import logging, sys, traceback
logging.basicConfig(level=logging.DEBUG, stream=sys.stderr, force=True)
from huggingface_hub.utils import logging as hf_logging
hf_logging.set_verbosity_debug()
logging.getLogger("huggingface_hub").debug("debug logging is on")
from hf_striped.tools.model_card import push_folder
for token in (None, sys.argv[2]):
    try:
        push_folder(sys.argv[1], "someone/repo", token=token)
    except RuntimeError as exc:
        print("error:", exc)
        traceback.print_exc()
        traceback.print_exception(exc.__context__)
    else:
        sys.exit("unexpected upload")
"""


def test_push_to_hub_never_logs_the_token(tmp_path):
    secret = "hf_FAKEsecretTOKEN0123456789abcdef"
    (tmp_path / "config.json").write_text("{}")
    env = dict(os.environ, HF_TOKEN=secret, HF_HUB_OFFLINE="1", HF_HUB_VERBOSITY="debug")
    proc = subprocess.run([sys.executable, "-c", PUSH, str(tmp_path), secret], capture_output=True, text=True, env=env, timeout=120)
    out = proc.stdout + proc.stderr
    print(out[-1500:])
    assert proc.returncode == 0, out
    assert proc.stdout.count("error: could not upload") == 2 and "debug logging is on" in proc.stderr  # both attempts failed, with debug logs on
    assert secret not in out and secret[:12] not in out


def test_train_script_refuses_pickled_model_weights(tmp_path, tiny_llama_dir):
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = tmp_path / "bin-only"
    AutoConfig.from_pretrained(tiny_llama_dir).save_pretrained(folder)
    torch.save(AutoModelForCausalLM.from_pretrained(tiny_llama_dir).state_dict(), folder / "pytorch_model.bin")
    (tmp_path / "data.jsonl").write_text(json.dumps({"input_ids": list(range(3, 100))}) + "\n")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), "--model", str(folder), "--data", str(tmp_path / "data.jsonl"),
         "--seq-len", "32", "--cp-size", "1", "--steps", "1", "--output-dir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, cwd="/", env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    print(proc.stderr[-800:])
    assert proc.returncode != 0
    assert "no safetensors weights" in proc.stderr and "pytorch_model.bin" in proc.stderr
    assert "save_pretrained" in proc.stderr  # says how to convert
    assert not (tmp_path / "out" / "final").exists()
