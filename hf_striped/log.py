"""One-time warnings, shared by every layer (kernels included).

``warn_once(message)`` issues ``message`` as a :class:`RuntimeWarning` (or ``category``) the first
time its ``key`` (default: the message itself) is seen in this process, like Transformers'
``logger.warning_once``, but through :mod:`warnings`, so ``pytest.warns`` and
``warnings.filterwarnings`` see it.
"""

from __future__ import annotations

import warnings

_SEEN: set = set()  # the registry of keys already warned about (the one piece of module state here)


def warn_once(message: str, *, key=None, category: type[Warning] = RuntimeWarning, stacklevel: int = 2) -> bool:
    """Warn with ``message`` unless ``key`` (default ``message``) was warned about before.
    Returns whether it warned. ``stacklevel`` as in :func:`warnings.warn`, counted from the
    caller of ``warn_once`` (1: that caller's line; 2, the default: its caller's)."""
    key = message if key is None else key
    if key in _SEEN:
        return False
    _SEEN.add(key)
    warnings.warn(message, category, stacklevel=stacklevel + 1)
    return True


def reset_warnings() -> None:
    """Forget every key, so each warning fires again (for tests)."""
    _SEEN.clear()
