"""Depth analysis: which layers and sublayers matter, by every metric from the literature, on calibration text.

One full-depth forward over the calibration batches (:func:`~skiplm.analysis.activations.trace_residuals` with the logits
kept) feeds every activation metric and the logit lens; the skip-one metric needs one extra pass per skipped unit.
All values are per decoder layer ``l`` (0-based), averaged over every calibration token.

Definitions (``in`` / ``out``: the residual stream entering / leaving the unit; see :mod:`skiplm.analysis.activations`):

=========================  ===========================================================================================
metric (JSON key)          definition
=========================  ===========================================================================================
``cosine``                 mean cos(in, out) per attention / MLP / block (LLM-Drop). High: the unit changes little.
``block_influence``        1 - ``cosine["block"]`` (ShortGPT's Block Influence). High: important.
``relative_contribution``  mean ||out - in|| / ||in|| (Csordás et al.). High: the unit writes a lot.
``l2_norm_change``         mean | ||out|| - ||in|| | (LAC, "Void in Language Models"): the change of the L2 norm of the
                           hidden state; a token whose change is small at a layer treats that layer as a void.
``residual_norm``          mean ||h|| entering each layer and after the last (L+1 values).
``angular_distance``       {n: [d(l, l+n) for l = 0..L-n]}, d = mean arccos(cos(h_l, h_{l+n})) / pi, h_l the residual
                           entering layer l (Gromov et al.). Small: blocks l..l+n-1 are a candidate cut.
``logit_lens_kl``          mean KL(p_final || p_exit(l)), p_exit(l) = softmax of the model's own head (final norm,
                           LM head, final-logit soft-cap if configured) on the residual after layer l.
                           ``logit_lens_kl_embeddings``: the same on the embeddings (before layer 0).
``logit_lens_top1``        share of tokens whose early-exit argmax after layer l equals the final argmax.
``skip_one_loss_increase`` mean next-token loss with only that unit skipped (SLEB-style), minus the full model's.
``skip_one_kl``            mean KL(p_full || p_skipped) per token with only that unit skipped.
``zd``                     share of the unit's weights with |z| > 1, each weight matrix z-scored on its own, counts
                           pooled over the unit's matrices (ZD, "Layer-wise quantization", Dumitru et al.). A
                           Gaussian matrix scores 0.317; heavy tails (a few outsized weights) score lower. Read as
                           low = important, following the paper's "(smaller is better)". Weights only: no data.
=========================  ===========================================================================================
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import metrics
from .activations import trace_residuals
from ..models.adapters import get_adapter
from ..errors import DataError, SkipLMError
from ..plan import SkipSet

log = logging.getLogger(__name__)

UNITS = ("attention", "mlp", "block")


def default_span_max(num_layers: int) -> int:
    return max(1, num_layers // 4)


def analysis_steps(num_layers: int, num_batches: int, skip_one: bool = True) -> int:
    """How many times :func:`analyze` calls ``progress``: one per calibration batch, one for the weight statistics,
    one per depth of the logit lens (L+1), and one per skip-one pass (3L)."""
    return num_batches + 1 + (num_layers + 1) + (3 * num_layers if skip_one else 0)


@dataclasses.dataclass
class AnalysisResult:
    """Per-layer importance metrics of one model on one calibration set (see the module docstring)."""

    num_layers: int
    settings: dict[str, Any]
    full_loss: float
    cosine: dict[str, list[float]]
    block_influence: list[float]
    relative_contribution: dict[str, list[float]]
    l2_norm_change: dict[str, list[float]]
    residual_norm: list[float]
    angular_distance: dict[int, list[float]]
    logit_lens_kl: list[float]
    logit_lens_kl_embeddings: float
    logit_lens_top1: list[float]
    zd: dict[str, list[float]]
    skip_one_loss_increase: dict[str, list[float]] | None = None
    skip_one_kl: dict[str, list[float]] | None = None
    model_name: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "analysis",
            "model": self.model_name,
            "num_layers": self.num_layers,
            "settings": self.settings,
            "full_model": {"loss": self.full_loss, "perplexity": math.exp(self.full_loss)},
            "metrics": {
                "cosine": self.cosine,
                "block_influence": self.block_influence,
                "relative_contribution": self.relative_contribution,
                "l2_norm_change": self.l2_norm_change,
                "residual_norm": self.residual_norm,
                "angular_distance": {str(n): values for n, values in self.angular_distance.items()},
                "logit_lens_kl": self.logit_lens_kl,
                "logit_lens_kl_embeddings": self.logit_lens_kl_embeddings,
                "logit_lens_top1": self.logit_lens_top1,
                "skip_one_loss_increase": self.skip_one_loss_increase,
                "skip_one_kl": self.skip_one_kl,
                "zd": self.zd,
            },
            "definitions": DEFINITIONS,
            "agreement": agreement(self),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AnalysisResult:
        """Read back :meth:`to_json` (e.g. to re-plot an analysis.json without recomputing it)."""
        if not isinstance(data, dict) or data.get("kind") != "analysis":
            raise DataError("not a skiplm analysis: expected the analysis.json that `skiplm analyze` writes.")
        m = data["metrics"]
        return cls(
            num_layers=data["num_layers"],
            settings=data["settings"],
            full_loss=data["full_model"]["loss"],
            cosine=m["cosine"],
            block_influence=m["block_influence"],
            relative_contribution=m["relative_contribution"],
            l2_norm_change=m["l2_norm_change"],
            residual_norm=m["residual_norm"],
            angular_distance={int(n): values for n, values in m["angular_distance"].items()},
            logit_lens_kl=m["logit_lens_kl"],
            logit_lens_kl_embeddings=m["logit_lens_kl_embeddings"],
            logit_lens_top1=m["logit_lens_top1"],
            zd=m["zd"],
            skip_one_loss_increase=m["skip_one_loss_increase"],
            skip_one_kl=m["skip_one_kl"],
            model_name=data.get("model"),
        )

    def logit_lens_gain(self) -> list[float]:
        """How much layer l brings the early exit closer to the final distribution: KL before l minus KL after l."""
        before = [self.logit_lens_kl_embeddings] + self.logit_lens_kl[:-1]
        return [b - a for b, a in zip(before, self.logit_lens_kl)]

    def columns(self) -> list[Column]:
        """The main per-layer metrics, in display order (heatmap, markdown; the terminal shows those ``in_table``)."""
        cols = [
            Column("cos attn", "cosine.attention", self.cosine["attention"], "low", "LLM-Drop"),
            Column("cos mlp", "cosine.mlp", self.cosine["mlp"], "low", "LLM-Drop"),
            Column("BI block", "block_influence", self.block_influence, "high", "ShortGPT"),
            Column("rel attn", "relative_contribution.attention", self.relative_contribution["attention"], "high",
                   "Csordás"),
            Column("rel mlp", "relative_contribution.mlp", self.relative_contribution["mlp"], "high", "Csordás"),
            Column("ΔL2 attn", "l2_norm_change.attention", self.l2_norm_change["attention"], "high", "LAC", False),
            Column("ΔL2 mlp", "l2_norm_change.mlp", self.l2_norm_change["mlp"], "high", "LAC", False),
            Column("ΔL2 block", "l2_norm_change.block", self.l2_norm_change["block"], "high", "LAC"),
            Column("lens KL gain", "derived from logit_lens_kl", self.logit_lens_gain(), "high", "logit lens"),
        ]
        if self.skip_one_loss_increase is not None:
            cols += [
                Column(f"skip Δloss {short}", f"skip_one_loss_increase.{unit}", self.skip_one_loss_increase[unit],
                       "high", "SLEB")
                for unit, short in zip(UNITS, ("attn", "mlp", "block"))
            ]
            cols.append(Column("skip KL block", "skip_one_kl.block", self.skip_one_kl["block"], "high", "SLEB", False))
        cols += [
            Column("ZD attn", "zd.attention", self.zd["attention"], "low", "weights"),
            Column("ZD mlp", "zd.mlp", self.zd["mlp"], "low", "weights"),
        ]
        return cols


@dataclasses.dataclass(frozen=True)
class Column:
    label: str
    key: str  # where the values are in the JSON "metrics"
    values: list[float]
    important: str  # "high" or "low": which end of this metric marks an important layer
    source: str
    in_table: bool = True  # shown in the terminal table too (the heatmap and markdown show every column)

    def importance(self) -> torch.Tensor:
        """Values oriented so that larger = more important by this metric."""
        values = torch.tensor(self.values, dtype=torch.float64)
        return values if self.important == "high" else -values


DEFINITIONS = {
    "cosine": "mean over tokens of cos(unit input, unit output), residual stream; high = the unit changes little",
    "block_influence": "1 - cosine['block'] (ShortGPT); high = important",
    "relative_contribution": "mean ||output - input|| / ||input|| (Csordás et al.)",
    "l2_norm_change": "mean | ||output||_2 - ||input||_2 | (LAC: change of the hidden state's L2 norm)",
    "residual_norm": "mean ||h||_2 entering layer l, and after the last layer (L+1 values, before the final norm)",
    "angular_distance": "n -> [mean arccos(cos(h_l, h_(l+n)))/pi for l = 0..L-n], h_l = residual entering layer l",
    "logit_lens_kl": "mean KL(final || early exit after layer l); early exit = final norm + LM head (+ soft-cap)",
    "logit_lens_top1": "share of tokens whose early-exit argmax after layer l equals the final argmax",
    "skip_one_loss_increase": "mean next-token loss with only that unit skipped minus the full model's loss",
    "skip_one_kl": "mean KL(full || skipped) per token with only that unit skipped",
    "zd": "share of weights with |z| > 1, z-scored per weight matrix, pooled over the unit's matrices (2-D params); "
          "read as low = important (heavy-tailed weights)",
}


@torch.inference_mode()
def analyze(
    model: nn.Module,
    batches: list[torch.Tensor],
    *,
    span_max: int | None = None,
    skip_one: bool = True,
    corpus: str | None = None,
    model_name: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> AnalysisResult:
    """Every per-layer metric of ``model`` on calibration ``batches`` (token ids, [B, T] each, no padding).

    ``span_max``: the largest span n of the angular distance (default L // 4). ``skip_one``: also measure the loss
    increase and KL of skipping each attention, MLP and block alone (3L extra passes over the batches).
    ``progress(description)`` is called :func:`analysis_steps` times.
    """
    if not batches:
        raise DataError("the analysis needs at least one calibration batch.")
    if any(ids.dim() != 2 or ids.shape[1] < 2 for ids in batches):
        raise DataError("calibration batches must be [batch, tokens] token ids with at least 2 tokens per row.")
    num_layers = len(get_adapter(model).decoder_layers(model))
    span_max = default_span_max(num_layers) if span_max is None else span_max
    if not 1 <= span_max <= num_layers:
        raise SkipLMError(f"span_max must be in 1..{num_layers} (the model has {num_layers} layers), got {span_max}.")
    step = progress or (lambda description: None)
    started = time.perf_counter()

    trace = trace_residuals(model, _reporting(batches, step), keep_logits=True)
    full_loss = metrics.next_token_loss(trace.logits, batches)

    zd = {unit: metrics.zd_score(model, unit).tolist() for unit in UNITS}
    step("weight statistics")

    lens_kl, lens_top1 = _logit_lens(model, trace, step)
    if lens_kl[-1] > 1e-3:
        log.warning("the logit lens after the last layer differs from the model's own output (KL %.3g): the early "
                    "exit may not reproduce this model's head, so logit-lens values are approximate.", lens_kl[-1])

    loss_increase = kl_skip = None
    if skip_one:
        loss_increase = {unit: [0.0] * num_layers for unit in UNITS}
        kl_skip = {unit: [0.0] * num_layers for unit in UNITS}
        for layer in range(num_layers):
            for unit in UNITS:
                skips = SkipSet.of(**{"blocks" if unit == "block" else unit: [layer]})
                effect = metrics.skip_effect(model, batches, skips, trace.logits)
                loss_increase[unit][layer] = effect["loss"] - full_loss
                kl_skip[unit][layer] = effect["kl"]
                step(f"skip-one: layer {layer} {unit}")

    tokens = sum(ids.numel() for ids in batches)
    settings = {
        "corpus": corpus,
        "sequences": sum(ids.shape[0] for ids in batches),
        "length": batches[0].shape[1],
        "tokens": tokens,
        "span_max": span_max,
        "skip_one": skip_one,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "seconds": round(time.perf_counter() - started, 2),
    }
    return AnalysisResult(
        num_layers=num_layers,
        settings=settings,
        full_loss=full_loss,
        cosine={unit: metrics.cosine_similarity(trace, unit).tolist() for unit in UNITS},
        block_influence=metrics.block_influence(trace).tolist(),
        relative_contribution={unit: metrics.relative_contribution(trace, unit).tolist() for unit in UNITS},
        l2_norm_change={unit: metrics.l2_norm_change(trace, unit).tolist() for unit in UNITS},
        residual_norm=metrics.residual_norm(trace).tolist(),
        angular_distance={n: metrics.angular_distance(trace, n).tolist() for n in range(1, span_max + 1)},
        logit_lens_kl=lens_kl[1:],
        logit_lens_kl_embeddings=lens_kl[0],
        logit_lens_top1=lens_top1[1:],
        zd=zd,
        skip_one_loss_increase=loss_increase,
        skip_one_kl=kl_skip,
        model_name=model_name,
    )


def _reporting(batches: Iterable[torch.Tensor], step: Callable[[str], None]) -> Iterator[torch.Tensor]:
    """Yield the batches, reporting each one as done when the next is asked for (or the iteration ends)."""
    batches = list(batches)
    for index, ids in enumerate(batches):
        yield ids
        step(f"full-depth pass: batch {index + 1}/{len(batches)}")


def _logit_lens(model, trace, step) -> tuple[list[float], list[float]]:
    """:func:`metrics.logit_lens`, one depth at a time so that progress can be shown: values for depth 0..L."""
    kl, top1 = [], []
    for depth in range(trace.block_in.shape[0]):
        single = dataclasses.replace(trace, block_in=trace.block_in[depth : depth + 1])
        lens = metrics.logit_lens(model, single)
        kl.append(lens["kl"][0].item())
        top1.append(lens["top1"][0].item())
        step(f"logit lens: after layer {depth - 1}" if depth else "logit lens: embeddings")
    return kl, top1


# -- agreement between metrics -----------------------------------------------------------------------------------------
def agreement(result: AnalysisResult) -> dict[str, Any]:
    """Spearman rank correlation between the importance orderings of the block-level metrics (1 = same order)."""
    scores = _block_importances(result)
    names = list(scores)
    matrix = [[round(_spearman(scores[a], scores[b]), 4) for b in names] for a in names]
    return {"metrics": names, "spearman": matrix,
            "note": "each metric oriented so that larger = more important; rank correlation over layers"}


def _block_importances(result: AnalysisResult) -> dict[str, list[float]]:
    scores = {
        "BI (1-cos)": result.block_influence,
        "rel. contribution": result.relative_contribution["block"],
        "ΔL2 (LAC)": result.l2_norm_change["block"],
        "lens KL gain": result.logit_lens_gain(),
        "ZD (low = important)": [-v for v in result.zd["block"]],
    }
    if result.skip_one_loss_increase is not None:
        scores["skip Δloss"] = result.skip_one_loss_increase["block"]
        scores["skip KL"] = result.skip_one_kl["block"]
    return scores


def _ranks(values: list[float]) -> torch.Tensor:
    tensor = torch.tensor(values, dtype=torch.float64)
    ranks = torch.empty_like(tensor)
    ranks[tensor.argsort()] = torch.arange(len(values), dtype=torch.float64)
    return ranks


def _spearman(a: list[float], b: list[float]) -> float:
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = (ra.norm() * rb.norm()).item()
    return (ra @ rb).item() / denominator if denominator else float("nan")


# -- files -----------------------------------------------------------------------------------------------------------
def write_analysis(result: AnalysisResult, out: str | Path, extra: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write analysis.json, analysis.md and the plots into folder ``out``; returns {kind: path}."""
    from ..report.files import markdown_table, write_json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = result.to_json() | (extra or {})
    paths = {"json": write_json(out / "analysis.json", data)}
    columns = result.columns()
    headers = ["layer"] + [f"{c.label} {'↑' if c.important == 'high' else '↓'}" for c in columns]
    rows = [[str(layer)] + [format_value(c.values[layer]) for c in columns] for layer in range(result.num_layers)]
    paths["heatmap"] = plot_heatmap(result, out / "heatmap.png")
    paths["lines"] = plot_lines(result, out / "metrics.png")
    paths["angular"] = plot_angular_distance(result, out / "angular_distance.png")
    paths["agreement"] = plot_agreement(result, out / "agreement.png")
    (out / "analysis.md").write_text(
        f"# Depth analysis, {result.model_name}\n\n{_settings_line(result)}. Full model: loss {result.full_loss:.4f} "
        f"(perplexity {math.exp(result.full_loss):.2f}).\n\nDefinitions: see `definitions` in analysis.json. "
        f"Skip Δloss: increase of the next-token loss when only that unit is skipped. ↑/↓: a high/low value marks an "
        f"important layer.\n\n"
        + markdown_table(headers, rows)
        + "\n![heatmap](heatmap.png)\n\n![metrics](metrics.png)\n\n![angular distance](angular_distance.png)\n\n"
        + "![agreement](agreement.png)\n"
    )
    paths["markdown"] = out / "analysis.md"
    return paths


def _settings_line(result: AnalysisResult) -> str:
    s = result.settings
    return (f"{s['sequences']} sequences x {s['length']} tokens = {s['tokens']} tokens of {s['corpus'] or 'text'}, "
            f"{s['dtype']}, {s['seconds']:.0f} s")


def format_value(value: float, short: bool = False) -> str:
    """About 3 significant digits; ``short``: at most 5 characters where possible (the terminal table)."""
    if value != value:  # NaN
        return "-"
    magnitude = abs(value)
    if magnitude == 0:
        return "0"
    if short:
        if magnitude < 0.01:
            mantissa, exponent = f"{value:.0e}".split("e")
            return f"{mantissa}e{int(exponent)}"
        for digits in (3, 2, 1):
            text = f"{value:.{digits}f}"
            if len(text) <= 5:
                return text
        return f"{value:.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    if magnitude >= 0.01:
        return f"{value:.3f}"
    return f"{value:.1e}"


# -- plots -------------------------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_heatmap(result: AnalysisResult, path: Path) -> Path:
    """Layers x metrics; colour = the layer's importance rank by that metric (per column, darker = more important;
    ranks, not min-max, so that one outlier layer does not wash out the rest), text = the raw value."""
    plt = _pyplot()
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
    bar = fig.colorbar(image, ax=ax, fraction=0.025, pad=0.01)
    bar.set_label("importance rank within the column (0 = least, 1 = most important)", fontsize=7)
    bar.ax.tick_params(labelsize=7)
    ax.set_title(f"{result.model_name}: per-layer metrics (numbers = raw values; ↑/↓: high/low value = important)\n"
                 f"{_settings_line(result)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def _rank_scale(values: torch.Tensor) -> torch.Tensor:
    """Ranks scaled to 0..1 (ties share the lower rank); NaN counts as least important."""
    values = values.double().nan_to_num(float("-inf"))
    if values.numel() < 2:
        return torch.full_like(values, 0.5)
    ranks = (values[None, :] < values[:, None]).sum(dim=1).double()
    return ranks / (values.numel() - 1)


_UNIT_STYLE = {"attention": dict(color="tab:blue", marker="o"), "mlp": dict(color="tab:orange", marker="s"),
               "block": dict(color="tab:green", marker="^")}


def plot_lines(result: AnalysisResult, path: Path) -> Path:
    """One small chart per metric, x = layer; a log axis where a metric spans orders of magnitude."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    layers = list(range(result.num_layers))
    fig, axes = plt.subplots(2, 4, figsize=(18, 8.4))
    axes = axes.ravel()

    def per_unit(ax, values, title, ylabel):
        for unit in UNITS:
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
    fig.suptitle(f"{result.model_name}: per-layer metrics — {_settings_line(result)}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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


def plot_angular_distance(result: AnalysisResult, path: Path) -> Path:
    """Span n (rows) x first layer l (columns): angular distance between the residual entering layer l and the one
    entering layer l+n; the smallest per row (Gromov's choice of the n blocks to cut) is outlined."""
    plt = _pyplot()
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
    bar = fig.colorbar(image, ax=ax, fraction=0.03, pad=0.01)
    bar.set_label("arccos(cos(h_l, h_l+n)) / π", fontsize=7)
    bar.ax.tick_params(labelsize=7)
    ax.set_title(f"{result.model_name}: angular distance between the residual entering layer l and layer l+n "
                 f"(Gromov et al.)\nsmall = blocks l..l+n-1 change little; red box: smallest per span", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def plot_agreement(result: AnalysisResult, path: Path) -> Path:
    """Spearman rank correlation between block-level importance metrics: do they agree on which layers matter?"""
    plt = _pyplot()
    data = agreement(result)
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
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
