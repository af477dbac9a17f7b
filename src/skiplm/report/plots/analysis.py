"""Plots of the depth analysis (``skiplm analyze``): the per-layer metrics as a heatmap and as line charts, the
angular distance between layers, and how the block-level metrics agree. Each takes an
:class:`~skiplm.analysis.importance.AnalysisResult`; :func:`plot_analysis` writes all four next to ``analysis.md``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from . import pyplot, save_figure
from ..files import analysis_settings_line, format_value


def plot_analysis(result, out: Path) -> dict[str, Path]:
    """Write ``heatmap.png``, ``metrics.png``, ``angular_distance.png`` and ``agreement.png`` into ``out``."""
    out = Path(out)
    return {"heatmap": plot_heatmap(result, out / "heatmap.png"), "lines": plot_lines(result, out / "metrics.png"),
            "angular": plot_angular_distance(result, out / "angular_distance.png"),
            "agreement": plot_agreement(result, out / "agreement.png")}


def plot_heatmap(result, path: Path) -> Path:
    """Layers x metrics; colour = the layer's importance rank by that metric (per column, darker = more important;
    ranks, not min-max, so that one outlier layer does not wash out the rest), text = the raw value."""
    plt = pyplot()
    columns = result.columns()
    layers = result.num_layers
    shade = torch.stack([_rank_scale(c.importance()) for c in columns], dim=1).numpy()  # [L, metrics]
    width = max(8.0, 0.78 * len(columns) + 1.8)
    height = max(4.0, 0.3 * layers + 2.2)
    fig, ax = plt.subplots(figsize=(width, height))
    image = ax.imshow(shade, aspect="auto", cmap="YlOrRd", vmin=0, vmax=1, interpolation="nearest")
    font = 7 if layers <= 40 else 5
    for row in range(layers):
        for col, column in enumerate(columns):
            value = shade[row, col]
            ax.text(col, row, format_value(column.values[row]), ha="center", va="center", fontsize=font,
                    color="white" if value > 0.62 else "black")
    labels = [f"{c.label.replace(' ', chr(10), 1)}\n({'↑' if c.important == 'high' else '↓'} {c.source})"
              for c in columns]
    ax.set_xticks(range(len(columns)), labels, fontsize=7)
    ax.xaxis.tick_top()
    ax.set_yticks(range(layers), [str(layer) for layer in range(layers)], fontsize=7)
    ax.set_ylabel("layer")
    # separate metric families
    sources = [c.source for c in columns]
    for col in range(1, len(columns)):
        if sources[col] != sources[col - 1]:
            ax.axvline(col - 0.5, color="black", linewidth=1.2)
    _colorbar(fig, ax, image, "importance rank within the column (0 = least, 1 = most important)", 0.025)
    ax.set_title(f"{result.model_name}: per-layer metrics (numbers = raw values; ↑/↓: high/low value = important)\n"
                 f"{analysis_settings_line(result.settings)}", fontsize=9)
    return save_figure(fig, path, dpi=130)


def _colorbar(fig, ax, image, label: str, fraction: float) -> None:
    bar = fig.colorbar(image, ax=ax, fraction=fraction, pad=0.01)
    bar.set_label(label, fontsize=7)
    bar.ax.tick_params(labelsize=7)


def _rank_scale(values: torch.Tensor) -> torch.Tensor:
    """Ranks scaled to 0..1 (ties share the lower rank); NaN counts as least important."""
    values = values.double().nan_to_num(float("-inf"))
    if values.numel() < 2:
        return torch.full_like(values, 0.5)
    ranks = (values[None, :] < values[:, None]).sum(dim=1).double()
    return ranks / (values.numel() - 1)


_UNIT_STYLE = {"attention": dict(color="tab:blue", marker="o"), "mlp": dict(color="tab:orange", marker="s"),
               "block": dict(color="tab:green", marker="^")}


def plot_lines(result, path: Path) -> Path:
    """One small chart per metric, x = layer; a log axis where a metric spans orders of magnitude."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    layers = list(range(result.num_layers))
    fig, axes = plt.subplots(2, 4, figsize=(18, 8.4))
    axes = axes.ravel()

    def per_unit(ax, values, title, ylabel):
        for unit in _UNIT_STYLE:
            ax.plot(layers, values[unit], label=unit, markersize=3, linewidth=1.2, **_UNIT_STYLE[unit])
        _auto_scale(ax, [v for series in values.values() for v in series])
        ax.set_title(title, fontsize=9)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.legend(fontsize=7)

    dissimilarity = {unit: [1.0 - v for v in values] for unit, values in result.cosine.items()}
    per_unit(axes[0], dissimilarity, "1 - cos(input, output)  (LLM-Drop; block: ShortGPT BI)", "1 - cosine")
    per_unit(axes[1], result.relative_contribution, "relative contribution ||out - in|| / ||in||  (Csordás)", "ratio")
    per_unit(axes[2], result.l2_norm_change, "L2-norm change | ||out|| - ||in|| |  (LAC)", "hidden-state norm units")
    ax = axes[3]
    ax.plot(range(result.num_layers + 1), result.residual_norm, color="black", marker=".", linewidth=1.2)
    _auto_scale(ax, result.residual_norm)
    ax.set_title("residual-stream norm ||h|| entering layer l (l = L: output)", fontsize=9)
    ax.set_ylabel("mean L2 norm", fontsize=8)

    ax = axes[4]
    # the exit after the last layer is the model itself (KL 0): not drawn on the log axis
    depths = [-1] + layers[:-1]
    kl = [result.logit_lens_kl_embeddings] + result.logit_lens_kl[:-1]
    floor = max(max(kl), 1e-12) * 1e-6
    ax.plot(depths, [max(v, floor) for v in kl], color="tab:purple", marker=".", label="KL(final || exit)")
    ax.set_yscale("log")
    ax.set_ylabel("KL (nats; 0 after the last layer)", fontsize=8)
    ax.set_title("logit lens: early exit after layer l (-1 = embeddings)", fontsize=9)
    twin = ax.twinx()
    twin.plot(layers, result.logit_lens_top1, color="tab:gray", linestyle="--", label="top-1 = final top-1")
    twin.set_ylim(0, 1.3)  # leave the top free for the legend
    twin.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    twin.set_ylabel("top-1 agreement", fontsize=8)
    twin.tick_params(labelsize=7)
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    low, high = ax.get_ylim()
    ax.set_ylim(low, high * (high / low) ** 0.3)
    ax.legend(handles, [h.get_label() for h in handles], fontsize=7, loc="upper center", ncol=2)

    if result.skip_one_loss_increase is not None:
        per_unit(axes[5], result.skip_one_loss_increase, "skip-one (SLEB): loss increase, only this unit skipped",
                 "Δ next-token loss (nats)")
        axes[5].axhline(0, color="gray", linewidth=0.8)
        per_unit(axes[6], result.skip_one_kl, "skip-one: KL(full || skipped), only this unit skipped", "KL (nats)")
    else:
        for ax in axes[5:7]:
            ax.text(0.5, 0.5, "skip-one not measured\n(--no-skip-one)", ha="center", va="center",
                    transform=ax.transAxes, fontsize=10, color="gray")
            ax.set_title("skip-one", fontsize=9)
    per_unit(axes[7], result.zd, "ZD: share of weights with |z| > 1 (low = heavy tails)", "share")
    axes[7].axhline(0.3173, color="gray", linewidth=0.8, linestyle=":")

    for ax in axes:
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("layer", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"{result.model_name}: per-layer metrics — {analysis_settings_line(result.settings)}", fontsize=11)
    return save_figure(fig, path, dpi=120)


def _auto_scale(ax, values: list[float]) -> None:
    """Log axis for positive values spanning > 30x; symmetric log for signed values spanning > 3 decades."""
    finite = [v for v in values if v == v and abs(v) != float("inf")]
    magnitudes = sorted(abs(v) for v in finite if v != 0)
    if not magnitudes:
        return
    if min(finite) > 0:
        if magnitudes[-1] / magnitudes[0] > 30:
            ax.set_yscale("log")
    elif magnitudes[-1] / magnitudes[0] > 1e3:
        threshold = 10 ** math.floor(math.log10(max(magnitudes[len(magnitudes) // 4], magnitudes[-1] * 1e-4)))
        ax.set_yscale("symlog", linthresh=threshold, linscale=0.5)


def plot_angular_distance(result, path: Path) -> Path:
    """Span n (rows) x first layer l (columns): angular distance between the residual entering layer l and the one
    entering layer l+n; the smallest per row (Gromov's choice of the n blocks to cut) is outlined."""
    plt = pyplot()
    from matplotlib.patches import Rectangle

    spans = sorted(result.angular_distance)
    layers = result.num_layers
    grid = torch.full((len(spans), layers), float("nan"))
    for row, n in enumerate(spans):
        values = torch.tensor(result.angular_distance[n])
        grid[row, : values.numel()] = values
    fig, ax = plt.subplots(figsize=(max(7.0, 0.42 * layers + 2.5), max(2.8, 0.45 * len(spans) + 1.8)))
    image = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    finite = grid[torch.isfinite(grid)]
    middle = (finite.min() + finite.max()).item() / 2 if finite.numel() else 0.0
    for row, n in enumerate(spans):
        values = result.angular_distance[n]
        best = min(range(len(values)), key=values.__getitem__)
        for col, value in enumerate(values):
            ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=6 if layers > 24 else 7,
                    color="black" if value > middle else "white")
        ax.add_patch(Rectangle((best - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.8))
    ax.set_xticks(range(layers), [str(layer) for layer in range(layers)], fontsize=7)
    ax.set_yticks(range(len(spans)), [str(n) for n in spans], fontsize=7)
    ax.set_xlabel("first layer of the cut, l")
    ax.set_ylabel("span n (layers cut)")
    _colorbar(fig, ax, image, "arccos(cos(h_l, h_l+n)) / π", 0.03)
    ax.set_title(f"{result.model_name}: angular distance between the residual entering layer l and layer l+n "
                 f"(Gromov et al.)\nsmall = blocks l..l+n-1 change little; red box: smallest per span", fontsize=9)
    return save_figure(fig, path, dpi=130)


def plot_agreement(result, path: Path) -> Path:
    """Spearman rank correlation between block-level importance metrics: do they agree on which layers matter?"""
    plt = pyplot()
    data = result.agreement()
    names, matrix = data["metrics"], torch.tensor(data["spearman"])
    fig, ax = plt.subplots(figsize=(0.85 * len(names) + 3.2, 0.6 * len(names) + 2.0))
    image = ax.imshow(matrix.numpy(), cmap="RdBu", vmin=-1, vmax=1, aspect="auto")
    for i in range(len(names)):
        for j in range(len(names)):
            value = matrix[i, j].item()
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if abs(value) > 0.6 else "black")
    ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02).ax.tick_params(labelsize=7)
    ax.set_title(f"{result.model_name}: do block-level metrics rank layers alike?\n"
                 "Spearman correlation of importance (1 = same order)", fontsize=9)
    return save_figure(fig, path, dpi=130)
