"""The plots of method comparisons: a sweep's Pareto plot (:func:`plot_sweep`, quality against measured speed, with
the full model's A/A noise floor) and ``skiplm compare``'s (:func:`plot_pareto`). Both read the result dicts the
sweep and compare write, so a result file can be plotted again without the library that made it."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

from . import pyplot, save_figure


def pareto_measure(result: dict[str, Any]) -> str:
    """The speed on a sweep's Pareto plot's x axis: decode at batch 1 (or the smallest batch size measured)."""
    return f"decode_b{min(result['settings']['bench']['batch_sizes'])}"


def plot_sweep(result: dict[str, Any], path: Path, title: str) -> Path:
    """Pareto plot: perplexity (ratio to the full model, log) and prefix agreement against measured decode speedup."""
    plt = pyplot()
    import matplotlib.ticker  # matplotlib is imported on first use, after pyplot() chose its backend

    measure = pareto_measure(result)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    by_method: dict[str, list[dict]] = {}
    for point in result["points"][1:]:  # the first point is the full model's
        if not point.get("error"):
            by_method.setdefault(point["method"], []).append(point)
    for method, points in by_method.items():
        points.sort(key=lambda p: p["target"])  # a method's curve runs from its smallest target to its largest
        xs = [p["speed"]["plan"][measure]["speedup"] for p in points]
        errors = [[x - p["speed"]["plan"][measure]["speedup_ci95"][0] for x, p in zip(xs, points)],
                  [p["speed"]["plan"][measure]["speedup_ci95"][1] - x for x, p in zip(xs, points)]]
        errors = [[max(e, 0.0) for e in side] for side in errors]
        for axis, ys in ((left, [p["perplexity_ratio"] for p in points]),
                         (right, [100 * p["agreement"]["prefix_agreement"] for p in points])):
            line = axis.errorbar(xs, ys, xerr=errors, marker="o", capsize=2, label=method)
            for x, y, p in zip(xs, ys, points):
                axis.annotate(f"{p['target']:g}", (x, y), textcoords="offset points", xytext=(3, 3),
                              fontsize=6, color=line[0].get_color())
    full = result["points"][0]
    aa = full["speed"]["plan"][measure]
    for axis, y in ((left, 1.0), (right, 100 * full["agreement"]["prefix_agreement"])):
        low, high = sorted([*aa["speedup_ci95"], 1.0])[::2]
        axis.axvspan(low, high, color="grey", alpha=0.15, label="full vs itself (A/A: the noise floor)")
        axis.scatter([1.0], [y], marker="*", s=150, color="black", zorder=3, label="full model")
        axis.grid(alpha=0.3)
        axis.set_xlabel(f"measured speedup, {measure.replace('_b', ' batch ')} (x)")
    left.set_yscale("log")
    left.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    left.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    left.set_ylabel("perplexity / full model's (log)")
    right.set_ylabel("prefix agreement with the full model (%)")
    right.set_ylim(-3, 103)
    left.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def plot_pareto(result: dict[str, Any], path: str | Path, title: str, *, highlight: Collection[str] = ()) -> Path:
    """``skiplm compare``: held-out perplexity (log) against measured decode speedup, a line per method in target
    order; the methods in ``highlight`` drawn bold."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_method: dict[str, list[dict]] = {}
    for row in result["points"]:
        if "perplexity" in row:
            by_method.setdefault(row["method"], []).append(row)
    for method, rows in by_method.items():
        rows.sort(key=lambda r: r["target"])  # in target order: measured speedups are noisy
        ax.plot([r["decode_speedup"] for r in rows], [r["perplexity"] for r in rows], marker="o",
                linewidth=2.5 if method in highlight else 1, label=method)
    ax.scatter([1.0], [result["full_perplexity"]], marker="*", s=150, color="black", label="full model", zorder=3)
    ax.set_yscale("log")
    ax.set_xlabel("measured decode speedup, batch 1 (x)")
    ax.set_ylabel("held-out perplexity (log)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)


__all__ = ["pareto_measure", "plot_pareto", "plot_sweep"]
