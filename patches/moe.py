"""Mixture-of-experts families: routing is per token, so experts see exactly what they would see
on one process. The optional router load-balancing loss is not: Transformers computes it from
the means over the tokens of the forward, i.e. over this rank's tokens only, and a product of
per-rank means is not the mean over the sequence. The language-model loss and its gradients stay
exact; the auxiliary term differs, so it warns once."""

from __future__ import annotations

from ..log import warn_once

LIMITATION = "router aux loss (output_router_logits=True) is per rank (warns once); the LM loss is exact"


def check(config) -> None:
    model_type = getattr(config, "model_type", "?")
    if getattr(config, "output_router_logits", False):
        warn_once(
            f"hf_striped: {model_type} with output_router_logits=True computes its router load-balancing "
            "loss from this rank's tokens only, which is not the single-process auxiliary loss (the "
            "language-model loss and its gradients are exact). Set output_router_logits=False or accept "
            "the approximation.",
            key=("moe aux loss", model_type),
            stacklevel=3,
        )
