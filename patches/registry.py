"""Which model families ``striped_ring`` supports under context parallelism, keyed by
``config.model_type``.

Each entry says one of three things:

* ``supported``: every feature of the family runs exactly (a test in ``tests/test_families.py``
  compares logits and parameter gradients under CP = 2 and 3 with one process);
* ``limited``: supported exactly, except for the named limitations, each of which raises (or, for
  losses outside attention, warns) instead of computing something else;
* ``refused``: the family cannot be exact under sequence sharding; the first forward inside
  :func:`hf_striped.context_parallel` raises ``NotImplementedError`` with the reason, before any
  attention runs.

Policy for a ``model_type`` in neither the registry nor ``UNTESTED`` and for those in
``UNTESTED``: warn once and run. The attention-level checks in ``hf_striped.integration`` still
refuse every attention feature the ring does not implement; what they cannot see is token mixing
*outside* attention (state-space, convolution or linear-attention layers), which is why such
families are listed here as refused.

The README's "Supported models" table is generated from this module
(``python scripts/support_matrix.py``); a test fails when the two differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

from ..log import warn_once
from . import moe, rope

Status = Literal["supported", "limited", "refused"]

WINDOW = (
    "sliding windows are exact; the triangular edges of window bands run on the plain reference "
    "kernel (slower; warns once)"
)
ROUTER_LOSS = moe.LIMITATION
GLOBAL_LIMITATIONS: tuple[str, ...] = (rope.LIMITATION,)
"""Limitations every family shares (checked for registered, untested and unknown types alike)."""
SOFTCAP = "soft-capping runs on the plain reference kernel (exact but slow; warns once)"
HYBRID = (
    "it has layers that mix tokens outside attention (state-space, convolution or linear-attention "
    "layers); under sequence sharding each rank's layers would see only its own tokens"
)

_TESTS = "tests/test_families.py"


@dataclass(frozen=True, kw_only=True)
class Family:
    """One registry entry."""

    model_type: str
    """``config.model_type`` as Transformers spells it."""
    status: Status
    """``supported``, ``limited`` or ``refused`` (see the module docstring)."""
    limitations: tuple[str, ...] = ()
    """For ``limited``: what is refused or approximate, one phrase each."""
    reason: str = ""
    """For ``refused``: why the family cannot run exactly under context parallelism."""
    test: str = ""
    """The test that proves the status (a pytest node id)."""
    checks: tuple[Callable, ...] = ()
    """Config-level checks run on the first forward under a CP context (``check(config)``;
    raise ``NotImplementedError`` or warn)."""
    windows_in_attention: bool = False
    """Every sliding window the family's masks use also reaches its attention function (as the
    ``sliding_window`` argument), where the ring applies it; checked in its source."""

    def __post_init__(self):
        if self.status not in ("supported", "limited", "refused"):
            raise ValueError(f"unknown status {self.status!r} for {self.model_type}")
        if (self.status == "limited") != bool(self.limitations):
            raise ValueError(f"{self.model_type}: 'limited' entries (and only they) name their limitations")
        if (self.status == "refused") != bool(self.reason):
            raise ValueError(f"{self.model_type}: 'refused' entries (and only they) give a reason")


def _exact(model_type: str, *limitations: str, checks: tuple[Callable, ...] = (rope.check,)) -> Family:
    return Family(
        model_type=model_type,
        status="limited" if limitations else "supported",
        limitations=limitations,
        test=f"{_TESTS}::test_family_matches_single_process[{model_type}]",
        checks=checks,
        windows_in_attention=WINDOW in limitations,
    )


def _refused(model_type: str, reason: str = HYBRID) -> Family:
    return Family(
        model_type=model_type, status="refused", reason=reason, test=f"{_TESTS}::test_refused_families_fail_fast"
    )


_MOE = (rope.check, moe.check)

REGISTRY: dict[str, Family] = {
    f.model_type: f
    for f in (
        _exact("llama"),
        _exact("mistral", WINDOW),
        _exact("mixtral", WINDOW, ROUTER_LOSS, checks=_MOE),
        _exact("qwen2", WINDOW),
        _exact("qwen3", WINDOW),
        _exact("qwen3_moe", WINDOW, ROUTER_LOSS, checks=_MOE),
        _exact("gemma"),
        _exact("gemma2", WINDOW, SOFTCAP),
        _exact("gemma3_text", WINDOW),
        _exact("phi3", WINDOW),
        _exact("olmo2"),
        _exact("granite"),
        _exact("smollm3", WINDOW),
        _exact("cohere"),
        _exact("glm"),
        _exact("gpt_oss", WINDOW, ROUTER_LOSS, checks=_MOE),
        _exact("cohere2", WINDOW),
        _exact("ministral", WINDOW),
        _exact("starcoder2", WINDOW),
        *(
            _refused(t)
            for t in (
                "bailing_hybrid", "bamba", "falcon_h1", "granitemoehybrid", "jamba", "kimi_linear", "lfm2",
                "lfm2_moe", "lfm3", "minimax", "nemotron_h", "olmo_hybrid", "qwen3_5", "qwen3_5_moe",
                "qwen3_5_moe_text", "qwen3_5_text", "qwen3_next", "recurrent_gemma", "zamba", "zamba2",
            )
        ),
    )
}

# Families Transformers ships whose causal-LM class calls the attention interface but that no
# test here has run under context parallelism. They run with a one-time warning (see the module
# docstring). tests/test_families.py fails when Transformers adds a family that is in neither
# list, so a new release shows up as a failing test instead of a silent gap.
UNTESTED: tuple[str, ...] = (
    "afmoe", "apertus", "apertus1p5_text", "arcee", "aria_text", "axk1", "axk2", "bart", "beam", "bert",
    "bert-generation", "bigbird_pegasus", "biogpt", "bitnet", "blenderbot", "blenderbot-small", "blt", "camembert",
    "codegen", "cohere2_moe", "cohere_compass_text", "ctrl", "cwm", "dbrx", "deepseek_v2", "deepseek_v3",
    "deepseek_v32", "deepseek_v4", "diffllama", "doge", "dory", "dots1", "dots3_note", "dots3_note_text", "electra",
    "emu3", "ernie", "ernie4_5", "ernie4_5_moe", "exaone4", "exaone_moe", "flex_olmo", "flint", "gemma3", "gemma3n",
    "gemma3n_text", "gemma4", "gemma4_text", "gemma4_unified", "gemma4_unified_text", "git", "glm4", "glm4_moe",
    "glm4_moe_lite", "glm_moe_dsa", "gpt2", "gpt_bigcode", "gpt_neox", "gptj", "granite_swa", "granitemoe",
    "granitemoe_swa", "granitemoeshared", "helium", "hrm_text", "hunyuan_v1_dense", "hunyuan_v1_moe", "hy_v3",
    "hy_v4", "hyperclovax", "inkling2_loop_text", "inkling2_text", "inkling_text", "jais2", "jetmoe", "kolibri1",
    "laguna", "lara_mini", "llama4", "llama4_text", "longcat_flash", "marian", "mbart", "mellum", "mimo_v2_flash",
    "minicpm3", "minimax_m2", "minimax_m3_vl_text", "ministral3", "mllama", "modernbert-decoder",
    "moshi", "moss_transcribe_diarize", "musicgen", "musicgen_melody", "nanochat", "nemotron", "olmo", "olmo3",
    "olmoe", "opt", "pegasus", "persimmon", "phi", "phi4_multimodal", "phimoe", "plbart", "qwen2_moe", "qwen4_exp",
    "qwen4_exp_text", "roberta", "roberta-prelayernorm", "roc_bert", "seed_oss", "solar_open", "stablelm",
    "vaultgemma", "whisper", "xlm-roberta", "xlm-roberta-xl", "xmod", "youtu", "zaya",
)

def windows_reach_attention(config) -> bool:
    """Whether ``config``'s family hands its sliding windows to the attention function (so a
    window the mask function sees will be applied by the ring, not dropped)."""
    family = REGISTRY.get(getattr(config, "model_type", None))
    return family is not None and family.windows_in_attention


def lookup(model_type: str) -> Family | None:
    """The registry entry for ``model_type`` (``None`` if untested or unknown)."""
    return REGISTRY.get(model_type)


def check_model(config) -> None:
    """Run the registry's verdict for ``config`` (called on the first forward under a CP context).

    Raises ``NotImplementedError`` for refused families and for limitations a check detects;
    warns once per model type for untested or unknown ones.
    """
    model_type = getattr(config, "model_type", None)
    family = REGISTRY.get(model_type)
    if family is None:
        listed = "is listed as untested" if model_type in UNTESTED else "is not in the registry"
        warn_once(
            f"hf_striped: model_type {model_type!r} {listed} (hf_striped.patches.registry). Attention "
            "features the ring cannot do still raise, but layers that mix tokens outside attention "
            "would silently see only this rank's tokens. Compare one batch against a single process "
            "before training.",
            key=("untested family", model_type),
        )
        for check in (rope.check,):
            check(config)
        return
    if family.status == "refused":
        raise NotImplementedError(
            f"hf_striped: model_type {model_type!r} cannot run under context parallelism: {family.reason}. "
            "Run it without hf_striped.context_parallel."
        )
    for check in family.checks:
        check(config)
