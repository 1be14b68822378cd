"""Per-architecture support for ``striped_ring`` under context parallelism: a registry keyed by
``model_type`` (:mod:`.registry`) and one small module per concern that needs more than the
attention interface (:mod:`.rope`: length-dependent rotary types; :mod:`.moe`: router
auxiliary loss). Nothing here rebinds Transformers internals: every supported family works
through the registered attention and mask functions alone."""

from .registry import REGISTRY, UNTESTED, Family, check_model, lookup, windows_reach_attention

__all__ = ["REGISTRY", "UNTESTED", "Family", "check_model", "lookup", "windows_reach_attention"]
