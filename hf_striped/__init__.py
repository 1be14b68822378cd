"""hf-striped: exact context-parallel striped ring attention for Hugging Face Transformers.

``import hf_striped`` registers ``attn_implementation="striped_ring"``.
"""

from pathlib import Path as _Path

# In a source checkout, kernels/ and patches/ sit beside this folder instead of inside it (the
# installed package has them inside, see pyproject.toml). When the checkout itself is on sys.path
# (python -c / python -m run from its root), let its root serve those two subpackages too.
_here = _Path(__file__).resolve().parent
if not (_here / "kernels").is_dir() and (_here.parent / "pyproject.toml").is_file() and (
    _here.parent / "kernels" / "__init__.py"
).is_file():
    __path__.append(str(_here.parent))  # noqa: F821 - the package's own __path__

from .integration.context import context_parallel  # noqa: E402
from .training.data import StripingCollator  # noqa: E402
from .integration.attention import ATTN_IMPLEMENTATION, register  # noqa: E402
from .integration.generation import StripedCache  # noqa: E402
from .core.guards import NonFiniteError, RingCommError  # noqa: E402
from .core.layout import LAYOUTS  # noqa: E402
from .core.options import RingHooks, RingOptions  # noqa: E402
from .training.parallel import ContextParallel  # noqa: E402
from .core.ring import ring_attention  # noqa: E402
from .core.sharding import shard, unshard  # noqa: E402

register()

__version__ = "0.1.0"
__all__ = [
    "ATTN_IMPLEMENTATION",
    "LAYOUTS",
    "ContextParallel",
    "NonFiniteError",
    "RingCommError",
    "RingHooks",
    "RingOptions",
    "StripedCache",
    "StripedTrainer",
    "StripedTrainingArguments",
    "StripingCollator",
    "context_parallel",
    "register",
    "ring_attention",
    "shard",
    "unshard",
]


def __getattr__(name):  # the Trainer integration imports transformers.Trainer: only on first use
    if name in ("StripedTrainer", "StripedTrainingArguments"):
        from .training import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'hf_striped' has no attribute {name!r}")
