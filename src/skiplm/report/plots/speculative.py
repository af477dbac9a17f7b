"""Speculative decoding plots: each draft's speedup over plain greedy decoding, per prompt set and batch size
(``speculative.png`` of ``skiplm bench-speculative``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import pyplot, save_figure


def plot_speculative_speedups(result: dict[str, Any], path: Path, title: str) -> Path:
    """Grouped bars: per ``{set}_b{batch}`` entry of ``result["results"]``, every draft's median speedup."""
    plt = pyplot()
    keys = list(result["results"])
    names = list(result["drafts"])
    width = 0.8 / len(names)
    fig, axis = plt.subplots(figsize=(max(6, 1.2 * len(keys) + 2) + 2.5, 4))
    for i, name in enumerate(names):
        values = [result["results"][k][name]["speedup"] for k in keys]
        axis.bar([x + i * width for x in range(len(keys))], values, width, label=name)
    axis.axhline(1.0, color="black", linewidth=0.8)
    axis.set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(keys))])
    axis.set_xticklabels([k.replace("_b", "\nbatch ") for k in keys])
    axis.set_ylabel("speedup vs plain greedy (same run)")
    axis.set_title(title)
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, not over them
    return save_figure(fig, path, dpi=110)


__all__ = ["plot_speculative_speedups"]
