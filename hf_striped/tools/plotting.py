"""matplotlib for the scripts' plots, when it is installed (it is optional: ``pip install .[bench]``)."""

from __future__ import annotations

from types import ModuleType


def pyplot() -> ModuleType | None:
    """``matplotlib.pyplot`` on the Agg backend (writes image files, needs no display), or None if
    matplotlib is not installed: callers then skip their plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt
