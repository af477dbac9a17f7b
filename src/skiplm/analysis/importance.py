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
from ..report.files import analysis_markdown, write_json, write_text
from ..report.plots.analysis import plot_analysis

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

    def agreement(self) -> dict[str, Any]:
        """How the block-level metrics agree on which layers matter (see :func:`agreement`)."""
        return agreement(self)

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

    def most_and_least_important(self, count: int = 3) -> tuple[list[int], list[int]]:
        """The ``count`` most important layers by this metric (most first) and the ``count`` least (least last)."""
        order = self.importance().argsort(descending=True).tolist()
        return order[:count], order[-count:]


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
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": write_json(out / "analysis.json", result.to_json() | (extra or {}))}
    paths.update(plot_analysis(result, out))
    paths["markdown"] = write_text(out / "analysis.md", analysis_markdown(result))
    return paths
