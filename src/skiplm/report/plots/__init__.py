"""Every plot skiplm draws, in one place: one module per stage (``analysis``, ``policies``, ``speed``, ``sweep``,
``speculative``), all drawn through :func:`pyplot` and written by :func:`save_figure`.

matplotlib is imported on first use, never at import time, and always with the file-only Agg backend: a plot is a
results file, and nothing here may need a display.
"""

from __future__ import annotations

import io
from pathlib import Path


def pyplot():
    """matplotlib's ``pyplot``, on the Agg backend (files only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, *, dpi: int = 120) -> Path:
    """Lay out ``fig``, write it to ``path`` (folders made as needed; whole or not at all, through
    :func:`skiplm.files.write_bytes_atomic`) and close it. The format is the file's extension (``.png``, ``.pdf``,
    ``.svg``)."""
    from ...files import write_bytes_atomic

    path = Path(path)
    buffer = io.BytesIO()
    try:
        fig.tight_layout()
        fig.savefig(buffer, dpi=dpi, format=path.suffix.lstrip(".").lower() or "png")
    finally:
        pyplot().close(fig)
    return write_bytes_atomic(path, buffer.getvalue())


__all__ = ["pyplot", "save_figure"]
