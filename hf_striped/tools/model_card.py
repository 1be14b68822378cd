"""Model cards for trained folders, and the upload to the Hub.

The card is rendered from ``model_cards/template.md`` (installed as ``hf_striped.model_cards``)
by ``huggingface_hub.ModelCard.from_template``: the template is ours, and every user-provided
value (paths, dataset descriptions, repo names) is inserted as data, never evaluated.
"""

from __future__ import annotations

import platform
import re
from importlib import metadata, resources
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelCard, ModelCardData

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
TAGS = ["hf-striped", "context-parallel", "striped-attention", "long-context"]


def library_versions(extra: tuple[str, ...] = ()) -> str:
    """Versions of the libraries a trained folder depends on (plus ``extra`` ones, e.g. peft)."""
    names = ["hf-striped", "torch", "transformers", "accelerate", "datasets", *extra]
    out = []
    for n in names:
        try:
            out.append(f"{n} {metadata.version(n)}")
        except metadata.PackageNotFoundError:
            out.append(f"{n} (not installed)")
    return ", ".join(out)


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo``'s "model name" on Linux, else what ``platform`` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware(world_size: int) -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} x {world_size} process(es)"
    return f"CPU ({cpu_name()}) x {world_size} process(es)"


def render_card(info: dict[str, Any], *, base_model: str | None, license: str | None = None) -> ModelCard:
    """A :class:`huggingface_hub.ModelCard` with valid Hub YAML metadata, filled from ``info``
    (the template's fields: model_name, seq_len, cp_size, layout, dp_size, data, steps, ...).

    ``info["lora"]`` (a dict of rank, alpha, dropout, targets, trainable) makes it the card of a
    LoRA adapter folder (library ``peft``, tagged ``lora``; ``info["merged_path"]`` names a merged
    copy); with ``info["merged_from"]`` as well, the card of the full model merged from that adapter."""
    # Hub metadata takes only Hub repo ids here; a local folder is named in the text alone.
    hub_id = base_model if base_model and _REPO_ID.fullmatch(base_model) and not Path(base_model).exists() else None
    adapter = bool(info.get("lora")) and not info.get("merged_from")
    data = ModelCardData(
        base_model=hub_id,
        library_name="peft" if adapter else "transformers",
        pipeline_tag="text-generation",
        license=license,
        tags=[*TAGS, "lora"] if adapter else TAGS,
        model_name=info.get("model_name"),
    )
    template = resources.files("hf_striped.model_cards").joinpath("template.md").read_text(encoding="utf-8")
    link = f"https://huggingface.co/{hub_id}" if hub_id else Path(base_model or ".").as_posix()
    return ModelCard.from_template(data, template_str=template, base_model=base_model or "a local model", base_model_link=link, **info)


def push_folder(folder: str | Path, repo_id: str, *, private: bool = False, token: str | None = None) -> str:
    """Upload ``folder`` to the Hub model repo ``repo_id`` (created if missing); return its URL.

    Any failure (no network, offline mode, no permission) raises a ``RuntimeError`` that says the
    local folder is intact and how to upload it later; the token never appears in messages.
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="Upload model trained with hf-striped")
    except Exception as exc:  # noqa: BLE001 - network and Hub errors come in many types; all mean the same here
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        raise RuntimeError(
            f"could not upload {folder} to the Hub repo {repo_id!r} ({reason}). The local folder is intact; "
            f"upload it later with: hf upload {repo_id} {folder}"
        ) from None
    return str(getattr(info, "commit_url", None) or f"{repo_id}")
