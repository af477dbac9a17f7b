"""Every plot skiplm draws, in one place: one module per stage (``analysis``, ``policies``, ``speed``, ``sweep``,
``speculative``), all drawn through :func:`pyplot` and written by :func:`save_figure`.

matplotlib is imported on first use, never at import time, and always with the file-only Agg backend: a plot is a
results file, and nothing here may need a display.
"""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib's ``pyplot``, on the Agg backend (files only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, *, dpi: int = 120) -> Path:
    """Lay out ``fig``, write it to ``path`` (folders made as needed) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


__all__ = ["pyplot", "save_figure"]
