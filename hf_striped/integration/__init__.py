"""Transformers integration: the ``striped_ring`` attention and mask functions and the
``context_parallel`` block they run in."""

from .attention import ATTN_IMPLEMENTATION, register, striped_ring_attention_forward, striped_ring_mask
from .context import context_parallel

__all__ = ["ATTN_IMPLEMENTATION", "context_parallel", "register", "striped_ring_attention_forward", "striped_ring_mask"]
