"""matplotlib for the reports' figures: an optional dependency, the `plot` extra.

Only the harnesses draw (the chaos run and soak reports' ``timeline.png`` and ``memory.png``, the
consistency experiments' figures), so a shard or a worker never needs matplotlib. A command that
will draw checks :func:`missing` before it starts anything; :func:`pyplot` is the one import.
"""

from __future__ import annotations

import importlib.util
from typing import Any

INSTALL = "pip install 'tether-ps[plot]'"


class PlotUnavailable(ImportError):
    """matplotlib is not installed; the message says how to install it."""


def _why(what: str) -> str:
    return f"{what} needs matplotlib, which is not installed: {INSTALL}"


def missing(what: str = "the report's figures") -> str | None:
    """None if matplotlib can be imported; else one sentence saying what needs it and how to
    install it (``find_spec``: nothing is imported)."""
    return _why(what) if importlib.util.find_spec("matplotlib") is None else None


def pyplot(what: str = "the report's figures") -> Any:
    """``matplotlib.pyplot`` on the Agg backend (files, no display); :class:`PlotUnavailable`
    naming ``what`` and the extra to install when matplotlib is absent."""
    try:
        import matplotlib
    except ImportError as e:
        raise PlotUnavailable(_why(what)) from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
