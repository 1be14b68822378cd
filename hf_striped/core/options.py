"""The settings of context-parallel attention, validated once.

:class:`RingOptions` is built at the public entry points (``ring_attention``,
``context_parallel``, ``ContextParallel``, ``StripedTrainingArguments``) and handed down as it is;
nothing below them re-validates or re-resolves a setting.

Two settings have environment defaults, read when the options are built:

* ``timeout``: ``HF_STRIPED_TIMEOUT`` (seconds), else :data:`DEFAULT_TIMEOUT_S`. It bounds how
  long one rank waits for one ring message or one of hf_striped's collectives, so it must exceed
  the longest legitimate skew between ranks at a ring step (one block's compute, plus whatever a
  rank does between two forwards that its peers do not).
* ``check_finite``: ``HF_STRIPED_CHECK_FINITE`` (1/true/yes/on or 0/false/no/off), else off.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass

from ..kernels import BACKENDS
from .layout import Layout, check_layout

ENV_TIMEOUT = "HF_STRIPED_TIMEOUT"
ENV_CHECK_FINITE = "HF_STRIPED_CHECK_FINITE"
DEFAULT_TIMEOUT_S = 600.0
"""Default deadline for one ring wait, in seconds (NCCL's own default collective timeout)."""

HOW_TO_SET_TIMEOUT = (
    f"Set the timeout with context_parallel(..., timeout=), ContextParallel(timeout=), ring_attention(timeout=), "
    f"scripts/train.py --timeout, or the {ENV_TIMEOUT} environment variable (default {DEFAULT_TIMEOUT_S:g} s)."
)


def resolve_timeout(timeout: float | None) -> float:
    """``timeout`` in seconds, or the ``HF_STRIPED_TIMEOUT`` environment variable, or the default."""
    source = "timeout"
    if timeout is None:
        raw = os.environ.get(ENV_TIMEOUT)
        if raw is None:
            return DEFAULT_TIMEOUT_S
        source = ENV_TIMEOUT
        try:
            timeout = float(raw)
        except ValueError:
            raise ValueError(f"{ENV_TIMEOUT}={raw!r} is not a number of seconds; set e.g. {ENV_TIMEOUT}=600") from None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"{source} must be a number of seconds, got {timeout!r}")
    if not timeout > 0 or timeout != timeout or timeout == float("inf"):
        raise ValueError(f"{source} must be a positive, finite number of seconds; got {timeout!r}")
    return float(timeout)


def resolve_check_finite(flag: bool | None) -> bool:
    """``flag``, or whether ``HF_STRIPED_CHECK_FINITE`` is set to 1/true/yes/on."""
    if flag is not None:
        return bool(flag)
    raw = os.environ.get(ENV_CHECK_FINITE, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{ENV_CHECK_FINITE}={os.environ[ENV_CHECK_FINITE]!r}: set it to 1 (on) or 0 (off)")


@dataclass(frozen=True, kw_only=True)
class RingHooks:
    """Observation and fault-injection points of the ring, for tests and benchmarks. Each is
    called on the process running the ring, with ``name`` the call's name in errors (e.g.
    ``"LlamaAttention of layer 3"``) and ``phase`` ``"forward"`` or ``"backward"``."""

    on_step: Callable[[str, int, str | None], None] | None = None
    """``(phase, ring step, name)``: before the step's blocks are computed."""
    on_block: Callable[[str, int, str | None, dict], None] | None = None
    """``(phase, ring step, name, results)``: after each block call, before the finite guard
    checks ``results`` (tensors by name, which the hook may modify in place)."""
    on_wait: Callable[[float], None] | None = None
    """``(seconds)``: how long each wait for a ring message blocked (process groups only)."""


@dataclass(frozen=True, kw_only=True)
class RingOptions:
    """How ring attention runs over a context-parallel group. Frozen: build it once (``None``
    fields are resolved from the environment then) and pass it down; :meth:`replace` makes a
    changed copy."""

    layout: Layout = "striped"
    """How every sequence is split over the group: ``"striped"`` (rank r holds tokens r, r + P,
    ...), ``"contiguous"`` or ``"zigzag"`` (``hf_striped.LAYOUTS``)."""
    backend: str = "auto"
    """Block kernel: ``"auto"`` (the fastest that takes the inputs) or a name from
    ``hf_striped.kernels.BACKENDS``; a named one that cannot run the inputs raises."""
    timeout: float | None = None
    """Seconds any rank waits for one ring message or collective before raising
    ``hf_striped.RingCommError``; ``None``: ``HF_STRIPED_TIMEOUT``, else 600."""
    check_finite: bool | None = None
    """Check every attention block (and backward's gradient pieces) for NaN/Inf and raise
    ``hf_striped.NonFiniteError`` naming where; ``None``: ``HF_STRIPED_CHECK_FINITE``, else off."""
    hooks: RingHooks | None = None
    """Callbacks at every ring step, block and wait (:class:`RingHooks`); ``None``: none."""

    def __post_init__(self):
        check_layout(self.layout)
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        object.__setattr__(self, "timeout", resolve_timeout(self.timeout))
        object.__setattr__(self, "check_finite", resolve_check_finite(self.check_finite))
        if self.hooks is not None and not isinstance(self.hooks, RingHooks):
            raise TypeError(f"hooks must be a hf_striped.core.options.RingHooks, got {type(self.hooks).__name__}")

    def replace(self, **changes) -> RingOptions:
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)


def build_options(options: RingOptions | None = None, **settings) -> RingOptions:
    """``options`` as given, or new options from the keyword ``settings`` (``None`` values mean
    the default). Giving both is refused: the entry points take one or the other."""
    given = {k: v for k, v in settings.items() if v is not None}
    if options is None:
        return RingOptions(**given)
    if not isinstance(options, RingOptions):
        raise TypeError(f"options must be a hf_striped.RingOptions, got {type(options).__name__}")
    if given:
        raise ValueError(
            f"pass either options= or the separate settings ({', '.join(sorted(given))}), not both: "
            f"use options.replace({', '.join(f'{k}=...' for k in sorted(given))}) to change them"
        )
    return options
