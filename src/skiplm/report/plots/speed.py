"""Speed plots: measured against ideal speedup per configuration and measure (``bench.png``)."""

from __future__ import annotations

from pathlib import Path

from . import pyplot, save_figure
from ..files import FULL, measure_label


def plot_speedups(speed: dict, settings: dict, path: Path, title: str) -> Path:
    """Grouped bars: measured speedup of every non-full configuration per measure, ideal speedup as a tick."""
    plt = pyplot()
    configs = [name for name in speed if name != FULL]
    measures = list(next(iter(speed.values())))
    width = 0.8 / max(len(configs), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(measures)), 4))
    for i, name in enumerate(configs):
        xs = [m + (i - (len(configs) - 1) / 2) * width for m in range(len(measures))]
        ax.bar(xs, [speed[name][m]["speedup"] for m in measures], width, label=f"{name} (measured)")
        ax.scatter(xs, [speed[name][m]["ideal_speedup"] for m in measures], marker="_", s=400, color="black",
                   label="ideal (cost model)" if i == 0 else None, zorder=3)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(measures)), [measure_label(m, settings) for m in measures], fontsize=8)
    ax.set_ylabel("speedup vs full model (x)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return save_figure(fig, path, dpi=120)
