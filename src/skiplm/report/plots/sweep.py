"""The plots of method comparisons: a sweep's Pareto plot (:func:`plot_sweep`, quality against measured speed, with
the full model's A/A noise floor) and ``skiplm compare``'s (:func:`plot_pareto`). Both read the result dicts the
sweep and compare write, so a result file can be plotted again without the library that made it.

Both draw a line per method, the frontier of the planned points (:func:`frontier`), and the healed points (``"healed":
true``, heal folders) as their own series with their own frontier (:func:`_draw_healed`)."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

from . import pyplot, save_figure


def pareto_measure(result: dict[str, Any]) -> str:
    """The speed on a sweep's Pareto plot's x axis: decode at batch 1 (or the smallest batch size measured)."""
    return f"decode_b{min(result['settings']['bench']['batch_sizes'])}"


def frontier(points: list[tuple[float, float]], *, lower_is_better: bool) -> list[tuple[float, float]]:
    """The Pareto frontier of (speedup, quality) points, by speedup: those no other point beats on both (as fast or
    faster and as good or better)."""
    kept: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (-p[0], p[1] if lower_is_better else -p[1])):
        if not kept or (y < kept[-1][1] if lower_is_better else y > kept[-1][1]):
            kept.append((x, y))
    return kept[::-1]


HEALED_COLOR = "tab:green"


def _draw_healed(axis, planned: list[tuple[float, float]], healed: list[tuple[float, float, str]], *,
                 lower_is_better: bool) -> None:
    """The planned points' frontier (dashed grey), and the healed points (name beside each) with theirs."""
    if planned and healed:  # (a frontier of the planned points only where there is a healed one to set it against)
        xs, ys = zip(*frontier(planned, lower_is_better=lower_is_better))
        axis.plot(xs, ys, linestyle="--", color="grey", linewidth=1, label="frontier (unhealed)")
    if not healed:
        return
    axis.scatter([x for x, _, _ in healed], [y for _, y, _ in healed], marker="D", s=40, color=HEALED_COLOR, zorder=4,
                 label="healed")
    for x, y, name in healed:
        axis.annotate(name, (x, y), textcoords="offset points", xytext=(4, -8), fontsize=6, color=HEALED_COLOR)
    xs, ys = zip(*frontier([(x, y) for x, y, _ in healed], lower_is_better=lower_is_better))
    axis.plot(xs, ys, linestyle="--", color=HEALED_COLOR, linewidth=1.5, label="frontier (healed)")


def plot_sweep(result: dict[str, Any], path: Path, title: str) -> Path:
    """Pareto plot: perplexity (ratio to the full model, log) and prefix agreement against measured decode speedup."""
    plt = pyplot()
    import matplotlib.ticker  # matplotlib is imported on first use, after pyplot() chose its backend

    measure = pareto_measure(result)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    by_method: dict[str, list[dict]] = {}
    healed: list[dict] = []
    for point in result["points"][1:]:  # the first point is the full model's
        if not point.get("error"):
            (healed if point.get("healed") else by_method.setdefault(point["method"], [])).append(point)

    def speedup(p: dict) -> float:
        return p["speed"]["plan"][measure]["speedup"]

    def perplexity(p: dict) -> float:
        return p["perplexity_ratio"]

    def agreement(p: dict) -> float:
        return 100 * p["agreement"]["prefix_agreement"]

    qualities = ((left, perplexity, True), (right, agreement, False))
    for method, points in by_method.items():
        points.sort(key=lambda p: p["target"])  # a method's curve runs from its smallest target to its largest
        xs = [speedup(p) for p in points]
        errors = [[x - p["speed"]["plan"][measure]["speedup_ci95"][0] for x, p in zip(xs, points)],
                  [p["speed"]["plan"][measure]["speedup_ci95"][1] - x for x, p in zip(xs, points)]]
        errors = [[max(e, 0.0) for e in side] for side in errors]
        for axis, quality, _ in qualities:
            ys = [quality(p) for p in points]
            line = axis.errorbar(xs, ys, xerr=errors, marker="o", capsize=2, label=method)
            for x, y, p in zip(xs, ys, points):
                axis.annotate(f"{p['target']:g}", (x, y), textcoords="offset points", xytext=(3, 3),
                              fontsize=6, color=line[0].get_color())
    planned = [p for points in by_method.values() for p in points]
    for axis, quality, lower in qualities:
        _draw_healed(axis, [(speedup(p), quality(p)) for p in planned],
                     [(speedup(p), quality(p), p["method"]) for p in healed], lower_is_better=lower)
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
    order (the methods in ``highlight`` drawn bold), and the healed points with their frontier beside the planned
    points' frontier."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_method: dict[str, list[dict]] = {}
    healed: list[dict] = []
    for row in result["points"]:
        if "perplexity" in row:
            (healed if row.get("healed") else by_method.setdefault(row["method"], [])).append(row)
    for method, rows in by_method.items():
        rows.sort(key=lambda r: r["target"])  # in target order: measured speedups are noisy
        ax.plot([r["decode_speedup"] for r in rows], [r["perplexity"] for r in rows], marker="o",
                linewidth=2.5 if method in highlight else 1, label=method)
    _draw_healed(ax, [(r["decode_speedup"], r["perplexity"]) for rows in by_method.values() for r in rows],
                 [(r["decode_speedup"], r["perplexity"], r["method"]) for r in healed], lower_is_better=True)
    ax.scatter([1.0], [result["full_perplexity"]], marker="*", s=150, color="black", label="full model", zorder=3)
    ax.set_yscale("log")
    ax.set_xlabel("measured decode speedup, batch 1 (x)")
    ax.set_ylabel("held-out perplexity (log)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)


__all__ = ["frontier", "pareto_measure", "plot_pareto", "plot_sweep"]
