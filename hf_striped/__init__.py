"""hf-striped: exact context-parallel striped ring attention for Hugging Face Transformers.

``import hf_striped`` registers ``attn_implementation="striped_ring"``.
"""

from .context import context_parallel
from .integration import ATTN_IMPLEMENTATION, register
from .layout import LAYOUTS
from .ring import ring_attention
from .sharding import shard, unshard

register()

__all__ = ["ATTN_IMPLEMENTATION", "LAYOUTS", "context_parallel", "register", "ring_attention", "shard", "unshard"]
__version__ = "0.1.0"
